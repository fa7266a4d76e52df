//! The connection record and its send queue: everything a shard keeps per
//! connection.
//!
//! An idle connection is only its [`Conn`] record (48 bytes, checked at compile
//! time, with its first subscription inline): the partial-input, send-queue and
//! extra-subscription boxes are `None` while idle and exist only while a frame is
//! incomplete, bytes wait to be sent, or the connection has several topics.

use bytes::Bytes;
use ringgate_codec::MessageState;

use crate::sendq::{SendPool, SendQueue, STAMP_PLAIN};
use crate::topics::Subs;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Reading the HTTP upgrade request.
    Handshake,
    /// WebSocket open.
    Open,
    /// We sent a Close frame and wait for the peer's.
    Closing,
    /// The close handshake is complete: flush the send queue, then close the
    /// socket at once (RFC 6455 7.1.1: the server closes TCP first). The peer
    /// sends nothing after its Close, so no unread byte turns the close into a reset.
    Flushing,
    /// Failed or refused while the peer may still be sending: flush, shut down our
    /// side, discard reads until the peer's FIN, so the last thing we sent (a
    /// close frame or an HTTP error) is not lost to a reset.
    Draining,
    /// The descriptor is being (or has been) closed; waiting for the last completions.
    Finished,
}

/// What the upgraded connection serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// `GET /ws`: the pub/sub endpoint.
    PubSub,
    /// `GET /echo`: every message is sent back.
    Echo,
}

/// Flag bits of [`Conn::flags`]. "In flight" bits say the kernel holds an
/// operation on this connection; the record is freed only when none are set.
pub(crate) mod flag {
    /// A multishot recv is armed.
    pub const RECV_ARMED: u16 = 1 << 0;
    /// A send is in flight.
    pub const SEND_INFLIGHT: u16 = 1 << 1;
    /// A shutdown(SHUT_WR) is in flight.
    pub const SHUT_INFLIGHT: u16 = 1 << 2;
    /// Our side is shut down.
    pub const SHUT_DONE: u16 = 1 << 3;
    /// The close of the direct descriptor is in flight.
    pub const CLOSE_INFLIGHT: u16 = 1 << 4;
    /// The direct descriptor is closed.
    pub const CLOSED: u16 = 1 << 5;
    /// A keepalive ping was sent and nothing came back since.
    pub const PING_SENT: u16 = 1 << 6;
    /// Reads are paused because the send queue is over its limit.
    pub const READ_PAUSED: u16 = 1 << 7;
    /// The recv ended for lack of buffers; it is re-armed when buffers return.
    pub const REARM_WAIT: u16 = 1 << 8;
    /// The connection was upgraded on `/echo` (else `/ws`).
    pub const ROUTE_ECHO: u16 = 1 << 9;
    /// Silent a while: a one-shot POLLIN replaces the multishot recv.
    pub const PARKED: u16 = 1 << 10;
    /// The parked connection's poll is armed.
    pub const POLL_ARMED: u16 = 1 << 11;
    /// On the shard's ready list, waiting for a send slot.
    pub const SEND_READY: u16 = 1 << 12;
    /// On the shard's congested list: over its send-queue limit with bytes the
    /// kernel was not yet offered.
    pub const CONGESTED: u16 = 1 << 13;
    /// The send in flight was refused (the peer's socket is full) and gave its
    /// send slot back; it completes when the peer reads.
    pub const SEND_PARKED: u16 = 1 << 14;
    /// Replaying missed events: frames wait in the shard's backlog for it.
    pub const REPLAYING: u16 = 1 << 15;
    /// Any operation the kernel may still complete.
    pub const INFLIGHT: u16 =
        RECV_ARMED | SEND_INFLIGHT | SHUT_INFLIGHT | CLOSE_INFLIGHT | POLL_ARMED;
}

/// One connection's record in the shard's table.
#[derive(Debug)]
pub(crate) struct Conn {
    /// The direct descriptor (fixed-file slot).
    pub slot: u32,
    /// Tags this record's operations; see [`crate::token`].
    pub generation: u32,
    /// A sweep tick: of the accept (Handshake), of the last receive (Open), or of
    /// the start of closing (Closing, Draining).
    pub since: u32,
    pub state: State,
    /// Bad requests lately; the sweep forgives one per tick.
    pub strikes: u8,
    pub flags: u16,
    /// Input that ends in an unfinished frame or message; `None` while idle.
    pub partial: Option<Box<Partial>>,
    /// Bytes waiting to be sent; `None` while idle.
    pub sendq: Option<Box<SendQueue>>,
    /// Topics subscribed to (the first one inline).
    pub subs: Subs,
}

// The memory budget of design.md section 4: an idle record is at most 64 bytes.
const _: () = assert!(std::mem::size_of::<Conn>() <= 48);

impl Conn {
    pub fn new(slot: u32, generation: u32, now: u32) -> Self {
        Conn {
            slot,
            generation,
            since: now,
            state: State::Handshake,
            strikes: 0,
            flags: 0,
            partial: None,
            sendq: None,
            subs: Subs::default(),
        }
    }

    /// What the upgraded connection serves.
    pub fn route(&self) -> Route {
        if self.has(flag::ROUTE_ECHO) {
            Route::Echo
        } else {
            Route::PubSub
        }
    }

    pub fn set_route(&mut self, route: Route) {
        match route {
            Route::Echo => self.set(flag::ROUTE_ECHO),
            Route::PubSub => self.clear(flag::ROUTE_ECHO),
        }
    }

    pub fn has(&self, bits: u16) -> bool {
        self.flags & bits != 0
    }

    pub fn set(&mut self, bits: u16) {
        self.flags |= bits;
    }

    pub fn clear(&mut self, bits: u16) {
        self.flags &= !bits;
    }

