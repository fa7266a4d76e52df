//! One shard: a thread with its own io_uring, listener, buffer ring, connection
//! table and timer sweep.
//!
//! A loop turn: push the staged SQEs, enter the kernel (submit, run deferred
//! completions, wait only when there is nothing else to do), copy a bounded
//! batch of completions into memory and dispatch each (handlers only change
//! records and stage SQEs), give buffers back, re-arm what ran out of buffers,
//! offer waiting sends their slots; then, once every completion is reaped, take
//! a bounded share of the inbox. The turn's *epoch* rises at every enter that
//! submitted all staged SQEs: a send staged at an earlier epoch and still in
//! flight after a full reap is one the kernel refused.
//!
//! Owns the ring and every operation's lifetime: a buffer or frame handed to the
//! kernel stays alive and unmoved until its last completion, and a connection
//! record is freed only when no operation on it is in flight. A completion for
//! a record that is gone is a bug, and crashes.

mod accept;
mod auth;
mod commands;
mod fanout;
mod ops;
mod rate;
mod replay;
mod requests;
mod timers;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use io_uring::types::Timespec;
use io_uring::{squeue, EnterFlags, IoUring};
use slab::Slab;

use crate::bufring::BufRing;
use crate::config::ShardConfig;
use crate::conn::Conn;
use crate::inbox::{Command, Inbox};
use crate::input::{Env, Upcall};
use crate::limits::{CQE_BATCH_MAX, CQ_ENTRIES, EXIT_GRACE, SCRATCH_KEEP, SQ_ENTRIES};
use crate::routes::RouteWriter;
use crate::sendq::SendPool;
use crate::stats::{new_latency_histogram, ShardStats};
use crate::sweep::{Due, Timeouts};
use crate::sys;
use crate::token::{Op, Token};
use crate::topics::TopicIndex;
use crate::upstream::{SubscribeRequest, UpstreamSender};
use hdrhistogram::Histogram;
use replay::Replay;
use requests::Outstanding;

/// The buffer group id of the shard's one buffer ring.
const BGID: u16 = 0;

/// What a shard thread is started with.
pub(crate) struct ShardInit {
    pub id: usize,
    pub cfg: ShardConfig,
    pub listener: OwnedFd,
    pub inbox: Arc<Inbox>,
    pub stats: Arc<ShardStats>,
    pub upstream: Option<UpstreamSender>,
    /// The writer of the shard's route filter (the broker reads it).
    pub routes: RouteWriter,
    /// The kernel has multishot timeouts (Linux 6.4).
    pub multishot_timeout: bool,
}

