//! End to end: the pub/sub gateway with real clients on two shards: every
//! subscriber gets every event once and in order, non-subscribers nothing;
//! unsubscribe and disconnect stop delivery; slow consumers are cut off without
//! hurting the others; bad input gets an error and the connection stays usable.

mod common;

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn subscriber(server: &Server, topics: &str) -> TcpStream {
    raw_upgrade(server, &format!("/ws?topics={topics}"))
}

#[test]
fn every_subscriber_gets_every_event_once_in_order_across_two_shards() {
    let server = Server::start(&["--shards", "2"]);
    let mut news: Vec<TcpStream> = (0..40).map(|_| subscriber(&server, "news")).collect();
    let mut other: Vec<TcpStream> = (0..20).map(|_| subscriber(&server, "other")).collect();
    server.wait_for("60 subscriptions", Duration::from_secs(10), |s| {
        s.total("subscriptions") == 60
    });
    let subs = server.per_shard("subscriptions");
    assert!(
        subs.iter().all(|&n| n > 0),
        "subscribers on one shard only: {subs:?}"
    );
    let mut epoch = None;
    for i in 1..=100 {
        let answer = server.publish("news", &format!("{{\"n\":{i}}}"));
        let e = answer["epoch"].as_str().expect("an epoch").to_string();
        // One numbering: the epoch stays while the topic lives.
        assert_eq!(*epoch.get_or_insert_with(|| e.clone()), e);
        assert_eq!(
            answer,
            json!({"topic": "news", "seq": i, "epoch": e, "shards": 2})
        );
    }
    for s in &mut news {
        for i in 1..=100 {
            assert_eq!(
                read_json(s),
                json!({"topic": "news", "seq": i, "data": {"n": i}})
            );
        }
    }
    // The others got nothing of "news": their first frame is their own topic's event.
    server.publish("other", "\"only this\"");
    for s in &mut other {
        assert_eq!(
            read_json(s),
            json!({"topic": "other", "seq": 1, "data": "only this"})
        );
    }
    assert_eq!(server.total("messages_sent_total"), 40 * 100 + 20);
}

#[test]
fn text_bodies_become_json_strings() {
    let server = Server::start(&[]);
    let mut s = subscriber(&server, "t");
    server.wait_for("the subscription", Duration::from_secs(10), |s| {
        s.total("subscriptions") == 1
    });
    server.publish("t", "not json, \"quoted\"\n");
    assert_eq!(read_json(&mut s)["data"], "not json, \"quoted\"\n");
}

