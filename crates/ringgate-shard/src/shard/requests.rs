//! Client requests on `/ws` (subscribe, unsubscribe, publish) and what the
//! shard tells the broker about them.
//!
//! A `sub` goes to the broker, which answers with where the topic stands (and,
//! recovering, the events the client missed) through this shard's inbox; the
//! subscription takes effect when the answer is handled (`replay.rs`). While a
//! connection has a subscribe outstanding or a replay under way, its later
//! requests wait, in order, so replies come back in the order of the requests
//! and never overtake replayed events (a `sub` then `unsub` is answered
//! `subscribed`, the replay, then `unsubscribed`, and leaves no subscription).
//! `unsub` and `pub` need no answer from the broker.
//!
//! Presence: when a topic is announced here (an event of it was delivered to
//! local subscribers, or a subscribe answered by the broker took effect; see
//! topics.rs) and when an announced topic's last subscriber leaves, the broker
//! is told (it never forgets a topic a shard has announced). A full channel
//! keeps the change pending; opposite changes cancel out, so at most one change
//! per topic waits.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use ringgate_codec::close_code;

use super::Shard;
use crate::conn::{flag, State};
use crate::input::{self, Upcall};
use crate::limits::{REQUESTS_DEFERRED_MAX, STRIKES_MAX, SUBSCRIBES_PENDING_MAX};
use crate::pubsub::{self, Request};
use crate::topics::Subscribed;
use crate::upstream::{ClientPublish, Since, SubscribeRequest, Upstream};

/// A connection with subscribes outstanding at the broker, and the requests
/// that wait for their answers.
pub(super) struct Outstanding {
    pub generation: u32,
    /// Subscribes sent and not yet answered.
    pub pending: u16,
    /// Requests received since, in order; their bytes count in the shard's
    /// unfinished input.
    pub deferred: VecDeque<Box<[u8]>>,
}

impl Outstanding {
    /// Bytes of the requests waiting (at most `REQUESTS_DEFERRED_MAX` of them).
    pub fn deferred_bytes(&self) -> usize {
        self.deferred.iter().map(|text| text.len()).sum()
    }
}

impl Shard {
    /// Acts on the pub/sub work input handling left for connection `key`.
    pub(super) fn handle_upcalls(&mut self, key: usize) {
        let mut upcalls = std::mem::take(&mut self.upcalls);
        for upcall in upcalls.drain(..) {
            if self.conns[key].state != State::Open {
                break;
            }
            match upcall {
                Upcall::Authenticated(claims) => self.authenticated(key, *claims),
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
                Upcall::Recover(recoveries) => {
                    for (topic, seq, epoch) in recoveries {
                        let since = Some(Since { seq, epoch });
                        self.forward_subscribe(key, Arc::from(topic), since);
                    }
                }
                Upcall::Text(text) => {
                    if !self.within_rate(key) {
                        break;
                    }
                    self.handle_or_defer(key, text)
                }
                Upcall::Binary => {
                    self.bad_request(key, "binary messages are not part of the /ws protocol")
                }
            }
        }
        self.upcalls = upcalls;
        self.after_topic_changes();
        self.drive(key);
    }

    /// Handles a request now, or after what it must follow: the connection's
    /// unanswered subscribes, the replay its answers started (a reply must not
    /// overtake events of the replay), and the requests already waiting.
    fn handle_or_defer(&mut self, key: usize, text: Box<[u8]>) {
        let generation = self.conns[key].generation;
        let replaying = self.conns[key].has(flag::REPLAYING);
        let waiting = self
            .outstanding
            .get(&key)
            .is_some_and(|o| o.pending > 0 || !o.deferred.is_empty());
        if !replaying && !waiting {
            return self.handle_request(key, &text);
        }
        // A waiting request is input not yet acted on: it counts against the
        // shard's budget for unfinished input, as the bytes of a request still
        // arriving do, so connections holding requests cannot take more.
        let len = text.len();
        if self.unfinished + len > self.cfg.unfinished_bytes_max {
            self.stats.unfinished_refused.add(1);
            return self.error(key, "busy", "the server is busy, slow down");
        }
        let entry = self.outstanding_of(key, generation);
        if entry.deferred.len() >= REQUESTS_DEFERRED_MAX {
            return self.error(key, "busy", "too many requests in flight, slow down");
        }
        entry.deferred.push_back(text);
        self.unfinished += len;
    }

