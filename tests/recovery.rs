//! End to end: history, epochs and recovery across reconnects, with the real
//! binary on two shards: a recovery returns exactly the missed events, also
//! while publishing goes on at full speed; every case that cannot recover says
//! `recovered:false` with the topic's latest `seq`; history holds its memory
//! bound; forgotten topics come back with a new epoch; `?recover=` at connect.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn epoch_of(reply: &Value) -> String {
    reply["epoch"].as_str().expect("an epoch").to_string()
}

/// Reads events of `topic`, checking each is the next `seq`, up to `last`.
fn read_events(s: &mut TcpStream, topic: &str, from: u64, last: u64) {
    for seq in from..=last {
        let event = read_json(s);
        assert_eq!(event["topic"], topic, "{event}");
        assert_eq!(event["seq"], seq, "{event}");
        assert_eq!(event["data"], json!({"n": seq}), "{event}");
    }
}

fn publish_n(server: &Server, topic: &str, seqs: std::ops::RangeInclusive<u64>) -> String {
    let mut epoch = String::new();
    for n in seqs {
        let answer = server.publish(topic, &format!("{{\"n\":{n}}}"));
        assert_eq!(answer["seq"], n, "{answer}");
        epoch = epoch_of(&answer);
    }
    epoch
}

/// Opens `/ws` connections until each shard holds at least `each` of them.
fn clients_on_every_shard(server: &Server, each: u64) -> Vec<TcpStream> {
    let mut clients = Vec::new();
    while server.per_shard("connections").iter().any(|&n| n < each) {
        assert!(
            clients.len() < 400,
            "SO_REUSEPORT put 400 clients on one shard"
        );
        clients.push(raw_upgrade(server, "/ws"));
    }
    clients
}

#[test]
fn a_recovery_after_a_disconnect_returns_exactly_the_missed_events() {
    let server = Server::start(&["--shards", "2"]);
    let mut clients = clients_on_every_shard(&server, 3);
    let mut epoch = String::new();
    for c in &mut clients {
        let reply = sub(c, "mail", None);
        epoch = epoch_of(&reply);
        assert_eq!(
            reply,
            json!({"op": "subscribed", "topic": "mail", "seq": 0, "epoch": epoch})
        );
    }
    assert_eq!(publish_n(&server, "mail", 1..=5), epoch, "one numbering");
    for c in &mut clients {
        read_events(c, "mail", 1, 5);
    }
    let n = clients.len() as u64;
    drop(clients);
    server.wait_for("the disconnects", Duration::from_secs(10), |s| {
        s.total("subscriptions") == 0
    });
    publish_n(&server, "mail", 6..=12);
    let mut back = clients_on_every_shard(&server, 3);
    for c in &mut back {
        let reply = sub(c, "mail", Some((5, &epoch)));
        assert_eq!(
            reply,
            json!({"op": "subscribed", "topic": "mail", "seq": 12, "epoch": epoch, "recovered": true})
        );
    }
    publish_n(&server, "mail", 13..=13);
    for c in &mut back {
        read_events(c, "mail", 6, 13);
    }
    let m = back.len() as u64;
    assert!(m >= n.min(6));
    assert_eq!(server.total("recoveries_recovered_total"), m);
    assert_eq!(server.total("events_replayed_total"), 7 * m);
    let per = server.per_shard("recoveries_recovered_total");
    assert!(
        per.iter().all(|&r| r > 0),
        "recoveries on both shards: {per:?}"
    );
}

/// Many clients drop and recover three times each while a publisher publishes
/// as fast as the API takes events: each client's events form one contiguous,
/// duplicate-free sequence.
/// Two shards and a history deep enough for every recovery while publishing at full speed.
const DEEP_HISTORY: &[&str] = &[
    "--shards",
    "2",
    "--history-size",
    "100000",
    "--history-memory",
    "256MiB",
];

/// A client of a publisher that runs until told the clients are `done`: it
/// subscribes to `topic`, then `rounds` times reads `quota(round)` events
/// (each the next `seq`), drops the connection mid-stream, waits `pause`,
/// reconnects and recovers; then reads up to the event marked the end.
struct Recovering<'a, Q> {
    topic: &'a str,
    rounds: usize,
    quota: Q,
    pause: Duration,
}

