//! A connection's outgoing frames, what they cost, and whether the kernel is
//! refusing them; and the shard's pool of emptied queues.
//!
//! Frames are refcounted `Bytes`, so a frame shared by many connections is never
//! copied into a queue. A send takes what the queue holds, as much as one send
//! carries: a run of small frames is copied into one buffer lent by the shard's
//! [`SendPool`] (one contiguous send), large frames are gathered by reference
//! (one vectored send) or sent alone. Every frame covered by the send in flight
//! stays in the queue, unmoved, until that send completes; so do the boxed
//! gather list of a vectored send and the copy buffer of a copied one.
//!
//! Cost: each frame counts as its length plus [`FRAME_OVERHEAD_BYTES`] (its slot
//! and the queue's slack), so `--send-queue-limit` bounds memory for tiny frames
//! as well as large ones. Refusal: the kernel refused this connection's bytes when
//! its last send was short (the socket buffer is full) or a send offered to the
//! kernel has not completed; a queue over its limit is judged slow only then, never
//! for bytes the kernel was not yet offered.
//!
//! Owns no policy: the shard decides what to do with a queue over its limit.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::limits::{
    FRAME_OVERHEAD_BYTES, PONGS_QUEUED_MAX, SEND_COPY_BYTES, SEND_COPY_FRAME_MAX, SEND_FRAMES_MAX,
};

mod pool;

pub(crate) use pool::{CopyBuf, SendPool};

/// The stamp of a frame that is neither an event nor a pong.
pub(crate) const STAMP_PLAIN: u64 = 0;
/// The stamp of a pong, which a later ping may replace while it is unsent.
const STAMP_PONG: u64 = 1;

/// The stamp of an event published at `published_ns` ([`crate::clock_ns`]).
pub(crate) fn event_stamp(published_ns: u64) -> u64 {
    published_ns.max(STAMP_PONG + 1)
}

/// A connection's outgoing frames; boxed, and `None` in the record while empty.
#[derive(Default)]
pub(crate) struct SendQueue {
    /// Frames, each with its stamp: [`STAMP_PLAIN`], a pong, or an event's
    /// publish time.
    frames: VecDeque<(Bytes, u64)>,
    /// The gather list and header of vectored sends, which the kernel reads
    /// until the send completes. Boxed and made only the first time the queue
    /// holds several frames: a connection with one pending event (the common
    /// push) does not carry 570 bytes it never uses.
    gather: Option<Box<Gather>>,
    /// The buffer the send in flight reads, when it is a copy of small frames:
    /// lent by the [`SendPool`] at staging, given back at completion.
    copy: Option<Box<CopyBuf>>,
    /// Unsent bytes plus [`FRAME_OVERHEAD_BYTES`] per queued frame (the hard
    /// limit keeps it under 4 GiB: see `ShardConfig::validate`).
    cost: u32,
    /// Bytes of the head frame already sent.
    head_sent: u32,
    /// The shard's loop epoch when the send in flight was staged.
    epoch: u32,
    /// Frames covered by the send in flight; 0 when none is.
    in_flight: u16,
    /// The last send completed short: the kernel took less than it was offered.
    short: bool,
    /// Pongs queued and not yet fully sent.
    pongs: u8,
}

