//! End to end: the edge limits of issue 13 that a browser page or a flooding
//! client meets: `--allowed-origins` (exact and subdomain forms, a missing
//! Origin with and without `--allow-missing-origin`) and
//! `--max-messages-per-sec` (a token bucket; over it, 1008), each counted by
//! reason.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn upgrade_status(server: &Server, extra: &str) -> u16 {
    let mut s = TcpStream::connect(server.ws).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(upgrade_request("/ws", extra).as_bytes())
        .unwrap();
    let head = read_head(&mut s);
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn only_allowed_origins_get_in() {
    let server = Server::start(&["--allowed-origins", "https://app.example.com,*.example.org"]);
    for (origin, want) in [
        ("https://app.example.com", 101),
        ("https://APP.example.com", 101),
        ("http://app.example.com", 403),
        ("https://evil.com", 403),
        ("https://a.example.org", 101),
        ("http://b.c.example.org:8080", 101),
        ("https://example.org", 403),
    ] {
        assert_eq!(
            upgrade_status(&server, &format!("Origin: {origin}\r\n")),
            want,
            "{origin}"
        );
    }
    assert_eq!(upgrade_status(&server, ""), 403, "no Origin");
    assert_eq!(server.total("connections_rejected_origin_total"), 4);
    let lenient = Server::start(&[
        "--allowed-origins",
        "https://app.example.com",
        "--allow-missing-origin",
    ]);
    assert_eq!(upgrade_status(&lenient, ""), 101);
    assert_eq!(
        upgrade_status(&lenient, "Origin: https://evil.com\r\n"),
        403
    );
}

#[test]
fn a_bad_origin_list_refuses_to_start() {
    let out = std::process::Command::new(binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--allowed-origins",
            "app.example.com",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allowed-origins"), "{err}");
}

#[test]
fn a_client_over_the_message_rate_is_closed_with_1008() {
    let server = Server::start(&["--max-messages-per-sec", "5"]);
    // Within the rate: a burst of five, then one more after a fifth of a second.
    let mut polite = raw_upgrade(&server, "/ws");
    for _ in 0..5 {
        send_text(&mut polite, r#"{"op":"unsub","topic":"t"}"#);
        assert_eq!(read_json(&mut polite)["op"], "unsubscribed");
    }
    std::thread::sleep(Duration::from_millis(400));
    send_text(&mut polite, r#"{"op":"unsub","topic":"t"}"#);
    assert_eq!(read_json(&mut polite)["op"], "unsubscribed");
    // A flood: the first message past the bucket closes the connection.
    let mut flood = raw_upgrade(&server, "/ws");
    for _ in 0..20 {
        send_text(&mut flood, r#"{"op":"unsub","topic":"t"}"#);
    }
    assert_eq!(read_close_code(&mut flood), 1008);
    assert_eq!(server.total("rate_limited_total"), 1);
}

#[test]
fn a_connection_storm_is_spread_over_seconds_while_served_clients_go_on() {
    let server = Server::start(&["--shards", "1", "--max-accepts-per-sec", "20"]);
    let mut served = raw_upgrade(&server, "/ws");
    let started = Instant::now();
    let storm: Vec<TcpStream> = (0..80)
        .map(|_| {
            let mut s = TcpStream::connect(server.ws).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(upgrade_request("/ws", "").as_bytes()).unwrap();
            s
        })
        .collect();
    // The client already served is answered at once, storm or not.
    send_text(&mut served, r#"{"op":"unsub","topic":"t"}"#);
    assert_eq!(read_json(&mut served)["op"], "unsubscribed");
    assert!(started.elapsed() < Duration::from_secs(1));
    for mut s in storm {
        let head = read_head(&mut s);
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "80 connections at 20 a second need three ticks past the first: {took:?}"
    );
    assert!(server.total("accepts_paused_total") >= 2);
}
