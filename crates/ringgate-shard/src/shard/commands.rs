//! What other threads ask of the shard: events to fan out, taken from the inbox
//! a bounded share per loop turn, and shutdown.
//!
//! The doorbell only marks the inbox as pending; the loop takes commands once
//! every completion has been reaped, at most `INBOX_TURN_COMMANDS_MAX` commands
//! and `INBOX_TURN_BYTES_MAX` event bytes per turn, and not while a subscriber
//! is congested (over its limit with bytes the kernel was not yet offered) or
//! the fanout backlog is full (`fanout_pending`).

use std::io;
use std::time::Instant;

use io_uring::opcode;
use io_uring::types::Fd;
use ringgate_codec::close_code;

use super::Shard;
use crate::conn::{flag, State};
use crate::inbox::Command;
use crate::input;
#[cfg(doc)]
use crate::limits::FANOUT_BACKLOG_DEFAULT;
use crate::limits::{INBOX_TURN_BYTES_MAX, INBOX_TURN_COMMANDS_MAX};
use crate::sys;
use crate::token::{Op, Token};

impl Shard {
    pub(super) fn arm_doorbell(&mut self) {
        let buf: *mut u64 = &mut *self.doorbell_buf;
        let sqe = opcode::Read::new(Fd(sys::raw(self.inbox.doorbell())), buf.cast(), 8)
            .build()
            .user_data(Token::shard(Op::Doorbell).encode());
        self.staged.push(sqe);
    }

    pub(super) fn on_doorbell(&mut self, result: i32) {
        if result < 0 && -result != libc::EINTR {
            panic!(
                "the shard's doorbell read failed: {}",
                io::Error::from_raw_os_error(-result)
            );
        }
        self.inbox_pending = true;
        if let Some(deadline) = self.inbox.shutdown_requested() {
            self.begin_shutdown(deadline);
        }
        self.arm_doorbell();
    }

    /// Takes one turn's share of the inbox and acts on it.
    pub(super) fn handle_commands(&mut self) {
        let mut commands = std::mem::take(&mut self.commands);
        self.inbox_pending =
            self.inbox
                .take(&mut commands, INBOX_TURN_COMMANDS_MAX, INBOX_TURN_BYTES_MAX);
        for command in commands.drain(..) {
            match command {
                Command::Deliver {
                    topic,
                    hash,
                    seq: _,
                    frame,
                    published_ns,
                } => self.deliver(&topic, hash, &frame, published_ns),
                Command::Subscribed(answer) => self.on_subscribed(*answer),
            }
        }
        self.stage_due_sends();
        self.commands = commands;
        self.after_topic_changes();
    }

    /// Whether new events must wait in the inbox for an earlier fanout: more
    /// connections wait for a send slot than one turn's slots serve, and the
    /// deliveries made meanwhile reached `--fanout-backlog`
    /// ([`FANOUT_BACKLOG_DEFAULT`] by default). Below that, taking events while
    /// a fanout is being handed to the kernel is what coalesces a burst (a
    /// subscriber's send carries every event that arrived before its slot came
    /// up); past it they wait as one shared command each instead of a queue
    /// slot per subscriber each, until every connection waiting for a slot when
    /// the backlog filled has been offered one (the ready list is FIFO), so
    /// other traffic keeping the list long cannot hold the inbox for good.
    pub(super) fn fanout_pending(&mut self) -> bool {
        let waiting = self.ready.len();
        if waiting >= self.cfg.send_slots && self.backlog_deliveries >= self.cfg.fanout_backlog {
            let until = *self
                .backlog_held_until
                .get_or_insert(self.ready_served + waiting as u64);
            if self.ready_served < until {
                self.stats.fanout_held_turns.add(1);
                return true;
            }
        }
        // The fanout is handed over (the list is short), or a hold just ended.
        if waiting < self.cfg.send_slots || self.backlog_held_until.is_some() {
            (self.backlog_deliveries, self.backlog_held_until) = (0, None);
        }
        false
    }

    /// Whether a subscriber is over its send-queue limit with bytes the kernel
    /// was not yet offered (its send is staged or just submitted): then new
    /// events wait in the inbox until the kernel took them or refused them, so
    /// the shard's own pace never makes a reader look slow. A connection waiting
    /// for a send slot does not hold the inbox (the slots may all be taken by
    /// stalled subscribers); the hard limit bounds it instead.
    pub(super) fn is_congested(&mut self) -> bool {
        let limit = self.cfg.send_queue_bytes_max;
        let epoch = self.epoch;
        let Shard {
            conns, congested, ..
        } = self;
        congested.retain(|&(key, generation)| {
            let Some(conn) = conns.get_mut(key).filter(|c| c.generation == generation) else {
                return false;
            };
            let still = conn.state == State::Open
                && conn.has(flag::SEND_INFLIGHT)
                && conn
                    .sendq
                    .as_ref()
                    .is_some_and(|q| q.cost() > limit && !q.refused(epoch));
            if !still {
                conn.clear(flag::CONGESTED);
            }
            still
        });
        if congested.is_empty() {
            return false;
        }
        self.stats.congested_turns.add(1);
        true
    }

    /// Stops taking connections at once; closes the open ones once the inbox
    /// is empty (`close_open_connections`), or at half the drain time. The
    /// embedded broker refuses publishes before a shutdown is requested, so
    /// what the inbox holds then is all there is; a fleet member's link may go
    /// on delivering other hosts' events, hence the bound.
    pub(super) fn begin_shutdown(&mut self, deadline: Instant) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        tracing::info!(shard = self.id, connections = self.conns.len(), "draining");
        self.shutdown_deadline = Some(deadline);
        let now = Instant::now();
        self.going_away_by = Some(now + deadline.saturating_duration_since(now) / 2);
        self.cancel_accepts();
        // The armed accept holds its own reference to the socket until the
        // cancel completes (a turn from now); then closing ours takes this shard
        // out of the SO_REUSEPORT group. Whatever it accepts meanwhile is
        // answered 503 (`admit`).
        self.listener = None;
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            if self.conns[key].state == State::Handshake {
                self.finish(key);
                self.drive(key);
            }
        }
    }

    /// Sends every open connection Close 1001, after whatever it has queued.
    pub(super) fn close_open_connections(&mut self) {
        assert!(self.going_away_by.is_some(), "closing for a shutdown");
        self.going_away_by = None;
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let conn = &mut self.conns[key];
            if conn.state == State::Open {
                input::start_close(
                    conn,
                    close_code::GOING_AWAY,
                    "server shutting down",
                    self.now,
                    &mut self.pool,
                );
                self.drive(key);
            }
        }
    }
}
