//! End to end: the edge limits of issue 13 that a browser page or a flooding
//! client meets: `--allowed-origins` (exact and subdomain forms, a missing
//! Origin with and without `--allow-missing-origin`) and
//! `--max-messages-per-sec` (a token bucket; over it, 1008),
//! `--max-accepts-per-sec` and `--max-connections-per-ip` (429, counted over
//! every shard), each counted by reason.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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

/// Opens a TCP connection from `source` (a loopback address) and sends an
/// upgrade request; returns the socket and the answer's status.
fn upgrade_from(server: &Server, source: &str) -> (TcpStream, u16) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&from.into()).unwrap();
    socket.connect(&server.ws.into()).unwrap();
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(upgrade_request("/ws", "").as_bytes()).unwrap();
    let head = read_head(&mut s);
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    if status != 101 {
        assert!(
            head.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{head}"
        );
        assert!(head.contains("Retry-After: 5"), "{head}");
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert_eq!(body, "too many connections from your address\n");
    }
    (s, status)
}

#[test]
fn an_address_holds_at_most_its_connections_over_every_shard() {
    // Two shards: SO_REUSEPORT spreads one address's connections over both,
    // and the limit holds for the address, not per shard.
    let server = Server::start(&["--shards", "2", "--max-connections-per-ip", "4"]);
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let (s, status) = upgrade_from(&server, "127.0.0.1");
            assert_eq!(status, 101);
            s
        })
        .collect();
    // Refused on whichever shard the kernel hands them to (until both shards
    // have had some: the hash of the source port decides).
    let mut refused = 0;
    while refused < 6 || server.per_shard("connections_accepted_total").contains(&0) {
        assert_eq!(upgrade_from(&server, "127.0.0.1").1, 429);
        refused += 1;
        assert!(refused < 200, "SO_REUSEPORT gave one shard everything");
    }
    // Another address is not affected.
    let (_other, status) = upgrade_from(&server, "127.0.0.2");
    assert_eq!(status, 101);
    assert_eq!(server.total("connections_rejected_per_ip_total"), refused);
    // A connection that ends gives its place back, whichever shard held it.
    for _ in 0..2 {
        let mut gone = held.pop().unwrap();
        gone.write_all(&frame(0x88, &1000u16.to_be_bytes()))
            .unwrap();
        assert_eq!(read_close_code(&mut gone), 1000);
        assert!(reaches_eof(&mut gone));
    }
    server.wait_for("two connections ended", Duration::from_secs(10), |s| {
        s.total("connections") == 3
    });
    for _ in 0..2 {
        let (s, status) = upgrade_from(&server, "127.0.0.1");
        assert_eq!(status, 101);
        held.push(s);
    }
    assert_eq!(upgrade_from(&server, "127.0.0.1").1, 429);
}

#[test]
fn a_drain_during_a_connect_storm_with_the_per_address_limit_is_clean() {
    use std::io::BufRead;
    // Started by hand to read its log: accepts staged when the drain begins
    // must not reach the kernel with the listener's closed descriptor.
    let mut child = std::process::Command::new(binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--no-pin",
        ])
        .args(["--shards", "1", "--max-connections-per-ip", "100000"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ws: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ws="))
        .unwrap()
        .parse()
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && held.len() < 5000 {
                if let Ok(mut s) = TcpStream::connect(ws) {
                    let _ = s.write_all(upgrade_request("/ws", "").as_bytes());
                    held.push(s);
                }
            }
            held
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill with a valid pid and signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(storm.join().unwrap());
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(!log.contains("accept failed"), "{log}");
}
