//! A connection's operations: receive, send, shutdown, close; and
//! `drive`, which stages whatever a record's state calls for next.
//!
//! Sends take one of `--send-slots` (256 by default, at most
//! `SENDS_INFLIGHT_MAX`) slots; a connection
//! that finds none waits on the ready list and is offered one as earlier sends
//! complete, so the CQ never has to hold a completion per subscriber of a large
//! fanout. A send the kernel refused (still in flight a full reap after its
//! submit: the peer's socket is full) gives its slot back and waits on the
//! peer, so stalled clients cannot hold every slot.

use std::io;

use io_uring::types::{CancelBuilder, Fixed};
use io_uring::{cqueue, opcode};

use super::{Shard, BGID};
use crate::conn::{flag, State};
use crate::input;
use crate::limits::SCRATCH_KEEP;
use crate::sendq::NextSend;
use crate::stats::{clock_ns, LATENCY_MAX_US};
use crate::token::{Op, Token};

impl Shard {
    // ---- receive ------------------------------------------------------------

    pub(super) fn on_recv(&mut self, key: usize, result: i32, flags: u32) {
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
            let (conns, mut env) = self.env_parts();
            input::on_recv(&mut conns[key], data, &mut env);
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
            // EOF: the peer is gone, answered our shutdown, or half-closed.
            0 => self.on_eof(key),
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

    /// The peer's FIN: nothing more will come from it. A connection that still
    /// owes the peer bytes after the close began (an HTTP error, a close frame,
    /// what was queued before them) flushes them first, as `Flushing`: ending
    /// it now would cancel them. Everything else ends now. The close timeout
    /// bounds the flush.
    fn on_eof(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let owes = conn.sendq.is_some() || conn.has(flag::SEND_INFLIGHT | flag::SEND_READY);
        if owes && matches!(conn.state, State::Draining | State::Flushing) {
            conn.state = State::Flushing;
            return;
        }
        self.finish(key);
    }

    /// Re-arms the recvs that ran out of buffers, once buffers have come back.
    pub(super) fn rearm_starved(&mut self) {
        for (key, generation) in std::mem::take(&mut self.rearm) {
            match self.conns.get_mut(key) {
                Some(conn) if conn.generation == generation => conn.clear(flag::REARM_WAIT),
                _ => continue,
            }
            self.drive(key);
        }
    }

    /// A parked connection's poll fired: input (or EOF) is waiting. Unpark; drive
    /// re-arms the recv, which reads it.
    pub(super) fn on_poll(&mut self, key: usize, result: i32) {
        let conn = &mut self.conns[key];
        conn.clear(flag::POLL_ARMED);
        if result >= 0 {
            conn.clear(flag::PARKED);
        }
    }

    // ---- send -----------------------------------------------------------------

    pub(super) fn on_send(&mut self, key: usize, result: i32) {
        let conn = &mut self.conns[key];
        if conn.has(flag::SEND_PARKED) {
            conn.clear(flag::SEND_PARKED);
        } else {
            assert!(
                self.sends_inflight > 0,
                "a send completed with no slot taken"
            );
            self.sends_inflight -= 1;
        }
        conn.clear(flag::SEND_INFLIGHT);
        let queue = conn.sendq.as_mut().expect("a send was in flight");
        if result <= 0 {
            queue.abandon_in_flight(&mut self.pool);
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
        queue.complete(sent, &mut self.pool, |published_ns| {
            let now = *now_ns.get_or_insert_with(clock_ns);
            let us = (now.saturating_sub(published_ns) / 1000).clamp(1, LATENCY_MAX_US);
            let _ = latency.record(us);
        });
        conn.release_queue(&mut self.pool);
    }

    /// Sends the connection's queue if it has something and no send in flight:
    /// now, if a send slot is free, else after the connections already waiting.
    pub(super) fn want_send(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let idle = conn.sendq.as_ref().is_none_or(|q| q.is_empty());
        if idle || conn.has(flag::SEND_INFLIGHT | flag::SEND_READY) || conn.state == State::Finished
        {
            return;
        }
        if self.sends_inflight >= self.cfg.send_slots || !self.ready.is_empty() {
            conn.set(flag::SEND_READY);
            self.ready.push_back((key, conn.generation));
            return;
        }
        self.stage_send(key);
    }

    /// Gives free send slots to the connections waiting for one, in order.
    pub(super) fn offer_send_slots(&mut self) {
        while self.sends_inflight < self.cfg.send_slots {
            let Some((key, generation)) = self.ready.pop_front() else {
                break;
            };
            self.ready_served += 1;
            match self.conns.get_mut(key) {
                Some(conn) if conn.generation == generation => conn.clear(flag::SEND_READY),
                // Freed while waiting: the entry is stale.
                _ => continue,
            }
            self.stage_send(key);
        }
        if self.ready.is_empty() && self.ready.capacity() > SCRATCH_KEEP {
            self.ready.shrink_to(SCRATCH_KEEP);
        }
    }

    /// Gives back the slots of sends the kernel refused: staged before this
    /// epoch and still in flight after every completion was reaped. They wait
    /// on their peers now and complete when those read. Called only with the
    /// CQ empty.
    pub(super) fn park_refused_sends(&mut self) {
        while let Some(&(key, generation, epoch)) = self.offered.front() {
            if epoch == self.epoch {
                break;
            }
            self.offered.pop_front();
            let Some(conn) = self
                .conns
                .get_mut(key)
                .filter(|c| c.generation == generation)
            else {
                continue;
            };
            let same_send = conn.sendq.as_ref().is_some_and(|q| q.sending_since(epoch));
            if conn.has(flag::SEND_INFLIGHT) && !conn.has(flag::SEND_PARKED) && same_send {
                conn.set(flag::SEND_PARKED);
                self.sends_inflight -= 1;
                self.stats.sends_parked.add(1);
            }
        }
        if self.offered.is_empty() && self.offered.capacity() > SCRATCH_KEEP {
            self.offered.shrink_to(SCRATCH_KEEP);
        }
    }

    /// Stages a send of the head of the connection's queue (one send per
    /// connection at a time, so frames go out in order).
    fn stage_send(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.has(flag::SEND_INFLIGHT) || conn.state == State::Finished {
            return;
        }
        let pool = &mut self.pool;
        let Some(next) = conn
            .sendq
            .as_mut()
            .and_then(|q| q.next_send(self.epoch, pool))
        else {
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
        // The frames (and the copy buffer, or for SendMsg the header and
        // gather list) stay in the boxed queue, unmoved, until this completes:
        // see SendQueue.
        self.staged
            .push(sqe.user_data(Token::new(Op::Send, conn.generation, key).encode()));
        conn.set(flag::SEND_INFLIGHT);
        self.sends_inflight += 1;
        self.offered.push_back((key, conn.generation, self.epoch));
    }

    // ---- shutdown / close -------------------------------------------------------

    pub(super) fn on_shutdown(&mut self, key: usize, result: i32) {
        let conn = &mut self.conns[key];
        conn.clear(flag::SHUT_INFLIGHT);
        conn.set(flag::SHUT_DONE);
        if result < 0 {
            self.finish(key);
        }
    }

    pub(super) fn on_close(&mut self, key: usize) {
        self.stats.direct_descriptors.sub(1);
        let conn = &mut self.conns[key];
        conn.clear(flag::CLOSE_INFLIGHT);
        conn.set(flag::CLOSED);
    }

    /// Cancels one operation in flight by its own user_data.
    pub(super) fn cancel(&mut self, op: Op, key: usize) {
        let target = Token::new(op, self.conns[key].generation, key).encode();
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::user_data(target))
            .build()
            .user_data(Token::shard(Op::Cancel).encode());
        self.staged.push(cancel);
    }

    /// Ends a connection: cancel what is armed on it and close the descriptor.
    pub(super) fn finish(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.state == State::Finished {
            return;
        }
        conn.state = State::Finished;
        self.unfinished -= input::drop_partial(conn);
        self.end_replay(key);
        // Answers still on their way find the generation gone.
        self.drop_outstanding(key);
        self.forget_token(key);
        self.release_peer(key);
        if self.conns[key].subs.len() > 0 {
            self.topics.unsubscribe_all(&mut self.conns, key);
            self.after_topic_changes();
        }
        // Cancel what is in flight by its own user_data, never by file: a fixed
        // slot is reused as soon as it is closed, and a cancel (or a shutdown the
        // kernel ran late on a worker thread) aimed at a slot would then hit the
        // next connection in it. drive() closes the slot once all of these ended.
        let in_flight = [
            (flag::RECV_ARMED, Op::Recv),
            (flag::SEND_INFLIGHT, Op::Send),
            (flag::SHUT_INFLIGHT, Op::Shutdown),
            (flag::POLL_ARMED, Op::Poll),
        ];
        for (bit, op) in in_flight {
            if self.conns[key].has(bit) {
                self.cancel(op, key);
            }
        }
    }

    /// Stages whatever operations the connection's state now calls for, and frees
    /// its record once nothing is in flight.
    pub(super) fn drive(&mut self, key: usize) {
        self.conns[key].check();
        if self.conns[key].state == State::Finished {
            return self.drive_finished(key);
        }
        if self.conns[key].has(flag::REPLAYING) {
            self.pump_replay(key);
        }
        self.want_send(key);
        let conn = &mut self.conns[key];
        let generation = conn.generation;
        let fixed = Fixed(conn.slot);
        let sending = conn.has(flag::SEND_INFLIGHT | flag::SEND_READY);
        // The close handshake is done and everything is sent: close now (before
        // arming a recv that would only be cancelled).
        if conn.state == State::Flushing && conn.sendq.is_none() && !sending {
            self.finish(key);
            return self.drive(key);
        }
        self.pause_or_resume_reads(key);
        let conn = &mut self.conns[key];
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
        // Flushing, the peer has nothing more to send (its Close or its FIN
        // came): the recv armed before is left to end, and never re-armed.
        let wants_recv = !parked
            && conn.state != State::Flushing
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
        self.conns[key].check();
    }

    /// A finished connection: close the slot only when no operation can still
    /// refer to it, then free the record once the close has completed.
    fn drive_finished(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.has(flag::INFLIGHT) {
            return;
        }
        if conn.has(flag::CLOSED) {
            assert!(
                conn.partial.is_none() && conn.subs.len() == 0,
                "a freed record still holds input or subscriptions: {conn:?}"
            );
            let mut conn = self.conns.remove(key);
            if let Some(queue) = conn.sendq.as_mut() {
                queue.clear();
            }
            conn.release_queue(&mut self.pool);
            self.stats.connections.sub(1);
        } else {
            let close = opcode::Close::new(Fixed(conn.slot))
                .build()
                .user_data(Token::new(Op::Close, conn.generation, key).encode());
            self.staged.push(close);
            conn.set(flag::CLOSE_INFLIGHT);
        }
    }

    /// Back-pressure on `/echo`: a peer that does not read its echoes stops being
    /// read once its queue passes the limit, and is read again at half of it.
    fn pause_or_resume_reads(&mut self, key: usize) {
        let limit = self.cfg.send_queue_bytes_max;
        let conn = &mut self.conns[key];
        let cost = conn.queued_cost();
        if cost > limit && !conn.has(flag::READ_PAUSED) {
            conn.set(flag::READ_PAUSED);
            self.stats.reads_paused.add(1);
            if conn.has(flag::RECV_ARMED) {
                self.cancel(Op::Recv, key);
            }
        } else if conn.has(flag::READ_PAUSED) && cost <= limit / 2 {
            conn.clear(flag::READ_PAUSED);
        }
    }
}
