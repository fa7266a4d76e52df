//! The embedded broker: the one place that numbers events and builds their frame.
//!
//! A publish (from the HTTP API or from a client allowed to publish) is
//! all-or-nothing: a place is reserved in every shard's inbox first, and only
//! if every shard has one does the event get its topic's next `seq`, its frame
//! (encoded once), and the pushes. A full inbox anywhere refuses the event with
//! no `seq` used, so a retry cannot duplicate it for anyone. The topic table's
//! lock is held from the `seq` to the last push, so events of one topic reach
//! every inbox in `seq` order whichever thread publishes.
//!
//! Topic state is bounded: past `TOPICS_MAX` topics, the eighth least recently
//! published are forgotten (their numbering restarts at 1 when they return).
//! During a drain every publish is refused: nobody is left to receive it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ringgate_shard::{clock_ns, event_frame, valid_topic, Command, EventData, ShardSender};

/// Topics the broker keeps a `seq` for; past it the least recently published
/// eighth are forgotten. About 100 bytes per topic: 100 MB at most.
pub const TOPICS_MAX: usize = 1_000_000;

/// A publish that reached every shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    pub shards: usize,
}

/// Why a publish was refused. Nothing was delivered to anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    BadTopic,
    /// Some shards' inboxes were full: the event went nowhere, no `seq` was used.
    Busy {
        full: usize,
        shards: usize,
    },
    /// The server is shutting down: every subscriber is being closed.
    Draining,
}

impl PublishError {
    pub fn message(&self) -> String {
        match self {
            Self::BadTopic => "invalid topic name: 1-128 bytes of A-Z a-z 0-9 _ . : / -".into(),
            Self::Busy { full, shards } => format!(
                "{full} of {shards} shard inboxes are full: the event was not delivered to anyone; retry later"
            ),
            Self::Draining => {
                "the server is shutting down: the event was not delivered to anyone".into()
            }
        }
    }
}

struct TopicState {
    seq: u64,
    /// The broker's publish count when this topic was last published to.
    last: u64,
}

#[derive(Default)]
struct Topics {
    map: HashMap<Arc<str>, TopicState>,
    /// Counts publishes: the clock of `TopicState::last`.
    clock: u64,
}

impl Topics {
    /// Forgets the least recently published eighth of the topics.
    fn evict(&mut self) -> usize {
        let mut lasts: Vec<u64> = self.map.values().map(|t| t.last).collect();
        // Every `last` is distinct (one clock tick per publish), so exactly the
        // `cut` oldest are at or below the threshold.
        let cut = (lasts.len() / 8).max(1);
        let (_, &mut threshold, _) = lasts.select_nth_unstable(cut - 1);
        let before = self.map.len();
        self.map.retain(|_, t| t.last > threshold);
        before - self.map.len()
    }
}

pub struct Broker {
    shards: Vec<ShardSender>,
    topics: Mutex<Topics>,
    topics_max: usize,
    draining: AtomicBool,
    pub published: AtomicU64,
    pub rejected: AtomicU64,
    pub topics_forgotten: AtomicU64,
}

impl Broker {
    pub fn new(shards: Vec<ShardSender>) -> Self {
        Self::with_topics_max(shards, TOPICS_MAX)
    }

    fn with_topics_max(shards: Vec<ShardSender>, topics_max: usize) -> Self {
        assert!(topics_max >= 8, "eviction forgets an eighth at a time");
        Broker {
            shards,
            topics: Mutex::new(Topics::default()),
            topics_max,
            draining: AtomicBool::new(false),
            published: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            topics_forgotten: AtomicU64::new(0),
        }
    }

