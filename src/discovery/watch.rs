//! Network-change notifications: the OS says a link or an address
//! changed, and the node rescans its interfaces at once instead of at its
//! next periodic rescan (`Config::interface_rescan`, which stays as the
//! fallback and the only source where there are no notifications).
//!
//! On Linux and Android this is a netlink socket (the `netlink-sys` crate)
//! subscribed to link and address changes. The messages are not parsed:
//! any of them means "look again", and the rescan finds what changed (a
//! link that came back up, an address added or removed). A burst of
//! messages makes one rescan. Elsewhere nothing is watched (see
//! docs/PLATFORMS.md).

/// A source of "the network changed" signals.
pub(crate) struct Watch {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket: Option<netlink_sys::TokioSocket>,
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
        }
    }

    /// Resolves when the OS reports a change of links or addresses; never
    /// where nothing is watched.
    pub(crate) async fn changed(&mut self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(s) = &self.socket {
            return netlink::changed(s).await;
        }
        std::future::pending::<()>().await
    }
}