    /// Forgets what connection `key` waits for, its waiting requests with it.
    pub(super) fn drop_outstanding(&mut self, key: usize) {
        if let Some(entry) = self.outstanding.remove(&key) {
            self.unfinished -= entry.deferred_bytes();
        }
    }

    /// The connection's entry of what it waits for, made if it has none.
    fn outstanding_of(&mut self, key: usize, generation: u32) -> &mut Outstanding {
        let entry = self.outstanding.entry(key).or_insert_with(|| Outstanding {
            generation,
            pending: 0,
            deferred: VecDeque::new(),
        });
        assert_eq!(entry.generation, generation, "a stale outstanding entry");
        entry
    }

    /// Handles the requests that waited, in order, until one of them must wait
    /// again (a subscribe is unanswered, or a replay is under way).
    pub(super) fn run_deferred(&mut self, key: usize) {
        loop {
            let generation = self.conns[key].generation;
            let replaying = self.conns[key].has(flag::REPLAYING);
            let Some(waiting) = self.outstanding.get_mut(&key) else {
                return;
            };
            assert_eq!(waiting.generation, generation, "a stale outstanding entry");
            if waiting.pending > 0 || replaying {
                return;
            }
            let Some(text) = waiting.deferred.pop_front() else {
                self.drop_outstanding(key);
                return;
            };
            self.unfinished -= text.len();
            if self.conns[key].state != State::Open {
                self.drop_outstanding(key);
                return;
            }
            self.handle_request(key, &text);
        }
    }

    fn handle_request(&mut self, key: usize, text: &[u8]) {
        let request = match pubsub::parse_request(text) {
            Ok(request) => request,
            Err(reason) => return self.bad_request(key, &reason),
        };
        match request {
            Request::Sub { topic, since } => {
                let since = since.map(|(seq, epoch)| Since {
                    seq,
                    epoch: epoch.into_owned(),
                });
                self.forward_subscribe(key, Arc::from(&*topic), since);
            }
            Request::Unsub(topic) => {
                self.topics.unsubscribe(&mut self.conns, key, &topic);
                self.reply(key, pubsub::reply("unsubscribed", &topic));
            }
            Request::Pub { topic, data } => self.client_publish(key, topic, data),
            Request::Refresh(token) => self.refresh(key, &token),
        }
    }

    /// Asks the broker where `topic` stands (and, recovering, for what the
    /// client missed); the answer subscribes the connection (`on_subscribed`).
    fn forward_subscribe(&mut self, key: usize, topic: Arc<str>, since: Option<Since>) {
        if !self.may_subscribe(key, &topic) {
            let msg = "the token does not allow subscribing to this topic";
            self.stats.ops_forbidden.add(1);
            return self.reply(key, pubsub::forbidden_reply(&topic, msg));
        }
        let conn = &self.conns[key];
        let generation = conn.generation;
        let held = conn.subs.len()
            + self
                .outstanding
                .get(&key)
                .map_or(0, |o| usize::from(o.pending));
        if held >= self.cfg.subscriptions_max {
            return self.error(key, "limit", "too many subscriptions on this connection");
        }
        if self.upstream.is_none() {
            return self.error(key, "unavailable", "this server has no broker");
        }
        self.subscribes_waiting.push_back(SubscribeRequest {
            shard: self.id,
            key: u32::try_from(key).expect("keys fit in 32 bits"),
            generation,
            topic,
            since,
        });
        self.outstanding_of(key, generation).pending += 1;
        self.flush_subscribes();
    }

