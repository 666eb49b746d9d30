//! Network-change notifications: the OS says a link or an address
//! changed, and the node rescans its interfaces at once instead of at its
//! next periodic rescan (`Config::interface_rescan`, which stays as the
//! fallback and the only source where there are no notifications).
//!
//! On Linux and Android this is a netlink socket (the `netlink-sys` crate)
//! subscribed to link and address changes. The messages are not parsed:
//! any of them means "look again", and the rescan finds what changed (a
//! link that came back up, an address added or removed). A burst of
//! messages makes one rescan. On macOS and iOS it is a routing socket
//! (`PF_ROUTE`, through socket2), whose address and interface messages do
//! the same (its route messages, which include every ARP entry there, are
//! skipped). Elsewhere (Windows) there is no watch: the periodic rescan
//! (see docs/PLATFORMS.md).

/// A source of "the network changed" signals.
pub(crate) struct Watch {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket: Option<netlink_sys::TokioSocket>,
    #[cfg(any(target_os = "macos", target_os = "ios"))]
    socket: Option<tokio::io::unix::AsyncFd<socket2::Socket>>,
}

#[cfg(any(target_os = "macos", target_os = "ios"))]
mod route {
    use std::io::Read;

    use socket2::{Domain, Socket, Type};
    use tokio::io::unix::AsyncFd;
    use tracing::warn;

    /// `rt_msghdr.rtm_type` values that concern interfaces: an address
    /// added or removed (`RTM_NEWADDR`, `RTM_DELADDR`), an interface's
    /// state (`RTM_IFINFO`). From XNU's net/route.h, shared by macOS and
    /// iOS; the libc crate has them for macOS only.
    const KINDS: [u8; 3] = [0xc, 0xd, 0xe];

    // `AsyncFd::register`, the replacement of `AsyncFd::new`, is newer
    // than the oldest tokio this crate supports; the fd is owned by the
    // `Socket` inside, so what `new` is deprecated for (an fd closed behind
    // its back) cannot happen here.
    #[allow(deprecated)]
    pub(super) fn open() -> Option<AsyncFd<Socket>> {
        let socket = Socket::new(Domain::from(libc::PF_ROUTE), Type::RAW, None).and_then(|s| {
            s.set_nonblocking(true)?;
            AsyncFd::new(s)
        });
        match socket {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "no network-change notifications; interfaces are rescanned periodically only");
                None
            }
        }
    }

    /// Waits for an address or interface message, then takes whatever
    /// else is queued, so that a burst makes one rescan.
    pub(super) async fn changed(socket: &AsyncFd<Socket>) {
        let mut buf = [0u8; 2048];
        let mut relevant = false;
        loop {
            let Ok(mut ready) = socket.readable().await else {
                return std::future::pending().await;
            };
            loop {
                let read = ready.try_io(|s| {
                    let mut socket: &Socket = s.get_ref();
                    socket.read(&mut buf)
                });
                match read {
                    Ok(Ok(n)) if n >= 4 => {
                        // The message's type is its fourth byte.
                        relevant |= KINDS.contains(&buf[3]);
                    }
                    Ok(_) => {}
                    // Drained (or failed): report what the burst held.
                    Err(_would_block) => break,
                }
            }
            if relevant {
                return;
            }
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod netlink {
    use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols};
    use tracing::{debug, warn};

    /// rtnetlink multicast groups (linux/rtnetlink.h): link state, IPv4
    /// and IPv6 addresses.
    const RTMGRP_LINK: u32 = 0x1;
    const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    const RTMGRP_IPV6_IFADDR: u32 = 0x100;

    /// A message is read only to know that one came: its start is enough
    /// (a longer one is truncated, which is fine).
    const READ: usize = 512;

    pub(super) fn open() -> Option<TokioSocket> {
        let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
        let socket = TokioSocket::new(protocols::NETLINK_ROUTE).and_then(|mut s| {
            s.socket_mut().bind(&SocketAddr::new(0, groups))?;
            Ok(s)
        });
        match socket {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "no network-change notifications; interfaces are rescanned periodically only");
                None
            }
        }
    }

    /// Waits for the next change notification, then takes whatever else
    /// is queued, so that a burst makes one rescan.
    pub(super) async fn changed(socket: &TokioSocket) {
        let mut buf = Vec::with_capacity(READ);
        if let Err(e) = socket.recv(&mut buf).await {
            // Most likely ENOBUFS: notifications were lost, so something
            // changed; the rescan finds what.
            debug!(error = %e, "netlink receive error");
        }
        loop {
            buf.clear();
            // The socket is non-blocking: an empty queue is `WouldBlock`.
            match socket.socket_ref().recv(&mut buf, 0) {
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
}

impl Watch {
    /// Starts watching where the OS can tell; without it (another OS, or
    /// the socket refused) the node relies on its periodic rescan.
    pub(crate) fn new() -> Watch {
        Watch {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            socket: netlink::open(),
            #[cfg(any(target_os = "macos", target_os = "ios"))]
            socket: route::open(),
        }
    }

    /// Resolves when the OS reports a change of links or addresses; never
    /// where nothing is watched.
    pub(crate) async fn changed(&mut self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(s) = &self.socket {
            return netlink::changed(s).await;
        }
        #[cfg(any(target_os = "macos", target_os = "ios"))]
        if let Some(s) = &self.socket {
            return route::changed(s).await;
        }
        std::future::pending::<()>().await
    }
}