    /// Refuses every publish from now on (the shards are being drained).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Topics with a `seq` now.
    pub fn topics(&self) -> usize {
        self.lock().map.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Topics> {
        // Every update below leaves the table consistent before it can panic.
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers, encodes once, and hands the event to every shard, or to none.
    pub fn publish(&self, topic: &str, data: EventData<'_>) -> Result<Published, PublishError> {
        let result = self.publish_inner(topic, data);
        let counter = if result.is_ok() {
            &self.published
        } else {
            &self.rejected
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    fn publish_inner(&self, topic: &str, data: EventData<'_>) -> Result<Published, PublishError> {
        if !valid_topic(topic) {
            return Err(PublishError::BadTopic);
        }
        // Held until the last push: one topic's events enter every inbox in order.
        let mut topics = self.lock();
        if self.draining.load(Ordering::SeqCst) {
            return Err(PublishError::Draining);
        }
        let reservations: Vec<_> = self.shards.iter().filter_map(|s| s.reserve()).collect();
        if reservations.len() < self.shards.len() {
            return Err(PublishError::Busy {
                full: self.shards.len() - reservations.len(),
                shards: self.shards.len(),
            });
        }
        if !topics.map.contains_key(topic) && topics.map.len() >= self.topics_max {
            let forgotten = topics.evict();
            self.topics_forgotten
                .fetch_add(forgotten as u64, Ordering::Relaxed);
            tracing::info!(
                forgotten,
                "topic table full: forgot the least recently published topics"
            );
        }
        topics.clock += 1;
        let clock = topics.clock;
        // Allocate the shared name only for a topic seen for the first time.
        let name = match topics.map.get_key_value(topic) {
            Some((name, _)) => name.clone(),
            None => {
                let name: Arc<str> = Arc::from(topic);
                topics
                    .map
                    .insert(name.clone(), TopicState { seq: 0, last: 0 });
                name
            }
        };
        let state = topics.map.get_mut(topic).expect("found or inserted above");
        state.seq += 1;
        state.last = clock;
        let seq = state.seq;
        let frame = event_frame(topic, seq, data);
        let published_ns = clock_ns();
        for reservation in reservations {
            reservation.push(Command::Deliver {
                topic: name.clone(),
                frame: frame.clone(),
                published_ns,
            });
        }
        Ok(Published {
            seq,
            shards: self.shards.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_rises_by_one_per_topic_and_bad_topics_are_refused() {
        let broker = Broker::new(Vec::new());
        let data = EventData::Json("1");
        assert_eq!(broker.publish("a", data).unwrap().seq, 1);
        assert_eq!(broker.publish("a", data).unwrap().seq, 2);
        assert_eq!(broker.publish("b", data).unwrap().seq, 1);
        assert_eq!(broker.publish("a", data).unwrap().seq, 3);
        assert_eq!(
            broker.publish("bad topic", data),
            Err(PublishError::BadTopic)
        );
        assert_eq!(broker.published.load(Ordering::Relaxed), 4);
        assert_eq!(broker.rejected.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_full_inbox_anywhere_delivers_to_nobody_and_uses_no_seq() {
        let roomy = ShardSender::detached(0, 100).unwrap();
        let tight = ShardSender::detached(1, 2).unwrap();
        let broker = Broker::new(vec![roomy, tight]);
        let data = EventData::Text("x");
        assert_eq!(
            broker.publish("t", data),
            Ok(Published { seq: 1, shards: 2 })
        );
        assert_eq!(
            broker.publish("t", data),
            Ok(Published { seq: 2, shards: 2 })
        );
        // The second shard's inbox is full: nobody gets the event, and the
        // roomy shard's inbox did not take it either.
        let busy = broker.publish("t", data).unwrap_err();
        assert_eq!(busy, PublishError::Busy { full: 1, shards: 2 });
        assert!(
            busy.message().contains("not delivered to anyone"),
            "{}",
            busy.message()
        );
        let roomy = &broker.shards[0];
        let mut held = 0;
        while roomy.reserve().map(std::mem::forget).is_some() {
            held += 1;
        }
        assert_eq!(held, 100 - 2, "the refused event holds no place");
    }

    #[test]
    fn a_refused_publish_leaves_no_gap_in_seq() {
        let tight = ShardSender::detached(0, 1).unwrap();
        let broker = Broker::new(vec![tight]);
        let data = EventData::Text("x");
        assert_eq!(broker.publish("t", data).unwrap().seq, 1);
        assert!(broker.publish("t", data).is_err());
        let topics = broker.lock();
        assert_eq!(topics.map["t"].seq, 1, "the refused event took no seq");
    }

    #[test]
    fn draining_refuses_every_publish() {
        let broker = Broker::new(vec![ShardSender::detached(0, 10).unwrap()]);
        broker.start_draining();
        assert_eq!(
            broker.publish("t", EventData::Text("x")),
            Err(PublishError::Draining)
        );
    }

    #[test]
    fn a_full_topic_table_forgets_the_least_recently_published() {
        let broker = Broker::with_topics_max(Vec::new(), 80);
        let data = EventData::Text("x");
        for i in 0..80 {
            broker.publish(&format!("t{i}"), data).unwrap();
        }
        // t0 is published again: it is now among the most recent.
        assert_eq!(broker.publish("t0", data).unwrap().seq, 2);
        // A new topic: the ten least recently published go (t1..t10), not t0.
        assert_eq!(broker.publish("new", data).unwrap().seq, 1);
        assert_eq!(broker.topics_forgotten.load(Ordering::Relaxed), 10);
        assert_eq!(broker.topics(), 71);
        assert_eq!(broker.publish("t0", data).unwrap().seq, 3, "kept");
        assert_eq!(broker.publish("t1", data).unwrap().seq, 1, "forgotten");
        // Never a permanent refusal: a million new topics all get a seq.
        for i in 0..1000 {
            assert!(broker.publish(&format!("flood{i}"), data).is_ok());
        }
        assert!(broker.topics() <= 80);
    }

    #[test]
    fn concurrent_publishers_keep_each_topics_order_in_every_inbox() {
        use ringgate_shard::Command;
        let inbox = ShardSender::detached(0, 100_000).unwrap();
        let broker = Arc::new(Broker::new(vec![inbox.clone()]));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let broker = broker.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        broker.publish("t", EventData::Text("x")).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut seqs = Vec::new();
        for command in inbox.take_all_for_tests() {
            let Command::Deliver { frame, .. } = command;
            let v: serde_json::Value = serde_json::from_slice(&frame[2..]).unwrap();
            seqs.push(v["seq"].as_u64().unwrap());
        }
        assert_eq!(seqs, (1..=8000).collect::<Vec<u64>>());
    }
}
