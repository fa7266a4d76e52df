//! The `/ws` op parser on arbitrary bytes: never panics; what it accepts is the
//! documented object form with a valid topic, and a publish's data is JSON
//! whose numbers all fit a double; a recovering subscribe names a `since`
//! that is a whole number and a valid epoch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate_shard::fuzzing::{parse_op, valid_epoch, valid_topic};

fuzz_target!(|data: &[u8]| {
    let Ok((op, topic, payload)) = parse_op(data) else {
        return;
    };
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(data).expect("an accepted op is a JSON object");
    assert_eq!(object.get("op").and_then(|v| v.as_str()), Some(op));
    if op == "refresh" {
        assert_eq!(object.len(), 2, "a refresh is op and token only");
        assert_eq!(object["token"].as_str(), payload.as_deref());
        return;
    }
    assert!(valid_topic(&topic), "{topic:?}");
    assert!(!object.contains_key("token"));
    match (op, payload) {
        ("pub", Some(payload)) => {
            let v: serde_json::Value = serde_json::from_str(&payload).expect("data is JSON");
            assert!(finite(&v), "{payload}");
        }
        ("sub" | "unsub", None) => {
            assert!(!object.contains_key("data"));
            assert!(!object.contains_key("since") && !object.contains_key("epoch"));
        }
        ("sub", Some(since)) => {
            let (seq, epoch) = since.split_once('@').expect("seq@epoch");
            assert_eq!(object["since"].as_u64(), seq.parse().ok(), "{since}");
            assert_eq!(object["epoch"].as_str(), Some(epoch));
            assert!(valid_epoch(epoch), "{epoch:?}");
        }
        other => panic!("an op the parser should not accept: {other:?}"),
    }
});

fn finite(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) => n.as_f64().is_some_and(f64::is_finite),
        serde_json::Value::Array(a) => a.iter().all(finite),
        serde_json::Value::Object(o) => o.values().all(finite),
        _ => true,
    }
}
