//! End to end: upgrade requests that must be refused, each with its exact HTTP
//! status, and the connection limit.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn exchange(server: &Server, request: &[u8]) -> String {
    let mut s = TcpStream::connect(server.ws).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut response = Vec::new();
    let _ = s.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

#[test]
fn refused_upgrades_get_the_right_status_and_a_reason() {
    let server = Server::start(&[]);
    let good = upgrade_request("/ws", "");
    let cases: Vec<(&str, String, u16)> = vec![
        ("unknown path", upgrade_request("/nope", ""), 404),
        ("echo without --echo", upgrade_request("/echo", ""), 404),
        (
            "plain GET",
            "GET /ws HTTP/1.1\r\nHost: t\r\n\r\n".into(),
            400,
        ),
        (
            "no Connection: Upgrade",
            good.replace("Connection: Upgrade\r\n", ""),
            400,
        ),
        ("no Host", good.replace("Host: test\r\n", ""), 400),
        (
            "missing key",
            good.replace(&format!("Sec-WebSocket-Key: {REQUEST_KEY}\r\n"), ""),
            400,
        ),
        (
            "malformed key",
            good.replace(REQUEST_KEY, "not-base64-at-all"),
            400,
        ),
        ("POST", good.replacen("GET", "POST", 1), 405),
        ("HTTP/1.0", good.replace("HTTP/1.1", "HTTP/1.0"), 400),
        (
            "garbage",
            "\x16\x03\x01 this is not http\r\n\r\n".into(),
            400,
        ),
    ];
    for (what, request, status) in cases {
        let response = exchange(&server, request.as_bytes());
        let (got, body) = parse_response(&response);
        assert_eq!(got, status, "{what}: {response}");
        assert!(!body.trim().is_empty(), "{what}: no reason given");
        assert!(response.contains("Connection: close"), "{what}");
    }
    assert!(server.total("handshake_failed_total") >= 10);
}

#[test]
fn wrong_version_is_426_with_the_supported_version() {
    let server = Server::start(&[]);
    let request =
        upgrade_request("/ws", "").replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let response = exchange(&server, request.as_bytes());
    assert!(response.starts_with("HTTP/1.1 426 "), "{response}");
    assert!(
        response.contains("\r\nSec-WebSocket-Version: 13\r\n"),
        "{response}"
    );
}

#[test]
fn request_head_over_the_limit_is_431() {
    let server = Server::start(&["--max-request-size", "1KiB"]);
    let big = upgrade_request("/ws", &format!("X-Big: {}\r\n", "a".repeat(2000)));
    let response = exchange(&server, big.as_bytes());
    assert!(response.starts_with("HTTP/1.1 431 "), "{response}");
    // A head that never ends is cut off at the limit too.
    let mut s = TcpStream::connect(server.ws).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\n").unwrap();
    for _ in 0..100 {
        if s.write_all(b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n")
            .is_err()
        {
            break;
        }
    }
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
}

#[test]
fn connections_over_the_limit_are_answered_503() {
    let server = Server::start(&["--max-connections", "3", "--shards", "1"]);
    let held: Vec<_> = (0..3).map(|_| raw_upgrade(&server, "/ws")).collect();
    let response = exchange(&server, upgrade_request("/ws", "").as_bytes());
    assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
    assert_eq!(server.total("connections_rejected_limit_total"), 1);
    drop(held);
    server.wait_for("the held connections to go", Duration::from_secs(10), |s| {
        s.total("connections") == 0
    });
    let _again = raw_upgrade(&server, "/ws");
}

#[test]
fn a_silent_handshake_is_closed_after_the_timeout() {
    let server = Server::start(&["--handshake-timeout", "1s"]);
    let mut s = TcpStream::connect(server.ws).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\n").unwrap(); // and then nothing (slowloris)
    let started = std::time::Instant::now();
    assert!(reaches_eof(&mut s), "not closed");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        server.total("connections_rejected_handshake_timeout_total"),
        1
    );
}
