//! Fanout of published frames to local subscribers, and the rule that judges
//! what a connection's send queue may take (events and replies alike).
//!
//! Fanout queues the very same `Bytes` on every subscriber (a refcount, never a
//! copy or a re-encode) and, once the turn's events are all queued, asks for one
//! send per subscriber; the loop submits them in batches. A subscriber whose queue would pass the send-queue limit
//! while the kernel refuses its bytes (its socket is full) is a slow consumer:
//! closed with 1008, or, with `--slow-consumer=drop`, it misses the event (its
//! `seq` shows the gap). Over the limit with bytes the kernel was not yet offered,
//! it is not judged: the event is queued and the inbox waits (congestion). No
//! queue ever passes the hard limit (`ShardConfig::send_queue_hard_max`).

use bytes::Bytes;
use ringgate_codec::close_code;

use super::Shard;
use crate::config::SlowConsumer;
use crate::conn::{flag, Conn, State};
use crate::input;
use crate::limits::{FRAME_OVERHEAD_BYTES, SCRATCH_KEEP};
use crate::sendq::{event_stamp, SendPool};
use crate::stats::ShardStats;

impl Shard {
    /// Queues an answer to a client's request (see `requests.rs`). A client
    /// whose socket is full and whose queue is over its limit is not reading its
    /// answers: it is closed as a slow consumer whatever the policy.
    pub(super) fn queue_reply(&mut self, key: usize, frame: Bytes) {
        let limits = QueueLimits::of(self);
        let conn = &mut self.conns[key];
        if conn.state != State::Open {
            return;
        }
        match limits.judge(conn, frame.len()) {
            Verdict::Fits | Verdict::Congested => conn.queue(frame, &mut self.pool),
            Verdict::Slow => close_slow(conn, self.now, &self.stats, &mut self.pool),
        }
    }

    /// Queues `frame` on every open local subscriber of `topic` (`hash`, its
    /// `topic_hash`).
    pub(super) fn deliver(&mut self, topic: &str, hash: u64, frame: &Bytes, published_ns: u64) {
        let limits = QueueLimits::of(self);
        // The keys are copied out (a memcpy, 4 bytes per subscriber) so each
        // subscriber can be handled with the whole shard at hand. Subscribers
        // here now hold this topic's numbering: it is announced to the broker,
        // which must keep it (see topics.rs).
        let mut keys = std::mem::take(&mut self.fanout_keys);
        let id = self.topics.announce_hashed(topic, hash);
        if let Some(id) = id {
            keys.extend_from_slice(self.topics.subscribers_of(id));
        }
        self.backlog_deliveries += keys.len();
        for &key in &keys {
            let key = key as usize;
            if self.conns[key].has(flag::REPLAYING) {
                // Behind the replay, in order; the backlog is moved into the
                // queue as it drains (drive pumps it).
                if self.conns[key].state == State::Open {
                    self.queue_behind_replay(key, frame, published_ns, &limits);
                }
                continue;
            }
            let conn = &mut self.conns[key];
            let queued = queue_event(
                conn,
                frame,
                published_ns,
                &limits,
                self.now,
                &self.stats,
                &mut self.pool,
            );
            match queued {
                Queued::Skipped => continue,
                Queued::Congested if !conn.has(flag::CONGESTED) => {
                    conn.set(flag::CONGESTED);
                    self.congested.push((key, conn.generation));
                }
                // The close goes out now (the record may leave the topic).
                Queued::Closed => self.want_send(key),
                Queued::Congested | Queued::Event => {}
            }
        }
        keys.clear();
        keys.shrink_to(SCRATCH_KEEP);
        self.fanout_keys = keys;
        // Sends wait for the end of the turn (`stage_due_sends`): a subscriber
        // then gets every event of the turn in one send, not a send for the
        // first and the rest behind it.
        if let Some(id) = id {
            if !self.sends_due.contains(&id) {
                self.sends_due.push(id);
            }
        }
        self.stats.events_received.add(1);
    }

    /// Asks for a send for every subscriber of the topics delivered to this
    /// turn. `want_send` is a no-op for a connection with nothing to send or a
    /// send already asked for, so a topic index reused meanwhile costs only
    /// the walk.
    pub(super) fn stage_due_sends(&mut self) {
        let mut due = std::mem::take(&mut self.sends_due);
        let mut keys = std::mem::take(&mut self.fanout_keys);
        for id in due.drain(..) {
            keys.extend_from_slice(self.topics.subscribers_of(id));
            for &key in &keys {
                self.want_send(key as usize);
            }
            keys.clear();
        }
        keys.shrink_to(SCRATCH_KEEP);
        self.fanout_keys = keys;
        self.sends_due = due;
    }
}

/// What [`queue_event`] did for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queued {
    /// The event is queued.
    Event,
    /// The event is queued, over the limit, with bytes the kernel was not yet
    /// offered: the shard waits before taking more events.
    Congested,
    /// The subscriber was too slow: its queue now ends in a Close 1008.
    Closed,
    /// Nothing queued (not open, or the event was dropped for it).
    Skipped,
}

