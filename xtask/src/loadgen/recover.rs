//! The client side of `loadgen reconnect`: one subscriber's place in its
//! topic's numbering, and how its recovery went.
//!
//! A subscriber subscribes with `{"op":"sub"}` and keeps the `seq` and epoch of
//! the reply; from then on every event must be the next `seq`. When the storm
//! drops it, it comes back with `/ws?recover=TOPIC@SEQ@EPOCH`; a reply with
//! `"recovered":true` promises every event after SEQ, so from there every event
//! must again be the next one (a jump is a gap, a repeat a duplicate, a step
//! back a reordering), and it has recovered once it holds the reply's `seq`.
//! A reply with `"recovered":false` starts the numbering afresh from its `seq`.

use std::time::Instant;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::wire::{number_after, string_after};

/// Where a subscriber is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the first `subscribed` reply.
    Subscribing,
    /// Receiving live events.
    Live,
    /// Dropped by the storm; reconnecting.
    Down,
    /// Reconnected, waiting for the reply (since `started`).
    Asking { started: Instant },
    /// Recovered: replayed events arrive until `until` is received.
    CatchingUp { started: Instant, until: u64 },
    /// Back to live after the storm.
    Back,
}

/// What the subscribers of one worker saw of the storm.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Tally {
    pub recovered: u64,
    pub not_recovered: u64,
    /// Events received between a `recovered:true` reply and its `seq`.
    pub replayed: u64,
    /// (microseconds, count): reconnect start to holding the reply's `seq`.
    pub recover_us: Vec<(u64, u64)>,
}

/// One subscriber.
pub struct Track {
    pub phase: Phase,
    pub epoch: String,
    /// The last `seq` received (or announced by a reply).
    pub last: u64,
}

/// What a text frame was to a subscriber.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// An event in order.
    Next,
    Gap(u64),
    Duplicate,
    Reordered,
    /// A reply or an event that moved nothing.
    Other,
    /// The server said no (an error reply).
    Refused(String),
}

impl Track {
    pub fn new() -> Track {
        Track {
            phase: Phase::Subscribing,
            epoch: String::new(),
            last: 0,
        }
    }

    /// Whether this subscriber is back (or was never dropped) and live.
    pub fn settled(&self) -> bool {
        matches!(self.phase, Phase::Live | Phase::Back)
    }

    /// The path to reconnect with.
    pub fn recover_path(&self, topic: &str) -> String {
        format!("/ws?recover={topic}@{}@{}", self.last, self.epoch)
    }

    /// Takes one text frame from the server.
    pub fn on_text(
        &mut self,
        payload: &[u8],
        now: Instant,
        tally: &mut Tally,
        recover_us: &mut Histogram<u64>,
    ) -> Seen {
        if payload.starts_with(b"{\"op\":\"error\"") {
            return Seen::Refused(String::from_utf8_lossy(payload).into_owned());
        }
        if payload.starts_with(b"{\"op\":\"subscribed\"") {
            return self.on_reply(payload, now, tally, recover_us);
        }
        let Some(seq) = number_after(payload, b"\"seq\":") else {
            return Seen::Other;
        };
        let seen = match self.last {
            last if seq == last + 1 => Seen::Next,
            last if seq > last => Seen::Gap(seq - last - 1),
            last if seq == last => Seen::Duplicate,
            _ => Seen::Reordered,
        };
        self.last = self.last.max(seq);
        if let Phase::CatchingUp { started, until } = self.phase {
            tally.replayed += 1;
            if self.last >= until {
                self.back(started, now, recover_us);
            }
        }
        seen
    }

    fn on_reply(
        &mut self,
        payload: &[u8],
        now: Instant,
        tally: &mut Tally,
        recover_us: &mut Histogram<u64>,
    ) -> Seen {
        let (Some(seq), Some(epoch)) = (
            number_after(payload, b"\"seq\":"),
            string_after(payload, b"\"epoch\":"),
        ) else {
            return Seen::Refused(String::from_utf8_lossy(payload).into_owned());
        };
        let epoch = String::from_utf8_lossy(epoch).into_owned();
        match self.phase {
            Phase::Subscribing => {
                (self.last, self.epoch) = (seq, epoch);
                self.phase = Phase::Live;
            }
            Phase::Asking { started } => {
                let recovered = payload.windows(16).any(|w| w == b"\"recovered\":true");
                if recovered {
                    tally.recovered += 1;
                    assert_eq!(epoch, self.epoch, "a recovery keeps the epoch");
                    self.phase = Phase::CatchingUp {
                        started,
                        until: seq,
                    };
                    if self.last >= seq {
                        self.back(started, now, recover_us);
                    }
                } else {
                    tally.not_recovered += 1;
                    (self.last, self.epoch) = (seq, epoch);
                    self.back(started, now, recover_us);
                }
            }
            _ => {}
        }
        Seen::Other
    }

    fn back(&mut self, started: Instant, now: Instant, recover_us: &mut Histogram<u64>) {
        let us = now.duration_since(started).as_micros() as u64;
        let _ = recover_us.record(us.max(1));
        self.phase = Phase::Back;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist() -> Histogram<u64> {
        Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()
    }

    #[test]
    fn a_recovery_counts_replayed_events_and_catches_gaps() {
        let (mut tally, mut h, now) = (Tally::default(), hist(), Instant::now());
        let mut t = Track::new();
        let reply = br#"{"op":"subscribed","topic":"t0","seq":4,"epoch":"abc"}"#;
        assert_eq!(t.on_text(reply, now, &mut tally, &mut h), Seen::Other);
        let event = |seq: u64| format!(r#"{{"topic":"t0","seq":{seq},"data":1}}"#);
        assert_eq!(
            t.on_text(event(5).as_bytes(), now, &mut tally, &mut h),
            Seen::Next
        );
        assert_eq!(t.recover_path("t0"), "/ws?recover=t0@5@abc");
        t.phase = Phase::Asking { started: now };
        let reply = br#"{"op":"subscribed","topic":"t0","seq":8,"epoch":"abc","recovered":true}"#;
        t.on_text(reply, now, &mut tally, &mut h);
        assert_eq!(
            t.on_text(event(6).as_bytes(), now, &mut tally, &mut h),
            Seen::Next
        );
        assert_eq!(
            t.on_text(event(6).as_bytes(), now, &mut tally, &mut h),
            Seen::Duplicate
        );
        assert!(!t.settled());
        assert_eq!(
            t.on_text(event(8).as_bytes(), now, &mut tally, &mut h),
            Seen::Gap(1)
        );
        assert!(t.settled());
        assert_eq!((tally.recovered, tally.replayed, h.len()), (1, 3, 1));
    }

    #[test]
    fn a_refused_recovery_restarts_the_numbering() {
        let (mut tally, mut h, now) = (Tally::default(), hist(), Instant::now());
        let mut t = Track::new();
        t.on_text(
            br#"{"op":"subscribed","topic":"t","seq":0,"epoch":"a"}"#,
            now,
            &mut tally,
            &mut h,
        );
        t.phase = Phase::Asking { started: now };
        let reply = br#"{"op":"subscribed","topic":"t","seq":90,"epoch":"b","recovered":false}"#;
        t.on_text(reply, now, &mut tally, &mut h);
        assert!(t.settled());
        assert_eq!(
            (t.last, t.epoch.as_str(), tally.not_recovered),
            (90, "b", 1)
        );
        let event = br#"{"topic":"t","seq":91,"data":1}"#;
        assert_eq!(t.on_text(event, now, &mut tally, &mut h), Seen::Next);
    }
}
