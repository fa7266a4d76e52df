//! End to end: keepalive pings, the idle timeout, graceful shutdown, and start-up
//! errors a person would hit.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

#[test]
fn a_silent_client_is_pinged_then_closed_after_the_idle_timeout() {
    let server = Server::start(&["--ping-interval", "1s", "--idle-timeout", "3s"]);
    let mut s = raw_upgrade(&server, "/ws");
    let started = Instant::now();
    let (b0, _) = read_frame(&mut s).expect("a keepalive ping");
    assert_eq!(b0, FIN | PING);
    // Never answer the ping: the server closes with 1001; answering that close
    // completes the handshake and the server closes TCP at once.
    assert_eq!(read_close_code(&mut s), 1001);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    s.write_all(&frame(FIN | CLOSE, &1001u16.to_be_bytes()))
        .unwrap();
    assert!(reaches_eof(&mut s));
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.total("idle_closed_total"), 1);
}

#[test]
fn a_client_that_answers_pings_stays_connected() {
    let server = Server::start(&["--echo", "--ping-interval", "1s", "--idle-timeout", "2s"]);
    let mut s = raw_upgrade(&server, "/echo");
    let until = Instant::now() + Duration::from_millis(3500);
    let mut pings = 0;
    while Instant::now() < until {
        let (b0, payload) = read_frame(&mut s).expect("connection kept");
        assert_eq!(b0, FIN | PING, "only pings while idle");
        s.write_all(&frame(FIN | PONG, &payload)).unwrap();
        pings += 1;
    }
    assert!(pings >= 2, "{pings} pings in 3.5 s");
    s.write_all(&frame(FIN | TEXT, b"still here")).unwrap();
    assert_eq!(
        read_frame(&mut s),
        Some((FIN | TEXT, b"still here".to_vec()))
    );
}

#[test]
fn sigterm_sends_1001_to_every_client_and_exits_0() {
    let mut server = Server::start(&["--echo", "--shards", "2", "--drain-timeout", "5s"]);
    let mut clients: Vec<Ws> = (0..8).map(|_| ws_connect(&server, "/echo")).collect();
    for ws in &mut clients {
        ws.send(Message::text("before")).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text("before"));
    }
    server.signal(libc::SIGTERM);
    for ws in &mut clients {
        match ws.read().unwrap() {
            Message::Close(Some(close)) => assert_eq!(close.code, CloseCode::Away),
            other => panic!("expected Close 1001, got {other:?}"),
        }
        // tungstenite answers the close; then the server closes TCP.
        while ws.read().is_ok() {}
    }
    // The server closed every socket itself: it did not wait for the drain deadline.
    let status = server.wait_exit(Duration::from_secs(3));
    assert!(status.success(), "{status:?}");
    assert!(std::net::TcpStream::connect(server.ws).is_err());
    drop(clients);
}

/// Events answered 200 before a shutdown reach every subscriber before its
/// Close 1001. The shard used to close every connection on the doorbell that
/// carried the shutdown, and what its inbox still held then went to nobody.
/// Two send slots and a short fanout backlog make the shard take the batch
/// from its inbox over many turns, so most of it is still there at SIGTERM.
#[test]
fn events_accepted_before_sigterm_reach_every_subscriber_before_1001() {
    const SUBSCRIBERS: usize = 40;
    const EVENTS: u64 = 2000;
    let mut server = Server::start(&[
        "--shards",
        "1",
        "--send-slots",
        "2",
        "--fanout-backlog",
        "4",
        "--drain-timeout",
        "30s",
    ]);
    let readers: Vec<_> = (0..SUBSCRIBERS)
        .map(|_| {
            let mut s = raw_upgrade(&server, "/ws?topics=last");
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            std::thread::spawn(move || {
                let mut seqs = Vec::new();
                loop {
                    match read_frame(&mut s) {
                        Some((b0, payload)) if b0 == FIN | TEXT => {
                            let event: serde_json::Value =
                                serde_json::from_slice(&payload).unwrap();
                            seqs.push(event["seq"].as_u64().unwrap());
                        }
                        Some((b0, payload)) if b0 == FIN | CLOSE => {
                            return (seqs, u16::from_be_bytes([payload[0], payload[1]]));
                        }
                        Some((b0, _)) if b0 == FIN | PING => {}
                        other => panic!("after {} events: {other:?}", seqs.len()),
                    }
                }
            })
        })
        .collect();
    server.wait_for("the subscriptions", Duration::from_secs(10), |s| {
        s.total("subscriptions") == SUBSCRIBERS as u64
    });
    let body: String = (1..=EVENTS)
        .map(|i| format!("{{\"topic\":\"last\",\"data\":{i}}}\n"))
        .collect();
    let (status, answer) = post(server.control, "/publish", body.as_bytes());
    assert_eq!(status, 200, "{answer}");
    server.signal(libc::SIGTERM);
    let wanted: Vec<u64> = (1..=EVENTS).collect();
    for reader in readers {
        let (seqs, code) = reader.join().unwrap();
        assert_eq!(code, 1001);
        assert!(
            seqs == wanted,
            "{} of {EVENTS} events before the close",
            seqs.len()
        );
    }
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}

