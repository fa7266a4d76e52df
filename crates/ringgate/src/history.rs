//! One topic's history: the last events published to it, as the very frames
//! every subscriber was sent (shared `Bytes`, never a copy), with their `seq`
//! and publish time. Contiguous: it holds `first_seq ..= last_seq` with no hole.
//!
//! Owns the events of one topic and what they cost; the bounds over all topics
//! (count, age, the process-wide byte budget) are the topic table's.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

/// What one held event costs beyond its frame: its slot here (the frame handle,
/// `seq`, time) and the ring's slack.
pub const HELD_OVERHEAD_BYTES: usize = 64;

struct Held {
    seq: u64,
    frame: Bytes,
    at: Instant,
}

/// One topic's recent events.
#[derive(Default)]
pub struct History {
    events: VecDeque<Held>,
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
    pub fn push(&mut self, seq: u64, frame: Bytes, at: Instant) {
        if let Some(last) = self.events.back() {
            assert_eq!(last.seq + 1, seq, "history must stay contiguous");
        }
        self.bytes += History::cost(&frame);
        self.events.push_back(Held { seq, frame, at });
    }

    /// Drops the oldest event; returns its cost.
    pub fn pop_oldest(&mut self) -> Option<usize> {
        let held = self.events.pop_front()?;
        let cost = History::cost(&held.frame);
        self.bytes -= cost;
        Some(cost)
    }

    /// Drops events published before `cutoff`; returns what they cost.
    pub fn expire(&mut self, cutoff: Instant) -> usize {
        let mut freed = 0;
        while self.events.front().is_some_and(|h| h.at < cutoff) {
            freed += self.pop_oldest().expect("checked");
        }
        freed
    }

    /// Drops everything; returns what it cost.
    pub fn clear(&mut self) -> usize {
        self.events.clear();
        std::mem::take(&mut self.bytes)
    }

    /// The frames of `after + 1 ..= last`, if every one of them is held (an
    /// empty list when `after` is the last held or nothing was published since).
    /// `None` when the history does not reach back to `after + 1`.
    pub fn since(&self, after: u64, last: u64) -> Option<Vec<Bytes>> {
        if after >= last {
            return Some(Vec::new());
        }
        let first = self.events.front()?.seq;
        if first > after + 1 {
            return None;
        }
        let skip = (after + 1 - first) as usize;
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
    use std::time::Duration;

    fn frame(n: u8) -> Bytes {
        Bytes::from(vec![n; 10])
    }

    #[test]
    fn since_returns_exactly_the_missed_frames_or_nothing() {
        let t = Instant::now();
        let mut h = History::default();
        for seq in 5..=9 {
            h.push(seq, frame(seq as u8), t);
        }
        let got: Vec<u8> = h.since(6, 9).unwrap().iter().map(|f| f[0]).collect();
        assert_eq!(got, vec![7, 8, 9]);
        assert_eq!(h.since(4, 9).unwrap().len(), 5, "from the first held");
        assert!(h.since(3, 9).is_none(), "seq 4 is gone");
        assert_eq!(h.since(9, 9).unwrap().len(), 0, "nothing missed");
        let shared = h.since(8, 9).unwrap();
        assert_eq!(shared[0].as_ptr(), h.events[4].frame.as_ptr(), "not a copy");
    }

    #[test]
    fn expiry_and_costs() {
        let t = Instant::now();
        let mut h = History::default();
        h.push(1, frame(1), t);
        h.push(2, frame(2), t + Duration::from_secs(10));
        assert_eq!(
            h.expire(t + Duration::from_secs(5)),
            10 + HELD_OVERHEAD_BYTES
        );
        assert_eq!(h.len(), 1);
        assert_eq!(h.clear(), 10 + HELD_OVERHEAD_BYTES);
        assert!(h.is_empty());
        assert!(h.since(0, 2).is_none(), "an empty history reaches nothing");
    }

    #[test]
    #[should_panic(expected = "contiguous")]
    fn a_hole_is_a_bug() {
        let mut h = History::default();
        h.push(1, frame(1), Instant::now());
        h.push(3, frame(3), Instant::now());
    }
}
