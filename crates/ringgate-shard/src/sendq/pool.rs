//! The shard's send resources kept for reuse: emptied send queues, and the
//! buffers small frames are copied into for one send each.
//!
//! Both exist so a busy shard does not allocate per delivery, and both are
//! bounded: what is kept when returned ([`SEND_QUEUE_POOL_MAX`] queues,
//! [`SEND_COPY_BUFFERS_KEEP`] buffers) and, for copy buffers, what is lent at
//! once ([`SEND_COPY_BUFFERS_MAX`]; past it a send gathers instead of copying).

use std::collections::VecDeque;

use super::SendQueue;
use crate::limits::{
    SEND_COPY_BUFFERS_KEEP, SEND_COPY_BUFFERS_MAX, SEND_COPY_BYTES, SEND_QUEUE_POOL_MAX,
};

/// A buffer a run of small frames is copied into for one send.
pub(crate) type CopyBuf = [u8; SEND_COPY_BYTES];

/// Emptied send queues and copy buffers kept for reuse. Full, about 1 MiB of
/// queues (at most [`SEND_QUEUE_POOL_MAX`], each with a frame array of at most
/// [`POOLED_FRAMES_MAX`] slots and no gather box) and 1 MiB of buffers.
#[derive(Default)]
pub(crate) struct SendPool {
    // Boxed on purpose: a connection's queue is a box, and recycling the box
    // itself is the point (one allocation saved per delivery).
    #[allow(clippy::vec_box)]
    free: Vec<Box<SendQueue>>,
    /// 0 turns queue recycling off (for measuring what it saves).
    max: usize,
    copies: Vec<Box<CopyBuf>>,
    /// Copy buffers lent to sends in flight.
    copies_lent: usize,
}

/// Frame slots a pooled queue keeps (a larger array is freed).
const POOLED_FRAMES_MAX: usize = 4;

impl SendPool {
    pub fn new(enabled: bool) -> Self {
        SendPool {
            max: if enabled { SEND_QUEUE_POOL_MAX } else { 0 },
            ..SendPool::default()
        }
    }

    /// An empty queue, recycled when one is at hand.
    pub fn take(&mut self) -> Box<SendQueue> {
        self.free.pop().unwrap_or_default()
    }

    /// Takes back a queue that is empty and has nothing in flight.
    pub fn put(&mut self, mut queue: Box<SendQueue>) {
        assert!(
            queue.frames.is_empty() && queue.in_flight == 0 && queue.copy.is_none(),
            "only an empty queue with nothing in flight is recycled: {queue:?}"
        );
        if self.free.len() >= self.max {
            return;
        }
        if queue.frames.capacity() > POOLED_FRAMES_MAX {
            queue.frames = VecDeque::new();
        }
        queue.gather = None;
        queue.cost = 0;
        queue.head_sent = 0;
        queue.short = false;
        queue.pongs = 0;
        self.free.push(queue);
    }

    /// A copy buffer for one send, unless [`SEND_COPY_BUFFERS_MAX`] are lent.
    /// Its bytes are whatever the last send left: the sender writes before
    /// it reads.
    pub fn lend_copy(&mut self) -> Option<Box<CopyBuf>> {
        if self.copies_lent >= SEND_COPY_BUFFERS_MAX {
            return None;
        }
        self.copies_lent += 1;
        Some(self.copies.pop().unwrap_or_else(|| {
            vec![0u8; SEND_COPY_BYTES]
                .into_boxed_slice()
                .try_into()
                .expect("the length is the array's")
        }))
    }

    /// Takes back a copy buffer whose send has ended.
    pub fn return_copy(&mut self, buf: Box<CopyBuf>) {
        assert!(
            self.copies_lent > 0,
            "a copy buffer came back that was not lent"
        );
        self.copies_lent -= 1;
        if self.copies.len() < SEND_COPY_BUFFERS_KEEP {
            self.copies.push(buf);
        }
    }

    /// Copy buffers lent now.
    #[cfg(test)]
    pub fn copies_lent(&self) -> usize {
        self.copies_lent
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.free.len()
    }
}
