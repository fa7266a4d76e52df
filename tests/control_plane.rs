//! End to end: a protected control plane. With `--control-token`, publishing
//! needs the bearer token; `--metrics` serves only what a scraper needs; a
//! control address off loopback without a token refuses to start; `/readyz`
//! turns 503 when the server drains; `/stats` never shows the token.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const TOKEN: &str = "s3cret-control-token-0123";

/// POSTs an event with an optional `Authorization` header; returns (status, body).
fn publish_with(addr: SocketAddr, topic: &str, authorization: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    write!(
        s,
        "POST /publish/{topic} HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: 1\r\nConnection: close\r\n\r\n1"
    )
    .unwrap();
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    parse_response(&response)
}

#[test]
fn publishing_needs_the_control_token() {
    let server = Server::start(&["--control-token", TOKEN]);
    let (status, body) = publish_with(server.control, "t", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Bearer"), "{body}");
    let wrong = format!("Bearer {}x", &TOKEN[..TOKEN.len() - 1]);
    assert_eq!(publish_with(server.control, "t", Some(&wrong)).0, 401);
    assert_eq!(
        publish_with(server.control, "t", Some(TOKEN)).0,
        401,
        "no scheme"
    );
    let (status, body) = publish_with(server.control, "t", Some(&format!("Bearer {TOKEN}")));
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.total("control_unauthorized_total"), 3);
    // Reading stays open; the token is not shown.
    let stats = server.stats();
    assert_eq!(stats["settings"]["control-token"], "<redacted>");
    assert!(!stats.to_string().contains(TOKEN));
    assert_eq!(server.control_get("/metrics").0, 200);
    assert_eq!(server.control_get("/readyz"), (200, "ready\n".into()));
}

#[test]
fn the_token_can_come_from_a_file() {
    let path = std::env::temp_dir().join(format!("ringgate-token-{}", std::process::id()));
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    let server = Server::start(&["--control-token-file", path.to_str().unwrap()]);
    assert_eq!(publish_with(server.control, "t", None).0, 401);
    let (status, _) = publish_with(server.control, "t", Some(&format!("Bearer {TOKEN}")));
    assert_eq!(status, 200);
    let _ = std::fs::remove_file(path);
}

#[test]
fn the_metrics_listener_serves_scrapes_and_nothing_else() {
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let metrics = server
        .metrics
        .expect("the ready line names the metrics address");
    let (status, body) = http_get(metrics, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("ringgate_connections{shard=\"0\"}"), "{body}");
    assert_eq!(http_get(metrics, "/healthz").0, 200);
    assert_eq!(http_get(metrics, "/readyz").0, 200);
    assert_eq!(http_get(metrics, "/stats").0, 404);
    assert_eq!(publish_with(metrics, "t", None).0, 404);
    assert_eq!(
        post(metrics, "/publish", b"{\"topic\":\"t\",\"data\":1}\n").0,
        404
    );
    // The dashboard and the figures it reads (tests/dashboard.rs drives it).
    let (status, page) = http_get(metrics, "/dashboard");
    assert_eq!(status, 200);
    assert!(
        page.contains("<title>ringgate</title>")
            && !page.contains("http://")
            && !page.contains("https://"),
        "self-contained: no CDN"
    );
    let (status, body) = http_get(metrics, "/dashboard/stats");
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(stats["totals"]["connections"].is_u64(), "{body}");
    // The control plane still publishes.
    assert_eq!(publish_with(server.control, "t", None).0, 200);
}

/// Runs the binary expecting it to refuse to start; returns its stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new(binary())
        .args(["--listen", "127.0.0.1:0", "--no-pin"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_open_control_address_without_a_token_refuses_to_start() {
    let err = refused(&["--control", "0.0.0.0:0"]);
    assert!(err.contains("not a loopback address"), "{err}");
    assert!(err.contains("--control-token"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let err = refused(&["--control", "127.0.0.1:0", "--control-token", "short"]);
    assert!(err.contains("at least 16"), "{err}");
    // With a token it starts.
    let server = Server::start(&["--control", "0.0.0.0:0", "--control-token", TOKEN]);
    let local = SocketAddr::from(([127, 0, 0, 1], server.control.port()));
    assert_eq!(http_get(local, "/healthz").0, 200);
}

/// Draining, the control plane leaves its port, as the shards leave theirs (a
/// process started with --takeover gets the new connections); a connection
/// already open is answered 503 "shutting down", and closed.
#[test]
fn readyz_turns_503_while_draining_and_the_port_is_left() {
    let server = Server::start(&["--drain-timeout", "5s"]);
    // A client that never answers the close keeps the drain going.
    let _stuck = raw_upgrade(&server, "/ws?topics=t");
    server.wait_for("the subscription", Duration::from_secs(10), |s| {
        s.total("subscriptions") == 1
    });
    let mut open = KeepAlive::connect(server.control);
    assert_eq!(
        open.request("GET", "/readyz", b""),
        (200, "ready\n".into(), false)
    );
    server.signal(libc::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while std::net::TcpStream::connect(server.control).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the control port still takes connections"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        open.request("GET", "/readyz", b""),
        (503, "shutting down\n".into(), true)
    );
}

#[test]
fn a_publish_wait_past_its_bound_refuses_to_start() {
    let err = refused(&["--control", "127.0.0.1:0", "--publish-wait", "31s"]);
    assert!(err.contains("--publish-wait must be at most 30s"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let err = refused(&["--control", "127.0.0.1:0", "--publish-wait", "soon"]);
    assert!(err.contains("invalid duration"), "{err}");
}
