//! The connection record and its send queue: everything a shard keeps per
//! connection.
//!
//! An idle connection is only its [`Conn`] record (48 bytes, checked at compile
//! time, with its first subscription inline): the partial-input, send-queue and
//! extra-subscription boxes are `None` while idle and exist only while a frame is
//! incomplete, bytes wait to be sent, or the connection has several topics.

use std::collections::VecDeque;

use bytes::Bytes;
use ringgate_codec::MessageState;

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
    /// Any operation the kernel may still complete.
    pub const INFLIGHT: u16 = RECV_ARMED | SEND_INFLIGHT | SHUT_INFLIGHT | CLOSE_INFLIGHT;
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
    pub fn queue(&mut self, frame: Bytes) {
        self.sendq.get_or_insert_with(Default::default).push(frame);
    }

    pub fn queued_bytes(&self) -> usize {
        self.sendq.as_ref().map_or(0, |q| q.bytes)
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
}

impl Partial {
    /// Whether anything is carried over (else the box is freed).
    pub fn is_needed(&self) -> bool {
        !self.tail.is_empty() || self.state.in_message()
    }
}

/// A connection's outgoing frames. Frames are refcounted `Bytes`, so a frame
/// shared by many connections is never copied; the head stays alive (and
/// unmoved) until its send completes.
#[derive(Debug, Default)]
pub(crate) struct SendQueue {
    frames: VecDeque<Bytes>,
    /// Bytes of the head frame already sent.
    head_sent: usize,
    /// Bytes queued and not yet sent, over all frames.
    pub bytes: usize,
}

impl SendQueue {
    pub fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// The unsent part of the head frame.
    pub fn head(&self) -> Option<&[u8]> {
        self.frames.front().map(|f| &f[self.head_sent..])
    }

    /// Records `sent` bytes of the head as sent (a short send leaves the rest);
    /// returns how many frames were completed.
    pub fn advance(&mut self, sent: usize) -> usize {
        let head = self
            .frames
            .front()
            .expect("a send completed with an empty queue");
        let remaining = head.len() - self.head_sent;
        assert!(sent <= remaining, "sent {sent} of {remaining} bytes");
        self.bytes -= sent;
        if sent < remaining {
            self.head_sent += sent;
            return 0;
        }
        self.frames.pop_front();
        self.head_sent = 0;
        1
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Drops every frame not yet handed to the kernel. The head stays when a
    /// send of it is in flight (`keep_head`): the kernel still reads it, and a
    /// frame cut in the middle would corrupt the stream.
    pub fn discard_unsent(&mut self, keep_head: bool) {
        if keep_head && !self.frames.is_empty() {
            for frame in self.frames.drain(1..) {
                self.bytes -= frame.len();
            }
        } else {
            self.frames.clear();
            self.bytes = 0;
            self.head_sent = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_sends_keep_the_rest_of_the_head() {
        let mut q = SendQueue::default();
        q.push(Bytes::from_static(b"hello"));
        q.push(Bytes::from_static(b"world"));
        assert_eq!(q.bytes, 10);
        assert_eq!(q.advance(2), 0);
        assert_eq!(q.head(), Some(&b"llo"[..]));
        assert_eq!(q.bytes, 8);
        assert_eq!(q.advance(3), 1);
        assert_eq!(q.head(), Some(&b"world"[..]));
        assert_eq!(q.advance(5), 1);
        assert!(q.is_empty());
        assert_eq!(q.bytes, 0);
    }

    #[test]
    fn discarding_keeps_an_in_flight_head() {
        let mut q = SendQueue::default();
        for f in [&b"abcd"[..], b"ef", b"gh"] {
            q.push(Bytes::copy_from_slice(f));
        }
        q.advance(1);
        q.discard_unsent(true);
        assert_eq!(q.head(), Some(&b"bcd"[..]));
        assert_eq!(q.bytes, 3);
        q.discard_unsent(false);
        assert!(q.is_empty());
        assert_eq!(q.bytes, 0);
    }

    #[test]
    fn shared_frames_are_not_copied() {
        let frame = Bytes::from(vec![7u8; 100]);
        let mut a = Conn::new(0, 0, 0);
        let mut b = Conn::new(1, 0, 0);
        a.queue(frame.clone());
        b.queue(frame.clone());
        let pa = a.sendq.as_ref().unwrap().head().unwrap().as_ptr();
        let pb = b.sendq.as_ref().unwrap().head().unwrap().as_ptr();
        assert_eq!(pa, frame.as_ptr());
        assert_eq!(pb, frame.as_ptr());
    }

    #[test]
    fn an_idle_record_owns_no_heap() {
        let c = Conn::new(3, 1, 0);
        assert!(c.partial.is_none() && c.sendq.is_none());
        assert!(std::mem::size_of::<Conn>() <= 48);
    }
}