impl<Q: Fn(usize) -> u64> Recovering<'_, Q> {
    /// Returns the last `seq` read and how many events were read.
    fn run(&self, server: &Server, done: &AtomicU64) -> (u64, u64) {
        let topic = self.topic;
        let mut s = raw_upgrade(server, "/ws");
        let reply = sub(&mut s, topic, None);
        let epoch = epoch_of(&reply);
        let mut at = reply["seq"].as_u64().unwrap();
        let mut events = 0u64;
        for round in 0..=self.rounds {
            let last = round == self.rounds;
            let mut read = 0;
            while last || read < (self.quota)(round) {
                let event = read_json(&mut s);
                let seq = event["seq"].as_u64().expect("an event");
                assert_eq!(seq, at + 1, "{topic}: gap, duplicate or reordering");
                assert_eq!(event["data"]["n"], seq);
                at = seq;
                read += 1;
                events += 1;
                if event["data"]["end"] == true {
                    assert!(last, "{topic}: the end came early");
                    break;
                }
            }
            if last {
                break;
            }
            drop(s);
            std::thread::sleep(self.pause);
            s = raw_upgrade(server, "/ws");
            let reply = sub(&mut s, topic, Some((at, &epoch)));
            assert_eq!(reply["recovered"], true, "{topic}: {reply}");
            assert_eq!(epoch_of(&reply), epoch);
            assert!(reply["seq"].as_u64().unwrap() >= at);
            if round + 1 == self.rounds {
                done.fetch_add(1, Ordering::SeqCst);
            }
        }
        (at, events)
    }
}

#[test]
fn recoveries_while_publishing_at_full_speed_are_contiguous() {
    let server = Arc::new(Server::start(DEEP_HISTORY));
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 3;
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (server, done, stop) = (server.clone(), done.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seq = 0;
            let mut busy = 0;
            // Until every client has done its rounds, then a little more; the
            // last event says it is the last.
            let mut after = 200;
            while after > 0 && !stop.load(Ordering::Relaxed) {
                if done.load(Ordering::Relaxed) == CLIENTS as u64 {
                    after -= 1;
                }
                let end = if after == 0 { ",\"end\":true" } else { "" };
                let body = format!("{{\"n\":{}{end}}}", seq + 1);
                let (status, answer) = post(server.control, "/publish/fast", body.as_bytes());
                match status {
                    200 => {
                        seq += 1;
                        let answer: Value = serde_json::from_str(&answer).unwrap();
                        assert_eq!(answer["seq"], seq);
                    }
                    // A full inbox: no seq was used; retry.
                    503 => busy += 1,
                    other => panic!("publish answered {other}: {answer}"),
                }
            }
            (seq, busy)
        })
    };
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (server, done) = (server.clone(), done.clone());
            std::thread::spawn(move || {
                let client = Recovering {
                    topic: "fast",
                    rounds: ROUNDS,
                    quota: |round| 20 + 13 * (i + round) as u64,
                    pause: Duration::from_millis(5 + 20 * (i as u64 % 5)),
                };
                client.run(&server, &done)
            })
        })
        .collect();
    let mut total = 0;
    let mut ends = Vec::new();
    for c in clients {
        match c.join() {
            Ok((end, events)) => {
                ends.push(end);
                total += events;
            }
            Err(panic) => {
                stop.store(true, Ordering::Relaxed);
                std::panic::resume_unwind(panic);
            }
        }
    }
    let (last, _busy) = publisher.join().unwrap();
    assert!(last > 200, "the publisher published {last}");
    assert!(ends.iter().all(|&e| e == last), "{ends:?} != {last}");
    assert_eq!(
        server.total("recoveries_recovered_total"),
        (CLIENTS * ROUNDS) as u64
    );
    assert!(server.total("events_replayed_total") > 0);
    assert_eq!(server.total("slow_consumer_total"), 0);
    let per = server.per_shard("recoveries_recovered_total");
    assert!(
        per.iter().all(|&r| r > 0),
        "recoveries on both shards: {per:?}"
    );
    // Every client saw every event from its first subscribe to the end.
    assert!(total >= CLIENTS as u64 * 100, "{total}");
}