pub(crate) struct Shard {
    // Field order is drop order: the ring goes first, so no operation can outlive
    // the memory below it.
    ring: IoUring,
    bufs: Option<BufRing>,
    conns: Slab<Conn>,
    id: usize,
    cfg: ShardConfig,
    listener: Option<OwnedFd>,
    inbox: Arc<Inbox>,
    stats: Arc<ShardStats>,
    topics: TopicIndex,
    upstream: Option<UpstreamSender>,
    /// Connections with subscribes outstanding at the broker, and the requests
    /// waiting for the answers.
    outstanding: HashMap<usize, Outstanding>,
    /// Subscribes forwarded and not yet answered, over all connections.
    subscribes_pending: usize,
    /// Subscribes waiting to be forwarded (`flush_subscribes`).
    subscribes_waiting: VecDeque<SubscribeRequest>,
    /// Backlogs of connections replaying missed events (`REPLAYING`).
    replays: HashMap<usize, Replay>,
    /// First-in/last-out changes the broker has not been told yet.
    presence: HashMap<Arc<str>, bool>,
    /// Authenticated connections' token state (`--auth-*`).
    tokens: auth::Tokens,
    /// Message-rate buckets of the clients that sent lately.
    buckets: rate::Buckets,
    /// Pub/sub work left by input handling, for the connection being handled.
    upcalls: Vec<Upcall>,
    /// Commands taken from the inbox this turn.
    commands: Vec<Command>,
    /// Commands wait in the inbox (the doorbell rang, or a turn left some).
    inbox_pending: bool,
    /// Delivery latencies since the last tick (microseconds); merged into the
    /// shared histogram once per tick.
    latency: Histogram<u64>,
    timeouts: Timeouts,
    /// SQEs staged by handlers, pushed to the SQ by the loop.
    staged: Vec<squeue::Entry>,
    /// Connections whose recv ran out of buffers, by key and generation.
    rearm: Vec<(usize, u32)>,
    /// Connections waiting for a send slot (all `--send-slots` are taken).
    ready: VecDeque<(usize, u32)>,
    /// Send slots taken now: sends offered and not yet refused.
    sends_inflight: usize,
    /// Sends staged, in order, with the epoch they were staged at: each turn
    /// the refused ones (still in flight a full reap after their submit) give
    /// their slot back.
    offered: VecDeque<(usize, u32, u32)>,
    /// Subscribers over their send-queue limit with bytes the kernel was not yet
    /// offered: the inbox waits until each is under it or refused.
    congested: Vec<(usize, u32)>,
    /// Emptied send queues for reuse.
    pool: SendPool,
    /// Scratch: the subscribers of the topic being fanned out.
    fanout_keys: Vec<u32>,
    /// Topics delivered to this turn, whose subscribers' sends are asked for
    /// once the turn's events are all queued (at most a turn's commands).
    sends_due: Vec<u32>,
    /// Events queued on subscribers while an earlier fanout waited for send
    /// slots (see `fanout_pending`).
    backlog_deliveries: usize,
    /// While the backlog holds the inbox: the count of `ready_served` at which
    /// every connection waiting when it began has been offered a slot.
    backlog_held_until: Option<u64>,
    /// Entries taken off the ready list so far.
    ready_served: u64,
    /// Bytes held for unfinished input over all connections.
    unfinished: usize,
    /// Rises at every enter that submitted every staged SQE.
    epoch: u32,
    /// Scratch for the sweep.
    due: Vec<(usize, Due)>,
    /// Target of the doorbell read; boxed so its address is stable while in flight.
    doorbell_buf: Box<u64>,
    /// The tick interval; boxed so its address is stable while the timeout is armed.
    tick_spec: Box<Timespec>,
    /// The tick is one multishot timeout (else a one-shot re-armed each tick).
    tick_multishot: bool,
    start: Instant,
    now: u32,
    next_generation: u32,
    accepting: accept::Accepting,
    shutdown_deadline: Option<Instant>,
    /// Shutting down, and the open connections are still to be sent Close
    /// 1001: that waits until the inbox is empty, so every event accepted
    /// before the shutdown reaches its subscribers first, or until this time
    /// (half the drain time: a fleet member's inbox keeps taking other hosts'
    /// events, which the clients recover from Redis on their next host).
    going_away_by: Option<Instant>,
}

impl Shard {
    pub fn new(init: ShardInit) -> io::Result<Self> {
        let ShardInit {
            id,
            cfg,
            listener,
            inbox,
            stats,
            upstream,
            routes,
            multishot_timeout,
        } = init;
        let ring = build_ring()?;
        let accepting = accept::Accepting::new(&cfg);
        ring.submitter()
            .register_files_sparse(cfg.fixed_files())
            .map_err(|e| io::Error::new(e.kind(), format!(
                "registering {} fixed-file slots: {e} (one ring may hold at most the soft RLIMIT_NOFILE, {}; use more --shards)",
                cfg.fixed_files(), sys::nofile_soft_limit())))?;
        let bufs = BufRing::new(&ring.submitter(), cfg.buffers, cfg.buffer_bytes, BGID, true)?;
        tracing::debug!(
            shard = id,
            incremental = bufs.incremental(),
            multishot_timeout,
            "ring ready"
        );
        stats.connections_max.set(u64::from(cfg.connections_max));
        stats.buffer_ring_size.set(u64::from(cfg.buffers));
        let timeouts = Timeouts::new(&cfg);
        let tick_multishot = multishot_timeout && !cfg.oneshot_tick;
        let pool = SendPool::new(cfg.recycle_send_queues);
        let topics = TopicIndex::new(cfg.announce_first_in, routes);
        let tokens = if cfg.auth.is_some() {
            auth::Tokens::with_capacity(cfg.connections_max as usize)
        } else {
            auth::Tokens::default()
        };
        Ok(Shard {
            ring,
            bufs: Some(bufs),
            conns: Slab::new(),
            id,
            timeouts,
            cfg,
            listener: Some(listener),
            inbox,
            stats,
            topics,
            upstream,
            outstanding: HashMap::new(),
            subscribes_pending: 0,
            subscribes_waiting: VecDeque::new(),
            replays: HashMap::new(),
            presence: HashMap::new(),
            tokens,
            buckets: rate::Buckets::default(),
            upcalls: Vec::new(),
            commands: Vec::new(),
            inbox_pending: false,
            latency: new_latency_histogram(),
            staged: Vec::with_capacity(1024),
            rearm: Vec::new(),
            ready: VecDeque::new(),
            sends_inflight: 0,
            offered: VecDeque::new(),
            congested: Vec::new(),
            pool,
            fanout_keys: Vec::new(),
            sends_due: Vec::with_capacity(crate::limits::INBOX_TURN_COMMANDS_MAX),
            backlog_deliveries: 0,
            backlog_held_until: None,
            ready_served: 0,
            unfinished: 0,
            epoch: 0,
            due: Vec::new(),
            doorbell_buf: Box::new(0),
            tick_spec: Box::new(Timespec::from(crate::limits::TICK)),
            tick_multishot,
            start: Instant::now(),
            now: 0,
            next_generation: 0,
            accepting,
            shutdown_deadline: None,
            going_away_by: None,
        })
    }

