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
    /// Silent a while: a one-shot POLLIN replaces the multishot recv.
    pub const PARKED: u16 = 1 << 10;
    /// The parked connection's poll is armed.
    pub const POLL_ARMED: u16 = 1 << 11;
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
    pub fn queue(&mut self, frame: Bytes) {
        self.queue_event(frame, 0);
    }

    /// Appends a published event, stamped with its publish time.
    pub fn queue_event(&mut self, frame: Bytes, published_ns: u64) {
        self.sendq
            .get_or_insert_with(Default::default)
            .push(frame, published_ns);
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

/// Frames gathered into one vectored send: fewer, larger sends when a
/// connection has a backlog (a burst of events), one plain send otherwise.
pub(crate) const SEND_FRAMES_MAX: usize = 32;

/// A connection's outgoing frames. Frames are refcounted `Bytes`, so a frame
/// shared by many connections is never copied. Every frame covered by the send
/// in flight stays in the queue, unmoved, until that send completes; so does the
/// boxed gather list of a vectored send.
#[derive(Default)]
pub(crate) struct SendQueue {
    /// Frames, each with its publish time ([`crate::clock_ns`]; 0 for frames
    /// that are not published events).
    frames: VecDeque<(Bytes, u64)>,
    /// Bytes of the head frame already sent.
    head_sent: usize,
    /// Bytes queued and not yet sent, over all frames.
    pub bytes: usize,
    /// Frames covered by the send in flight; 0 when none is.
    in_flight: usize,
    /// The gather list and header of vectored sends, which the kernel reads
    /// until the send completes. Boxed and made only the first time the queue
    /// holds several frames: a connection with one pending event (the common
    /// push) does not carry 570 bytes it never uses.
    gather: Option<Box<Gather>>,
}

// A queue exists per connection with something to send: keep it small.
const _: () = assert!(std::mem::size_of::<SendQueue>() <= 64);

struct Gather {
    iov: [libc::iovec; SEND_FRAMES_MAX],
    msg: libc::msghdr,
}

impl Gather {
    fn new() -> Box<Gather> {
        Box::new(Gather {
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; SEND_FRAMES_MAX],
            // SAFETY: msghdr is plain data; all-zero is an empty header.
            msg: unsafe { std::mem::zeroed() },
        })
    }
}

impl std::fmt::Debug for SendQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendQueue")
            .field("frames", &self.frames.len())
            .field("bytes", &self.bytes)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

/// The next send to submit for a queue.
pub(crate) enum NextSend {
    /// One contiguous range: a plain send.
    One(*const u8, usize),
    /// Several frames: a sendmsg of this header (in the queue's gather box).
    Many(*const libc::msghdr),
}

impl SendQueue {
    /// Queues a frame; `published_ns` is the event's publish time, or 0.
    pub fn push(&mut self, frame: Bytes, published_ns: u64) {
        self.bytes += frame.len();
        self.frames.push_back((frame, published_ns));
    }

    /// The unsent part of the head frame.
    #[cfg(test)]
    pub fn head(&self) -> Option<&[u8]> {
        self.frames.front().map(|(f, _)| &f[self.head_sent..])
    }

    /// Prepares a send of up to [`SEND_FRAMES_MAX`] frames from the head and
    /// marks them in flight. `None` if the queue is empty or a send is in flight.
    pub fn next_send(&mut self) -> Option<NextSend> {
        if self.in_flight > 0 || self.frames.is_empty() {
            return None;
        }
        let count = self.frames.len().min(SEND_FRAMES_MAX);
        self.in_flight = count;
        let head = &self.frames[0].0[self.head_sent..];
        if count == 1 {
            return Some(NextSend::One(head.as_ptr(), head.len()));
        }
        let gather = self.gather.get_or_insert_with(Gather::new);
        for (i, (frame, _)) in self.frames.iter().take(count).enumerate() {
            let part = if i == 0 { head } else { &frame[..] };
            gather.iov[i] = libc::iovec {
                iov_base: part.as_ptr() as *mut _,
                iov_len: part.len(),
            };
        }
        gather.msg.msg_iov = gather.iov.as_mut_ptr();
        gather.msg.msg_iovlen = count as _;
        Some(NextSend::Many(&gather.msg))
    }

