//! The `?topics=` and `?recover=` parsers on arbitrary queries: never panic,
//! never return more than the limit, and return valid, distinct topic names
//! (sorted for `?topics=`) and valid epochs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate_shard::fuzzing::{query_recoveries, query_topics, valid_epoch, valid_topic};

fuzz_target!(|input: (u8, &str)| {
    let (max, query) = input;
    let max = usize::from(max % 70) + 1;
    if let Ok(recoveries) = query_recoveries(Some(query), max) {
        assert!(recoveries.len() <= max);
        for (i, (topic, _, epoch)) in recoveries.iter().enumerate() {
            assert!(valid_topic(topic) && valid_epoch(epoch), "{topic:?} {epoch:?}");
            assert!(recoveries[..i].iter().all(|(t, _, _)| t != topic), "distinct");
        }
    }
    let Ok(topics) = query_topics(Some(query), max) else {
        return;
    };
    assert!(topics.len() <= max);
    assert!(topics.iter().all(|t| valid_topic(t)));
    assert!(
        topics.windows(2).all(|w| w[0] < w[1]),
        "sorted and distinct"
    );
});