/// Publishes `{"n":N}` to every topic not yet ended, as a batch, until each
/// has had its last event (`"end":true`) once `done` reaches `clients`; a line
/// refused (an inbox full) is published again. Returns the last seq of each.
fn publish_to_each_until_done(
    server: &Server,
    topics: &[String],
    done: &AtomicU64,
    stop: &AtomicBool,
) -> Vec<u64> {
    let mut last = vec![0u64; topics.len()];
    let mut ended = vec![false; topics.len()];
    let mut after = 100;
    while ended.iter().any(|e| !e) {
        assert!(!stop.load(Ordering::Relaxed), "a client failed");
        if done.load(Ordering::Relaxed) == topics.len() as u64 && after > 0 {
            after -= 1;
        }
        let end = if after == 0 { ",\"end\":true" } else { "" };
        let open: Vec<usize> = (0..topics.len()).filter(|&i| !ended[i]).collect();
        let body: String = open
            .iter()
            .map(|&i| {
                let n = last[i] + 1;
                format!(
                    "{{\"topic\":\"{}\",\"data\":{{\"n\":{n}{end}}}}}\n",
                    topics[i]
                )
            })
            .collect();
        let (status, answer) = post(server.control, "/publish", body.as_bytes());
        assert!(status == 200 || status == 207, "{status}: {answer}");
        for (&i, line) in open.iter().zip(answer.lines()) {
            let line: Value = serde_json::from_str(line).unwrap();
            assert_eq!(line["topic"], topics[i].as_str(), "{line}");
            match line["seq"].as_u64() {
                Some(seq) => {
                    assert_eq!(seq, last[i] + 1, "{line}");
                    last[i] = seq;
                    ended[i] = after == 0;
                }
                // An inbox was full: no seq was used; it goes again.
                None => assert!(line["error"].is_string(), "{line}"),
            }
        }
    }
    last
}

struct StopOnPanic(Arc<AtomicBool>);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