    /// Records the completion of the send in flight that wrote `sent` bytes (a
    /// short send leaves the rest queued); calls `event_sent` with the publish
    /// time of each published event that is now fully sent, and returns how many
    /// frames completed.
    pub fn complete(&mut self, sent: usize, mut event_sent: impl FnMut(u64)) -> usize {
        assert!(self.in_flight > 0, "a send completed with none in flight");
        assert!(
            sent <= self.bytes,
            "sent {sent} of {} queued bytes",
            self.bytes
        );
        self.in_flight = 0;
        self.bytes -= sent;
        let mut left = sent;
        let mut done = 0;
        while left > 0 {
            let remaining = self.frames[0].0.len() - self.head_sent;
            if left < remaining {
                self.head_sent += left;
                break;
            }
            left -= remaining;
            let (_, published_ns) = self
                .frames
                .pop_front()
                .expect("sent bytes belong to queued frames");
            if published_ns != 0 {
                event_sent(published_ns);
            }
            self.head_sent = 0;
            done += 1;
        }
        done
    }

    /// Ends the send in flight without progress (it failed or was cancelled).
    pub fn abandon_in_flight(&mut self) {
        self.in_flight = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Drops every frame not handed to the kernel. Frames covered by a send in
    /// flight stay: the kernel still reads them, and a frame cut in the middle
    /// would corrupt the stream.
    pub fn discard_unsent(&mut self) {
        let keep = self.in_flight;
        for (frame, _) in self.frames.drain(keep..) {
            self.bytes -= frame.len();
        }
        if keep == 0 {
            self.bytes = 0;
            self.head_sent = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes a send would write, read through the pointers the kernel gets.
    fn bytes_of(next: &NextSend) -> Vec<u8> {
        match *next {
            // SAFETY: `next_send` points into frames that stay in the queue
            // until `complete`, which the caller has not called yet.
            NextSend::One(ptr, len) => unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec(),
            NextSend::Many(msg) => {
                // SAFETY: the header lives in the queue, as above.
                let msg = unsafe { &*msg };
                // SAFETY: it points at `msg_iovlen` initialised iovecs in the queue.
                let iovs = unsafe { std::slice::from_raw_parts(msg.msg_iov, msg.msg_iovlen) };
                iovs.iter()
                    // SAFETY: each iovec names a live frame, as above.
                    .flat_map(|iov| unsafe {
                        std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len)
                    })
                    .copied()
                    .collect()
            }
        }
    }

    fn drain_all(q: &mut SendQueue) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(next) = q.next_send() {
            // Pretend the kernel takes 3 bytes at most, to exercise short sends.
            let bytes = bytes_of(&next);
            let sent = bytes.len().min(3);
            out.extend_from_slice(&bytes[..sent]);
            q.complete(sent, |_| {});
        }
        out
    }

    #[test]
    fn short_and_vectored_sends_deliver_every_byte_in_order() {
        let mut q = SendQueue::default();
        let mut expected = Vec::new();
        for i in 0..(SEND_FRAMES_MAX * 2 + 5) {
            let frame: Vec<u8> = (0..(i % 7 + 1)).map(|j| (i * 10 + j) as u8).collect();
            expected.extend_from_slice(&frame);
            q.push(Bytes::from(frame), 0);
        }
        assert_eq!(drain_all(&mut q), expected);
        assert!(q.is_empty());
        assert_eq!(q.bytes, 0);
    }

    #[test]
    fn one_send_at_a_time_and_a_full_batch_completes_many_frames() {
        let mut q = SendQueue::default();
        for _ in 0..SEND_FRAMES_MAX + 3 {
            q.push(Bytes::from_static(b"ab"), 0);
        }
        assert!(matches!(q.next_send(), Some(NextSend::Many(_))));
        assert!(q.next_send().is_none(), "one send in flight at a time");
        assert_eq!(q.complete(2 * SEND_FRAMES_MAX, |_| {}), SEND_FRAMES_MAX);
        assert!(matches!(q.next_send(), Some(NextSend::Many(_))));
        assert_eq!(q.complete(5, |_| {}), 2);
        assert!(matches!(q.next_send(), Some(NextSend::One(_, 1))));
    }

    #[test]
    fn discarding_keeps_the_frames_in_flight() {
        let mut q = SendQueue::default();
        for (i, f) in [&b"abcd"[..], b"ef", b"gh"].into_iter().enumerate() {
            q.push(Bytes::copy_from_slice(f), i as u64 + 1);
        }
        let _ = q.next_send();
        let mut events = Vec::new();
        q.complete(1, |ns| events.push(ns));
        assert!(events.is_empty(), "a partly sent event is not done");
        let _ = q.next_send(); // covers all three frames
        q.push(Bytes::from_static(b"ij"), 9);
        q.discard_unsent();
        assert_eq!(q.bytes, 3 + 2 + 2, "only the new frame was dropped");
        q.complete(7, |ns| events.push(ns));
        assert_eq!(
            events,
            vec![1, 2, 3],
            "each sent event reports its publish time once"
        );
        assert!(q.is_empty());
        q.push(Bytes::from_static(b"kl"), 0);
        q.discard_unsent();
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