    /// Sends waiting subscribes to the broker while fewer than
    /// `SUBSCRIBES_PENDING_MAX` are unanswered and the channel takes them. The
    /// rest wait, in order (a reconnect storm is back-pressure, not refusals):
    /// at most `--max-subscriptions` per connection, counted with its
    /// subscriptions. Called when a subscribe arrives, when an answer frees a
    /// place, and every tick (the channel may have been full).
    pub(super) fn flush_subscribes(&mut self) {
        let Some(upstream) = self.upstream.clone() else {
            return;
        };
        while self.subscribes_pending < SUBSCRIBES_PENDING_MAX {
            let Some(request) = self.subscribes_waiting.pop_front() else {
                return;
            };
            let key = request.key as usize;
            let alive = self
                .conns
                .get(key)
                .is_some_and(|c| c.generation == request.generation && c.state == State::Open);
            if !alive {
                // Its connection is going: nobody waits for the answer.
                continue;
            }
            // Before the broker can answer: events it numbers after the answer
            // must reach this shard (routes.rs).
            self.topics.await_answer(&request.topic);
            match upstream(Upstream::Subscribe(request)) {
                Ok(()) => self.subscribes_pending += 1,
                Err(Upstream::Subscribe(request)) => {
                    self.topics.answer_handled(&request.topic);
                    self.subscribes_waiting.push_front(request);
                    return;
                }
                Err(_) => unreachable!("the channel hands back what it was given"),
            }
        }
    }

    fn client_publish(&mut self, key: usize, topic: Cow<'_, str>, data: &str) {
        let allowed = self.may_publish(key, &topic);
        let Some(upstream) = self.upstream.as_ref().filter(|_| allowed) else {
            self.stats.ops_forbidden.add(1);
            return self.reply(
                key,
                pubsub::forbidden_reply(&topic, "clients may not publish to this topic"),
            );
        };
        let request = Upstream::Publish(ClientPublish {
            topic: topic.into_owned(),
            data: data.to_string(),
        });
        if upstream(request).is_err() {
            self.error(key, "busy", "the publisher is overloaded, try again");
        }
    }

    /// Answers a bad request; too many in a short time close the connection with 1008.
    fn bad_request(&mut self, key: usize, reason: &str) {
        self.error(key, "bad_request", reason);
        self.strike(key);
    }

    /// Counts a request that cost the shard for nothing against the connection
    /// (the sweep forgives one a tick); past `STRIKES_MAX` it is closed.
    pub(super) fn strike(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.strikes = conn.strikes.saturating_add(1);
        if conn.strikes > STRIKES_MAX {
            input::start_close(
                conn,
                close_code::POLICY_VIOLATION,
                "too many bad requests",
                self.now,
                &mut self.pool,
            );
            self.stats.protocol_errors.add(1);
        }
    }

    pub(super) fn error(&mut self, key: usize, code: &str, msg: &str) {
        self.reply(key, pubsub::error_reply(code, msg));
    }

    /// Subscribes `key` to `topic` now (an answer from the broker arrived).
    pub(super) fn subscribe_now(&mut self, key: usize, topic: &str) -> Subscribed {
        let max = self.cfg.subscriptions_max;
        self.topics.subscribe(&mut self.conns, key, topic, max)
    }

    /// Sends the topic index's presence changes (announced, last out) to the broker and
    /// updates the gauges.
    pub(super) fn after_topic_changes(&mut self) {
        for (topic, present) in self.topics.take_changes() {
            // A change undoing a pending one cancels it: the broker never saw it.
            match self.presence.remove(&topic) {
                Some(pending) => assert_ne!(pending, present, "presence changes alternate"),
                None => {
                    self.presence.insert(topic, present);
                }
            }
        }
        self.flush_presence();
        self.update_topic_gauges();
    }

    /// Tells the broker the pending presence changes, as many as the channel takes.
    pub(super) fn flush_presence(&mut self) {
        let Some(upstream) = self.upstream.as_ref() else {
            self.presence.clear();
            return;
        };
        let shard = self.id;
        let mut sent = Vec::new();
        for (topic, &present) in &self.presence {
            let message = Upstream::Presence {
                shard,
                topic: topic.clone(),
                present,
            };
            if upstream(message).is_err() {
                break;
            }
            sent.push(topic.clone());
        }
        for topic in sent {
            self.presence.remove(&topic);
        }
    }

    pub(super) fn update_topic_gauges(&self) {
        self.stats.topics.set(self.topics.topics() as u64);
        self.stats
            .subscriptions
            .set(self.topics.subscriptions() as u64);
    }

    /// Queues an answer to a client's request. A client whose socket is full
    /// and whose queue is over its limit is not reading its answers: it is
    /// closed as a slow consumer whatever the policy, instead of growing.
    pub(super) fn reply(&mut self, key: usize, frame: Bytes) {
        self.queue_reply(key, frame);
    }
}