#[test]
fn recoveries_of_topics_with_one_subscriber_each_are_contiguous_while_publishing() {
    // Each topic has one subscriber, so between its connections no shard
    // holds it and its events go to no inbox: the recovering subscribe must
    // route the topic to its shard before the broker answers, or an event
    // published just after the answer would be lost.
    let server = Arc::new(Server::start(DEEP_HISTORY));
    const CLIENTS: usize = 12;
    const ROUNDS: usize = 4;
    let topics: Vec<String> = (0..CLIENTS).map(|i| format!("own.{i}")).collect();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (server, done, topic) = (server.clone(), done.clone(), topics[i].clone());
            let stop = stop.clone();
            std::thread::spawn(move || {
                // A failing client stops the publisher, so the others run dry
                // (and time out) instead of reading forever.
                let _stop = StopOnPanic(stop);
                // Between its connections the topic has no subscriber; events go on.
                let client = Recovering {
                    topic: &topic,
                    rounds: ROUNDS,
                    quota: |round| 10 + 7 * (i + round) as u64,
                    pause: Duration::from_millis(2 + 7 * (i as u64 % 4)),
                };
                client.run(&server, &done).0
            })
        })
        .collect();
    let publisher = {
        let (server, done, stop) = (server.clone(), done.clone(), stop.clone());
        let topics = topics.clone();
        std::thread::spawn(move || publish_to_each_until_done(&server, &topics, &done, &stop))
    };
    let mut ends = Vec::new();
    for c in clients {
        match c.join() {
            Ok(end) => ends.push(end),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    let last = publisher.join().unwrap();
    assert_eq!(ends, last, "every client read its topic to the end");
    assert_eq!(
        server.total("recoveries_recovered_total"),
        (CLIENTS * ROUNDS) as u64
    );
    let per = server.per_shard("recoveries_recovered_total");
    assert!(
        per.iter().all(|&r| r > 0),
        "recoveries on both shards: {per:?}"
    );
}

#[test]
fn every_case_that_cannot_recover_says_so_with_the_latest_seq() {
    let server = Server::start(&["--shards", "2", "--history-size", "3"]);
    let epoch = publish_n(&server, "t", 1..=10);
    let cases: [(Option<(u64, &str)>, &str); 5] = [
        (Some((2, epoch.as_str())), "too_old"),
        (Some((6, "zzzz")), "epoch_changed"),
        (Some((50, epoch.as_str())), "future"),
        // The history holds 8, 9, 10: it reaches 7 + 1.
        (Some((7, epoch.as_str())), "recovered"),
        (Some((10, epoch.as_str())), "recovered"),
    ];
    let mut clients = Vec::new();
    for (since, outcome) in cases {
        let mut c = raw_upgrade(&server, "/ws");
        let reply = sub(&mut c, "t", since);
        let recovered = outcome == "recovered";
        assert_eq!(
            reply,
            json!({"op": "subscribed", "topic": "t", "seq": 10, "epoch": epoch, "recovered": recovered}),
            "{outcome}"
        );
        if since == Some((7, epoch.as_str())) {
            read_events(&mut c, "t", 8, 10);
        }
        clients.push(c);
    }
    // Nothing was replayed to the others: their next frame is the next event.
    publish_n(&server, "t", 11..=11);
    for c in &mut clients {
        read_events(c, "t", 11, 11);
    }
    for outcome in ["too_old", "epoch_changed", "future"] {
        assert_eq!(server.total(&format!("recoveries_{outcome}_total")), 1);
    }
    assert_eq!(server.total("recoveries_recovered_total"), 2);
    // A topic never published: seq 0, and whatever epoch the client names is not its own.
    let mut c = raw_upgrade(&server, "/ws");
    let reply = sub(&mut c, "fresh", Some((0, "abc")));
    assert_eq!(reply["seq"], 0);
    assert_eq!(reply["recovered"], false);
    // Subscribing again on the same connection replays nothing.
    let mut c = raw_upgrade(&server, "/ws");
    sub(&mut c, "t", None);
    let reply = sub(&mut c, "t", Some((9, &epoch)));
    assert_eq!(reply["recovered"], false, "{reply}");
    publish_n(&server, "t", 12..=12);
    read_events(&mut c, "t", 12, 12);
    assert_eq!(server.total("recoveries_already_subscribed_total"), 1);

    let off = Server::start(&["--history-size", "0"]);
    let epoch = publish_n(&off, "t", 1..=3);
    let mut c = raw_upgrade(&off, "/ws");
    let reply = sub(&mut c, "t", Some((1, &epoch)));
    assert_eq!(
        reply,
        json!({"op": "subscribed", "topic": "t", "seq": 3, "epoch": epoch, "recovered": false})
    );
    assert_eq!(off.total("recoveries_history_off_total"), 1);
}

#[test]
fn a_replay_larger_than_the_send_queue_is_paced_not_cut_off() {
    // 2,000 events of 2 KB: 4 MB to replay through a 64 KiB send queue.
    let server = Server::start(&["--history-size", "2000", "--send-queue-limit", "64KiB"]);
    let mut s = raw_upgrade(&server, "/ws");
    let epoch = epoch_of(&sub(&mut s, "big", None));
    drop(s);
    let pad = "x".repeat(2000);
    for n in 1..=2000 {
        server.publish("big", &format!("{{\"n\":{n},\"pad\":\"{pad}\"}}"));
    }
    let mut s = raw_upgrade(&server, "/ws");
    let reply = sub(&mut s, "big", Some((0, &epoch)));
    assert_eq!(reply["recovered"], true, "{reply}");
    // A live event published during the replay comes after it, once.
    server.publish("big", "{\"n\":2001}");
    for n in 1..=2001 {
        let event = read_json(&mut s);
        assert_eq!(event["seq"], n);
        // A client reading at a normal pace.
        if n % 500 == 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert_eq!(server.total("slow_consumer_total"), 0);
    assert_eq!(server.total("events_replayed_total"), 2000);
}

#[test]
fn the_history_memory_bound_holds_under_thousands_of_topics_with_large_events() {
    let server = Server::start(&["--history-memory", "4MiB", "--history-size", "100"]);
    let rss_before = server.rss_bytes();
    let body = format!("\"{}\"", "y".repeat(32 * 1024));
    // 2,000 topics x 2 events x 32 KB: 128 MB published, 4 MiB held.
    for round in 0..2 {
        for t in 0..2000 {
            let answer = server.publish(&format!("user.{t}"), &body);
            assert_eq!(answer["seq"], round + 1);
        }
    }
    let stats = server.stats();
    let totals = &stats["totals"];
    let held = totals["history_bytes"].as_u64().unwrap();
    assert!(held <= 4 << 20, "{held} bytes held");
    assert!(held > 3 << 20, "the budget is used: {held}");
    assert!(totals["history_evicted_total"].as_u64().unwrap() > 3500);
    assert_eq!(totals["broker_topics"], 2000);
    let events = totals["history_events"].as_u64().unwrap();
    assert!(
        (100..=128).contains(&events),
        "{events} events of 32 KB in 4 MiB"
    );
    let grown = server.rss_bytes().saturating_sub(rss_before);
    assert!(
        grown < 40 << 20,
        "RSS grew {grown} bytes for a 4 MiB history"
    );
    // The most recently published topic recovers; the least recent is too old.
    let mut c = raw_upgrade(&server, "/ws");
    let epoch = server.publish("user.1999", "1")["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        sub(&mut c, "user.1999", Some((1, &epoch)))["recovered"],
        true
    );
    let (status, metrics) = server.control_get("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("ringgate_history_bytes "), "{metrics}");
    let recovered: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("ringgate_recoveries_total{") && l.contains("outcome=\"recovered\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(recovered, 1, "per shard, summed");
}

#[test]
fn a_forgotten_topic_comes_back_with_a_new_epoch_but_one_with_subscribers_stays() {
    let server = Server::start(&[
        "--shards",
        "2",
        "--history-ttl",
        "1s",
        "--topic-idle-ttl",
        "2s",
    ]);
    let old = publish_n(&server, "gone", 1..=1);
    let mut keeper = raw_upgrade(&server, "/ws");
    let kept = epoch_of(&sub(&mut keeper, "kept", None));
    publish_n(&server, "kept", 1..=1);
    read_events(&mut keeper, "kept", 1, 1);
    server.wait_for("the idle topic forgotten", Duration::from_secs(20), |s| {
        s.total("broker_topics_forgotten_total") >= 1
    });
    let answer = server.publish("gone", "{\"n\":1}");
    assert_eq!(answer["seq"], 1, "numbering restarts");
    let new = epoch_of(&answer);
    assert_ne!(new, old, "with a new epoch");
    let mut c = raw_upgrade(&server, "/ws");
    let reply = sub(&mut c, "gone", Some((1, &old)));
    assert_eq!(
        reply,
        json!({"op": "subscribed", "topic": "gone", "seq": 1, "epoch": new, "recovered": false})
    );
    assert_eq!(server.total("recoveries_epoch_changed_total"), 1);
    // "kept" had a subscriber all along: same numbering.
    let answer = server.publish("kept", "{\"n\":2}");
    assert_eq!(
        (answer["seq"].as_u64(), epoch_of(&answer)),
        (Some(2), kept.clone())
    );
    read_events(&mut keeper, "kept", 2, 2);
    // History expired after --history-ttl: a recovery is too old, not wrong.
    std::thread::sleep(Duration::from_millis(2100));
    let mut late = raw_upgrade(&server, "/ws");
    let reply = sub(&mut late, "kept", Some((1, &kept)));
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(server.total("recoveries_too_old_total"), 1);
}

#[test]
fn recover_at_connect_names_topic_seq_and_epoch() {
    let server = Server::start(&["--shards", "2"]);
    let a = publish_n(&server, "a", 1..=4);
    let b = publish_n(&server, "b", 1..=2);
    let path = format!("/ws?topics=c&recover=a@2@{a},b@2@{b}");
    let mut s = raw_upgrade(&server, &path);
    // Answers come in the order named; a's replay follows its answer.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        seen.push(read_json(&mut s));
    }
    assert_eq!(
        seen[0],
        json!({"op": "subscribed", "topic": "a", "seq": 4, "epoch": a, "recovered": true})
    );
    assert_eq!(
        (seen[1]["topic"].clone(), seen[1]["seq"].clone()),
        (json!("a"), json!(3))
    );
    assert_eq!(
        (seen[2]["topic"].clone(), seen[2]["seq"].clone()),
        (json!("a"), json!(4))
    );
    assert_eq!(
        seen[3],
        json!({"op": "subscribed", "topic": "b", "seq": 2, "epoch": b, "recovered": true})
    );
    server.wait_for("three subscriptions", Duration::from_secs(10), |s| {
        s.total("subscriptions") == 3
    });
    publish_n(&server, "c", 1..=1);
    read_events(&mut s, "c", 1, 1);
    for bad in [
        "/ws?recover=a@2",
        "/ws?recover=a@x@e",
        "/ws?recover=a@1@ep-och",
        "/ws?recover=a@1@e,a@2@e",
    ] {
        let mut s = TcpStream::connect(server.ws).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(upgrade_request(bad, "").as_bytes()).unwrap();
        let mut response = String::new();
        let _ = s.read_to_string(&mut response);
        assert!(response.starts_with("HTTP/1.1 400 "), "{bad}: {response}");
        assert!(response.contains("recover"), "{bad}: {response}");
    }
}

#[test]
fn requests_behind_a_subscribe_are_answered_in_order() {
    let server = Server::start(&["--shards", "2"]);
    let mut s = raw_upgrade(&server, "/ws");
    // One write: the unsub arrives while the sub waits for the broker.
    let mut both = frame(FIN | TEXT, br#"{"op":"sub","topic":"t"}"#);
    both.extend(frame(FIN | TEXT, br#"{"op":"unsub","topic":"t"}"#));
    both.extend(frame(FIN | TEXT, br#"{"op":"sub","topic":"sentinel"}"#));
    s.write_all(&both).unwrap();
    assert_eq!(read_json(&mut s)["op"], "subscribed");
    assert_eq!(
        read_json(&mut s),
        json!({"op": "unsubscribed", "topic": "t"})
    );
    assert_eq!(read_json(&mut s)["topic"], "sentinel");
    server.publish("t", "1");
    server.publish("sentinel", "2");
    // Nothing of "t": the unsubscribe took effect after the subscribe.
    assert_eq!(read_json(&mut s)["topic"], "sentinel");
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.total("topics") != 1 {
        assert!(Instant::now() < deadline, "t left subscribed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// More recovering clients at once than a shard forwards to the broker at a
/// time (`SUBSCRIBES_PENDING_MAX`, 1,024): the rest wait their turn; none is
/// told to go away.
#[test]
fn a_reconnect_storm_past_the_pending_limit_waits_instead_of_refusing() {
    let server = Server::start(&["--shards", "1"]);
    let epoch = publish_n(&server, "storm", 1..=5);
    let request = upgrade_request(&format!("/ws?recover=storm@2@{epoch}"), "");
    let mut clients: Vec<TcpStream> = (0..2000)
        .map(|_| {
            let mut s = TcpStream::connect(server.ws).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            s
        })
        .collect();
    for c in &mut clients {
        let head = read_head(c);
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        let reply = read_json(c);
        assert_eq!(reply["recovered"], true, "{reply}");
        read_events(c, "storm", 3, 5);
    }
    assert_eq!(server.total("recoveries_recovered_total"), 2000);
}

/// A topic per user: subscribers that never got an event cost the broker
/// nothing; once one has, its topic keeps its numbering while it stays.
#[test]
fn silent_subscribers_cost_the_broker_nothing_until_an_event_reaches_them() {
    let server = Server::start(&[
        "--shards",
        "2",
        "--history-ttl",
        "1s",
        "--topic-idle-ttl",
        "2s",
    ]);
    let mut users: Vec<TcpStream> = (0..50)
        .map(|i| raw_upgrade(&server, &format!("/ws?topics=user.{i}")))
        .collect();
    server.wait_for("50 subscriptions", Duration::from_secs(10), |s| {
        s.total("subscriptions") == 50
    });
    assert_eq!(server.total("broker_topics"), 0);
    let epoch = publish_n(&server, "user.7", 1..=1);
    read_events(&mut users[7], "user.7", 1, 1);
    assert_eq!(server.total("broker_topics"), 1);
    // Well past --topic-idle-ttl: user.7's subscriber holds its numbering.
    std::thread::sleep(Duration::from_millis(3500));
    let answer = server.publish("user.7", "{\"n\":2}");
    assert_eq!(
        (answer["seq"].as_u64(), epoch_of(&answer)),
        (Some(2), epoch)
    );
    read_events(&mut users[7], "user.7", 2, 2);
    assert_eq!(server.total("broker_topics_forgotten_total"), 0);
    // When it leaves, the topic idles out.
    drop(users);
    server.wait_for("user.7 forgotten", Duration::from_secs(20), |s| {
        s.total("broker_topics_forgotten_total") == 1
    });
}

/// Requests behind a recovering subscribe wait for its replay: a reply never
/// overtakes replayed events, and a second recovery does not mix with the first.
#[test]
fn requests_wait_for_the_replay_before_them() {
    let server = Server::start(&["--send-queue-limit", "64KiB", "--history-size", "1000"]);
    let pad = "p".repeat(1000);
    for n in 1..=200 {
        server.publish("r", &format!("{{\"n\":{n},\"pad\":\"{pad}\"}}"));
    }
    let epoch = epoch_of(&server.publish("r", "{\"n\":201}"));
    let mut s = raw_upgrade(&server, "/ws");
    // 200 KB to replay, more than half the queue limit: most of it waits.
    let sub = format!(r#"{{"op":"sub","topic":"r","since":1,"epoch":"{epoch}"}}"#);
    let mut burst = frame(FIN | TEXT, sub.as_bytes());
    burst.extend(frame(FIN | TEXT, br#"{"op":"unsub","topic":"r"}"#));
    burst.extend(frame(FIN | TEXT, sub.as_bytes()));
    s.write_all(&burst).unwrap();
    for round in 0..2 {
        let reply = read_json(&mut s);
        assert_eq!(reply["op"], "subscribed", "round {round}: {reply}");
        assert_eq!(reply["recovered"], true);
        for n in 2..=201 {
            let event = read_json(&mut s);
            assert_eq!(event["seq"], n, "round {round}: {event}");
        }
        if round == 0 {
            assert_eq!(
                read_json(&mut s),
                json!({"op": "unsubscribed", "topic": "r"})
            );
        }
    }
    server.publish("r", "{\"n\":202}");
    assert_eq!(read_json(&mut s)["seq"], 202, "subscribed again, live");
}

/// A client that closes in the middle of a replay gets the Close answered and
/// nothing after it (RFC 6455 5.5.1).
#[test]
fn nothing_follows_the_close_in_the_middle_of_a_replay() {
    let server = Server::start(&["--send-queue-limit", "64KiB", "--history-size", "1000"]);
    let pad = "p".repeat(2000);
    let mut epoch = String::new();
    for n in 1..=300 {
        epoch = epoch_of(&server.publish("c", &format!("{{\"n\":{n},\"pad\":\"{pad}\"}}")));
    }
    let mut s = raw_upgrade(&server, &format!("/ws?recover=c@0@{epoch}"));
    // Read a little of the 600 KB replay, then close.
    assert_eq!(read_json(&mut s)["recovered"], true);
    assert_eq!(read_json(&mut s)["seq"], 1);
    s.write_all(&frame(FIN | CLOSE, &1000u16.to_be_bytes()))
        .unwrap();
    let mut after_close = 0;
    let mut closed = false;
    while let Some((b0, _)) = read_frame(&mut s) {
        if closed {
            after_close += 1;
        } else if b0 & 0x0f == CLOSE {
            closed = true;
        }
    }
    assert!(closed, "the Close was answered");
    assert_eq!(after_close, 0, "frames after the server's Close");
}