#[test]
fn unsubscribe_and_disconnect_stop_delivery() {
    let server = Server::start(&["--shards", "2"]);
    let mut a = raw_upgrade(&server, "/ws");
    let b = subscriber(&server, "t");
    send_text(&mut a, r#"{"op":"sub","topic":"t"}"#);
    let reply = read_json(&mut a);
    let epoch = reply["epoch"].as_str().expect("an epoch");
    assert_eq!(
        reply,
        json!({"op": "subscribed", "topic": "t", "seq": 0, "epoch": epoch})
    );
    send_text(&mut a, r#"{"op":"sub","topic":"sentinel"}"#);
    assert_eq!(read_json(&mut a)["topic"], "sentinel");
    server.wait_for("three subscriptions", Duration::from_secs(10), |s| {
        s.total("subscriptions") == 3
    });
    server.publish("t", "1");
    assert_eq!(read_json(&mut a)["seq"], 1);
    send_text(&mut a, r#"{"op":"unsub","topic":"t"}"#);
    assert_eq!(
        read_json(&mut a),
        json!({"op": "unsubscribed", "topic": "t"})
    );
    server.publish("t", "2");
    server.publish("sentinel", "\"after\"");
    // Nothing of "t" came before the sentinel.
    assert_eq!(
        read_json(&mut a),
        json!({"topic": "sentinel", "seq": 1, "data": "after"})
    );
    drop(b);
    server.wait_for("b's subscription to go", Duration::from_secs(10), |s| {
        s.total("subscriptions") == 1
    });
    server.publish("t", "3");
    assert_eq!(
        server.total("topics"),
        1,
        "an empty topic's memory is returned"
    );
}

#[test]
fn a_thousand_subscribers_times_a_thousand_events_lose_nothing() {
    const SUBSCRIBERS: usize = 1000;
    const EVENTS: u64 = 1000;
    let server = Server::start(&["--shards", "2"]);
    let subscribers: Vec<TcpStream> = (0..SUBSCRIBERS)
        .map(|_| subscriber(&server, "load"))
        .collect();
    server.wait_for("every subscription", Duration::from_secs(20), |s| {
        s.total("subscriptions") == SUBSCRIBERS as u64
    });
    // Readers run while events are published, as real clients do.
    let readers: Vec<_> = subscribers
        .chunks(SUBSCRIBERS / 4)
        .map(|chunk| {
            let streams: Vec<TcpStream> = chunk.iter().map(|s| s.try_clone().unwrap()).collect();
            std::thread::spawn(move || {
                for s in streams {
                    let mut r = BufReader::with_capacity(64 * 1024, s);
                    for seq in 1..=EVENTS {
                        let event: Value = read_json(&mut r);
                        assert_eq!(event["seq"], seq);
                        assert_eq!(event["data"]["i"], seq);
                    }
                }
            })
        })
        .collect();
    for i in 1..=EVENTS {
        server.publish("load", &format!("{{\"i\":{i}}}"));
    }
    for r in readers {
        r.join().expect("a subscriber lost or reordered an event");
    }
    let stats = server.stats();
    assert_eq!(
        stats["totals"]["messages_sent_total"],
        json!(SUBSCRIBERS as u64 * EVENTS)
    );
    assert_eq!(stats["totals"]["slow_consumer_total"], json!(0));
    drop(subscribers);
}

#[test]
fn a_client_that_never_reads_is_closed_as_a_slow_consumer() {
    const EVENTS: u64 = 2000;
    let server = Server::start(&["--shards", "2"]);
    let stalled = stalled_subscriber(&server, "big");
    let reader = subscriber(&server, "big");
    server.wait_for("both subscriptions", Duration::from_secs(10), |s| {
        s.total("subscriptions") == 2
    });
    let reading = std::thread::spawn(move || {
        let mut r = BufReader::with_capacity(64 * 1024, reader);
        for seq in 1..=EVENTS {
            assert_eq!(read_json(&mut r)["seq"], seq);
        }
    });
    // 2,000 events of 8 KB: far more than the stalled client's socket buffers
    // and its 256 KiB send queue hold.
    let body = format!("\"{}\"", "x".repeat(8_000));
    for _ in 0..EVENTS {
        server.publish("big", &body);
    }
    reading
        .join()
        .expect("the reading subscriber missed an event");
    assert_eq!(server.total("slow_consumer_total"), 1);
    // The stalled client finds some events, then Close 1008.
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut r = BufReader::new(stalled.try_clone().unwrap());
    assert_eq!(read_close_code(&mut r), 1008);
}

#[test]
fn with_the_drop_policy_a_slow_consumer_misses_events_but_stays() {
    let server = Server::start(&["--slow-consumer", "drop"]);
    let stalled = stalled_subscriber(&server, "big");
    server.wait_for("the subscription", Duration::from_secs(10), |s| {
        s.total("subscriptions") == 1
    });
    let body = format!("\"{}\"", "x".repeat(8_000));
    for _ in 0..2000 {
        server.publish("big", &body);
    }
    assert!(server.total("events_dropped_total") > 0);
    assert_eq!(server.total("slow_consumer_total"), 0);
    // Reading now: seq has gaps, but the connection is alive and new events
    // arrive once its queue has drained.
    let reading = std::thread::spawn(move || {
        let mut r = BufReader::new(stalled);
        let (mut last, mut gap) = (0, false);
        loop {
            let event = read_json(&mut r);
            let seq = event["seq"].as_u64().unwrap();
            gap |= seq != last + 1;
            assert!(seq > last, "seq went back from {last} to {seq}");
            last = seq;
            if event["data"] == "end" {
                return gap;
            }
        }
    });
    while !reading.is_finished() {
        server.publish("big", "\"end\"");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        reading.join().unwrap(),
        "dropped events show as a gap in seq"
    );
}

/// A subscriber with a tiny receive buffer, so the kernel cannot absorb what it
/// does not read.
fn stalled_subscriber(server: &Server, topics: &str) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.ws.into()).unwrap();
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(upgrade_request(&format!("/ws?topics={topics}"), "").as_bytes())
        .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 101 "));
    s
}

#[test]
fn malformed_requests_get_errors_and_the_connection_stays_usable() {
    let server = Server::start(&["--max-subscriptions", "2"]);
    let mut s = raw_upgrade(&server, "/ws");
    for bad in [
        "not json",
        r#"{"op":"sub"}"#,
        r#"{"op":"sub","topic":"bad name"}"#,
        r#"{"op":"jump","topic":"a"}"#,
        "[]",
    ] {
        send_text(&mut s, bad);
        let reply = read_json(&mut s);
        assert_eq!(reply["op"], "error", "{bad}");
        assert_eq!(reply["code"], "bad_request", "{bad}");
        assert!(reply["msg"].as_str().unwrap().len() > 5, "{bad}");
    }
    s.write_all(&frame(FIN | BINARY, &[1, 2, 3])).unwrap();
    assert_eq!(read_json(&mut s)["code"], "bad_request");
    // Still usable: subscriptions work, up to the limit.
    send_text(&mut s, r#"{"op":"sub","topic":"a"}"#);
    assert_eq!(read_json(&mut s)["op"], "subscribed");
    send_text(&mut s, r#"{"op":"sub","topic":"b"}"#);
    assert_eq!(read_json(&mut s)["op"], "subscribed");
    send_text(&mut s, r#"{"op":"sub","topic":"c"}"#);
    assert_eq!(read_json(&mut s)["code"], "limit");
    server.publish("a", "1");
    assert_eq!(
        read_json(&mut s),
        json!({"topic": "a", "seq": 1, "data": 1})
    );
    // Clients may not publish unless allowed.
    send_text(&mut s, r#"{"op":"pub","topic":"a","data":1}"#);
    assert_eq!(read_json(&mut s)["code"], "forbidden");
}

#[test]
fn a_flood_of_garbage_is_closed_with_1008() {
    let server = Server::start(&[]);
    let mut s = raw_upgrade(&server, "/ws");
    for _ in 0..30 {
        send_text(&mut s, "garbage");
    }
    assert_eq!(read_close_code(&mut s), 1008);
}

#[test]
fn clients_publish_where_allowed_with_the_same_seq_numbering() {
    let server = Server::start(&["--client-publish", "chat.*", "--shards", "2"]);
    let mut alice = subscriber(&server, "chat.room");
    let mut bob = subscriber(&server, "chat.room");
    server.wait_for("two subscriptions", Duration::from_secs(10), |s| {
        s.total("subscriptions") == 2
    });
    server.publish("chat.room", "\"from the API\"");
    send_text(
        &mut alice,
        r#"{"op":"pub","topic":"chat.room","data":{"text":"hi bob"}}"#,
    );
    for s in [&mut alice, &mut bob] {
        assert_eq!(
            read_json(s),
            json!({"topic": "chat.room", "seq": 1, "data": "from the API"})
        );
        assert_eq!(
            read_json(s),
            json!({"topic": "chat.room", "seq": 2, "data": {"text": "hi bob"}})
        );
    }
    send_text(&mut alice, r#"{"op":"pub","topic":"admin","data":1}"#);
    assert_eq!(read_json(&mut alice)["code"], "forbidden");
}

#[test]
fn topics_at_connect_are_checked() {
    let server = Server::start(&["--max-subscriptions", "2"]);
    for query in ["topics=bad%20name", "topics=a,b,c"] {
        let mut s = TcpStream::connect(server.ws).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(upgrade_request(&format!("/ws?{query}"), "").as_bytes())
            .unwrap();
        let head = read_head(&mut s);
        assert!(head.starts_with("HTTP/1.1 400 "), "{query}: {head}");
    }
}

#[test]
fn the_publish_api_refuses_bad_input() {
    let server = Server::start(&["--max-message-size", "1KiB", "--max-frame-size", "1KiB"]);
    let (status, body) = post(server.control, "/publish/bad%20topic", b"1");
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(server.control, "/publish/t", &[0xff, 0xfe]);
    assert_eq!(status, 400, "{body}");
    let (status, _) = post(server.control, "/publish/t", &[b'x'; 2000]);
    assert_eq!(status, 413);
    // Topic names may contain '/'.
    let (status, body) = post(server.control, "/publish/a/b:c", b"1");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["topic"],
        "a/b:c"
    );
}

#[test]
fn an_event_goes_only_to_the_shards_that_hold_its_subscribers() {
    let server = Server::start(&["--shards", "2"]);
    // Nobody subscribes: the event is numbered and kept, handed to no shard.
    assert_eq!(server.publish("solo", "1")["shards"], 0);
    let mut clients = Vec::new();
    while server.per_shard("connections").contains(&0) {
        assert!(
            clients.len() < 200,
            "SO_REUSEPORT put 200 clients on one shard"
        );
        clients.push(raw_upgrade(&server, "/ws"));
    }
    for c in &mut clients {
        assert_eq!(sub(c, "everywhere", None)["op"], "subscribed");
    }
    let a = &mut clients[0];
    assert_eq!(sub(a, "solo", None)["seq"], 1);
    let answer = server.publish("solo", "2");
    assert_eq!(answer["shards"], 1, "{answer}");
    assert_eq!(read_json(a)["seq"], 2);
    assert_eq!(server.publish("everywhere", "1")["shards"], 2);
    for c in &mut clients {
        assert_eq!(read_json(c)["topic"], "everywhere");
    }
    // Unsubscribed: the shard no longer takes the topic's events.
    let a = &mut clients[0];
    send_text(a, r#"{"op":"unsub","topic":"solo"}"#);
    assert_eq!(read_json(a)["op"], "unsubscribed");
    assert_eq!(server.publish("solo", "3")["shards"], 0);
    // Subscribed at the upgrade, then gone.
    let late = subscriber(&server, "late");
    server.wait_for("the upgrade's subscription", Duration::from_secs(10), |s| {
        s.total("subscriptions") == clients.len() as u64 + 1
    });
    assert_eq!(server.publish("late", "1")["shards"], 1);
    drop(late);
    server.wait_for("its subscription to go", Duration::from_secs(10), |s| {
        s.total("subscriptions") == clients.len() as u64
    });
    assert_eq!(server.publish("late", "2")["shards"], 0);
    // Nothing of "solo" reached the client that left it.
    assert_eq!(server.publish("everywhere", "2")["shards"], 2);
    assert_eq!(
        read_json(&mut clients[0]),
        json!({"topic": "everywhere", "seq": 2, "data": 2})
    );
}
