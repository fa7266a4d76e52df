//! The broker's answers to subscribes, and the pacing of replays.
//!
//! An answer subscribes the connection (the subscription takes effect here, in
//! the inbox's order: every event numbered before the answer is in it, every
//! later one comes after), queues the `subscribed` reply, then the replayed
//! events. No event can be both replayed and delivered live, so none is
//! duplicated and none is missed.
//!
//! Pacing: a replay can be as large as the history (`--history-size` events), so
//! it does not go into the send queue at once. The connection's frames wait in
//! a backlog (`REPLAYING` flag) and are moved into the queue as it drains, at
//! most half the send-queue limit at a time; while the backlog exists, live
//! events for the connection join it behind the replay, keeping every topic's
//! order. Live events are judged as usual (slow consumer, hard bound) by the
//! queue plus the live bytes waiting; the replay itself is the server's own
//! doing and is not held against the client, but a replay that does not move
//! for `REPLAY_STALL_TIMEOUT` (the client reads nothing) ends the connection
//! (1008), so frames it pins are let go.

use std::collections::VecDeque;

use bytes::Bytes;

use super::fanout::{close_slow, QueueLimits, Verdict};
use super::Shard;
use crate::config::SlowConsumer;
use crate::conn::{flag, State};
use crate::limits::{FRAME_OVERHEAD_BYTES, REPLAY_STALL_TIMEOUT};
use crate::pubsub;
use crate::sendq::event_stamp;
use crate::topics::Subscribed;
use crate::upstream::{Recovery, SubscribeAnswer};

/// A connection's frames waiting to go into its send queue.
pub(super) struct Replay {
    pub generation: u32,
    /// Replayed events, then live events, each with its stamp and whether it
    /// is live.
    frames: VecDeque<(Bytes, u64, bool)>,
    /// Bytes of live events among `frames` (judged like queued bytes).
    live_bytes: usize,
    /// The tick the backlog last moved.
    moved: u32,
}

impl Shard {
    /// Handles the broker's answer to a subscribe this shard forwarded.
    pub(super) fn on_subscribed(&mut self, answer: SubscribeAnswer) {
        assert!(self.subscribes_pending > 0, "an answer nobody asked for");
        self.subscribes_pending -= 1;
        let topic = answer.topic.clone();
        self.handle_answer(answer);
        // After the answer took effect: the topic is in the index now if it
        // was subscribed, and counted there (routes.rs).
        self.topics.answer_handled(&topic);
        self.flush_subscribes();
    }

    fn handle_answer(&mut self, answer: SubscribeAnswer) {
        let key = answer.key as usize;
        let alive = self
            .conns
            .get(key)
            .is_some_and(|c| c.generation == answer.generation);
        if !alive {
            // The connection went while the broker answered: nothing to do.
            return;
        }
        if let Some(waiting) = self.outstanding.get_mut(&key) {
            assert!(waiting.pending > 0, "an answer for a subscribe not pending");
            waiting.pending -= 1;
        }
        if self.conns[key].state == State::Open {
            self.take_effect(key, answer);
        }
        self.run_deferred(key);
        self.after_topic_changes();
        self.drive(key);
    }

    fn take_effect(&mut self, key: usize, answer: SubscribeAnswer) {
        if let Some(reason) = answer.refused {
            return self.error(key, "busy", reason);
        }
        // A refresh may have narrowed the ACL while the broker answered.
        if !self.may_subscribe(key, &answer.topic) {
            let msg = "the token does not allow subscribing to this topic";
            self.stats.ops_forbidden.add(1);
            return self.reply(key, crate::pubsub::forbidden_reply(&answer.topic, msg));
        }
        let mut recovery = answer.recovery;
        let mut replay = answer.replay;
        match self.subscribe_now(key, &answer.topic) {
            Subscribed::New => {}
            Subscribed::Already => {
                // Live events flow already: a replay would repeat them.
                if recovery != Recovery::NotAsked {
                    recovery = Recovery::AlreadySubscribed;
                }
                replay.clear();
            }
            Subscribed::Full => {
                return self.error(key, "limit", "too many subscriptions on this connection")
            }
        }
        // The client now holds the topic's numbering: the broker must keep it.
        self.topics.announce(&answer.topic);
        if recovery != Recovery::NotAsked {
            self.stats.count_recovery(recovery);
        }
        let reply = pubsub::subscribed_reply(
            &answer.topic,
            answer.seq,
            &answer.epoch,
            recovery.recovered(),
        );
        self.reply(key, reply);
        if replay.is_empty() || self.conns[key].state != State::Open {
            // Nothing to replay, or the reply found the client not reading.
            return;
        }
        assert_eq!(recovery, Recovery::Recovered, "only a recovery replays");
        self.stats.events_replayed.add(replay.len() as u64);
        let conn = &mut self.conns[key];
        let generation = conn.generation;
        conn.set(flag::REPLAYING);
        let backlog = self.replays.entry(key).or_insert_with(|| Replay {
            generation,
            frames: VecDeque::new(),
            live_bytes: 0,
            moved: self.now,
        });
        assert_eq!(backlog.generation, generation, "a stale replay entry");
        // Replayed events are stamped now, not when they were published: the
        // delivery-latency histogram measures live events.
        let stamp = event_stamp(crate::stats::clock_ns());
        backlog
            .frames
            .extend(replay.into_iter().map(|f| (f, stamp, false)));
    }

