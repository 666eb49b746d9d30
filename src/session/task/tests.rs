//! Tests of the connection task: its size, and each phase driven over a
//! real loopback socket against a scripted peer.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::Span;

use super::*;
use crate::queue::Queue;
use crate::session::mailbox::Mailbox;
use crate::session::supervision::NodeContext;
use crate::session::timer::Timer;

fn new_connection(reports: mpsc::UnboundedSender<Report>) -> NewConnection {
    NewConnection {
        id: 0,
        session: Arc::new(crate::testing::session_config()),
        expected: None,
        outbound: false,
        max_frame: 1024,
        write_timeout: Duration::from_secs(1),
        node: Arc::new(NodeContext {
            events: Arc::new(Queue::new(1)),
            timer: Arc::new(Timer::new(clock::now())),
            counters: Default::default(),
        }),
        reports,
        mailbox: Arc::new(Mailbox::new(4)),
    }
}

/// Every idle session holds its task's future: keep it small (the
/// 10 000-session memory budget is 4 KiB per session, all included).
#[test]
fn the_session_task_stays_small() {
    let (reports, _rx) = mpsc::unbounded_channel();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let addr = s.peer_addr().unwrap();
        let task = ConnectionTask::new(new_connection(reports), Ok(s), addr, Span::none());
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "session task is {size} bytes");
    });
}
