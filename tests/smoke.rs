//! End to end: 5,000 idle connections held by one process, which stays
//! responsive, and whose per-connection memory stays within the budget.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use tungstenite::Message;

#[test]
fn five_thousand_idle_connections_and_still_responsive() {
    const IDLE: usize = 5000;
    let server = Server::start(&["--echo", "--shards", "2"]);
    let rss_before = server.rss_bytes();
    // Pipeline the upgrades: send every request, then read every response.
    let request = upgrade_request("/ws?topics=user.42", "");
    let mut idle: Vec<TcpStream> = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let mut s = TcpStream::connect(server.ws).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        idle.push(s);
    }
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = read_head(s);
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    }
    server.wait_for("all connections counted", Duration::from_secs(30), |s| {
        s.total("connections") == IDLE as u64
    });
    // Still serving: a new client gets its echoes, the control plane answers.
    let mut ws = ws_connect(&server, "/echo");
    for i in 0..100 {
        ws.send(Message::text(format!("ping {i}"))).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(format!("ping {i}")));
    }
    assert_eq!(server.control_get("/healthz").0, 200);
    let per_connection = server.rss_bytes().saturating_sub(rss_before) / IDLE as u64;
    // The records are 48 bytes; allow for slab growth and allocator slack, but
    // catch any per-connection buffer (a 4 KiB one would show up as > 4096).
    assert!(
        per_connection < 1024,
        "RSS grew {per_connection} bytes per idle connection"
    );
    drop(idle);
    server.wait_for("the idle connections to go", Duration::from_secs(30), |s| {
        s.total("connections") <= 1
    });
}
