//! The embedded broker: the one place that numbers events and builds their frame.
//!
//! A publish (from the HTTP API or from a client allowed to publish) gets the
//! next `seq` of its topic, is encoded once into a WebSocket frame, and the same
//! `Bytes` goes to every shard's inbox. A full inbox is reported, never waited on.
//! One broker per process; with a bus (later), it is also where the link lives.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ringgate_shard::{clock_ns, event_frame, valid_topic, EventData, ShardSender};

/// Topics the broker keeps a `seq` for; a publish to a new topic past this is refused.
pub const TOPICS_MAX: usize = 1_000_000;

/// A publish that reached every shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    pub shards: usize,
}

/// Why a publish was refused or only partly delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    BadTopic,
    TooManyTopics,
    /// Some shards' inboxes were full: their subscribers miss event `seq`.
    Busy {
        seq: u64,
        delivered: usize,
        shards: usize,
    },
}

impl PublishError {
    pub fn message(&self) -> String {
        match self {
            Self::BadTopic => "invalid topic name: 1-128 bytes of A-Z a-z 0-9 _ . : / -".into(),
            Self::TooManyTopics => format!("too many topics (at most {TOPICS_MAX})"),
            Self::Busy {
                delivered, shards, ..
            } => {
                format!("shard inboxes are full: the event reached {delivered} of {shards} shards; retry later")
            }
        }
    }
}

pub struct Broker {
    shards: Vec<ShardSender>,
    /// The last `seq` of each topic (and the shared topic name handed to shards).
    seqs: Mutex<HashMap<Arc<str>, u64>>,
    pub published: AtomicU64,
    pub rejected: AtomicU64,
}

impl Broker {
    pub fn new(shards: Vec<ShardSender>) -> Self {
        Broker {
            shards,
            seqs: Mutex::new(HashMap::new()),
            published: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    /// Numbers, encodes once, and hands the event to every shard.
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
        let (name, seq) = {
            let mut seqs = self.seqs.lock().unwrap_or_else(|p| p.into_inner());
            if !seqs.contains_key(topic) && seqs.len() >= TOPICS_MAX {
                return Err(PublishError::TooManyTopics);
            }
            // Allocate the shared name only for a topic seen for the first time.
            let name = match seqs.get_key_value(topic) {
                Some((name, _)) => name.clone(),
                None => {
                    let name: Arc<str> = Arc::from(topic);
                    seqs.insert(name.clone(), 0);
                    name
                }
            };
            let seq = seqs
                .get_mut(topic)
                .expect("present: found or inserted above");
            *seq += 1;
            (name, *seq)
        };
        let frame = event_frame(topic, seq, data);
        let published_ns = clock_ns();
        let delivered = self
            .shards
            .iter()
            .filter(|shard| {
                shard
                    .deliver(name.clone(), frame.clone(), published_ns)
                    .is_ok()
            })
            .count();
        if delivered < self.shards.len() {
            return Err(PublishError::Busy {
                seq,
                delivered,
                shards: self.shards.len(),
            });
        }
        Ok(Published {
            seq,
            shards: delivered,
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
    fn a_full_shard_inbox_is_reported_not_waited_on() {
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
        // The second shard's inbox is full: the event reaches one of two shards,
        // and its seq is used, so that shard's subscribers see the gap.
        assert_eq!(
            broker.publish("t", data),
            Err(PublishError::Busy {
                seq: 3,
                delivered: 1,
                shards: 2
            })
        );
        let busy = broker.publish("t", data).unwrap_err();
        assert!(
            busy.message().contains("reached 1 of 2 shards"),
            "{}",
            busy.message()
        );
    }
}
