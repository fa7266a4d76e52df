//! The shard's pub/sub work: client requests on `/ws` (subscribe, unsubscribe,
//! publish), and fanout of published frames to local subscribers.
//!
//! Fanout queues the very same `Bytes` on every subscriber (a refcount, never a
//! copy or a re-encode) and stages one send per subscriber; the loop submits
//! them in batches. A subscriber whose queue would pass the send-queue limit is
//! a slow consumer: closed with 1008, or, with `--slow-consumer=drop`, it misses
//! the event (its `seq` shows the gap).

use std::borrow::Cow;

use bytes::Bytes;
use ringgate_codec::close_code;

use super::{stage_send, Shard};
use crate::config::{SlowConsumer, STRIKES_MAX};
use crate::conn::{Conn, State};
use crate::input::{self, Upcall};
use crate::pubsub::{self, Request};
use crate::stats::ShardStats;
use crate::topics::Subscribed;
use crate::ClientPublish;

impl Shard {
    /// Acts on the pub/sub work input handling left for connection `key`.
    pub(super) fn handle_upcalls(&mut self, key: usize) {
        let mut upcalls = std::mem::take(&mut self.upcalls);
        for upcall in upcalls.drain(..) {
            if self.conns[key].state != State::Open {
                break;
            }
            match upcall {
                Upcall::Subscribe(topics) => {
                    for topic in &topics {
                        // The count was checked against the limit at the upgrade.
                        self.topics.subscribe(
                            &mut self.conns,
                            key,
                            topic,
                            self.cfg.subscriptions_max,
                        );
                    }
                }
                Upcall::Text(text) => self.handle_request(key, &text),
                Upcall::Binary => {
                    self.bad_request(key, "binary messages are not part of the /ws protocol")
                }
            }
        }
        self.upcalls = upcalls;
        self.update_topic_gauges();
        self.drive(key);
    }

    fn handle_request(&mut self, key: usize, text: &[u8]) {
        let request = match pubsub::parse_request(text) {
            Ok(request) => request,
            Err(reason) => return self.bad_request(key, reason),
        };
        match request {
            Request::Sub(topic) => {
                let max = self.cfg.subscriptions_max;
                match self.topics.subscribe(&mut self.conns, key, &topic, max) {
                    Subscribed::New | Subscribed::Already => {
                        self.conns[key].queue(pubsub::reply("subscribed", &topic))
                    }
                    Subscribed::Full => {
                        self.error(key, "limit", "too many subscriptions on this connection")
                    }
                }
            }
            Request::Unsub(topic) => {
                self.topics.unsubscribe(&mut self.conns, key, &topic);
                self.conns[key].queue(pubsub::reply("unsubscribed", &topic));
            }
            Request::Pub { topic, data } => self.client_publish(key, topic, data),
        }
    }

    fn client_publish(&mut self, key: usize, topic: Cow<'_, str>, data: &str) {
        let allowed = self
            .cfg
            .client_publish
            .as_deref()
            .is_some_and(|p| pubsub::publish_allowed(p, &topic));
        let Some(publisher) = self.publisher.as_ref().filter(|_| allowed) else {
            return self.error(key, "forbidden", "clients may not publish to this topic");
        };
        let request = ClientPublish {
            topic: topic.into_owned(),
            data: data.to_string(),
        };
        if publisher(request).is_err() {
            self.error(key, "busy", "the publisher is overloaded, try again");
        }
    }

    /// Answers a bad request; too many in a short time close the connection with 1008.
    fn bad_request(&mut self, key: usize, reason: &str) {
        self.error(key, "bad_request", reason);
        let conn = &mut self.conns[key];
        conn.strikes = conn.strikes.saturating_add(1);
        if conn.strikes > STRIKES_MAX {
            input::start_close(
                conn,
                close_code::POLICY_VIOLATION,
                "too many bad requests",
                self.now,
            );
            self.stats.protocol_errors.add(1);
        }
    }

    fn error(&mut self, key: usize, code: &str, msg: &str) {
        self.conns[key].queue(pubsub::error_reply(code, msg));
    }

    /// Queues `frame` on every open local subscriber of `topic`.
    pub(super) fn deliver(&mut self, topic: &str, frame: &Bytes, published_ns: u64) {
        let limit = self.cfg.send_queue_bytes_max;
        let policy = self.cfg.slow_consumer;
        let Shard {
            topics,
            conns,
            staged,
            stats,
            now,
            ..
        } = self;
        for &key in topics.subscribers(topic) {
            let key = key as usize;
            let conn = &mut conns[key];
            if queue_event(conn, frame, published_ns, limit, policy, *now, stats) != Queued::Skipped
            {
                stage_send(conn, key, staged);
            }
        }
        stats.events_received.add(1);
    }

