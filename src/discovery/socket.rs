//! Discovery sockets (socket2) and the interface scan (if-addrs).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

use super::machine::Target;
use crate::config::InterfaceSelection;

/// One address of a local interface, as the scan saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IfaceAddr {
    pub(crate) name: String,
    pub(crate) ip: IpAddr,
    /// The interface's index (the scope of its IPv6 link-local address);
    /// 0 where unknown.
    pub(crate) index: u32,
    pub(crate) prefix_len: u8,
    pub(crate) broadcast: Option<Ipv4Addr>,
    pub(crate) loopback: bool,
    pub(crate) up: bool,
    pub(crate) p2p: bool,
}

/// Whether an interface can carry traffic now (its link is up).
///
/// On Unix `if-addrs` reads the `IFF_RUNNING` flag: "up" when set, and
/// "unknown" when not (a cable out, Wi-Fi gone, a link set down), so only
/// "up" counts. Windows reports the real operational state, where
/// loopback and some virtual links say "unknown": there only a definite
/// "not up" state excludes an interface.
fn is_up(status: &if_addrs::IfOperStatus) -> bool {
    use if_addrs::IfOperStatus as S;
    if cfg!(unix) {
        *status == S::Up
    } else {
        !matches!(
            status,
            S::Down | S::LowerLayerDown | S::NotPresent | S::Dormant
        )
    }
}

/// Lists the IPv4 and IPv6 addresses of all local interfaces.
pub(crate) fn scan() -> io::Result<Vec<IfaceAddr>> {
    Ok(if_addrs::get_if_addrs()?
        .into_iter()
        .map(|i| {
            let (ip, prefix_len, broadcast) = match &i.addr {
                if_addrs::IfAddr::V4(v4) => (IpAddr::V4(v4.ip), v4.prefixlen, v4.broadcast),
                if_addrs::IfAddr::V6(v6) => (IpAddr::V6(v6.ip), v6.prefixlen, None),
            };
            IfaceAddr {
                name: i.name.clone(),
                ip,
                index: i.index.unwrap_or(0),
                prefix_len,
                broadcast,
                loopback: i.is_loopback(),
                up: is_up(&i.oper_status),
                p2p: i.is_p2p(),
            }
        })
        .collect())
}

/// Picks the broadcast targets among the scanned addresses.
///
/// Named interfaces are used whatever their kind (so a test can name `lo`);
/// without names, every interface that is not point-to-point and not
/// loopback (unless asked for). Interfaces that are down are kept, marked
/// down: nothing is sent on them, but they count as new when they come back.
/// A subnet with no broadcast address (/31, /32) is skipped.
pub(crate) fn select_targets(addrs: &[IfaceAddr], sel: &InterfaceSelection) -> Vec<Target> {
    let selected = |a: &&IfaceAddr| {
        if sel.exclude.contains(&a.name) {
            return false;
        }
        if sel.loopback_only {
            return a.loopback;
        }
        if !sel.include.is_empty() {
            return sel.include.contains(&a.name);
        }
        !a.p2p && (!a.loopback || sel.loopback)
    };
    let v4 = addrs
        .iter()
        .filter(selected)
        .filter_map(|a| match a.ip {
            IpAddr::V4(ip) => Some((a, ip)),
            IpAddr::V6(_) => None,
        })
        .filter(|(a, _)| a.prefix_len < 31)
        // No broadcast address (a cellular link, Android's CLAT): nobody to
        // reach by broadcast, and sending would wake the modem for nothing.
        // Loopback has none either, and is used when asked for.
        .filter(|(a, _)| a.broadcast.is_some() || a.loopback)
        .map(|(a, ip)| {
            let host_mask = u32::MAX >> a.prefix_len;
            let computed = Ipv4Addr::from(u32::from(ip) | host_mask);
            let mut t = Target::v4(&a.name, ip, a.prefix_len, a.broadcast.unwrap_or(computed));
            t.up = a.up;
            t
        });
    // IPv6: one target per interface, its link-local address (what the
    // multicast group is reached from, and what peers on the link use);
    // never loopback, which has no link-local address or multicast.
    let v6 = addrs
        .iter()
        .filter(selected)
        .filter(|a| !a.loopback && a.index != 0)
        .filter_map(|a| match a.ip {
            IpAddr::V6(ip) if ip.is_unicast_link_local() => Some((a, ip)),
            _ => None,
        })
        .map(|(a, ip)| {
            let mut t = Target::v6(&a.name, ip, a.index);
            t.up = a.up;
            t
        });
    let mut out: Vec<Target> = v4.chain(v6).collect();
    out.sort_by(|a, b| (&a.interface, a.addr).cmp(&(&b.interface, b.addr)));
    out.dedup_by(|a, b| a.interface == b.interface && a.destination(0) == b.destination(0));
    out
}