    /// Appends a frame to the send queue, creating it if needed.
    pub fn queue(&mut self, frame: Bytes, pool: &mut SendPool) {
        self.queue_stamped(frame, STAMP_PLAIN, pool);
    }

    /// Appends a frame with its stamp (see [`crate::sendq`]).
    pub fn queue_stamped(&mut self, frame: Bytes, stamp: u64, pool: &mut SendPool) {
        self.sendq
            .get_or_insert_with(|| pool.take())
            .push(frame, stamp);
    }

    /// Appends a pong, or replaces an unsent one (see [`SendQueue::push_pong`]).
    pub fn queue_pong(&mut self, frame: Bytes, pool: &mut SendPool) {
        self.sendq
            .get_or_insert_with(|| pool.take())
            .push_pong(frame);
    }

    /// What the send queue costs now (bytes plus per-frame overhead).
    pub fn queued_cost(&self) -> usize {
        self.sendq.as_ref().map_or(0, |q| q.cost())
    }

    /// Unsent bytes in the send queue.
    pub fn queued_bytes(&self) -> usize {
        self.sendq.as_ref().map_or(0, |q| q.bytes())
    }

    /// Heap bytes this record owns outside the table: its further
    /// subscriptions, its send queue, its unfinished input.
    pub fn heap_bytes(&self) -> usize {
        self.subs.heap_bytes()
            + self.sendq.as_ref().map_or(0, |q| q.heap_bytes())
            + self.partial.as_ref().map_or(0, |p| p.held_bytes())
    }

    /// The publish time of the oldest event waiting for this client, if any.
    pub fn oldest_queued_event_ns(&self) -> Option<u64> {
        self.sendq.as_ref().and_then(|q| q.oldest_event_ns())
    }

    /// Gives an emptied send queue back to the pool.
    pub fn release_queue(&mut self, pool: &mut SendPool) {
        if self
            .sendq
            .as_ref()
            .is_some_and(|q| q.is_empty() && !q.sending())
        {
            pool.put(self.sendq.take().expect("checked above"));
        }
    }

    /// Asserts the record's invariants (design.md: bugs crash, in release too).
    pub fn check(&self) {
        let sending = self.sendq.as_ref().is_some_and(|q| q.sending());
        assert_eq!(
            self.has(flag::SEND_INFLIGHT),
            sending,
            "the send-in-flight flag disagrees with the queue: {self:?}"
        );
        assert!(
            !(self.has(flag::RECV_ARMED) && self.has(flag::POLL_ARMED)),
            "a recv and a poll armed at once: {self:?}"
        );
        assert!(
            !(self.has(flag::SEND_INFLIGHT) && self.has(flag::SEND_READY)),
            "a send in flight while waiting for a send slot: {self:?}"
        );
        assert!(
            !self.has(flag::SEND_PARKED) || self.has(flag::SEND_INFLIGHT),
            "a parked send that is not in flight: {self:?}"
        );
        assert!(
            !self.has(flag::CLOSED) || !self.has(flag::INFLIGHT),
            "an operation in flight on a closed descriptor: {self:?}"
        );
    }
}

/// Input carried between receives: an unfinished frame (or request head) and an
/// unfinished fragmented message.
#[derive(Debug, Default)]
pub(crate) struct Partial {
    /// The bytes of an unfinished frame or request head, from its first byte.
    pub tail: Vec<u8>,
    /// Payload bytes of the frame in `tail` already unmasked and checked.
    pub checked: u64,
    /// Fragments of an unfinished message, for routes that need it whole.
    pub message: Vec<u8>,
    /// Cross-frame protocol state.
    pub state: MessageState,
    /// The sweep tick when input started to be unfinished: the message timeout
    /// counts from here, and new fragments do not move it.
    pub started: u32,
}

impl Partial {
    pub fn new(now: u32) -> Box<Partial> {
        Box::new(Partial {
            started: now,
            ..Partial::default()
        })
    }

    /// Whether anything is carried over (else the box is freed).
    pub fn is_needed(&self) -> bool {
        !self.tail.is_empty() || self.state.in_message()
    }

    /// Heap bytes this holds, counted against the shard's unfinished-input budget.
    pub fn held_bytes(&self) -> usize {
        std::mem::size_of::<Partial>() + self.tail.capacity() + self.message.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sendq::SendPool;

    #[test]
    fn shared_frames_are_not_copied() {
        let frame = Bytes::from(vec![7u8; 100]);
        let mut pool = SendPool::new(true);
        let mut a = Conn::new(0, 0, 0);
        let mut b = Conn::new(1, 0, 0);
        a.queue(frame.clone(), &mut pool);
        b.queue(frame.clone(), &mut pool);
        let pa = a.sendq.as_ref().unwrap().head().unwrap().as_ptr();
        let pb = b.sendq.as_ref().unwrap().head().unwrap().as_ptr();
        assert_eq!(pa, frame.as_ptr());
        assert_eq!(pb, frame.as_ptr());
    }

    #[test]
    fn an_idle_record_owns_no_heap() {
        let c = Conn::new(3, 1, 0);
        assert!(c.partial.is_none() && c.sendq.is_none() && c.subs.len() == 0);
    }

    #[test]
    fn the_invariants_hold_through_a_send() {
        let mut pool = SendPool::new(true);
        let mut c = Conn::new(3, 1, 0);
        c.check();
        c.queue(Bytes::from_static(b"ab"), &mut pool);
        let _ = c.sendq.as_mut().unwrap().next_send(0, &mut pool);
        c.set(flag::SEND_INFLIGHT);
        c.check();
        c.set(flag::RECV_ARMED | flag::POLL_ARMED);
        assert!(
            std::panic::catch_unwind(move || c.check()).is_err(),
            "recv and poll are exclusive"
        );
    }
}
