//! One topic's history: the last events published to it, as the very frames
//! every subscriber was sent (shared `Bytes`, never a copy), with their publish
//! time. Contiguous: it holds `first_seq ..` with no hole, so a `seq` is not
//! stored per event.
//!
//! Owns the events of one topic and what they cost; the bounds over all topics
//! (count, age, the process-wide byte budget) are the topic table's. Times are
//! whole seconds on the table's clock.

use std::collections::VecDeque;

use bytes::Bytes;

/// What one held event costs beyond its frame, measured (release build, 100,000
/// single-event topics and 99,000 more events; BENCHMARKS.md 2026-12-01): its
/// 40-byte slot here with the ring's slack (up to twice that), the frame's
/// reference count (12 bytes beside a frame of up to 508 bytes, in one
/// allocation rounded up by at most 31: `one_alloc` in the shard crate; a
/// 32-byte header of its own for a larger one), and the allocator's 8-byte
/// header and rounding. A ring at its most slack holding a frame at the end of
/// its class costs a few bytes more; the figure is the measured one.
pub const HELD_OVERHEAD_BYTES: usize = 128;

struct Held {
    frame: Bytes,
    /// Publish time, in seconds.
    at: u32,
}

/// One topic's recent events.
#[derive(Default)]
pub struct History {
    events: VecDeque<Held>,
    /// The `seq` of the first held event.
    first_seq: u64,
    /// What the events cost: frames plus `HELD_OVERHEAD_BYTES` each.
    bytes: usize,
}

impl History {
    /// What an event costs the byte budget.
    pub fn cost(frame: &Bytes) -> usize {
        frame.len() + HELD_OVERHEAD_BYTES
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// What the held events cost.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Appends the event numbered `seq`, the next after the last held.
    pub fn push(&mut self, seq: u64, frame: Bytes, at: u32) {
        if self.events.is_empty() {
            self.first_seq = seq;
            // Most topics of a topic-per-user workload hold one event: one slot,
            // not the four a first push would allocate.
            self.events.reserve_exact(1);
        } else {
            let next = self.first_seq + self.events.len() as u64;
            assert_eq!(next, seq, "history must stay contiguous");
        }
        self.bytes += History::cost(&frame);
        self.events.push_back(Held { frame, at });
    }

    /// Drops the oldest event; returns its cost.
    pub fn pop_oldest(&mut self) -> Option<usize> {
        let held = self.events.pop_front()?;
        self.first_seq += 1;
        let cost = History::cost(&held.frame);
        self.bytes -= cost;
        self.give_back();
        Some(cost)
    }

    /// Drops events published before `cutoff`; returns what they cost.
    pub fn expire(&mut self, cutoff: u32) -> usize {
        let mut freed = 0;
        while self.events.front().is_some_and(|h| h.at < cutoff) {
            freed += self.pop_oldest().expect("checked");
        }
        freed
    }

    /// Drops everything, memory included; returns what it cost.
    pub fn clear(&mut self) -> usize {
        self.events = VecDeque::new();
        std::mem::take(&mut self.bytes)
    }

    /// Returns the ring's memory as it empties: an idle topic keeps none, and
    /// no ring is more than four times what it holds.
    fn give_back(&mut self) {
        let capacity = self.events.capacity();
        if self.events.is_empty() {
            self.events = VecDeque::new();
        } else if capacity > 8 && self.events.len() < capacity / 4 {
            self.events.shrink_to(capacity / 2);
        }
    }

    /// The frames of `after + 1 ..= last`, if every one of them is held (an
    /// empty list when `after` is the last held or nothing was published since).
    /// `None` when the history does not reach back to `after + 1`.
    pub fn since(&self, after: u64, last: u64) -> Option<Vec<Bytes>> {
        if after >= last {
            return Some(Vec::new());
        }
        if self.events.is_empty() || self.first_seq > after + 1 {
            return None;
        }
        let skip = (after + 1 - self.first_seq) as usize;
        let frames: Vec<Bytes> = self
            .events
            .iter()
            .skip(skip)
            .map(|h| h.frame.clone())
            .collect();
        assert_eq!(
            frames.len() as u64,
            last - after,
            "history ends at the topic's seq"
        );
        Some(frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Bytes {
        Bytes::from(vec![n; 10])
    }

    #[test]
    fn since_returns_exactly_the_missed_frames_or_nothing() {
        let mut h = History::default();
        for seq in 5..=9 {
            h.push(seq, frame(seq as u8), 0);
        }
        let got: Vec<u8> = h.since(6, 9).unwrap().iter().map(|f| f[0]).collect();
        assert_eq!(got, vec![7, 8, 9]);
        assert_eq!(h.since(4, 9).unwrap().len(), 5, "from the first held");
        assert!(h.since(3, 9).is_none(), "seq 4 is gone");
        assert_eq!(h.since(9, 9).unwrap().len(), 0, "nothing missed");
        let shared = h.since(8, 9).unwrap();
        assert_eq!(shared[0].as_ptr(), h.events[4].frame.as_ptr(), "not a copy");
        h.pop_oldest();
        assert!(h.since(4, 9).is_none(), "seq 5 is gone now");
        assert_eq!(h.since(5, 9).unwrap().len(), 4);
    }

    #[test]
    fn expiry_costs_and_memory_given_back() {
        let mut h = History::default();
        h.push(1, frame(1), 0);
        assert_eq!(h.events.capacity(), 1, "one event, one slot");
        h.push(2, frame(2), 10);
        assert_eq!(h.expire(5), 10 + HELD_OVERHEAD_BYTES);
        assert_eq!(h.len(), 1);
        assert_eq!(h.clear(), 10 + HELD_OVERHEAD_BYTES);
        assert!(h.is_empty());
        assert_eq!(h.events.capacity(), 0, "an emptied history keeps no memory");
        assert!(h.since(0, 2).is_none(), "an empty history reaches nothing");
        // After a hole in time the numbering goes on where the topic is.
        h.push(7, frame(7), 20);
        assert_eq!(h.since(6, 7).unwrap().len(), 1);
        for seq in 8..=200 {
            h.push(seq, frame(0), 20);
        }
        while h.len() > 10 {
            h.pop_oldest();
        }
        assert!(h.events.capacity() <= 4 * 10, "{}", h.events.capacity());
    }

    #[test]
    #[should_panic(expected = "contiguous")]
    fn a_hole_is_a_bug() {
        let mut h = History::default();
        h.push(1, frame(1), 0);
        h.push(3, frame(3), 0);
    }
}