    pub(super) fn update_topic_gauges(&self) {
        self.stats.topics.set(self.topics.topics() as u64);
        self.stats
            .subscriptions
            .set(self.topics.subscriptions() as u64);
    }
}

/// What [`queue_event`] did for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queued {
    /// The event is queued.
    Event,
    /// The subscriber was too slow: its queue now ends in a Close 1008.
    Closed,
    /// Nothing queued (not open, or the event was dropped for it).
    Skipped,
}

/// Queues one published frame on one subscriber, applying the slow-consumer
/// policy. The frame is shared (`Bytes::clone` is a refcount), never copied.
pub(crate) fn queue_event(
    conn: &mut Conn,
    frame: &Bytes,
    published_ns: u64,
    limit: usize,
    policy: SlowConsumer,
    now: u32,
    stats: &ShardStats,
) -> Queued {
    if conn.state != State::Open {
        return Queued::Skipped;
    }
    let queued = conn.queued_bytes();
    if queued > 0 && queued + frame.len() > limit {
        match policy {
            SlowConsumer::Drop => {
                stats.events_dropped.add(1);
                return Queued::Skipped;
            }
            SlowConsumer::Close => {
                stats.slow_consumers.add(1);
                if let Some(q) = conn.sendq.as_mut() {
                    q.discard_unsent();
                }
                conn.queue(input::close_frame(
                    close_code::POLICY_VIOLATION,
                    "slow consumer",
                ));
                conn.state = State::Draining;
                conn.since = now;
                return Queued::Closed;
            }
        }
    }
    conn.queue_event(frame.clone(), published_ns);
    stats.messages_sent.add(1);
    Queued::Event
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::NextSend;
    use crate::pubsub::{event_frame, EventData};
    use crate::topics::TopicIndex;
    use slab::Slab;

    fn open_subscribers(n: usize, topic: &str) -> (Slab<Conn>, TopicIndex) {
        let mut conns = Slab::new();
        let mut index = TopicIndex::default();
        for i in 0..n {
            let mut conn = Conn::new(i as u32, 0, 0);
            conn.state = State::Open;
            let key = conns.insert(conn);
            index.subscribe(&mut conns, key, topic, 64);
        }
        (conns, index)
    }

    #[test]
    fn every_subscriber_gets_the_same_bytes_not_a_copy() {
        let (mut conns, index) = open_subscribers(100, "news");
        let frame = event_frame("news", 1, EventData::Json("{\"x\":1}"));
        let stats = ShardStats::default();
        for &key in index.subscribers("news") {
            let conn = &mut conns[key as usize];
            assert_eq!(
                queue_event(conn, &frame, 1, 1 << 20, SlowConsumer::Close, 0, &stats),
                Queued::Event
            );
        }
        for (_, conn) in conns.iter_mut() {
            match conn.sendq.as_mut().unwrap().next_send() {
                Some(NextSend::One(ptr, len)) => {
                    assert_eq!(ptr, frame.as_ptr(), "a subscriber got a copy");
                    assert_eq!(len, frame.len());
                }
                other => panic!(
                    "expected one send of the shared frame, got {}",
                    other.is_some()
                ),
            }
        }
        assert_eq!(stats.messages_sent.get(), 100);
    }

    #[test]
    fn slow_consumers_are_closed_or_skipped() {
        let (mut conns, _) = open_subscribers(2, "t");
        let frame = Bytes::from(vec![0u8; 100]);
        let stats = ShardStats::default();
        let (a, b) = (0, 1);
        // One 100-byte event for a connection whose queue may hold 150.
        let offer = |conn: &mut Conn, policy| queue_event(conn, &frame, 1, 150, policy, 7, &stats);
        // The first event always fits, whatever its size.
        assert_eq!(offer(&mut conns[a], SlowConsumer::Close), Queued::Event);
        assert_eq!(offer(&mut conns[a], SlowConsumer::Close), Queued::Closed);
        let conn = &conns[a];
        assert_eq!(conn.state, State::Draining);
        let q = conn.sendq.as_ref().unwrap();
        assert_eq!(
            q.head().unwrap()[0],
            0x88,
            "queued events dropped, a close queued"
        );
        assert_eq!(stats.slow_consumers.get(), 1);
        // Closed connections get nothing more.
        assert_eq!(offer(&mut conns[a], SlowConsumer::Close), Queued::Skipped);
        // The drop policy keeps the connection and skips the event.
        assert_eq!(offer(&mut conns[b], SlowConsumer::Drop), Queued::Event);
        assert_eq!(offer(&mut conns[b], SlowConsumer::Drop), Queued::Skipped);
        assert_eq!(conns[b].state, State::Open);
        assert_eq!(stats.events_dropped.get(), 1);
    }
}
