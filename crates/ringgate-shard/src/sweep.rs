//! The per-second sweep's decisions: which connection is due for a keepalive
//! ping, an idle close, or a handshake or close timeout.
//!
//! Owns only the rule, as a pure function of a record and the time; the shard
//! walks its table once per tick and acts on the answers. No timer object exists
//! per connection, so timers cost no memory.

use crate::config::{ticks, ShardConfig};
use crate::conn::{flag, Conn, State};
use crate::limits::CLOSE_TIMEOUT;

/// What a connection is due for at this tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    Nothing,
    Ping,
    IdleClose,
    HandshakeTimeout,
    /// Input unfinished for longer than `--message-timeout`.
    MessageTimeout,
    /// A replay that has not moved for `REPLAY_STALL_TIMEOUT` (decided by the
    /// shard, which holds the replays).
    ReplayStalled,
    CloseTimeout,
    /// Silent long enough to trade the armed recv for a cheaper poll.
    Park,
}

/// The timeouts in whole ticks (seconds).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    handshake: u32,
    ping: u32,
    /// Pings are spread over this many ticks before `ping`, by connection key.
    ping_jitter: u32,
    idle: u32,
    close: u32,
    message: u32,
    park: Option<u32>,
}

impl Timeouts {
    pub fn new(cfg: &ShardConfig) -> Self {
        let ping = ticks(cfg.ping_interval);
        Timeouts {
            handshake: ticks(cfg.handshake_timeout),
            ping,
            ping_jitter: ping / 5,
            idle: ticks(cfg.idle_timeout),
            close: ticks(CLOSE_TIMEOUT),
            message: ticks(cfg.message_timeout),
            park: cfg.park_after.map(ticks),
        }
    }
}

pub(crate) fn due(conn: &Conn, key: usize, now: u32, t: &Timeouts) -> Due {
    let elapsed = now.saturating_sub(conn.since);
    let unfinished_for = conn.partial.as_ref().map(|p| now.saturating_sub(p.started));
    match conn.state {
        State::Open | State::Closing if unfinished_for.is_some_and(|e| e >= t.message) => {
            Due::MessageTimeout
        }
        State::Handshake if elapsed >= t.handshake => Due::HandshakeTimeout,
        State::Open if elapsed >= t.idle => Due::IdleClose,
        State::Open => {
            // Spread pings so connections accepted together are not pinged together.
            let jitter = if t.ping_jitter == 0 {
                0
            } else {
                key as u32 % (t.ping_jitter + 1)
            };
            let parkable = !conn.has(flag::PARKED) && conn.sendq.is_none();
            if !conn.has(flag::PING_SENT) && elapsed >= t.ping - jitter {
                Due::Ping
            } else if parkable && t.park.is_some_and(|park| elapsed >= park) {
                Due::Park
            } else {
                Due::Nothing
            }
        }
        State::Closing | State::Flushing | State::Draining if elapsed >= t.close => {
            Due::CloseTimeout
        }
        _ => Due::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_config;
    use std::time::Duration;

    fn timeouts(ping: u64, idle: u64) -> Timeouts {
        let mut cfg = test_config();
        cfg.ping_interval = Duration::from_secs(ping);
        cfg.idle_timeout = Duration::from_secs(idle);
        cfg.handshake_timeout = Duration::from_secs(3);
        Timeouts::new(&cfg)
    }

    #[test]
    fn open_connections_are_pinged_then_closed() {
        let t = timeouts(25, 60);
        let mut c = Conn::new(0, 0, 100);
        c.state = State::Open;
        assert_eq!(due(&c, 0, 124, &t), Due::Nothing);
        assert_eq!(due(&c, 0, 125, &t), Due::Ping);
        c.set(flag::PING_SENT);
        assert_eq!(due(&c, 0, 130, &t), Due::Nothing);
        assert_eq!(due(&c, 0, 160, &t), Due::IdleClose);
    }

    #[test]
    fn jitter_pings_early_but_never_late() {
        let t = timeouts(25, 60);
        let mut c = Conn::new(0, 0, 0);
        c.state = State::Open;
        for key in 0..100 {
            assert_eq!(due(&c, key, 25, &t), Due::Ping, "key {key}");
            let first = (0..=25)
                .find(|&now| due(&c, key, now, &t) == Due::Ping)
                .unwrap();
            assert!(first >= 20, "key {key} pinged at {first}");
        }
    }

    #[test]
    fn silent_connections_are_parked_once_when_enabled() {
        let mut cfg = test_config();
        cfg.park_after = Some(Duration::from_secs(5));
        let t = Timeouts::new(&cfg);
        let mut c = Conn::new(0, 0, 0);
        c.state = State::Open;
        assert_eq!(due(&c, 0, 4, &t), Due::Nothing);
        assert_eq!(due(&c, 0, 5, &t), Due::Park);
        c.set(flag::PARKED);
        assert_eq!(due(&c, 0, 6, &t), Due::Nothing);
        assert_eq!(
            due(&c, 0, 25, &t),
            Due::Ping,
            "parked connections are still pinged"
        );
        // Off by default.
        let t = Timeouts::new(&test_config());
        c.clear(flag::PARKED);
        assert_eq!(due(&c, 0, 10, &t), Due::Nothing);
    }

    #[test]
    fn handshake_and_close_timeouts() {
        let t = timeouts(25, 60);
        let c = Conn::new(0, 0, 10);
        assert_eq!(due(&c, 0, 12, &t), Due::Nothing);
        assert_eq!(due(&c, 0, 13, &t), Due::HandshakeTimeout);
        let mut c = Conn::new(0, 0, 10);
        c.state = State::Draining;
        assert_eq!(due(&c, 0, 14, &t), Due::Nothing);
        assert_eq!(due(&c, 0, 15, &t), Due::CloseTimeout);
        c.state = State::Finished;
        assert_eq!(due(&c, 0, 1000, &t), Due::Nothing);
    }

    #[test]
    fn unfinished_input_times_out_from_its_first_byte() {
        let mut cfg = test_config();
        cfg.message_timeout = Duration::from_secs(30);
        let t = Timeouts::new(&cfg);
        let mut c = Conn::new(0, 0, 0);
        c.state = State::Open;
        c.partial = Some(crate::conn::Partial::new(100));
        // Fragments keep the connection from idling out (they move `since`)...
        c.since = 129;
        assert_eq!(due(&c, 0, 129, &t), Due::Nothing);
        // ...but not the message's own deadline.
        assert_eq!(due(&c, 0, 130, &t), Due::MessageTimeout);
        c.partial = None;
        assert_eq!(due(&c, 0, 130, &t), Due::Nothing);
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let t = timeouts(1, 2);
        let c = Conn::new(0, 0, 50);
        assert_eq!(due(&c, 0, 40, &t), Due::Nothing);
    }
}