/// The socket every node of the host shares on the discovery port: it
/// receives broadcasts (probes, start announces, goodbyes).
///
/// `SO_REUSEADDR` and `SO_REUSEPORT` let several nodes share the port; the
/// kernel hands each broadcast to all of them. A unicast datagram to the port
/// would reach only one, which is why replies never go there (see
/// [`bind_unicast`]).
///
/// With `device` (see [`bound_device`]) the socket takes only what arrives
/// on that interface.
pub(crate) fn bind_shared(port: u16, device: Option<&str>) -> io::Result<UdpSocket> {
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    let s = udp_socket()?;
    s.set_reuse_address(true)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    s.set_reuse_port(true)?;
    bind_to_device(&s, device)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// The node's own socket on an ephemeral port: it sends probes, announces
/// and goodbyes, and receives the unicast replies to its probes, which
/// therefore always reach the node that asked.
pub(crate) fn bind_unicast(device: Option<&str>) -> io::Result<UdpSocket> {
    let s = udp_socket()?;
    bind_to_device(&s, device)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).into())?;
    UdpSocket::from_std(s.into())
}

/// The sockets of the sessions' liveness datagrams (PROTOCOL.md §7): one
/// for IPv4 on an ephemeral port and, with `v6`, one for IPv6 on the same
/// port number (a hello names one port for both), or `None` if no port
/// free for both was found in a few tries.
pub(crate) fn bind_liveness(
    device: Option<&str>,
    v6: bool,
) -> io::Result<(UdpSocket, Option<UdpSocket>)> {
    let mut four = bind_unicast(device)?;
    if !v6 {
        return Ok((four, None));
    }
    for _ in 0..8 {
        let port = four.local_addr()?.port();
        let six = udp6_socket().and_then(|s| {
            bind_to_device(&s, device)?;
            s.bind(&SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)).into())?;
            UdpSocket::from_std(s.into())
        });
        match six {
            Ok(six) => return Ok((four, Some(six))),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => four = bind_unicast(device)?,
            Err(_) => break,
        }
    }
    Ok((four, None))
}

/// The IPv6 sockets: the shared one on the discovery port (it joins
/// [`IPV6_GROUP`](super::machine::IPV6_GROUP) on each interface, see
/// [`join_group`]), and the node's own on an ephemeral port. IPv6 only
/// (`IPV6_V6ONLY`): IPv4 has its own sockets.
pub(crate) fn bind_udp6(port: u16, device: Option<&str>) -> io::Result<(UdpSocket, UdpSocket)> {
    let shared = udp6_socket()?;
    shared.set_reuse_address(true)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    shared.set_reuse_port(true)?;
    bind_to_device(&shared, device)?;
    shared.bind(&SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)).into())?;
    let own = udp6_socket()?;
    bind_to_device(&own, device)?;
    own.bind(&SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0)).into())?;
    Ok((
        UdpSocket::from_std(shared.into())?,
        UdpSocket::from_std(own.into())?,
    ))
}

/// Joins the discovery group on interface `index` (idempotent: joining
/// twice is `AddrInUse`, taken as done).
pub(crate) fn join_group(s: &UdpSocket, index: u32) -> io::Result<()> {
    match s.join_multicast_v6(&super::machine::IPV6_GROUP, index) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(()),
        r => r,
    }
}

