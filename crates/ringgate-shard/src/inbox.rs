//! A shard's inbox: a bounded queue of commands from other threads, and the
//! doorbell (an eventfd the shard keeps a read armed on) that wakes it.
//!
//! The doorbell rings once per batch, not once per command: a sender rings only
//! when it flips `notified` from false to true, and the shard clears `notified`
//! before it drains. A full queue is back-pressure: the command is handed back
//! to the sender, which reports it (the publish API answers 503).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

use crate::sys;

/// Messages other threads send to a shard.
#[derive(Debug)]
pub enum Command {
    /// Queue `frame` (an encoded WebSocket frame) on every local subscriber of `topic`.
    Deliver {
        /// The topic.
        topic: Arc<str>,
        /// The frame, shared by every shard and every subscriber.
        frame: Bytes,
        /// When it was published ([`crate::clock_ns`]), for the latency histogram.
        published_ns: u64,
    },
    /// Stop accepting, send Close 1001 to every client, exit when all are closed
    /// or at `deadline`, whichever comes first.
    Shutdown {
        /// When to give up on clients that have not closed.
        deadline: Instant,
    },
}

pub(crate) struct Inbox {
    queue: Mutex<VecDeque<Command>>,
    capacity: usize,
    notified: AtomicBool,
    doorbell: OwnedFd,
}

impl Inbox {
    pub fn new(capacity: usize) -> std::io::Result<Self> {
        Ok(Inbox {
            queue: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity,
            notified: AtomicBool::new(false),
            doorbell: sys::eventfd()?,
        })
    }

    pub fn doorbell(&self) -> &OwnedFd {
        &self.doorbell
    }

    /// Queues a command; hands it back if the inbox is full.
    pub fn push(&self, command: Command) -> Result<(), Command> {
        {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.len() >= self.capacity {
                return Err(command);
            }
            queue.push_back(command);
        }
        if !self.notified.swap(true, Ordering::SeqCst) {
            sys::ring_eventfd(sys::raw(&self.doorbell));
        }
        Ok(())
    }

    /// Moves every queued command into `out`. Called by the shard after its
    /// doorbell read completes.
    pub fn drain(&self, out: &mut Vec<Command>) {
        // Clear first: a command pushed after this either is drained below or
        // rings the doorbell again.
        self.notified.store(false, Ordering::SeqCst);
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(queue.drain(..));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(n: u8) -> Command {
        Command::Deliver {
            topic: Arc::from("t"),
            frame: Bytes::from(vec![n]),
            published_ns: 0,
        }
    }

    #[test]
    fn a_full_inbox_hands_the_command_back() {
        let inbox = Inbox::new(2).unwrap();
        assert!(inbox.push(deliver(1)).is_ok());
        assert!(inbox.push(deliver(2)).is_ok());
        assert!(matches!(
            inbox.push(deliver(3)),
            Err(Command::Deliver { .. })
        ));
        let mut out = Vec::new();
        inbox.drain(&mut out);
        assert_eq!(out.len(), 2);
        assert!(inbox.push(deliver(4)).is_ok());
    }

    #[test]
    fn the_doorbell_rings_once_per_batch() {
        let inbox = Inbox::new(100).unwrap();
        for i in 0..10 {
            inbox.push(deliver(i)).unwrap();
        }
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from our eventfd.
        let n = unsafe {
            libc::read(
                sys::raw(inbox.doorbell()),
                (&mut count as *mut u64).cast(),
                8,
            )
        };
        assert_eq!((n, count), (8, 1));
        let mut out = Vec::new();
        inbox.drain(&mut out);
        inbox.push(deliver(11)).unwrap();
        // SAFETY: as above.
        let n = unsafe {
            libc::read(
                sys::raw(inbox.doorbell()),
                (&mut count as *mut u64).cast(),
                8,
            )
        };
        assert_eq!((n, count), (8, 1), "rings again after a drain");
    }
}