// A queue exists per connection with something to send: keep it small.
const _: () = assert!(std::mem::size_of::<SendQueue>() <= 64);
const _: () = assert!(SEND_FRAMES_MAX <= u16::MAX as usize);

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
            .field("cost", &self.cost)
            .field("in_flight", &self.in_flight)
            .field("copy", &self.copy.is_some())
            .field("short", &self.short)
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
    /// Queues a frame with its stamp.
    pub fn push(&mut self, frame: Bytes, stamp: u64) {
        // A frame has at least a 2-byte header; an empty one would make a send
        // of 0 bytes, whose result reads as a closed peer.
        assert!(!frame.is_empty(), "an empty frame was queued");
        debug_assert!(stamp != STAMP_PONG, "pongs go through push_pong");
        self.charge(frame.len() + FRAME_OVERHEAD_BYTES);
        self.frames.push_back((frame, stamp));
    }

    fn charge(&mut self, bytes: usize) {
        self.cost = u32::try_from(bytes)
            .ok()
            .and_then(|b| self.cost.checked_add(b))
            .expect("a send queue past 4 GiB: the hard limit failed");
    }

    fn uncharge(&mut self, bytes: usize) {
        self.cost -= u32::try_from(bytes).expect("more bytes than were charged");
    }

    /// Queues a pong. With [`PONGS_QUEUED_MAX`] pongs already waiting, it
    /// replaces the newest one not yet offered to the kernel instead (RFC 6455
    /// 5.5.3: a pong for only the most recent ping is enough). Returns whether a
    /// frame was added.
    pub fn push_pong(&mut self, frame: Bytes) -> bool {
        if self.pongs >= PONGS_QUEUED_MAX {
            let offered = usize::from(self.in_flight);
            let newest = (offered..self.frames.len())
                .rev()
                .find(|&i| self.frames[i].1 == STAMP_PONG);
            if let Some(i) = newest {
                let new_len = frame.len();
                let old = std::mem::replace(&mut self.frames[i].0, frame);
                self.uncharge(old.len());
                self.charge(new_len);
                return false;
            }
        }
        self.pongs += 1;
        self.charge(frame.len() + FRAME_OVERHEAD_BYTES);
        self.frames.push_back((frame, STAMP_PONG));
        true
    }

    /// What the queue costs now: unsent bytes plus the per-frame overhead.
    pub fn cost(&self) -> usize {
        self.cost as usize
    }

    /// Unsent bytes.
    pub fn bytes(&self) -> usize {
        self.cost() - self.frames.len() * FRAME_OVERHEAD_BYTES
    }

    /// Whether the kernel refused this connection's bytes: its last send was
    /// short, or a send staged before loop epoch `epoch` (so submitted, with
    /// every completion since reaped) is still in flight.
    pub fn refused(&self, epoch: u32) -> bool {
        self.short || (self.in_flight > 0 && self.epoch != epoch)
    }

    /// Whether a send is in flight.
    pub fn sending(&self) -> bool {
        self.in_flight > 0
    }

    /// Whether the send in flight is the one staged at loop epoch `epoch`.
    pub fn sending_since(&self, epoch: u32) -> bool {
        self.in_flight > 0 && self.epoch == epoch
    }

    /// The unsent part of the head frame.
    #[cfg(test)]
    pub fn head(&self) -> Option<&[u8]> {
        self.frames
            .front()
            .map(|(f, _)| &f[self.head_sent as usize..])
    }

    /// Prepares the next send from the head and marks the frames it covers in
    /// flight, staged at loop epoch `epoch`: the head alone, a run of small
    /// frames copied into a buffer lent by `pool` (up to [`SEND_COPY_BYTES`]),
    /// or up to [`SEND_FRAMES_MAX`] frames gathered. `None` if the queue is
    /// empty or a send is in flight.
    pub fn next_send(&mut self, epoch: u32, pool: &mut SendPool) -> Option<NextSend> {
        if self.in_flight > 0 || self.frames.is_empty() {
            return None;
        }
        assert!(
            self.copy.is_none(),
            "a copy buffer held with no send in flight"
        );
        self.epoch = epoch;
        let head = &self.frames[0].0[self.head_sent as usize..];
        if self.frames.len() == 1 {
            self.in_flight = 1;
            return Some(NextSend::One(head.as_ptr(), head.len()));
        }
        let small =
            head.len() <= SEND_COPY_FRAME_MAX && self.frames[1].0.len() <= SEND_COPY_FRAME_MAX;
        if let Some(mut buf) = small.then(|| pool.lend_copy()).flatten() {
            let mut len = 0;
            let mut count = 0;
            for (i, (frame, _)) in self.frames.iter().enumerate() {
                let part = if i == 0 { head } else { &frame[..] };
                if part.len() > SEND_COPY_FRAME_MAX || len + part.len() > SEND_COPY_BYTES {
                    break;
                }
                buf[len..len + part.len()].copy_from_slice(part);
                len += part.len();
                count += 1;
            }
            // The first two frames always fit (2 x SEND_COPY_FRAME_MAX <=
            // SEND_COPY_BYTES), and SEND_COPY_BYTES / 2 frames fit a u16.
            assert!(count >= 2);
            self.in_flight = count as u16;
            let ptr = self.copy.insert(buf).as_ptr();
            return Some(NextSend::One(ptr, len));
        }
        let count = self.frames.len().min(SEND_FRAMES_MAX);
        self.in_flight = count as u16;
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
    /// short send leaves the rest queued and marks the queue refused), giving
    /// its copy buffer back to `pool`; calls `event_sent` with the publish time
    /// of each event now fully sent, and returns how many frames completed.
    pub fn complete(
        &mut self,
        sent: usize,
        pool: &mut SendPool,
        mut event_sent: impl FnMut(u64),
    ) -> usize {
        let covered = usize::from(self.in_flight);
        assert!(covered > 0, "a send completed with none in flight");
        if let Some(buf) = self.copy.take() {
            pool.return_copy(buf);
        }
        let offered: usize = self
            .frames
            .iter()
            .take(covered)
            .map(|(f, _)| f.len())
            .sum::<usize>()
            - self.head_sent as usize;
        assert!(sent <= offered, "sent {sent} of {offered} offered bytes");
        self.in_flight = 0;
        self.short = sent < offered;
        self.uncharge(sent);
        let mut left = sent;
        let mut done = 0;
        while left > 0 {
            let remaining = self.frames[0].0.len() - self.head_sent as usize;
            if left < remaining {
                self.head_sent += left as u32;
                break;
            }
            left -= remaining;
            let (_, stamp) = self
                .frames
                .pop_front()
                .expect("sent bytes belong to queued frames");
            self.uncharge(FRAME_OVERHEAD_BYTES);
            match stamp {
                STAMP_PLAIN => {}
                STAMP_PONG => self.pongs -= 1,
                published_ns => event_sent(published_ns),
            }
            self.head_sent = 0;
            done += 1;
        }
        done
    }

    /// Ends the send in flight without progress (it failed or was cancelled),
    /// giving its copy buffer back to `pool`.
    pub fn abandon_in_flight(&mut self, pool: &mut SendPool) {
        assert!(self.in_flight > 0, "no send in flight to abandon");
        self.in_flight = 0;
        if let Some(buf) = self.copy.take() {
            pool.return_copy(buf);
        }
    }

    /// Heap bytes this queue holds, the box included (frames are shared, so
    /// their bytes are counted where they are made, not here).
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of::<SendQueue>()
            + self.frames.capacity() * std::mem::size_of::<(Bytes, u64)>()
            + self
                .gather
                .as_ref()
                .map_or(0, |_| std::mem::size_of::<Gather>())
            + self
                .copy
                .as_ref()
                .map_or(0, |_| std::mem::size_of::<CopyBuf>())
    }

    /// When the first event still queued was published (its stamp), if any:
    /// the oldest, give or take the inbox's latency (concurrent publishers,
    /// and a replay stamped when it was answered, can put a slightly older
    /// event behind it). The first, not a walk over a queue that may hold
    /// thousands of frames, because the sweep asks every backlogged queue
    /// every tick.
    pub fn oldest_event_ns(&self) -> Option<u64> {
        self.frames
            .iter()
            .map(|&(_, stamp)| stamp)
            .find(|&stamp| stamp > STAMP_PONG)
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Drops every frame not handed to the kernel, to end the stream with a
    /// Close. Frames covered by a send in flight stay (the kernel still reads
    /// them), and so does a head frame partly sent: cut in the middle, it would
    /// make whatever follows garbage to the peer.
    pub fn discard_unsent(&mut self) {
        let keep = usize::from(self.in_flight).max(usize::from(self.head_sent > 0));
        self.drop_from(keep);
    }

    /// Drops every frame, for a connection that is gone. Nothing may be in flight.
    pub fn clear(&mut self) {
        assert_eq!(self.in_flight, 0, "clearing a queue with a send in flight");
        self.drop_from(0);
    }

    fn drop_from(&mut self, keep: usize) {
        let head_sent = self.head_sent as usize;
        let from = keep.min(self.frames.len());
        for (i, (frame, stamp)) in self.frames.drain(from..).enumerate() {
            // Only the unsent part of the head frame is still counted.
            let sent = if from == 0 && i == 0 { head_sent } else { 0 };
            self.cost -= (frame.len() - sent + FRAME_OVERHEAD_BYTES) as u32;
            if stamp == STAMP_PONG {
                self.pongs -= 1;
            }
        }
        if self.frames.is_empty() {
            assert_eq!(self.cost, 0, "send-queue cost accounting drifted");
            self.head_sent = 0;
        }
    }
}

/// The bytes a send would write, read through the very pointers the kernel
/// gets (tests and fuzzing stand in for the kernel with this).
#[cfg(any(test, fuzzing))]
pub(crate) fn read_send(next: &NextSend) -> Vec<u8> {
    match *next {
        // SAFETY: `next_send` points into a frame or the copy buffer, which
        // stay in the queue until `complete` or `abandon_in_flight`, which the
        // caller calls only after this returns.
        NextSend::One(ptr, len) => unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec(),
        NextSend::Many(msg) => {
            // SAFETY: the header lives in the queue's gather box, as above.
            let msg = unsafe { &*msg };
            // SAFETY: it points at `msg_iovlen` initialised iovecs in the box.
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

#[cfg(test)]
mod tests;