    /// A live event for a connection that is replaying: it waits behind the
    /// replay. Judged like a queued event on the queue plus the live bytes
    /// waiting; returns the verdict.
    pub(super) fn queue_behind_replay(
        &mut self,
        key: usize,
        frame: &Bytes,
        published_ns: u64,
        limits: &QueueLimits,
    ) -> Verdict {
        let conn = &self.conns[key];
        let backlog = self
            .replays
            .get(&key)
            .expect("a replaying connection has a backlog");
        let queue = conn.sendq.as_ref();
        let cost = queue.map_or(0, |q| q.cost())
            + backlog.live_bytes
            + backlog.frames.len() * FRAME_OVERHEAD_BYTES;
        let verdict = limits.judge_cost(cost, limits.refused(conn), frame.len());
        match (verdict, limits.policy) {
            (Verdict::Slow, SlowConsumer::Drop) => self.stats.events_dropped.add(1),
            (Verdict::Slow, SlowConsumer::Close) => {
                self.end_replay(key);
                close_slow(&mut self.conns[key], self.now, &self.stats, &mut self.pool);
            }
            (Verdict::Fits | Verdict::Congested, _) => {
                let backlog = self.replays.get_mut(&key).expect("checked above");
                backlog.live_bytes += frame.len();
                backlog
                    .frames
                    .push_back((frame.clone(), event_stamp(published_ns), true));
                self.stats.messages_sent.add(1);
            }
        }
        verdict
    }

    /// Moves waiting frames into the connection's send queue while it holds
    /// less than half the send-queue limit (at least one frame into an empty
    /// queue); ends the replay when none are left.
    pub(super) fn pump_replay(&mut self, key: usize) {
        if self.conns[key].state != State::Open {
            // Closing: nothing may follow its Close frame.
            return self.end_replay(key);
        }
        let half = self.cfg.send_queue_bytes_max / 2;
        let Shard {
            conns,
            replays,
            pool,
            now,
            ..
        } = self;
        let conn = &mut conns[key];
        let backlog = replays
            .get_mut(&key)
            .expect("a replaying connection has a backlog");
        let mut moved = false;
        while let Some((frame, _, _)) = backlog.frames.front() {
            let cost = conn.queued_cost();
            if cost > 0 && cost + frame.len() > half {
                break;
            }
            let (frame, stamp, live) = backlog.frames.pop_front().expect("peeked");
            if live {
                backlog.live_bytes -= frame.len();
            }
            conn.queue_stamped(frame, stamp, pool);
            moved = true;
        }
        if moved {
            backlog.moved = *now;
        }
        if backlog.frames.is_empty() {
            assert_eq!(backlog.live_bytes, 0, "live bytes left in an empty backlog");
            self.end_replay(key);
            // Requests that waited for the replay, in order (requests.rs).
            self.run_deferred(key);
        }
    }

    /// Drops the connection's backlog (the replay is done, or the connection is).
    pub(super) fn end_replay(&mut self, key: usize) {
        if self.conns[key].has(flag::REPLAYING) {
            self.conns[key].clear(flag::REPLAYING);
            let backlog = self
                .replays
                .remove(&key)
                .expect("a replaying connection has a backlog");
            assert_eq!(backlog.generation, self.conns[key].generation);
        }
    }

    /// Whether the connection's replay has not moved for `REPLAY_STALL_TIMEOUT`.
    pub(super) fn replay_stalled(&self, key: usize) -> bool {
        let stall = crate::config::ticks(REPLAY_STALL_TIMEOUT);
        self.replays
            .get(&key)
            .is_some_and(|b| self.now.saturating_sub(b.moved) >= stall)
    }
}