/// The limits a queued frame is judged by, and the judging.
pub(crate) struct QueueLimits {
    /// `--send-queue-limit`.
    pub soft: usize,
    /// No queue passes this, refused or not.
    pub hard: usize,
    pub policy: SlowConsumer,
    /// The loop epoch, for [`crate::sendq::SendQueue::refused`].
    pub epoch: u32,
}

/// How a frame of some size fits a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Within the limit (or the queue is empty: one frame always fits).
    Fits,
    /// Over the limit, but the kernel has not refused this connection's bytes.
    Congested,
    /// Over the limit and refused, or over the hard limit.
    Slow,
}

impl QueueLimits {
    pub(super) fn of(shard: &Shard) -> Self {
        QueueLimits {
            soft: shard.cfg.send_queue_bytes_max,
            hard: shard.cfg.send_queue_hard_max(),
            policy: shard.cfg.slow_consumer,
            epoch: shard.epoch,
        }
    }

    pub fn judge(&self, conn: &Conn, frame_len: usize) -> Verdict {
        let Some(queue) = conn.sendq.as_ref().filter(|q| !q.is_empty()) else {
            return Verdict::Fits;
        };
        self.judge_cost(queue.cost(), self.refused(conn), frame_len)
    }

    /// Whether the kernel refused `conn`'s bytes (see `SendQueue::refused`). A
    /// connection waiting for a send slot was offered nothing since its last
    /// send: whatever the kernel refused then it may take now, and the wait is
    /// the shard's pace, not the reader's (the hard limit bounds it meanwhile).
    pub fn refused(&self, conn: &Conn) -> bool {
        !conn.has(flag::SEND_READY) && conn.sendq.as_ref().is_some_and(|q| q.refused(self.epoch))
    }

    /// The verdict for a frame of `frame_len` on top of `cost` (0: one frame
    /// always fits), with the kernel having `refused` the connection's bytes.
    pub fn judge_cost(&self, cost: usize, refused: bool, frame_len: usize) -> Verdict {
        let after = cost + frame_len + FRAME_OVERHEAD_BYTES;
        if cost == 0 || after <= self.soft {
            Verdict::Fits
        } else if refused || after > self.hard {
            Verdict::Slow
        } else {
            Verdict::Congested
        }
    }
}

/// Queues one published frame on one subscriber, applying the slow-consumer
/// policy. The frame is shared (`Bytes::clone` is a refcount), never copied.
pub(crate) fn queue_event(
    conn: &mut Conn,
    frame: &Bytes,
    published_ns: u64,
    limits: &QueueLimits,
    now: u32,
    stats: &ShardStats,
    pool: &mut SendPool,
) -> Queued {
    if conn.state != State::Open {
        return Queued::Skipped;
    }
    let verdict = limits.judge(conn, frame.len());
    match (verdict, limits.policy) {
        (Verdict::Slow, SlowConsumer::Drop) => {
            stats.events_dropped.add(1);
            return Queued::Skipped;
        }
        (Verdict::Slow, SlowConsumer::Close) => {
            close_slow(conn, now, stats, pool);
            return Queued::Closed;
        }
        (Verdict::Fits | Verdict::Congested, _) => {}
    }
    conn.queue_stamped(frame.clone(), event_stamp(published_ns), pool);
    stats.messages_sent.add(1);
    if verdict == Verdict::Congested {
        Queued::Congested
    } else {
        Queued::Event
    }
}

