//! A user-space relay that delays a host's frames (this kernel has no
//! `sch_netem`): the host's bridge port is taken off the bridge and joined
//! to it again through two packet sockets in the bridge's namespace, which
//! pass every frame on after a delay of `base` plus a random share of
//! `jitter`, in order (a frame never overtakes the one before it, as on a
//! Wi-Fi link whose delay swings: a late frame holds up those behind it).
//!
//! The sockets use `PACKET_VNET_HDR`: a frame read carries the kernel's
//! offload header (a TCP segment of up to 64 KiB, its checksum not yet
//! filled in), and written back with it, so the kernel segments and checks
//! it on the way out as it would have.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SOL_PACKET: libc::c_int = 263;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// A raw packet socket bound to interface `name` (in the calling thread's
/// namespace), reading and writing frames with their offload header.
fn packet_socket(name: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(index != 0, "no interface {name}");
    let one: libc::c_int = 1;
    for opt in [PACKET_VNET_HDR, PACKET_IGNORE_OUTGOING] {
        // SAFETY: an int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_PACKET,
                opt,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert!(
            r == 0,
            "packet socket option {opt}: {}",
            std::io::Error::last_os_error()
        );
    }
    // Woken every 50 ms to see whether the relay is to stop.
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: a timeval of the right size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    // SAFETY: zeroed is a valid sockaddr_ll; the fields set are the ones
    // bind(2) reads.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: a sockaddr_ll of the right size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert!(
        r == 0,
        "bind to {name}: {}",
        std::io::Error::last_os_error()
    );
    fd
}

/// The delays of one direction: `base` plus up to `jitter`, never before
/// the previous frame's.
struct Schedule {
    base: Duration,
    jitter: Duration,
    last: Instant,
}

impl Schedule {
    fn next(&mut self, now: Instant) -> Instant {
        let extra = self.jitter.mul_f64(rand::random::<f64>());
        let at = (now + self.base + extra).max(self.last);
        self.last = at;
        at
    }
}

/// Relays frames from `from` to `to` (both named interfaces of the
/// calling thread's namespace) until `stop`.
fn relay(from: &str, to: &str, base: Duration, jitter: Duration, stop: Arc<AtomicBool>) -> u64 {
    let (rx, tx) = (packet_socket(from), packet_socket(to));
    let mut schedule = Schedule {
        base,
        jitter,
        last: Instant::now(),
    };
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 70 * 1024];
    let mut relayed = 0;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while let Some((at, _)) = queue.front()
            && *at <= now
        {
            let (_, frame) = queue.pop_front().unwrap();
            // SAFETY: a send of an owned buffer.
            let n = unsafe { libc::send(tx.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            relayed += u64::from(n > 0);
        }
        // Wait for a frame, but no longer than the next one is due.
        let wait = queue.front().map_or(Duration::from_millis(50), |(at, _)| {
            at.saturating_duration_since(now)
        });
        let mut pfd = libc::pollfd {
            fd: rx.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_millis().clamp(0, 50) as libc::c_int;
        // SAFETY: one pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            continue;
        }
        // SAFETY: a receive into an owned buffer of that length.
        let n = unsafe { libc::recv(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 {
            let at = schedule.next(Instant::now());
            queue.push_back((at, buf[..n as usize].to_vec()));
        }
    }
    relayed
}

/// A relay running in a namespace; stopped (and its threads joined) when
/// dropped.
pub struct Relay {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<u64>>,
}

impl Relay {
    /// Starts relaying between interfaces `a` and `b` of namespace `ns`,
    /// both ways, with the given delay.
    pub fn start(ns: &str, a: &str, b: &str, base: Duration, jitter: Duration) -> Relay {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (from, to) in [(a, b), (b, a)] {
            let (from, to, stop) = (from.to_owned(), to.to_owned(), stop.clone());
            threads.push(super::in_namespace(ns, move || {
                relay(&from, &to, base, jitter, stop)
            }));
        }
        Relay { stop, threads }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
