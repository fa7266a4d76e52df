//! End to end: a fleet of ringgate processes over a real `redis-server` (started
//! here on a free loopback port; `.ci/run` installs Debian's package). One
//! numbering across hosts, recovery on any host (also a restarted one), the
//! last local subscriber dropping the host's Redis subscription, a host cut off
//! from Redis repairing from the history or sending a gap notice, and a Redis
//! restart: 503s in the outage, then events flowing again with a gap notice.

mod common;

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A real redis-server on a free loopback port, without persistence; killed
/// when dropped.
struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = free_port();
        let mut redis = Redis { child: None, port };
        redis.restart();
        redis
    }

    /// Starts it (again) on the same port, empty.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server; .ci/run does)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.query(&["PING"]).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// One command in RESP; the reply's text (integers and simple strings as
    /// is, arrays as their elements joined by spaces).
    fn query(&self, args: &[&str]) -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut command = format!("*{}\r\n", args.len());
        for a in args {
            command.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(command.as_bytes())?;
        let mut reader = std::io::BufReader::new(s);
        read_reply(&mut reader)
    }

    /// Waits (10 s at most) until `want` hosts are subscribed to `topic`'s channel.
    fn wait_numsub(&self, topic: &str, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.numsub(topic) != want {
            assert!(
                Instant::now() < deadline,
                "NUMSUB of {topic} never reached {want}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Hosts subscribed to `topic`'s channel.
    fn numsub(&self, topic: &str) -> u64 {
        let reply = self
            .query(&["PUBSUB", "NUMSUB", &format!("ringgate:{{{topic}}}:events")])
            .unwrap();
        reply.split(' ').nth(1).unwrap().parse().unwrap()
    }
}

fn read_reply(r: &mut impl std::io::BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let line = line.trim_end();
    let (kind, rest) = line.split_at(1);
    match kind {
        "+" | ":" => Ok(rest.to_string()),
        "-" => Err(std::io::Error::other(rest.to_string())),
        "$" => {
            let n: i64 = rest.parse().unwrap();
            if n < 0 {
                return Ok(String::new());
            }
            let mut buf = vec![0; n as usize + 2];
            r.read_exact(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n as usize]).into_owned())
        }
        "*" => {
            let n: usize = rest.parse().unwrap();
            let parts: std::io::Result<Vec<String>> = (0..n).map(|_| read_reply(r)).collect();
            Ok(parts?.join(" "))
        }
        _ => panic!("not RESP: {line:?}"),
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A TCP forwarder between one host and Redis that the test can cut (a
/// network partition for that host alone): cut closes every forwarded
/// connection and refuses new ones until restored.
struct Partition {
    port: u16,
    open: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl Partition {
    fn new(redis_port: u16) -> Partition {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let (o, st) = (open.clone(), streams.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !o.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)) else {
                    continue;
                };
                let mut held = st.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(server.try_clone().unwrap());
                drop(held);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Partition {
            port,
            open,
            streams,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

fn host(broker: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--shards", "2", "--broker", broker];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    server.wait_for("the broker link", Duration::from_secs(20), |s| {
        s.control_get("/readyz").0 == 200
    });
    server
}

/// Reads events of `topic` numbered `seqs`, in order, with the data published.
fn read_events(s: &mut TcpStream, topic: &str, seqs: std::ops::RangeInclusive<u64>) {
    for seq in seqs {
        let event = read_json(s);
        assert_eq!(event["topic"], topic, "{event}");
        assert_eq!(event["seq"], seq, "{event}");
        assert_eq!(event["data"], json!({"n": seq}), "{event}");
    }
}

fn publish(server: &Server, topic: &str, n: u64) -> Value {
    server.publish(topic, &format!("{{\"n\":{n}}}"))
}

fn metric(server: &Server, name: &str) -> u64 {
    server.stats()["totals"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no total {name}"))
}

#[test]
fn every_host_delivers_each_event_once_in_order_with_one_numbering() {
    let redis = Redis::start();
    let a = host(&redis.url(), &[]);
    let b = host(&redis.url(), &[]);
    let mut clients = vec![
        raw_upgrade(&a, "/ws"),
        raw_upgrade(&a, "/ws"),
        raw_upgrade(&b, "/ws"),
    ];
    let replies: Vec<Value> = clients.iter_mut().map(|c| sub(c, "mail", None)).collect();
    let epoch = replies[0]["epoch"].as_str().unwrap().to_string();
    for r in &replies {
        assert_eq!(
            *r,
            json!({"op": "subscribed", "topic": "mail", "seq": 0, "epoch": epoch})
        );
    }
    // Publishes go through both hosts in turn: one numbering whoever takes them.
    for n in 1..=30 {
        let through = if n % 2 == 0 { &a } else { &b };
        let answer = publish(through, "mail", n);
        assert_eq!(answer["seq"], n, "{answer}");
        assert_eq!(answer["epoch"], epoch.as_str(), "{answer}");
        assert_eq!(answer["hosts"], 2, "both hosts follow mail: {answer}");
    }
    for c in &mut clients {
        read_events(c, "mail", 1..=30);
    }
    // Exactly once: the next frame each client sees is the next event.
    publish(&a, "mail", 31);
    for c in &mut clients {
        read_events(c, "mail", 31..=31);
    }
    assert_eq!(metric(&a, "broker_up"), 1);
    assert!(metric(&a, "broker_messages_received_total") >= 31);
    assert_eq!(metric(&a, "broker_gaps_detected_total"), 0);
}

#[test]
fn a_client_recovers_on_another_host_and_on_a_restarted_one() {
    let redis = Redis::start();
    let a = host(&redis.url(), &[]);
    let b = host(&redis.url(), &[]);
    let mut client = raw_upgrade(&a, "/ws");
    let epoch = sub(&mut client, "inbox", None)["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    for n in 1..=5 {
        publish(&a, "inbox", n);
    }
    read_events(&mut client, "inbox", 1..=5);
    drop(client);
    for n in 6..=10 {
        publish(&b, "inbox", n);
    }
    let mut on_b = raw_upgrade(&b, "/ws");
    let reply = sub(&mut on_b, "inbox", Some((5, &epoch)));
    assert_eq!(
        reply,
        json!({"op": "subscribed", "topic": "inbox", "seq": 10, "epoch": epoch, "recovered": true})
    );
    read_events(&mut on_b, "inbox", 6..=10);
    publish(&a, "inbox", 11);
    read_events(&mut on_b, "inbox", 11..=11);
    // A host restarted knows nothing itself: the history is Redis'.
    drop(a);
    let a2 = host(&redis.url(), &[]);
    let mut on_a2 = raw_upgrade(&a2, "/ws");
    let reply = sub(&mut on_a2, "inbox", Some((8, &epoch)));
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["seq"], 11, "{reply}");
    read_events(&mut on_a2, "inbox", 9..=11);
    // Too old, and a wrong epoch, are said so.
    let mut c = raw_upgrade(&a2, "/ws");
    let reply = sub(&mut c, "inbox", Some((8, "zzzzzzzzzz")));
    assert_eq!(reply["recovered"], false, "{reply}");
    let (status, _) = post(a2.control, "/publish/inbox", b"{\"n\":12}");
    assert_eq!(status, 200);
    read_events(&mut on_a2, "inbox", 12..=12);
    read_events(&mut c, "inbox", 12..=12);
}

#[test]
fn the_last_local_subscriber_leaving_drops_the_hosts_redis_subscription() {
    let redis = Redis::start();
    let a = host(&redis.url(), &[]);
    let mut by_query = raw_upgrade(&a, "/ws?topics=alerts");
    let mut by_op = raw_upgrade(&a, "/ws");
    assert_eq!(sub(&mut by_op, "alerts", None)["op"], "subscribed");
    redis.wait_numsub("alerts", 1);
    assert_eq!(metric(&a, "broker_subscriptions"), 1);
    publish(&a, "alerts", 1);
    read_events(&mut by_query, "alerts", 1..=1);
    read_events(&mut by_op, "alerts", 1..=1);
    send_text(&mut by_op, r#"{"op":"unsub","topic":"alerts"}"#);
    assert_eq!(read_json(&mut by_op)["op"], "unsubscribed");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(redis.numsub("alerts"), 1, "one local subscriber is left");
    drop(by_query);
    redis.wait_numsub("alerts", 0);
    a.wait_for("no subscriptions", Duration::from_secs(5), |s| {
        metric(s, "broker_subscriptions") == 0
    });
}

/// Scripts in Redis' cache (`INFO memory`).
fn cached_scripts(redis: &Redis) -> u64 {
    let info = redis.query(&["INFO", "memory"]).unwrap();
    let line = info
        .lines()
        .find_map(|l| l.strip_prefix("number_of_cached_scripts:"))
        .expect("INFO memory counts scripts");
    line.trim().parse().unwrap()
}

/// A publish's EVALSHA meeting an empty script cache (a restarted Redis) made
/// redis-rs load the script and send it again, so a publish sent meanwhile
/// could be numbered first. The link loads both scripts before it is up.
#[test]
fn a_host_loads_its_scripts_before_its_link_is_up() {
    let mut redis = Redis::start();
    let a = host(&redis.url(), &[]);
    assert_eq!(cached_scripts(&redis), 2);
    redis.kill();
    redis.restart();
    a.wait_for("the link again", Duration::from_secs(20), |s| {
        metric(s, "broker_reconnects_total") >= 1 && metric(s, "broker_up") == 1
    });
    assert_eq!(cached_scripts(&redis), 2);
}

/// The link counted as up while both its connections were: a Redis refusing
/// every write (a read-only replica, a failed save, too few replicas) left the
/// host ready while every publish got 503. A write probe with each ping (every
/// 5 s) now takes it out of readiness, and back in.
#[test]
fn a_redis_refusing_writes_makes_the_host_unready_until_it_takes_them() {
    let redis = Redis::start();
    let a = host(&redis.url(), &[]);
    redis
        .query(&["CONFIG", "SET", "min-replicas-to-write", "1"])
        .unwrap();
    a.wait_for("unready", Duration::from_secs(15), |s| {
        s.control_get("/readyz") == (503, "the broker (Redis) refuses writes\n".to_string())
    });
    assert_eq!(metric(&a, "broker_up"), 0);
    let (status, body) = post(a.control, "/publish/t", b"1");
    assert_eq!(status, 503, "{body}");
    redis
        .query(&["CONFIG", "SET", "min-replicas-to-write", "0"])
        .unwrap();
    a.wait_for("ready again", Duration::from_secs(15), |s| {
        s.control_get("/readyz").0 == 200
    });
    assert_eq!(metric(&a, "broker_up"), 1);
    assert_eq!(publish(&a, "t", 1)["seq"], 1);
}

/// A topic whose numbering in Redis is not of ringgate's making (an epoch
/// that is not ten of [0-9a-z], a seq that is no count: a hand edit, another
/// program) was wedged for good: its subscribes never answered, its publishes
/// 503 after running. Such a numbering now counts as none: the topic starts
/// a new one.
#[test]
fn a_corrupt_numbering_in_redis_starts_the_topic_afresh() {
    let redis = Redis::start();
    let a = host(&redis.url(), &[]);
    for (topic, seq, epoch) in [
        ("e", "5", "NOT-OURS!"),
        ("s", "many", "0123456789"),
        // Digits, but no count HINCRBY takes.
        ("z", "007", "0123456789"),
    ] {
        let meta = format!("ringgate:{{{topic}}}:meta");
        redis
            .query(&["HSET", &meta, "seq", seq, "epoch", epoch])
            .unwrap();
        let mut c = raw_upgrade(&a, "/ws");
        let reply = sub(&mut c, topic, None);
        assert_eq!(reply["op"], "subscribed", "{reply}");
        assert_eq!(reply["seq"], 0, "{reply}");
        let answer = publish(&a, topic, 1);
        assert_eq!(answer["seq"], 1, "{answer}");
        assert_eq!(answer["epoch"], reply["epoch"], "{answer}");
        read_events(&mut c, topic, 1..=1);
    }
    // Published to before anyone subscribed: the publish starts it afresh.
    redis
        .query(&["HSET", "ringgate:{p}:meta", "seq", "x", "epoch", "bad"])
        .unwrap();
    assert_eq!(publish(&a, "p", 1)["seq"], 1);
}

/// The history's last entry must be event `seq`. A host with no history
/// numbered its events without keeping them, so after a publish through it the
/// list lacked those events, and a recovery across them delivered the data of
/// older events under their numbers.
#[test]
fn a_host_keeping_no_history_never_makes_a_recovery_deliver_wrong_events() {
    let redis = Redis::start();
    let a = host(&redis.url(), &[]);
    let b = host(&redis.url(), &["--history-size", "0"]);
    let epoch = publish(&a, "mixed", 1)["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    for n in 2..=5 {
        publish(&a, "mixed", n);
    }
    for n in 6..=7 {
        publish(&b, "mixed", n);
    }
    publish(&a, "mixed", 8);
    // From 5: events 6 and 7 were never kept, so the history cannot give 6..=8.
    let mut c = raw_upgrade(&a, "/ws");
    let reply = sub(&mut c, "mixed", Some((5, &epoch)));
    assert_eq!(reply["recovered"], false, "{reply}");
    // From 7: event 8 is kept, and is itself.
    let mut c = raw_upgrade(&a, "/ws");
    let reply = sub(&mut c, "mixed", Some((7, &epoch)));
    assert_eq!(reply["recovered"], true, "{reply}");
    read_events(&mut c, "mixed", 8..=8);
}

/// The link pings its pub/sub connection every 5 s. A subscribed RESP2
/// connection answers ["pong", ""], which the link took for a failure: once the
/// host followed a topic it dropped the link and made it again every 5 s.
#[test]
fn a_host_following_a_topic_keeps_its_link_past_two_pings() {
    let redis = Redis::start();
    let a = host(&redis.url(), &[]);
    let mut client = raw_upgrade(&a, "/ws?topics=kept");
    redis.wait_numsub("kept", 1);
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(metric(&a, "broker_reconnects_total"), 0);
    assert_eq!(metric(&a, "broker_up"), 1);
    publish(&a, "kept", 1);
    read_events(&mut client, "kept", 1..=1);
}

/// Two hosts on one Redis, A through a partition it is cut off by while B
/// publishes `missed` events.
struct Partitioned {
    a: Server,
    b: Server,
    on_a: TcpStream,
    epoch: String,
    /// Bound by the test (a field left to `..` would be dropped at once).
    redis: Redis,
}

fn partition_while_publishing(b_args: &[&str], missed: u64) -> Partitioned {
    let redis = Redis::start();
    let partition = Partition::new(redis.port);
    let a = host(&partition.url(), &[]);
    let b = host(&redis.url(), b_args);
    let mut on_a = raw_upgrade(&a, "/ws");
    let epoch = sub(&mut on_a, "feed", None)["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    for n in 1..=3 {
        publish(&b, "feed", n);
    }
    read_events(&mut on_a, "feed", 1..=3);
    partition.cut();
    a.wait_for("A to see the link down", Duration::from_secs(10), |s| {
        s.control_get("/readyz").0 == 503
    });
    assert_eq!(metric(&a, "broker_up"), 0);
    let (status, body) = post(a.control, "/publish/feed", b"{\"n\":0}");
    assert_eq!(status, 503, "a publish in the outage: {body}");
    for n in 4..4 + missed {
        publish(&b, "feed", n);
    }
    partition.restore();
    a.wait_for("A to be back", Duration::from_secs(20), |s| {
        s.control_get("/readyz").0 == 200
    });
    Partitioned {
        a,
        b,
        on_a,
        epoch,
        redis,
    }
}

#[test]
fn a_host_cut_off_from_redis_delivers_what_it_missed_from_the_history() {
    let Partitioned {
        a,
        b,
        mut on_a,
        redis: _redis,
        ..
    } = partition_while_publishing(&[], 5);
    read_events(&mut on_a, "feed", 4..=8);
    publish(&b, "feed", 9);
    read_events(&mut on_a, "feed", 9..=9);
    assert!(metric(&a, "broker_gaps_repaired_total") >= 1);
    assert_eq!(metric(&a, "broker_gaps_notified_total"), 0);
    assert!(metric(&a, "broker_reconnects_total") >= 1);
}

#[test]
fn a_host_whose_missed_events_left_the_history_sends_a_gap_notice() {
    let Partitioned {
        a,
        b,
        mut on_a,
        epoch,
        redis: _redis,
    } = partition_while_publishing(&["--history-size", "2"], 5);
    assert_eq!(
        read_json(&mut on_a),
        json!({"op": "gap", "topic": "feed", "seq": 8, "epoch": epoch})
    );
    publish(&b, "feed", 9);
    read_events(&mut on_a, "feed", 9..=9);
    assert_eq!(metric(&a, "broker_gaps_notified_total"), 1);
}

#[test]
fn a_redis_restart_answers_503_then_events_flow_again_after_a_gap_notice() {
    let mut redis = Redis::start();
    let a = host(&redis.url(), &[]);
    let b = host(&redis.url(), &[]);
    let mut on_a = raw_upgrade(&a, "/ws");
    let mut on_b = raw_upgrade(&b, "/ws?topics=news");
    let epoch = sub(&mut on_a, "news", None)["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    while redis.numsub("news") < 2 {
        std::thread::sleep(Duration::from_millis(20));
    }
    publish(&a, "news", 1);
    read_events(&mut on_a, "news", 1..=1);
    read_events(&mut on_b, "news", 1..=1);
    redis.kill();
    for h in [&a, &b] {
        h.wait_for("the link down", Duration::from_secs(10), |s| {
            s.control_get("/readyz").0 == 503
        });
        let (status, body) = post(h.control, "/publish/news", b"{\"n\":2}");
        assert_eq!(status, 503, "a publish in the outage: {body}");
        assert!(body.contains("not published"), "{body}");
    }
    redis.restart();
    let restarted = Instant::now();
    for h in [&a, &b] {
        h.wait_for("the link back", Duration::from_secs(20), |s| {
            s.control_get("/readyz").0 == 200
        });
    }
    // Redis lost everything: a new numbering, announced to every subscriber.
    let notice_a = read_json(&mut on_a);
    let notice_b = read_json(&mut on_b);
    assert_eq!(notice_a["op"], "gap", "{notice_a}");
    assert_eq!(notice_a["seq"], 0, "{notice_a}");
    assert_eq!(notice_a, notice_b);
    let new_epoch = notice_a["epoch"].as_str().unwrap();
    assert_ne!(new_epoch, epoch);
    let answer = publish(&b, "news", 1);
    assert_eq!(answer["epoch"], new_epoch, "{answer}");
    read_events(&mut on_a, "news", 1..=1);
    read_events(&mut on_b, "news", 1..=1);
    eprintln!(
        "events flowed again {:?} after redis-server restarted",
        restarted.elapsed()
    );
}

#[test]
fn a_host_starts_without_redis_serves_clients_and_joins_when_it_comes() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let a = Server::start(&["--shards", "2", "--broker", &url]);
    let (status, body) = a.control_get("/readyz");
    assert_eq!(
        (status, body.as_str()),
        (503, "the broker (Redis) is unreachable\n")
    );
    assert_eq!(metric(&a, "broker_up"), 0);
    let (status, _) = post(a.control, "/publish/t", b"1");
    assert_eq!(status, 503);
    // Clients are served meanwhile; a subscribe is answered once the bus is there.
    let mut client = raw_upgrade(&a, "/ws");
    send_text(&mut client, r#"{"op":"sub","topic":"t"}"#);
    let mut redis = Redis { child: None, port };
    redis.restart();
    let reply = read_json(&mut client);
    assert_eq!(reply["op"], "subscribed", "{reply}");
    assert_eq!(reply["seq"], 0, "{reply}");
    a.wait_for("ready", Duration::from_secs(10), |s| {
        s.control_get("/readyz").0 == 200
    });
    a.publish("t", "{\"n\":1}");
    read_events(&mut client, "t", 1..=1);
}

/// The settings shown never carry the broker's password.
/// A subscribe waits while Redis is away, and the connection's later requests
/// wait behind it. They were held outside every budget (32 of up to
/// --max-op-size each, per connection, for as long as Redis stayed away); they
/// now count against the shard's --max-unfinished-bytes, and past it a request
/// is answered busy at once.
#[test]
fn requests_waiting_behind_a_subscribe_stay_within_the_shards_input_budget() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let a = Server::start(&[
        "--shards",
        "1",
        "--broker",
        &url,
        "--max-message-size",
        "16KiB",
        "--max-frame-size",
        "16KiB",
        "--max-unfinished-bytes",
        "40KiB",
    ]);
    let mut client = raw_upgrade(&a, "/ws");
    send_text(&mut client, r#"{"op":"sub","topic":"held"}"#);
    let pad = "x".repeat(15_000);
    for _ in 0..3 {
        send_text(
            &mut client,
            &format!(r#"{{"op":"unsub","topic":"held","pad":"{pad}"}}"#),
        );
    }
    // Two wait (30 KB); the third would pass 40 KiB.
    let reply = read_json(&mut client);
    assert_eq!(reply["op"], "error", "{reply}");
    assert_eq!(reply["code"], "busy", "{reply}");
    assert_eq!(a.total("unfinished_refused_total"), 1);
    // What waits is answered, in order, once Redis is there.
    let mut redis = Redis { child: None, port };
    redis.restart();
    assert_eq!(read_json(&mut client)["op"], "subscribed");
    for _ in 0..2 {
        let reply = read_json(&mut client);
        assert_eq!(reply["op"], "error", "an unknown field: {reply}");
    }
}

#[test]
fn the_brokers_password_is_not_shown() {
    let a = Server::start(&["--broker", "redis://:sekrit@127.0.0.1:1/"]);
    let stats = a.stats();
    assert_eq!(stats["settings"]["broker"], "redis://:***@127.0.0.1:1/");
    let (_, metrics) = a.control_get("/metrics");
    assert!(!metrics.contains("sekrit"));
}

/// `RINGGATE_BROKER` works like the flag, and a client's `pub` op on one host
/// reaches a subscriber on another.
#[test]
fn a_client_publish_on_one_host_reaches_subscribers_on_another() {
    let redis = Redis::start();
    let url = redis.url();
    let a = Server::start_with_env(
        &["--shards", "2", "--client-publish", "chat.*"],
        &[("RINGGATE_BROKER", &url)],
    );
    a.wait_for("the broker link", Duration::from_secs(20), |s| {
        s.control_get("/readyz").0 == 200
    });
    let b = host(&url, &[]);
    let mut subscriber = raw_upgrade(&b, "/ws");
    assert_eq!(sub(&mut subscriber, "chat.1", None)["seq"], 0);
    let mut publisher = raw_upgrade(&a, "/ws");
    send_text(
        &mut publisher,
        r#"{"op":"pub","topic":"chat.1","data":{"n":1}}"#,
    );
    read_events(&mut subscriber, "chat.1", 1..=1);
    // Counted when Redis' answer reaches A, which may be after B delivered.
    a.wait_for("the publish counted", Duration::from_secs(5), |s| {
        metric(s, "publish_total") == 1
    });
}

/// A batch through one host is numbered in line order and reaches a subscriber
/// on another host in that order (three script calls of at most 100 events).
#[test]
fn a_batch_through_one_host_arrives_in_order_on_another() {
    let redis = Redis::start();
    let a = host(&redis.url(), &[]);
    let b = host(&redis.url(), &[]);
    let mut on_b = raw_upgrade(&b, "/ws");
    assert_eq!(sub(&mut on_b, "bulk", None)["seq"], 0);
    let body: String = (1..=250)
        .map(|n| format!("{{\"topic\":\"bulk\",\"data\":{{\"n\":{n}}}}}\n"))
        .collect();
    let (status, answer) = post(a.control, "/publish", body.as_bytes());
    assert_eq!(status, 200, "{answer}");
    let seqs: Vec<u64> = answer
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (1..=250).collect::<Vec<u64>>());
    read_events(&mut on_b, "bulk", 1..=250);
}

/// Redis restored from an old snapshot numbers events again under the same
/// epoch: the hosts find it, the topic gets a new numbering, and subscribers
/// get a gap notice instead of silently missing the renumbered events.
#[test]
fn redis_going_back_in_time_renumbers_the_topic_with_a_gap_notice() {
    let redis = Redis::start();
    let a = host(&redis.url(), &[]);
    let mut client = raw_upgrade(&a, "/ws");
    let epoch = sub(&mut client, "r", None)["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    for n in 1..=5 {
        publish(&a, "r", n);
    }
    read_events(&mut client, "r", 1..=5);
    // What a restore from a snapshot taken at seq 2 leaves.
    redis
        .query(&["HSET", "ringgate:{r}:meta", "seq", "2"])
        .unwrap();
    let answer = publish(&a, "r", 3);
    assert_eq!(
        answer["epoch"],
        epoch.as_str(),
        "the stale numbering: {answer}"
    );
    let notice = read_json(&mut client);
    assert_eq!(notice["op"], "gap", "{notice}");
    assert_eq!(notice["seq"], 0, "{notice}");
    let new_epoch = notice["epoch"].as_str().unwrap().to_string();
    assert_ne!(new_epoch, epoch);
    let answer = publish(&a, "r", 1);
    assert_eq!(answer["epoch"], new_epoch.as_str(), "{answer}");
    read_events(&mut client, "r", 1..=1);
}