    /// Runs until shut down and every connection is gone (or the drain deadline
    /// and its grace passed). On an error, the memory the kernel may still use
    /// is leaked, not freed.
    pub fn run(mut self) -> io::Result<()> {
        self.arm_accept();
        self.arm_tick();
        self.arm_doorbell();
        let mut batch: Vec<(u64, i32, u32)> = Vec::with_capacity(CQE_BATCH_MAX);
        let result = loop {
            if let Err(e) = self.turn(&mut batch) {
                break Err(e);
            }
            if self.shutdown_done() {
                break Ok(());
            }
        };
        self.exit(result)
    }

    /// One loop turn (see the module doc).
    fn turn(&mut self, batch: &mut Vec<(u64, i32, u32)>) -> io::Result<()> {
        let all_pushed = self.flush_staged()?;
        // Wait for a completion only when nothing waits: no command in the
        // inbox, no connection for a send slot. (Slots are taken only by sends
        // staged since the last full reap; after the next one each has completed
        // or, refused, given its slot back, so waiting connections always move.)
        let busy = self.inbox_pending || !self.ready.is_empty();
        let all_submitted = self.enter(u32::from(!busy))? && all_pushed;
        if all_submitted {
            self.epoch = self.epoch.wrapping_add(1);
        }
        self.now = self.start.elapsed().as_secs() as u32;
        batch.clear();
        batch.extend(
            self.ring
                .completion()
                .take(CQE_BATCH_MAX)
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        if self.ring.submission().cq_overflow() {
            // The kernel holds completions the CQ had no room for: not lost,
            // but a sizing bug (see limits.rs). Counted, and reaped next turn.
            self.stats.cq_overflow.add(1);
        }
        for &(user_data, result, flags) in batch.iter() {
            self.dispatch(Token::decode(user_data), result, flags);
        }
        let bufs = self.bufs.as_mut().expect("present until exit");
        bufs.publish();
        self.stats.buffer_ring_in_use.set(u64::from(bufs.in_use()));
        self.rearm_starved();
        self.offer_send_slots();
        // Once every completion is in, a send still in flight from an earlier
        // epoch is one the kernel refused: it gives its slot back, and such
        // sends are what judge a slow consumer. New work only then. Completions
        // the kernel holds past a full CQ are not in yet (the next enter
        // flushes them): an empty ring says nothing while the overflow flag is up.
        if self.ring.completion().is_empty() && !self.ring.submission().cq_overflow() {
            self.park_refused_sends();
            self.offer_send_slots();
            if self.inbox_pending && !self.fanout_pending() && !self.is_congested() {
                self.handle_commands();
                self.offer_send_slots();
            }
        }
        if let Some(by) = self.going_away_by {
            if !self.inbox_pending || Instant::now() >= by {
                self.close_open_connections();
                self.offer_send_slots();
            }
        }
        assert!(
            self.ready.is_empty() || self.sends_inflight >= self.cfg.send_slots,
            "connections wait for a send slot while slots are free"
        );
        Ok(())
    }

    fn dispatch(&mut self, token: Token, result: i32, flags: u32) {
        match token.op {
            Op::Accept => self.on_accept(token.key as usize, result, flags),
            Op::Tick => self.on_tick(result, flags),
            Op::Doorbell => self.on_doorbell(result),
            Op::Cancel => {}
            Op::Recv | Op::Send | Op::Shutdown | Op::Close | Op::Poll => {
                let key = token.key as usize;
                let generation = self.conns.get(key).map(|c| c.generation);
                // A record is freed only when nothing is in flight on it, so a
                // completion always finds its own record: anything else is a
                // bug in that bookkeeping, and memory the kernel used may have
                // been freed under it. Crash (design.md: bugs crash).
                assert_eq!(
                    generation,
                    Some(token.generation),
                    "completion {token:?} (result {result}) for a record that is gone"
                );
                match token.op {
                    Op::Recv => self.on_recv(key, result, flags),
                    Op::Send => self.on_send(key, result),
                    Op::Shutdown => self.on_shutdown(key, result),
                    Op::Poll => self.on_poll(key, result),
                    _ => self.on_close(key),
                }
                self.drive(key);
            }
        }
    }

    /// The environment input handling runs in, borrowing the shard's parts.
    fn env_parts(&mut self) -> (&mut Slab<Conn>, Env<'_>) {
        let env = Env {
            cfg: &self.cfg,
            stats: &self.stats,
            now: self.now,
            upcalls: &mut self.upcalls,
            pool: &mut self.pool,
            unfinished: &mut self.unfinished,
        };
        (&mut self.conns, env)
    }

    fn shutdown_done(&self) -> bool {
        let Some(deadline) = self.shutdown_deadline else {
            return false;
        };
        if self.conns.is_empty() {
            return true;
        }
        // Past the deadline every connection was finished (cancels and closes
        // issued); the kernel gets a grace to complete them, then we go anyway.
        if Instant::now() >= deadline + EXIT_GRACE {
            tracing::warn!(
                shard = self.id,
                connections = self.conns.len(),
                "exiting with connections still closing after the drain deadline"
            );
            return true;
        }
        false
    }

    // ---- plumbing -------------------------------------------------------------

    /// Pushes staged SQEs into the submission queue. A full SQ is submitted and
    /// the rest pushed after it; if the kernel is busy (CQ overflow), the rest stay
    /// staged for the next turn, after completions are reaped. Returns whether
    /// every staged SQE was pushed.
    fn flush_staged(&mut self) -> io::Result<bool> {
        let mut done = 0;
        while done < self.staged.len() {
            let mut sq = self.ring.submission();
            for sqe in &self.staged[done..] {
                // SAFETY: every pointer in a staged SQE refers to memory that the
                // shard keeps alive and unmoved until the operation's final
                // completion: boxed fields of `self`, the buffer ring, and the
                // frames and gather box of a connection's send queue.
                if unsafe { sq.push(sqe) }.is_err() {
                    break;
                }
                done += 1;
            }
            drop(sq);
            if done < self.staged.len() {
                match self.ring.submit() {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        self.staged.drain(..done);
        if self.staged.is_empty() && self.staged.capacity() > SCRATCH_KEEP {
            self.staged.shrink_to(SCRATCH_KEEP);
        }
        Ok(self.staged.is_empty())
    }

    /// Submits what the SQ holds, runs deferred completions, and waits for at
    /// least `want` completions. Returns whether everything was submitted.
    fn enter(&mut self, want: u32) -> io::Result<bool> {
        let to_submit = self.ring.submission().len() as u32;
        let flags = EnterFlags::GETEVENTS.bits();
        // SAFETY: no argument pointer is passed (`None`), and GETEVENTS is a
        // valid flag; GETEVENTS even with `want` 0 runs the ring's deferred task
        // work (DEFER_TASKRUN), so completions keep coming during a long burst.
        let entered = unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(to_submit, want, flags, None)
        };
        match entered {
            Ok(_) => Ok(self.ring.submission().is_empty()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(false),
            // The CQ overflowed: reap, then submit again next turn.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn exit(mut self, result: io::Result<()>) -> io::Result<()> {
        // The doorbell read stays armed to the end: the kernel cancels it only
        // after the ring is closed, so its 8-byte target is never freed.
        std::mem::forget(std::mem::replace(&mut self.doorbell_buf, Box::new(0)));
        // So may accepts (cancelled at the drain, but not necessarily done):
        // their address slots are leaked too.
        self.accepting.leak_addrs();
        if self.conns.is_empty() && result.is_ok() {
            tracing::info!(shard = self.id, "stopped");
            // Nothing is in flight on connections; the only armed operations
            // left are the tick (its timespec was copied at submission) and the
            // doorbell read (leaked above).
            return result;
        }
        // Operations may still be in flight: close the ring first (field order
        // does that), and never free memory the kernel may still write or read:
        // the buffer ring, and the connections' queues and partial frames.
        if let Some(bufs) = self.bufs.take() {
            bufs.leak();
        }
        let conns = std::mem::take(&mut self.conns);
        std::mem::forget(conns);
        let staged = std::mem::take(&mut self.staged);
        std::mem::forget(staged);
        if let Err(e) = &result {
            tracing::error!(shard = self.id, "shard stopped on an error: {e}");
        }
        result
    }
}

fn build_ring() -> io::Result<IoUring> {
    let fast = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_submit_all()
        .setup_cqsize(CQ_ENTRIES)
        .build(SQ_ENTRIES);
    match fast {
        Ok(ring) => Ok(ring),
        Err(_) => IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)
            .map_err(|e| io::Error::new(e.kind(), format!("creating the io_uring: {e}"))),
    }
}
