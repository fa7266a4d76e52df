//! The `?topics=` parser on arbitrary queries: never panics, never returns more
//! than the limit, and returns valid, sorted, distinct topic names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate_shard::fuzzing::{query_topics, valid_topic};

fuzz_target!(|input: (u8, &str)| {
    let (max, query) = input;
    let max = usize::from(max % 70) + 1;
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