#[test]
fn clients_that_never_close_are_cut_at_the_drain_timeout() {
    let mut server = Server::start(&["--drain-timeout", "1s"]);
    let mut s = raw_upgrade(&server, "/ws");
    let started = Instant::now();
    server.signal(libc::SIGINT);
    assert_eq!(read_close_code(&mut s), 1001);
    // The client never answers the close.
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

fn run_and_fail(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ringgate"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let errors = stderr.lines().filter(|l| l.contains("error")).count();
    assert_eq!(errors, 1, "one error line expected: {stderr}");
    stderr
}

#[test]
fn a_bad_flag_is_one_line_with_clap_s_tip() {
    for (args, wanted) in [
        (&["--bogus"][..], "unexpected argument '--bogus'"),
        (&["--ech"][..], "similar argument exists: '--echo'"),
        (
            &["--slow-consumer", "slow"][..],
            "possible values: close, drop",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ringgate"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(wanted), "{err}");
    }
}

#[test]
fn bad_flags_and_busy_ports_fail_with_one_clear_line() {
    let err = run_and_fail(&["--max-frame-size", "lots"]);
    assert!(
        err.contains("--max-frame-size") && err.contains("invalid size"),
        "{err}"
    );
    let err = run_and_fail(&[
        "--buffers",
        "1000",
        "--listen",
        "127.0.0.1:0",
        "--control",
        "127.0.0.1:0",
    ]);
    assert!(err.contains("--buffers must be a power of two"), "{err}");
    let err = run_and_fail(&[
        "--ping-interval",
        "30s",
        "--idle-timeout",
        "10s",
        "--listen",
        "127.0.0.1:0",
        "--control",
        "127.0.0.1:0",
    ]);
    assert!(err.contains("--idle-timeout"), "{err}");
    // A port held by a socket without SO_REUSEPORT.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = run_and_fail(&["--listen", &addr, "--control", "127.0.0.1:0"]);
    assert!(err.contains("in use"), "{err}");
    let err = run_and_fail(&["--listen", "127.0.0.1:0", "--control", &addr]);
    assert!(err.contains("--control") && err.contains("in use"), "{err}");
}

#[test]
fn healthz_answers_ok() {
    let server = Server::start(&[]);
    assert_eq!(server.control_get("/healthz"), (200, "ok\n".to_string()));
}

#[test]
fn a_new_process_takes_over_the_port_while_the_old_one_drains() {
    // A fixed control address, as a deployment has: the new process shares it
    // too (found in review: only --listen could be shared).
    let control = format!("127.0.0.1:{}", free_port());
    let mut old = Server::start(&[
        "--shards",
        "2",
        "--drain-timeout",
        "10s",
        "--control",
        &control,
    ]);
    let address = old.ws.to_string();
    let mut subscribers: Vec<_> = (0..20).map(|_| raw_upgrade(&old, "/ws?topics=z")).collect();
    old.wait_for("20 subscriptions", Duration::from_secs(10), |s| {
        s.total("subscriptions") == 20
    });
    for i in 1..=50 {
        old.publish("z", &i.to_string());
    }
    // The new process binds the same address (SO_REUSEPORT) while the old one
    // runs: an explicit act.
    let out = std::process::Command::new(binary())
        .args(["--listen", &address, "--control", "127.0.0.1:0", "--no-pin"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "took the address without --takeover");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--takeover"), "{err}");
    let new = Server::start(&["--listen", &address, "--control", &control, "--takeover"]);
    assert_eq!((new.ws, new.control), (old.ws, old.control));
    old.signal(libc::SIGTERM);
    // Every client of the old process gets every event published before its
    // drain began, in order, and then Close 1001.
    for s in &mut subscribers {
        for seq in 1..=50 {
            assert_eq!(read_json(s)["seq"], seq);
        }
        assert_eq!(read_close_code(s), 1001);
        s.write_all(&frame(FIN | CLOSE, &1001u16.to_be_bytes()))
            .unwrap();
    }
    assert!(old.wait_exit(Duration::from_secs(10)).success());
    // Clients reconnecting to the same address reach the new process.
    let mut again = raw_upgrade(&new, "/ws?topics=z");
    new.wait_for("the new subscription", Duration::from_secs(10), |s| {
        s.total("subscriptions") == 1
    });
    new.publish("z", "\"after the restart\"");
    assert_eq!(read_json(&mut again)["data"], "after the restart");
}

#[test]
fn parked_connections_wake_for_input_and_still_receive() {
    let server = Server::start(&["--echo", "--park-after", "1s", "--shards", "1"]);
    let mut echo = raw_upgrade(&server, "/echo");
    let mut subscriber = raw_upgrade(&server, "/ws?topics=p");
    let mut leaving = raw_upgrade(&server, "/ws");
    server.wait_for("three connections parked", Duration::from_secs(10), |s| {
        s.total("parked_total") >= 3
    });
    // Input wakes a parked connection: the poll fires, the recv is re-armed.
    echo.write_all(&frame(FIN | TEXT, b"after a nap")).unwrap();
    assert_eq!(
        read_frame(&mut echo),
        Some((FIN | TEXT, b"after a nap".to_vec()))
    );
    // Sending needs no recv: a parked subscriber gets events.
    server.publish("p", "1");
    assert_eq!(read_json(&mut subscriber)["seq"], 1);
    // A parked connection's close is seen too.
    leaving
        .write_all(&frame(FIN | CLOSE, &1000u16.to_be_bytes()))
        .unwrap();
    assert_eq!(read_close_code(&mut leaving), 1000);
    assert!(reaches_eof(&mut leaving));
    server.wait_for("the leaver to go", Duration::from_secs(10), |s| {
        s.total("connections") == 2
    });
    // And they park again once silent.
    let parked = server.total("parked_total");
    server.wait_for("parking again", Duration::from_secs(10), |s| {
        s.total("parked_total") > parked
    });
    echo.write_all(&frame(FIN | BINARY, &[1, 2, 3])).unwrap();
    assert_eq!(read_frame(&mut echo), Some((FIN | BINARY, vec![1, 2, 3])));
}

/// The kernel timer armed on the server's end of the connection from `client`:
/// (kind, seconds left) from /proc/net/tcp, kind 2 being keepalive.
fn server_side_timer(server: &Server, client: &std::net::TcpStream) -> (u32, f64) {
    let server_port = format!(":{:04X}", server.ws.port());
    let client_port = format!(":{:04X}", client.local_addr().unwrap().port());
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let line = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f[1].ends_with(&server_port) && f[2].ends_with(&client_port))
        .expect("the server's socket is in /proc/net/tcp");
    let (kind, when) = line[5].split_once(':').unwrap();
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (
        u32::from_str_radix(kind, 16).unwrap(),
        u64::from_str_radix(when, 16).unwrap() as f64 / hz,
    )
}

#[test]
fn tcp_keepalive_is_armed_on_accepted_connections_only_when_asked() {
    let server = Server::start(&["--tcp-keepalive", "7s"]);
    let s = raw_upgrade(&server, "/ws");
    let (kind, left) = server_side_timer(&server, &s);
    assert_eq!(kind, 2, "a keepalive timer on the server's socket");
    assert!(left > 0.0 && left <= 7.0, "{left} s");

    let plain = Server::start(&[]);
    let s = raw_upgrade(&plain, "/ws");
    assert_eq!(server_side_timer(&plain, &s).0, 0, "no timer by default");

    let err = Command::new(env!("CARGO_BIN_EXE_ringgate"))
        .args(["--tcp-keepalive", "500ms", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(
        !err.status.success() && stderr.contains("--tcp-keepalive"),
        "{stderr}"
    );
}

/// Shards are pinned to the CPUs the process may use. Found in review: they
/// were pinned to CPUs 0, 1, ... whatever the process's affinity, so under
/// `taskset -c 1` shard 0 escaped to CPU 0.
#[test]
fn shards_are_pinned_within_the_process_s_cpus() {
    // The last CPU this test may use (CPU 1 on a 2-CPU machine): any other
    // than 0 shows the escape.
    let cpus_allowed = |status: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list")
            .trim()
            .to_string()
    };
    let ours = cpus_allowed(&std::fs::read_to_string("/proc/self/status").unwrap());
    let cpu = ours.rsplit([',', '-']).next().unwrap().to_string();
    /// Killed however the test ends: a process left running would hold the
    /// harness's output open.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Command::new("taskset")
        .args(["-c", &cpu])
        .arg(binary())
        .args([
            "--shards",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("taskset (util-linux)");
    let stdout = child.stdout.take().unwrap();
    let child = Killed(child);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    assert!(line.starts_with("ringgate ready"), "{line:?}");
    let mut shards = 0;
    for task in std::fs::read_dir(format!("/proc/{}/task", child.0.id())).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
        if !comm.starts_with("ringgate-shard") {
            continue;
        }
        let allowed = cpus_allowed(&std::fs::read_to_string(dir.join("status")).unwrap());
        assert_eq!(allowed, cpu, "a shard pinned outside the process's CPUs");
        shards += 1;
    }
    assert_eq!(shards, 2);
}
