//! End to end: the batch publish API (`POST /publish`, JSON lines in and out):
//! answers line by line in order, 200 or 207, a bad line refusing only itself,
//! events of a topic numbered in line order and delivered as such, the bounds,
//! and the control token.

mod common;

use common::*;
use serde_json::{json, Value};

fn lines(body: &str) -> Vec<Value> {
    body.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[test]
fn a_batch_is_answered_line_by_line_and_delivered_in_order() {
    let server = Server::start(&["--shards", "2"]);
    let mut a = raw_upgrade(&server, "/ws?topics=a");
    let mut b = raw_upgrade(&server, "/ws?topics=b");
    // Both subscriptions are in place before publishing (silent ?topics=).
    server.wait_for(
        "two subscriptions",
        std::time::Duration::from_secs(5),
        |s| s.total("subscriptions") == 2,
    );
    let body = [
        r#"{"topic":"a","data":{"n":1}}"#,
        r#"{"topic":"b","data":"text"}"#,
        "",
        r#"{"topic":"a","data":[2]}"#,
        r#"{"topic":"bad topic","data":1}"#,
        r#"not json"#,
        r#"{"topic":"a","data":3,"extra":1}"#,
        r#"{"topic":"a","data":1E400}"#,
        r#"{"topic":"a","data":{"n":4}}"#,
    ]
    .join("\n");
    let (status, answer) = post(server.control, "/publish", body.as_bytes());
    assert_eq!(status, 207, "{answer}");
    let answers = lines(&answer);
    assert_eq!(answers.len(), 8, "one answer per non-blank line: {answer}");
    let epoch_a = answers[0]["epoch"].as_str().unwrap();
    assert_eq!(
        answers[0],
        json!({"topic": "a", "seq": 1, "epoch": epoch_a})
    );
    assert_eq!(answers[1]["seq"], 1);
    assert_eq!(
        answers[2],
        json!({"topic": "a", "seq": 2, "epoch": epoch_a})
    );
    assert_eq!(answers[3]["topic"], "bad topic");
    assert!(answers[3]["error"]
        .as_str()
        .unwrap()
        .contains("invalid topic"));
    assert_eq!(answers[4]["topic"], Value::Null);
    assert_eq!(answers[5]["topic"], "a", "a line with a topic names it");
    assert!(answers[5]["error"].as_str().unwrap().contains("extra"));
    assert!(answers[6]["error"].as_str().unwrap().contains("double"));
    assert_eq!(
        answers[7],
        json!({"topic": "a", "seq": 3, "epoch": epoch_a})
    );
    for (seq, data) in [(1, json!({"n": 1})), (2, json!([2])), (3, json!({"n": 4}))] {
        assert_eq!(
            read_json(&mut a),
            json!({"topic": "a", "seq": seq, "data": data})
        );
    }
    assert_eq!(
        read_json(&mut b),
        json!({"topic": "b", "seq": 1, "data": "text"})
    );
    // All accepted: 200.
    let (status, answer) = post(
        server.control,
        "/publish",
        b"{\"topic\":\"b\",\"data\":2}\n",
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(lines(&answer)[0]["seq"], 2);
    assert_eq!(server.total("publish_total"), 5);
    assert_eq!(server.total("publish_rejected_total"), 1, "the bad topic");
}

#[test]
fn a_batch_is_bounded_and_guarded() {
    let server = Server::start(&["--max-message-size", "64", "--max-frame-size", "64"]);
    let (status, body) = post(server.control, "/publish", b"\n");
    assert_eq!(status, 400, "{body}");
    let many = "{\"topic\":\"a\",\"data\":1}\n".repeat(10_001);
    let (status, body) = post(server.control, "/publish", many.as_bytes());
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("10000"), "{body}");
    let big = format!("{{\"topic\":\"a\",\"data\":\"{}\"}}", "x".repeat(100));
    // Nothing in it could be published: an error status, the line saying why.
    let (status, body) = post(server.control, "/publish", big.as_bytes());
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("--max-message-size"), "{body}");
    let both = format!("{big}\n{{\"topic\":\"a\",\"data\":1}}\n");
    let (status, body) = post(server.control, "/publish", both.as_bytes());
    assert_eq!(status, 207, "{body}");
    let guarded = Server::start(&["--control-token", "s3cret-control-token-0123"]);
    let (status, _) = post(guarded.control, "/publish", b"{\"topic\":\"a\",\"data\":1}");
    assert_eq!(status, 401);
}

/// A batch far larger than the shards' inboxes (four places each here) waits
/// for room instead of being refused (`--publish-wait`): every event is
/// accepted, numbered in line order and delivered, and the wait is counted.
#[test]
fn a_batch_larger_than_the_inboxes_waits_for_room_and_loses_nothing() {
    const EVENTS: u64 = 600;
    let server = Server::start(&[
        "--shards",
        "2",
        "--inbox-capacity",
        "4",
        "--publish-wait",
        "8s",
    ]);
    let readers: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|topic| {
            let mut s = raw_upgrade(&server, &format!("/ws?topics={topic}"));
            std::thread::spawn(move || {
                (0..EVENTS / 2)
                    .map(|_| read_json(&mut s)["seq"].as_u64().unwrap())
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    server.wait_for(
        "two subscriptions",
        std::time::Duration::from_secs(5),
        |s| s.total("subscriptions") == 2,
    );
    let body: String = (0..EVENTS)
        .map(|i| {
            format!(
                "{{\"topic\":\"{}\",\"data\":{i}}}\n",
                ["a", "b"][i as usize % 2]
            )
        })
        .collect();
    let (status, answer) = post(server.control, "/publish", body.as_bytes());
    assert_eq!(status, 200, "{answer}");
    let seqs: Vec<u64> = lines(&answer)
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = (1..=EVENTS / 2).flat_map(|s| [s, s]).collect();
    assert_eq!(seqs, expected, "each topic numbered in line order");
    for reader in readers {
        let got = reader.join().unwrap();
        assert_eq!(got, (1..=EVENTS / 2).collect::<Vec<u64>>());
    }
    assert!(server.total("publish_waits_total") >= 1, "it had to wait");
    assert_eq!(server.total("publish_rejected_total"), 0);
    assert_eq!(server.total("publish_total"), EVENTS);
}