/// Closes a subscriber that does not keep up: its unsent frames go, a Close
/// 1008 follows whatever is in flight, and it drains.
pub(super) fn close_slow(conn: &mut Conn, now: u32, stats: &ShardStats, pool: &mut SendPool) {
    stats.slow_consumers.add(1);
    if let Some(q) = conn.sendq.as_mut() {
        q.discard_unsent();
    }
    conn.queue(
        input::close_frame(close_code::POLICY_VIOLATION, "slow consumer"),
        pool,
    );
    conn.state = State::Draining;
    conn.since = now;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pubsub::{event_frame, EventData};
    use crate::sendq::NextSend;
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

    fn limits(soft: usize, policy: SlowConsumer, epoch: u32) -> QueueLimits {
        QueueLimits {
            soft,
            hard: 4 * soft,
            policy,
            epoch,
        }
    }

    #[test]
    fn every_subscriber_gets_the_same_bytes_not_a_copy() {
        let (mut conns, index) = open_subscribers(100, "news");
        let frame = event_frame("news", 1, EventData::Json("{\"x\":1}"));
        let stats = ShardStats::default();
        let mut pool = SendPool::new(true);
        let limits = limits(1 << 20, SlowConsumer::Close, 0);
        for &key in index.subscribers("news") {
            let conn = &mut conns[key as usize];
            let queued = queue_event(conn, &frame, 1, &limits, 0, &stats, &mut pool);
            assert_eq!(queued, Queued::Event);
        }
        for (_, conn) in conns.iter_mut() {
            match conn.sendq.as_mut().unwrap().next_send(0, &mut pool) {
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

    /// Offers `n` 100-byte events to `conn` at loop epoch `epoch`; the limit
    /// holds three of them.
    fn offer(conn: &mut Conn, n: usize, policy: SlowConsumer, epoch: u32) -> Vec<Queued> {
        let frame = Bytes::from(vec![0u8; 100]);
        let stats = ShardStats::default();
        let mut pool = SendPool::new(true);
        let limits = limits(3 * (100 + FRAME_OVERHEAD_BYTES), policy, epoch);
        (0..n)
            .map(|_| queue_event(conn, &frame, 1, &limits, 7, &stats, &mut pool))
            .collect()
    }

    #[test]
    fn over_the_limit_a_subscriber_is_judged_only_once_the_kernel_refused() {
        let mut pool = SendPool::new(true);
        let (mut conns, _) = open_subscribers(1, "t");
        let conn = &mut conns[0];
        // Four events with nothing offered to the kernel yet: the fourth is
        // over the limit, but that is the shard's pace, not the reader's.
        let queued = offer(conn, 4, SlowConsumer::Close, 1);
        assert_eq!(queued.last(), Some(&Queued::Congested));
        // Offered (staged at epoch 1) and taken in full: still not refused.
        let q = conn.sendq.as_mut().unwrap();
        let _ = q.next_send(1, &mut pool);
        q.complete(400, &mut pool, |_| {});
        assert_eq!(offer(conn, 1, SlowConsumer::Close, 2), vec![Queued::Event]);
        // Offered at epoch 2 and still in flight at epoch 3: refused, so an
        // event over the limit now makes it a slow consumer.
        let _ = conn.sendq.as_mut().unwrap().next_send(2, &mut pool);
        let queued = offer(conn, 3, SlowConsumer::Close, 3);
        assert_eq!(queued, vec![Queued::Event, Queued::Event, Queued::Closed]);
        assert_eq!(conn.state, State::Draining);
        assert_eq!(
            offer(conn, 1, SlowConsumer::Close, 3),
            vec![Queued::Skipped]
        );
    }

    /// One subscriber offered three events at epoch 1 whose send was short:
    /// the socket took 10 of 306 bytes.
    fn after_a_short_send(policy: SlowConsumer) -> Slab<Conn> {
        let mut pool = SendPool::new(true);
        let (mut conns, _) = open_subscribers(1, "t");
        let conn = &mut conns[0];
        offer(conn, 3, policy, 1);
        let q = conn.sendq.as_mut().unwrap();
        let _ = q.next_send(1, &mut pool);
        q.complete(10, &mut pool, |_| {});
        conns
    }

    #[test]
    fn a_short_send_is_a_refusal_and_the_drop_policy_skips() {
        let mut conns = after_a_short_send(SlowConsumer::Drop);
        let conn = &mut conns[0];
        assert_eq!(offer(conn, 1, SlowConsumer::Drop, 1), vec![Queued::Skipped]);
        assert_eq!(conn.state, State::Open, "drop keeps the subscriber");
    }

    #[test]
    fn a_subscriber_waiting_for_a_send_slot_is_not_judged_by_its_last_short_send() {
        let mut conns = after_a_short_send(SlowConsumer::Close);
        let conn = &mut conns[0];
        // It waits for a slot now: nothing was offered since, so over the
        // limit it is congested (the hard limit bounds it), not slow...
        conn.set(flag::SEND_READY);
        assert_eq!(
            offer(conn, 1, SlowConsumer::Close, 2),
            vec![Queued::Congested]
        );
        assert_eq!(conn.state, State::Open);
        // ...and once its send is offered again, the short send counts.
        conn.clear(flag::SEND_READY);
        assert_eq!(offer(conn, 1, SlowConsumer::Close, 2), vec![Queued::Closed]);
    }

    #[test]
    fn no_queue_passes_the_hard_limit() {
        let (mut conns, _) = open_subscribers(1, "t");
        let conn = &mut conns[0];
        // Never refused, never offered: congested up to the hard limit (four
        // times the soft one here), then judged.
        let queued = offer(conn, 13, SlowConsumer::Close, 1);
        assert_eq!(queued[..3], [Queued::Event; 3]);
        assert_eq!(queued[3..12], [Queued::Congested; 9]);
        assert_eq!(queued[12], Queued::Closed);
    }

    #[test]
    fn the_first_event_always_fits() {
        let (mut conns, _) = open_subscribers(1, "t");
        let big = Bytes::from(vec![0u8; 10_000]);
        let stats = ShardStats::default();
        let mut pool = SendPool::new(true);
        let limits = limits(1000, SlowConsumer::Close, 0);
        let queued = queue_event(&mut conns[0], &big, 1, &limits, 0, &stats, &mut pool);
        assert_eq!(queued, Queued::Event);
    }
}