fn udp6_socket() -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(true)?;
    // Other nodes on this host hear our multicast too.
    s.set_multicast_loop_v6(true)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// The IPv6 TCP listener, on the same port as the IPv4 one (`IPV6_V6ONLY`,
/// so the two do not collide).
pub(crate) fn bind_listener6(port: u16, device: Option<&str>) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    s.set_only_v6(true)?;
    #[cfg(unix)]
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    bind_to_device(&s, device)?;
    s.bind(&SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)).into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// The TCP listener sessions are accepted on; with `device`, only
/// connections arriving on that interface reach it (others are reset by
/// the kernel).
pub(crate) fn bind_listener(port: u16, device: Option<&str>) -> io::Result<TcpListener> {
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    // As std and tokio do: a restarted node can take its port again at once.
    #[cfg(unix)]
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    bind_to_device(&s, device)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// The interface a node's sockets are bound to: the one interface the
/// configuration names, on the platforms that bind a socket to a device
/// (Linux and Android, `SO_BINDTODEVICE`). With several named interfaces,
/// or elsewhere, the sockets are not bound and the node filters instead:
/// datagrams and connections from outside the selected subnets are
/// dropped (see `Supervisor::accepted`).
///
/// Loopback only: the loopback interface of `addrs` (the scan at start),
/// found by its flag.
pub(crate) fn bound_device(sel: &InterfaceSelection, addrs: &[IfaceAddr]) -> Option<String> {
    if !cfg!(any(target_os = "linux", target_os = "android")) {
        return None;
    }
    if sel.loopback_only {
        return addrs.iter().find(|a| a.loopback).map(|a| a.name.clone());
    }
    match sel.include.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// Whether sockets can be bound to `device`: it exists, and the process
/// may (Linux before 5.7 asks for `CAP_NET_RAW`).
pub(crate) fn check_device(device: &str) -> io::Result<()> {
    bind_to_device(&udp_socket()?, Some(device))
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn bind_to_device(s: &Socket, device: Option<&str>) -> io::Result<()> {
    match device {
        Some(d) => s.bind_device(Some(d.as_bytes())),
        None => Ok(()),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn bind_to_device(_: &Socket, _: Option<&str>) -> io::Result<()> {
    Ok(())
}

fn udp_socket() -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_broadcast(true)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address as the scan reports it: loopback without a broadcast
    /// address, the others with their subnet's.
    fn a(name: &str, ip: [u8; 4], prefix: u8) -> IfaceAddr {
        let host_mask = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
        IfaceAddr {
            name: name.into(),
            ip: ip.into(),
            index: 0,
            prefix_len: prefix,
            broadcast: (name != "lo").then(|| Ipv4Addr::from(u32::from_be_bytes(ip) | host_mask)),
            loopback: name == "lo",
            up: true,
            p2p: false,
        }
    }

    #[test]
    fn default_selection_skips_loopback_and_p2p_and_marks_down() {
        let mut down = a("wlan0", [192, 168, 1, 5], 24);
        down.up = false;
        let mut tun = a("tun0", [10, 8, 0, 2], 24);
        tun.p2p = true;
        let addrs = vec![
            a("lo", [127, 0, 0, 1], 8),
            a("eth0", [10, 0, 0, 5], 24),
            down,
            tun,
            a("eth1", [172, 16, 0, 1], 32),
        ];
        let t = select_targets(&addrs, &InterfaceSelection::default());
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].interface, "eth0");
        assert_eq!(t[0].broadcast, Ipv4Addr::new(10, 0, 0, 255));
        assert!(t[0].up);
        assert_eq!(t[1].interface, "wlan0");
        assert!(!t[1].up, "kept, marked down");
    }

    #[test]
    fn named_interfaces_include_loopback_and_exclude_others() {
        let addrs = vec![a("lo", [127, 0, 0, 1], 8), a("eth0", [10, 0, 0, 5], 24)];
        let sel = InterfaceSelection {
            include: vec!["lo".into()],
            ..Default::default()
        };
        let t = select_targets(&addrs, &sel);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].broadcast, Ipv4Addr::new(127, 255, 255, 255));
        let sel = InterfaceSelection {
            exclude: vec!["eth0".into()],
            loopback: true,
            ..Default::default()
        };
        assert_eq!(select_targets(&addrs, &sel)[0].interface, "lo");
    }

    #[test]
    fn loopback_only_goes_by_the_flag_not_the_name() {
        // macOS calls it lo0.
        let mut lo0 = a("lo0", [127, 0, 0, 1], 8);
        lo0.loopback = true;
        lo0.broadcast = None;
        let addrs = vec![lo0, a("en0", [192, 168, 1, 9], 24)];
        let sel = InterfaceSelection {
            loopback: true,
            loopback_only: true,
            ..Default::default()
        };
        let t = select_targets(&addrs, &sel);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].interface, "lo0");
        assert!(sel.is_restricted());
        if cfg!(any(target_os = "linux", target_os = "android")) {
            assert_eq!(bound_device(&sel, &addrs).as_deref(), Some("lo0"));
        }
        let open = InterfaceSelection::default();
        assert!(!open.is_restricted());
        assert_eq!(bound_device(&open, &addrs), None);
    }

    #[test]
    fn interfaces_without_a_broadcast_address_are_skipped() {
        // A cellular link: an address, no broadcast. Named or not, nothing
        // is broadcast on it.
        let mut rmnet = a("rmnet0", [100, 64, 3, 7], 24);
        rmnet.broadcast = None;
        assert!(select_targets(&[rmnet.clone()], &InterfaceSelection::default()).is_empty());
        let named = InterfaceSelection {
            include: vec!["rmnet0".into()],
            ..Default::default()
        };
        assert!(select_targets(&[rmnet], &named).is_empty());
    }

    #[test]
    fn ipv6_uses_one_link_local_address_per_interface() {
        let v6 = |name: &str, ip: &str, index: u32| IfaceAddr {
            name: name.into(),
            ip: ip.parse().unwrap(),
            index,
            prefix_len: 64,
            broadcast: None,
            loopback: name == "lo",
            up: true,
            p2p: false,
        };
        let mut tun = v6("tun0", "fe80::9", 7);
        tun.p2p = true;
        let addrs = vec![
            a("eth0", [10, 0, 0, 5], 24),
            v6("eth0", "fe80::1", 2),
            v6("eth0", "fd00::1", 2),
            v6("eth0", "2001:db8::1", 2),
            v6("lo", "::1", 1),
            v6("wlan0", "fe80::2", 3),
            tun,
        ];
        let t = select_targets(&addrs, &InterfaceSelection::default());
        let v6: Vec<_> = t.iter().filter(|t| t.addr.is_ipv6()).collect();
        assert_eq!(v6.len(), 2, "{t:?}");
        assert_eq!(v6[0].addr, "fe80::1".parse::<IpAddr>().unwrap());
        assert_eq!(
            v6[0].destination(47474),
            "[ff02::6c62%2]:47474".parse().unwrap()
        );
        assert_eq!((v6[1].interface.as_str(), v6[1].scope), ("wlan0", 3));
        assert_eq!(t.iter().filter(|t| t.addr.is_ipv4()).count(), 1);
        // Loopback only: no IPv6 (loopback has no link-local multicast).
        let lo = InterfaceSelection {
            loopback: true,
            loopback_only: true,
            ..Default::default()
        };
        assert!(select_targets(&addrs, &lo).is_empty());
    }

    #[test]
    fn the_os_broadcast_address_wins() {
        let mut x = a("eth0", [10, 0, 0, 5], 24);
        x.broadcast = Some(Ipv4Addr::new(10, 0, 0, 127));
        let t = select_targets(&[x], &InterfaceSelection::default());
        assert_eq!(t[0].broadcast, Ipv4Addr::new(10, 0, 0, 127));
    }

    #[test]
    fn scan_sees_loopback() {
        let addrs = scan().unwrap();
        assert!(addrs.iter().any(|a| a.loopback && a.ip.is_loopback()));
    }
}
