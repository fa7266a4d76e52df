//! The shard's tick and the per-tick sweep of its table.
//!
//! The tick is one multishot timeout where the kernel has them (Linux 6.4);
//! elsewhere, or when `oneshot_tick` forces it, a one-shot timeout re-armed at
//! every expiry. A tick result other than its expiry is checked: an EINVAL from
//! a kernel that refuses the multishot form switches to the one-shot form,
//! anything else stops the shard (a tick that fails at once would otherwise
//! spin the loop at 100% CPU while looking alive to the watchdog).

use std::io;
use std::time::Instant;

use io_uring::opcode;
use io_uring::types::TimeoutFlags;
use ringgate_codec::close_code;

use super::Shard;
use crate::conn::{flag, State};
use crate::input;
use crate::limits::SCRATCH_KEEP;
use crate::sweep::{self, Due};
use crate::token::{Op, Token};

impl Shard {
    pub(super) fn arm_tick(&mut self) {
        let mut timeout = opcode::Timeout::new(&*self.tick_spec);
        if self.tick_multishot {
            timeout = timeout.flags(TimeoutFlags::MULTISHOT);
        }
        let sqe = timeout.build().user_data(Token::shard(Op::Tick).encode());
        self.staged.push(sqe);
    }

    pub(super) fn on_tick(&mut self, result: i32, flags: u32) {
        let more = io_uring::cqueue::more(flags);
        match -result {
            // The timeout expired: a tick.
            libc::ETIME => {}
            libc::EINVAL if self.tick_multishot && !more => {
                tracing::warn!(
                    shard = self.id,
                    "this kernel refuses multishot timeouts; ticking with one-shot timeouts"
                );
                self.tick_multishot = false;
                return self.arm_tick();
            }
            // Only cancelled when the ring goes away.
            libc::ECANCELED => return,
            _ => panic!(
                "the shard's tick failed: {} (result {result})",
                io::Error::from_raw_os_error(-result)
            ),
        }
        self.stats.loop_ticks.add(1);
        if !more {
            self.arm_tick();
        }
        self.accept_tick();
        self.sweep();
        self.expire_tokens();
        self.prune_buckets();
        // Whatever the broker's channel had no room for last time, and
        // presence changes left by requests run from a send completion.
        self.flush_subscribes();
        self.after_topic_changes();
    }

    /// User-space bytes this shard's connections hold, fixed per-shard costs
    /// (rings, buffers, scratch, pools, histograms) apart: the table, what
    /// the records own on the heap (`heap`, summed by the sweep), the topic
    /// index, and the token, address and rate tables. What
    /// `ringgate_memory_bytes_per_connection{kind="user"}` divides.
    fn connection_bytes(&self, heap: usize) -> usize {
        self.conns.capacity() * std::mem::size_of::<crate::conn::Conn>()
            + heap
            + self.topics.heap_bytes()
            + self.tokens.bytes()
            + self.accepting.peer_bytes()
            + self.buckets.bytes()
    }

    /// Visits every connection once per tick: pings, idle closes, handshake,
    /// message and close timeouts. No timer object per connection; a record is
    /// written only when something about it changes.
    fn sweep(&mut self) {
        let mut due = std::mem::take(&mut self.due);
        let mut queued = 0;
        let mut backlogged = 0;
        let mut oldest_ns = u64::MAX;
        let mut unfinished = 0;
        let mut heap = 0;
        let mut replaying = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            heap += conn.heap_bytes();
            let bytes = conn.queued_bytes() as u64;
            if bytes > 0 {
                queued += bytes;
                backlogged += 1;
                oldest_ns = oldest_ns.min(conn.oldest_queued_event_ns().unwrap_or(u64::MAX));
            }
            if conn.has(flag::REPLAYING) && conn.state == State::Open {
                replaying.push(key);
            }
            unfinished += conn.partial.as_ref().map_or(0, |p| p.held_bytes());
            if conn.strikes > 0 {
                conn.strikes -= 1;
            }
            let d = sweep::due(conn, key, self.now, &self.timeouts);
            if d != Due::Nothing {
                due.push((key, d));
            }
        }
        unfinished += self
            .outstanding
            .values()
            .map(super::requests::Outstanding::deferred_bytes)
            .sum::<usize>();
        // The running count of unfinished input (waiting requests included)
        // must agree with the records.
        assert_eq!(
            unfinished, self.unfinished,
            "unfinished-input accounting drifted"
        );
        for key in replaying {
            if self.replay_stalled(key) {
                due.push((key, Due::ReplayStalled));
            }
        }
        self.stats.send_queue_bytes.set(queued);
        self.stats
            .connection_bytes
            .set(self.connection_bytes(heap) as u64);
        self.stats.send_queue_connections.set(backlogged);
        // How long the oldest event still queued for a client has waited
        // since its publish: the backlog's age, which the delivery latency
        // (recorded only when a send completes) cannot show while it grows.
        let age_us = match oldest_ns {
            u64::MAX => 0,
            ns => crate::stats::clock_ns().saturating_sub(ns) / 1000,
        };
        self.stats.send_queue_oldest_us.set(age_us);
        self.stats.unfinished_bytes.set(unfinished as u64);
        self.stats.merge_latency(&mut self.latency);
        for (key, d) in due.drain(..) {
            self.act_on(key, d);
            self.drive(key);
        }
        due.shrink_to(SCRATCH_KEEP);
        self.due = due;
        if let Some(deadline) = self.shutdown_deadline {
            if Instant::now() >= deadline {
                let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                for key in keys {
                    self.finish(key);
                    self.drive(key);
                }
            }
        }
    }

    fn act_on(&mut self, key: usize, due: Due) {
        let conn = &mut self.conns[key];
        match due {
            Due::Nothing => {}
            Due::Ping => {
                conn.queue(input::ping_frame(), &mut self.pool);
                conn.set(flag::PING_SENT);
                self.stats.pings_sent.add(1);
            }
            Due::IdleClose => {
                input::start_close(
                    conn,
                    close_code::GOING_AWAY,
                    "idle timeout",
                    self.now,
                    &mut self.pool,
                );
                self.stats.idle_closed.add(1);
            }
            Due::MessageTimeout => {
                self.stats.message_timeouts.add(1);
                self.unfinished -= input::drop_partial(conn);
                let (conns, mut env) = self.env_parts();
                input::fail_with(
                    &mut conns[key],
                    close_code::POLICY_VIOLATION,
                    "message not completed in time",
                    &mut env,
                );
            }
            Due::HandshakeTimeout => {
                self.stats.handshake_timeouts.add(1);
                self.finish(key);
            }
            Due::CloseTimeout => self.finish(key),
            Due::ReplayStalled => {
                self.end_replay(key);
                // Another due item of this tick may have closed it already.
                if self.conns[key].state == State::Open {
                    self.stats.replays_stalled.add(1);
                    let conn = &mut self.conns[key];
                    super::fanout::close_slow(conn, self.now, &self.stats, &mut self.pool);
                }
            }
            Due::Park => {
                conn.set(flag::PARKED);
                self.stats.parked.add(1);
                if conn.has(flag::RECV_ARMED) {
                    // The recv ends with ECANCELED; drive then arms the poll.
                    self.cancel(Op::Recv, key);
                }
            }
        }
    }
}
