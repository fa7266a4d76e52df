//! One shard: a thread with its own io_uring, listener, buffer ring, connection
//! table and timer sweep. The loop is: reap a bounded batch of completions into
//! memory, dispatch each (handlers only stage SQEs), give buffers back, re-arm
//! what ran out of buffers, then submit everything staged and wait.
//!
//! Owns the ring and every operation's lifetime: a buffer or frame handed to the
//! kernel stays alive and unmoved until its last completion, and a connection
//! record is freed only when no operation on it is in flight.

mod fanout;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use io_uring::types::{CancelBuilder, Fd, Fixed, TimeoutFlags, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use ringgate_codec::close_code;
use slab::Slab;

use crate::bufring::BufRing;
use crate::config::{ShardConfig, CQE_BATCH_MAX, CQ_ENTRIES, SCRATCH_KEEP, SQ_ENTRIES};
use crate::conn::{flag, Conn, NextSend, State};
use crate::inbox::{Command, Inbox};
use crate::input::{self, Env, Upcall};
use crate::stats::{clock_ns, new_latency_histogram, ShardStats, LATENCY_MAX_US};
use crate::sweep::{self, Due, Timeouts};
use crate::sys;
use crate::token::{Op, Token};
use crate::topics::TopicIndex;
use crate::Publisher;
use hdrhistogram::Histogram;

/// The buffer group id of the shard's one buffer ring.
const BGID: u16 = 0;

/// What a shard thread is started with.
pub(crate) struct ShardInit {
    pub id: usize,
    pub cfg: ShardConfig,
    pub listener: OwnedFd,
    pub inbox: Arc<Inbox>,
    pub stats: Arc<ShardStats>,
    pub publisher: Option<Publisher>,
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
    publisher: Option<Publisher>,
    /// Pub/sub work left by input handling, for the connection being handled.
    upcalls: Vec<Upcall>,
    /// Commands drained from the inbox.
    commands: Vec<Command>,
    /// Delivery latencies since the last tick (microseconds); merged into the
    /// shared histogram once per tick.
    latency: Histogram<u64>,
    timeouts: Timeouts,
    /// SQEs staged by handlers, pushed to the SQ by the loop.
    staged: Vec<squeue::Entry>,
    /// Connections whose recv ran out of buffers, by key and generation.
    rearm: Vec<(usize, u32)>,
    /// Scratch for the sweep.
    due: Vec<(usize, Due)>,
    /// Target of the doorbell read; boxed so its address is stable while in flight.
    doorbell_buf: Box<u64>,
    /// The tick interval; boxed so its address is stable while the timeout is armed.
    tick_spec: Box<Timespec>,
    start: Instant,
    now: u32,
    next_generation: u32,
    accept_armed: bool,
    shutdown_deadline: Option<Instant>,
}

impl Shard {
    pub fn new(init: ShardInit) -> io::Result<Self> {
        let ShardInit {
            id,
            cfg,
            listener,
            inbox,
            stats,
            publisher,
        } = init;
        let ring = build_ring()?;
        ring.submitter()
            .register_files_sparse(cfg.fixed_files())
            .map_err(|e| io::Error::new(e.kind(), format!(
                "registering {} fixed-file slots: {e} (one ring may hold at most the soft RLIMIT_NOFILE, {}; use more --shards)",
                cfg.fixed_files(), sys::nofile_soft_limit())))?;
        let bufs = BufRing::new(&ring.submitter(), cfg.buffers, cfg.buffer_bytes, BGID, true)?;
        tracing::debug!(
            shard = id,
            incremental = bufs.incremental(),
            "buffer ring registered"
        );
        let timeouts = Timeouts::new(&cfg);
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
            topics: TopicIndex::default(),
            publisher,
            upcalls: Vec::new(),
            commands: Vec::new(),
            latency: new_latency_histogram(),
            staged: Vec::with_capacity(1024),
            rearm: Vec::new(),
            due: Vec::new(),
            doorbell_buf: Box::new(0),
            tick_spec: Box::new(Timespec::new().sec(1)),
            start: Instant::now(),
            now: 0,
            next_generation: 0,
            accept_armed: false,
            shutdown_deadline: None,
        })
    }

    /// Runs until shut down and every connection is gone (or the drain deadline passed).
    pub fn run(mut self) -> io::Result<()> {
        self.arm_accept();
        self.arm_tick();
        self.arm_doorbell();
        let mut batch: Vec<(u64, i32, u32)> = Vec::with_capacity(CQE_BATCH_MAX);
        loop {
            self.flush_staged()?;
            match self.ring.submitter().submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The CQ is full: reap below, then submit again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.now = self.start.elapsed().as_secs() as u32;
            batch.clear();
            batch.extend(
                self.ring
                    .completion()
                    .take(CQE_BATCH_MAX)
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(user_data, result, flags) in &batch {
                self.dispatch(Token::decode(user_data), result, flags);
            }
            let bufs = self.bufs.as_mut().expect("present until exit");
            bufs.publish();
            self.stats.buffer_ring_in_use.set(u64::from(bufs.in_use()));
            self.rearm_starved();
            if self.shutdown_done() {
                break;
            }
        }
        self.exit()
    }

    fn dispatch(&mut self, token: Token, result: i32, flags: u32) {
        match token.op {
            Op::Accept => self.on_accept(result, flags),
            Op::Tick => self.on_tick(flags),
            Op::Doorbell => self.on_doorbell(result),
            Op::Cancel => {}
            Op::Recv | Op::Send | Op::Shutdown | Op::Close | Op::Poll => {
                let key = token.key as usize;
                match self.conns.get(key) {
                    Some(c) if c.generation == token.generation => {}
                    // A completion for a record that is gone: nothing holds its memory.
                    _ => {
                        debug_assert!(false, "stale completion {token:?}");
                        return;
                    }
                }
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

    // ---- accept -------------------------------------------------------------

    fn arm_accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        let sqe = opcode::AcceptMulti::new(Fd(sys::raw(listener)))
            .allocate_file_index(true)
            .build()
            .user_data(Token::shard(Op::Accept).encode());
        self.staged.push(sqe);
        self.accept_armed = true;
    }

    fn on_accept(&mut self, result: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.accept_armed = false;
        }
        if result < 0 {
            match -result {
                libc::ENFILE => {
                    // The fixed-file table is full: the kernel closed the socket.
                    // Accepting again waits for the next tick.
                    self.stats.rejected_table_full.add(1);
                    return;
                }
                libc::ECANCELED => return,
                errno => tracing::warn!(
                    shard = self.id,
                    "accept failed: {}",
                    io::Error::from_raw_os_error(errno)
                ),
            }
        } else {
            self.admit(result as u32);
        }
        if !self.accept_armed && self.shutdown_deadline.is_none() {
            self.arm_accept();
        }
    }

    fn admit(&mut self, slot: u32) {
        self.stats.accepted.add(1);
        self.stats.direct_descriptors.add(1);
        self.stats.connections.add(1);
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1) & crate::token::GENERATION_MASK;
        let full = self.conns.len() >= self.cfg.connections_max as usize;
        let key = self.conns.insert(Conn::new(slot, generation, self.now));
        if full {
            self.stats.rejected_limit.add(1);
            let mut env = Env {
                cfg: &self.cfg,
                stats: &self.stats,
                now: self.now,
                upcalls: &mut self.upcalls,
            };
            let conn = &mut self.conns[key];
            input::reject(
                conn,
                503,
                "server at its connection limit, try again later",
                "Retry-After: 1\r\n",
                &mut env,
            );
        }
        self.drive(key);
    }

    // ---- receive ------------------------------------------------------------

    fn on_recv(&mut self, key: usize, result: i32, flags: u32) {
        let more = cqueue::more(flags);
        let conn = &mut self.conns[key];
        if !more {
            conn.clear(flag::RECV_ARMED);
        }
        if result > 0 {
            let bid = cqueue::buffer_select(flags).expect("recv with buffer select names a buffer");
            let bufs = self.bufs.as_mut().expect("present until exit");
            let chunk = bufs.take(bid, result as usize, cqueue::buffer_more(flags));
            // SAFETY: the kernel filled these bytes and gave the buffer to us with
            // this completion; it is not in the ring (or, in incremental mode, the
            // kernel writes only past them) until `finish` below, and nothing else
            // refers to it meanwhile.
            let data = unsafe { std::slice::from_raw_parts_mut(chunk.ptr.as_ptr(), chunk.len) };
            let mut env = Env {
                cfg: &self.cfg,
                stats: &self.stats,
                now: self.now,
                upcalls: &mut self.upcalls,
            };
            input::on_recv(&mut self.conns[key], data, &mut env);
            self.bufs
                .as_mut()
                .expect("present until exit")
                .finish(chunk);
            if !self.upcalls.is_empty() {
                self.handle_upcalls(key);
            }
            return;
        }
        match -result {
            // EOF: the peer is gone or answered our shutdown.
            0 => self.finish(key),
            libc::ENOBUFS => {
                // Flow control, not loss: the bytes wait in the socket.
                self.stats.buffer_ring_exhausted.add(1);
                let conn = &mut self.conns[key];
                conn.set(flag::REARM_WAIT);
                self.rearm.push((key, conn.generation));
            }
            // Paused for back-pressure, or finishing: drive() decides.
            libc::ECANCELED => {}
            errno => {
                tracing::debug!(
                    shard = self.id,
                    "recv failed: {}",
                    io::Error::from_raw_os_error(errno)
                );
                self.finish(key);
            }
        }
    }

    /// Re-arms the recvs that ran out of buffers, once buffers have come back.
    fn rearm_starved(&mut self) {
        for (key, generation) in std::mem::take(&mut self.rearm) {
            match self.conns.get_mut(key) {
                Some(conn) if conn.generation == generation => conn.clear(flag::REARM_WAIT),
                _ => continue,
            }
            self.drive(key);
        }
    }

    // ---- send / shutdown / close ----------------------------------------------

    fn on_send(&mut self, key: usize, result: i32) {
        let conn = &mut self.conns[key];
        conn.clear(flag::SEND_INFLIGHT);
        let queue = conn.sendq.as_mut().expect("a send was in flight");
        if result <= 0 {
            queue.abandon_in_flight();
            if result < 0 && -result != libc::ECANCELED {
                tracing::debug!(
                    shard = self.id,
                    "send failed: {}",
                    io::Error::from_raw_os_error(-result)
                );
            }
            self.finish(key);
            return;
        }
        let sent = result as usize;
        self.stats.bytes_sent.add(sent as u64);
        let latency = &mut self.latency;
        let mut now_ns = None;
        queue.complete(sent, |published_ns| {
            let now = *now_ns.get_or_insert_with(clock_ns);
            let us = (now.saturating_sub(published_ns) / 1000).clamp(1, LATENCY_MAX_US);
            let _ = latency.record(us);
        });
        if queue.is_empty() {
            conn.sendq = None;
        }
    }

    /// A parked connection's poll fired: input (or EOF) is waiting. Unpark; drive
    /// re-arms the recv, which reads it.
    fn on_poll(&mut self, key: usize, result: i32) {
        let conn = &mut self.conns[key];
        conn.clear(flag::POLL_ARMED);
        if result >= 0 {
            conn.clear(flag::PARKED);
        }
    }

    fn on_shutdown(&mut self, key: usize, result: i32) {
        let conn = &mut self.conns[key];
        conn.clear(flag::SHUT_INFLIGHT);
        conn.set(flag::SHUT_DONE);
        if result < 0 {
            self.finish(key);
        }
    }

    fn on_close(&mut self, key: usize) {
        self.stats.direct_descriptors.sub(1);
        let conn = &mut self.conns[key];
        conn.clear(flag::CLOSE_INFLIGHT);
        conn.set(flag::CLOSED);
    }

    /// Ends a connection: cancel what is armed on it and close the descriptor.
    fn finish(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.state == State::Finished {
            return;
        }
        conn.state = State::Finished;
        conn.partial = None;
        if conn.subs.len() > 0 {
            self.topics.unsubscribe_all(&mut self.conns, key);
            self.update_topic_gauges();
        }
        // Cancel what is in flight by its own user_data, never by file: a fixed
        // slot is reused as soon as it is closed, and a cancel (or a shutdown the
        // kernel ran late on a worker thread) aimed at a slot would then hit the
        // next connection in it. drive() closes the slot once all of these ended.
        let conn = &self.conns[key];
        let in_flight = [
            (flag::RECV_ARMED, Op::Recv),
            (flag::SEND_INFLIGHT, Op::Send),
            (flag::SHUT_INFLIGHT, Op::Shutdown),
            (flag::POLL_ARMED, Op::Poll),
        ];
        for (bit, op) in in_flight {
            if conn.has(bit) {
                let target = Token::new(op, conn.generation, key).encode();
                let cancel = opcode::AsyncCancel2::new(CancelBuilder::user_data(target))
                    .build()
                    .user_data(Token::shard(Op::Cancel).encode());
                self.staged.push(cancel);
            }
        }
    }

    /// Stages whatever operations the connection's state now calls for, and frees
    /// its record once nothing is in flight.
    fn drive(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let generation = conn.generation;
        let fixed = Fixed(conn.slot);
        if conn.state == State::Finished {
            // Close the slot only when no operation can still refer to it, then
            // free the record once the close has completed.
            if !conn.has(flag::INFLIGHT) {
                if conn.has(flag::CLOSED) {
                    self.conns.remove(key);
                    self.stats.connections.sub(1);
                } else {
                    let close = opcode::Close::new(fixed)
                        .build()
                        .user_data(Token::new(Op::Close, generation, key).encode());
                    self.staged.push(close);
                    conn.set(flag::CLOSE_INFLIGHT);
                }
            }
            return;
        }
        stage_send(conn, key, &mut self.staged);
        // The close handshake is done and everything is sent: close now (before
        // arming a recv that would only be cancelled).
        if conn.state == State::Flushing && conn.sendq.is_none() && !conn.has(flag::SEND_INFLIGHT) {
            self.finish(key);
            return self.drive(key);
        }
        let queued = conn.queued_bytes();
        // Back-pressure: a peer that does not read its echoes stops being read.
        if queued > self.cfg.send_queue_bytes_max && !conn.has(flag::READ_PAUSED) {
            conn.set(flag::READ_PAUSED);
            self.stats.reads_paused.add(1);
            if conn.has(flag::RECV_ARMED) {
                let target = Token::new(Op::Recv, generation, key).encode();
                let cancel = opcode::AsyncCancel2::new(CancelBuilder::user_data(target))
                    .build()
                    .user_data(Token::shard(Op::Cancel).encode());
                self.staged.push(cancel);
            }
        } else if conn.has(flag::READ_PAUSED) && queued <= self.cfg.send_queue_bytes_max / 2 {
            conn.clear(flag::READ_PAUSED);
        }
        // Keep a recv armed while reading (also to see the FIN while draining); a
        // parked connection waits with a one-shot poll instead.
        let parked = conn.has(flag::PARKED) && conn.state == State::Open;
        if parked && !conn.has(flag::RECV_ARMED | flag::POLL_ARMED) {
            let sqe = opcode::PollAdd::new(fixed, (libc::POLLIN | libc::POLLRDHUP) as u32)
                .build()
                .user_data(Token::new(Op::Poll, generation, key).encode());
            self.staged.push(sqe);
            conn.set(flag::POLL_ARMED);
        }
        let wants_recv = !parked
            && !conn
                .has(flag::RECV_ARMED | flag::READ_PAUSED | flag::REARM_WAIT | flag::POLL_ARMED);
        if wants_recv {
            let sqe = opcode::RecvMulti::new(fixed, BGID)
                .build()
                .user_data(Token::new(Op::Recv, generation, key).encode());
            self.staged.push(sqe);
            conn.set(flag::RECV_ARMED);
        }
        if conn.state == State::Draining
            && conn.sendq.is_none()
            && !conn.has(flag::SEND_INFLIGHT | flag::SHUT_INFLIGHT | flag::SHUT_DONE)
        {
            let sqe = opcode::Shutdown::new(fixed, libc::SHUT_WR)
                .build()
                .user_data(Token::new(Op::Shutdown, generation, key).encode());
            self.staged.push(sqe);
            conn.set(flag::SHUT_INFLIGHT);
        }
    }

    // ---- timers ---------------------------------------------------------------

    fn arm_tick(&mut self) {
        let sqe = opcode::Timeout::new(&*self.tick_spec)
            .flags(TimeoutFlags::MULTISHOT)
            .build()
            .user_data(Token::shard(Op::Tick).encode());
        self.staged.push(sqe);
    }

    fn on_tick(&mut self, flags: u32) {
        self.stats.loop_ticks.add(1);
        if !cqueue::more(flags) {
            self.arm_tick();
        }
        if !self.accept_armed && self.shutdown_deadline.is_none() {
            self.arm_accept();
        }
        self.sweep();
    }

    /// Visits every connection once per tick: pings, idle closes, handshake and
    /// close timeouts. No timer object per connection.
    fn sweep(&mut self) {
        let mut due = std::mem::take(&mut self.due);
        let mut queued = 0;
        for (key, conn) in self.conns.iter_mut() {
            queued += conn.queued_bytes() as u64;
            conn.strikes = conn.strikes.saturating_sub(1);
            let d = sweep::due(conn, key, self.now, &self.timeouts);
            if d != Due::Nothing {
                due.push((key, d));
            }
        }
        self.stats.send_queue_bytes.set(queued);
        self.stats.merge_latency(&mut self.latency);
        for (key, d) in due.drain(..) {
            let conn = &mut self.conns[key];
            match d {
                Due::Nothing => {}
                Due::Ping => {
                    conn.queue(input::ping_frame());
                    conn.set(flag::PING_SENT);
                    self.stats.pings_sent.add(1);
                }
                Due::IdleClose => {
                    input::start_close(conn, close_code::GOING_AWAY, "idle timeout", self.now);
                    self.stats.idle_closed.add(1);
                }
                Due::HandshakeTimeout => {
                    self.stats.handshake_timeouts.add(1);
                    self.finish(key);
                }
                Due::CloseTimeout => self.finish(key),
                Due::Park => {
                    conn.set(flag::PARKED);
                    self.stats.parked.add(1);
                    if conn.has(flag::RECV_ARMED) {
                        // The recv ends with ECANCELED; drive then arms the poll.
                        let target = Token::new(Op::Recv, conn.generation, key).encode();
                        let cancel = opcode::AsyncCancel2::new(CancelBuilder::user_data(target))
                            .build()
                            .user_data(Token::shard(Op::Cancel).encode());
                        self.staged.push(cancel);
                    }
                }
            }
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

    // ---- inbox ----------------------------------------------------------------

    fn arm_doorbell(&mut self) {
        let buf: *mut u64 = &mut *self.doorbell_buf;
        let sqe = opcode::Read::new(Fd(sys::raw(self.inbox.doorbell())), buf.cast(), 8)
            .build()
            .user_data(Token::shard(Op::Doorbell).encode());
        self.staged.push(sqe);
    }

    fn on_doorbell(&mut self, result: i32) {
        if result < 0 && -result != libc::EAGAIN && -result != libc::EINTR {
            tracing::error!(
                shard = self.id,
                "doorbell read failed: {}",
                io::Error::from_raw_os_error(-result)
            );
        }
        let mut commands = std::mem::take(&mut self.commands);
        self.inbox.drain(&mut commands);
        for command in commands.drain(..) {
            match command {
                Command::Deliver {
                    topic,
                    frame,
                    published_ns,
                } => self.deliver(&topic, &frame, published_ns),
                Command::Shutdown { deadline } => self.begin_shutdown(deadline),
            }
        }
        self.commands = commands;
        self.arm_doorbell();
    }

    fn begin_shutdown(&mut self, deadline: Instant) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        tracing::info!(shard = self.id, connections = self.conns.len(), "draining");
        self.shutdown_deadline = Some(deadline);
        if self.accept_armed {
            let cancel = opcode::AsyncCancel2::new(CancelBuilder::user_data(
                Token::shard(Op::Accept).encode(),
            ))
            .build()
            .user_data(Token::shard(Op::Cancel).encode());
            self.staged.push(cancel);
        }
        // The cancel holds its own reference to the socket; closing ours now
        // takes this shard out of the SO_REUSEPORT group.
        self.listener = None;
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let conn = &mut self.conns[key];
            match conn.state {
                State::Open => input::start_close(
                    conn,
                    close_code::GOING_AWAY,
                    "server shutting down",
                    self.now,
                ),
                State::Handshake => self.finish(key),
                _ => {}
            }
            self.drive(key);
        }
    }

    fn shutdown_done(&self) -> bool {
        self.shutdown_deadline.is_some() && self.conns.is_empty()
    }

    // ---- plumbing -------------------------------------------------------------

    /// Pushes staged SQEs into the submission queue. A full SQ is submitted and
    /// the rest pushed after it; if the kernel is busy (CQ overflow), the rest stay
    /// staged for the next iteration, after completions are reaped.
    fn flush_staged(&mut self) -> io::Result<()> {
        let mut done = 0;
        while done < self.staged.len() {
            let mut sq = self.ring.submission();
            for sqe in &self.staged[done..] {
                // SAFETY: every pointer in a staged SQE refers to memory that the
                // shard keeps alive and unmoved until the operation's final
                // completion: boxed fields of `self`, the buffer ring, and the head
                // `Bytes` of a connection's send queue.
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
        Ok(())
    }

    fn exit(mut self) -> io::Result<()> {
        tracing::info!(shard = self.id, "stopped");
        // Nothing is in flight on connections (the table is empty); the only
        // armed operations left are the tick and the doorbell read, which own
        // boxed memory dropped after the ring.
        if !self.conns.is_empty() {
            // Deadline passed with completions outstanding: keep buffer memory
            // mapped, the kernel may still write into it.
            if let Some(bufs) = self.bufs.take() {
                bufs.leak();
            }
        }
        Ok(())
    }
}

/// Stages a send of the head of the connection's queue, if one is not in flight
/// already (one send per connection at a time, so frames go out in order).
fn stage_send(conn: &mut Conn, key: usize, staged: &mut Vec<squeue::Entry>) {
    if conn.has(flag::SEND_INFLIGHT) || conn.state == State::Finished {
        return;
    }
    let Some(next) = conn.sendq.as_mut().and_then(|q| q.next_send()) else {
        return;
    };
    let fixed = Fixed(conn.slot);
    let sqe = match next {
        NextSend::One(ptr, len) => opcode::Send::new(fixed, ptr, len as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build(),
        NextSend::Many(msg) => opcode::SendMsg::new(fixed, msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build(),
    };
    // The frames (and for SendMsg the header and gather list) stay in the boxed
    // queue, unmoved, until this completes: see SendQueue.
    staged.push(sqe.user_data(Token::new(Op::Send, conn.generation, key).encode()));
    conn.set(flag::SEND_INFLIGHT);
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
