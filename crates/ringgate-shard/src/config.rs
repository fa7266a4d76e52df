//! A shard's settings and the limits that bound everything it allocates.
//!
//! Owns the numbers and how they relate (checked once, at start); not where they
//! come from (flags, files: the binary's business).

use std::net::SocketAddr;
use std::time::Duration;

use ringgate_codec::Limits;

use crate::limits::{
    BUFFERS_MAX, FIXED_FILES_MAX, INBOX_CAPACITY_MAX, OP_BYTES_MAX, REJECT_SLOTS,
    REQUEST_BYTES_CEILING, SENDS_INFLIGHT_MAX, SEND_QUEUE_LIMIT_MAX, SEND_QUEUE_LIMIT_MIN,
};
#[cfg(any(test, fuzzing))]
use crate::limits::{FANOUT_BACKLOG_DEFAULT, INBOX_CAPACITY, SEND_SLOTS_DEFAULT};

/// What to do with a subscriber whose send queue is full when an event arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Close it with 1008 "slow consumer" (its queued events are dropped).
    Close,
    /// Drop the new event for it, and count the drop.
    Drop,
}

/// Everything one shard needs to run.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// The address every shard listens on (SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Connections this shard holds at most; more are answered 503.
    pub connections_max: u32,
    /// Entries in the provided-buffer ring (a power of two).
    pub buffers: u32,
    /// Bytes per provided buffer.
    pub buffer_bytes: u32,
    /// Frame and message size limits of `/echo` (and the largest event).
    pub limits: Limits,
    /// The largest client message on `/ws` (a JSON op), over all its fragments;
    /// also its largest frame.
    pub op_bytes_max: u64,
    /// Bytes this shard holds at most for unfinished frames, messages and
    /// request heads, over all its connections; input that would pass it
    /// closes its connection (1013, or 503 during the upgrade).
    pub unfinished_bytes_max: usize,
    /// An unfinished frame or message (or request head) must be complete within
    /// this long of its first byte; further fragments do not extend it.
    pub message_timeout: Duration,
    /// The largest request head accepted (431 past it).
    pub request_bytes_max: usize,
    /// What one connection may have queued for sending, each frame counted as its
    /// length plus [`crate::limits::FRAME_OVERHEAD_BYTES`]. Past it a subscriber
    /// the kernel refused is a slow consumer, and `/echo` reads pause.
    pub send_queue_bytes_max: usize,
    /// Close connections that have not finished the upgrade after this long.
    pub handshake_timeout: Duration,
    /// Ping connections silent this long.
    pub ping_interval: Duration,
    /// Close connections silent this long.
    pub idle_timeout: Duration,
    /// Kernel TCP keepalive: probe peers silent this long, drop those that
    /// acknowledge nothing for twice as long; `None`: off.
    pub tcp_keepalive: Option<Duration>,
    /// Serve `GET /echo`.
    pub echo: bool,
    /// After this long without input, arm a one-shot poll instead of a
    /// multishot recv (less kernel memory per idle connection); `None`: never.
    pub park_after: Option<Duration>,
    /// Topics one connection may subscribe to.
    pub subscriptions_max: usize,
    /// Events the shard's inbox holds; a publish that finds it full is refused.
    pub inbox_capacity: usize,
    /// Send slots: sends offered to the kernel and not yet refused (see
    /// `SEND_SLOTS_DEFAULT`), at most `SENDS_INFLIGHT_MAX`.
    pub send_slots: usize,
    /// Events queued on subscribers while an earlier fanout waits for send
    /// slots, past which new events wait in the inbox (`FANOUT_BACKLOG_DEFAULT`).
    pub fanout_backlog: usize,
    /// What happens to subscribers that do not keep up.
    pub slow_consumer: SlowConsumer,
    /// Topics clients may publish to (`*`, `prefix*` or one name); `None`: none.
    pub client_publish: Option<String>,
    /// Pin the shard thread to this CPU.
    pub cpu: Option<usize>,
    /// Tick with a re-armed one-shot timeout even where the kernel has multishot
    /// timeouts (Linux 6.4): the fallback older kernels use, forced for tests.
    pub oneshot_tick: bool,
    /// Keep emptied send queues for reuse (see `sendq::SendPool`); off only to
    /// measure what recycling saves.
    pub recycle_send_queues: bool,
    /// Announce a topic to the broker when its first local subscriber arrives,
    /// however it subscribed (not only once it matters, see `topics.rs`): a
    /// fleet member's broker subscribes to the topic on the bus then.
    pub announce_first_in: bool,
    /// `--auth-*`: tokens required at the upgrade, and their topic ACLs.
    pub auth: Option<std::sync::Arc<crate::auth::Verifier>>,
    /// `--allowed-origins`: browser origins let in (all when `None`).
    pub origins: Option<std::sync::Arc<crate::auth::Origins>>,
    /// `--max-messages-per-sec`: messages a `/ws` client may send a second,
    /// with bursts of as many (0: no limit).
    pub messages_per_sec_max: u32,
    /// `--max-accepts-per-sec`, this shard's share: connections it accepts a
    /// second before it stops accepting until the next tick (0: no limit).
    pub accepts_per_sec_max: u32,
    /// `--max-connections-per-ip`: the process-wide counts (no limit when `None`).
    pub peers: Option<std::sync::Arc<crate::peers::PeerCounts>>,
}

impl ShardConfig {
    /// Checks the settings against each other and the kernel's limits.
    pub fn validate(&self) -> Result<(), String> {
        if !self.buffers.is_power_of_two() || self.buffers > BUFFERS_MAX {
            return Err(format!(
                "--buffers must be a power of two from 1 to {BUFFERS_MAX}, not {}",
                self.buffers
            ));
        }
        if self.buffer_bytes < 64 || self.buffer_bytes > 16 << 20 {
            return Err(format!(
                "--buffer-size must be from 64 bytes to 16 MiB, not {}",
                self.buffer_bytes
            ));
        }
        if self.subscriptions_max == 0 || self.subscriptions_max > u16::MAX as usize {
            return Err(format!(
                "--max-subscriptions must be from 1 to {}",
                u16::MAX
            ));
        }
        if !(1..=INBOX_CAPACITY_MAX).contains(&self.inbox_capacity) {
            return Err(format!(
                "--inbox-capacity must be from 1 to {INBOX_CAPACITY_MAX}, not {}",
                self.inbox_capacity
            ));
        }
        if !(1..=SENDS_INFLIGHT_MAX).contains(&self.send_slots) {
            return Err(format!(
                "--send-slots must be from 1 to {SENDS_INFLIGHT_MAX}, not {}",
                self.send_slots
            ));
        }
        if self.connections_max == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if self.fixed_files() > FIXED_FILES_MAX {
            return Err(format!(
                "a shard holds at most {} connections (the kernel's registered-file table is {FIXED_FILES_MAX} slots, {REJECT_SLOTS} kept for refusals), not {}: use more --shards",
                FIXED_FILES_MAX - REJECT_SLOTS,
                self.connections_max
            ));
        }
        if let Some(pattern) = &self.client_publish {
            if !crate::pubsub::valid_publish_pattern(pattern) {
                return Err(format!(
                    "--client-publish {pattern:?} is not a pattern: use *, a topic name, or a topic prefix ending in * (such as chat.*)"
                ));
            }
        }
        let limits = &self.limits;
        if limits.frame_bytes_max == 0 || limits.message_bytes_max < limits.frame_bytes_max {
            return Err(format!(
                "--max-message-size ({}) must be at least --max-frame-size ({}), and both above 0",
                limits.message_bytes_max, limits.frame_bytes_max
            ));
        }
        if limits.message_bytes_max > SEND_QUEUE_LIMIT_MAX as u64 {
            return Err(format!(
                "--max-message-size must be at most {SEND_QUEUE_LIMIT_MAX} bytes"
            ));
        }
        if !(SEND_QUEUE_LIMIT_MIN..=SEND_QUEUE_LIMIT_MAX).contains(&self.send_queue_bytes_max) {
            return Err(format!(
                "--send-queue-limit must be from {} KiB to {} MiB, not {} bytes",
                SEND_QUEUE_LIMIT_MIN >> 10,
                SEND_QUEUE_LIMIT_MAX >> 20,
                self.send_queue_bytes_max
            ));
        }
        if !(125..=OP_BYTES_MAX).contains(&self.op_bytes_max) {
            return Err(format!(
                "--max-op-size must be from 125 bytes to {} KiB, not {}",
                OP_BYTES_MAX >> 10,
                self.op_bytes_max
            ));
        }
        // One connection assembling the largest message while the next frame's
        // tail arrives must fit, or a legitimate client could never send it.
        let one_connection = limits.message_bytes_max
            + limits.frame_bytes_max
            + ringgate_codec::HEADER_BYTES_MAX as u64;
        let one_connection = one_connection.max(self.request_bytes_max as u64);
        if (self.unfinished_bytes_max as u64) < one_connection {
            return Err(format!(
                "--max-unfinished-bytes ({}) must hold one connection's largest message and frame ({one_connection} bytes: --max-message-size + --max-frame-size)",
                self.unfinished_bytes_max
            ));
        }
        if self.message_timeout < Duration::from_secs(1) {
            return Err("--message-timeout must be at least 1s".into());
        }
        if self.request_bytes_max < 256 || self.request_bytes_max > REQUEST_BYTES_CEILING {
            return Err(format!(
                "the request size limit must be from 256 bytes to {REQUEST_BYTES_CEILING}"
            ));
        }
        if let Some(k) = self.tcp_keepalive {
            // TCP_KEEPIDLE takes whole seconds up to 32767.
            if k < Duration::from_secs(1) || k > Duration::from_secs(32767) {
                return Err(format!(
                    "--tcp-keepalive must be from 1s to 32767s (or 0 for off), not {k:?}"
                ));
            }
        }
        if self.idle_timeout < self.ping_interval {
            return Err(format!(
                "--idle-timeout ({:?}) must not be shorter than --ping-interval ({:?})",
                self.idle_timeout, self.ping_interval
            ));
        }
        Ok(())
    }

    /// What a `/ws` connection's send queue never passes, whatever the kernel
    /// does: twice `--send-queue-limit` (a subscriber over the limit with bytes
    /// not yet offered to the kernel gets a turn's events more) plus one largest
    /// event (data of at most `--max-message-size` in its envelope), which
    /// always fits an empty queue. This is the memory bound per connection,
    /// frames counted with their slot overhead.
    pub fn send_queue_hard_max(&self) -> usize {
        2 * self.send_queue_bytes_max
            + self.limits.message_bytes_max as usize
            + crate::pubsub::EVENT_ENVELOPE_BYTES_MAX
            + ringgate_codec::SERVER_HEADER_BYTES_MAX
            + crate::limits::FRAME_OVERHEAD_BYTES
    }

    /// Slots in the fixed-file table: the connection limit plus the reject slots.
    pub fn fixed_files(&self) -> u32 {
        self.connections_max.saturating_add(REJECT_SLOTS)
    }
}

/// A duration as whole sweep ticks (one per second), rounded up, at least one.
pub(crate) fn ticks(d: Duration) -> u32 {
    let ms = d.as_millis().max(1);
    u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX)
}

/// Settings for tests and fuzzing: small, every check on.
#[cfg(any(test, fuzzing))]
pub(crate) fn test_config() -> ShardConfig {
    ShardConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        connections_max: 100,
        buffers: 16,
        buffer_bytes: 4096,
        limits: Limits {
            frame_bytes_max: 64 * 1024,
            message_bytes_max: 1 << 20,
        },
        op_bytes_max: 16 * 1024,
        unfinished_bytes_max: 8 << 20,
        message_timeout: Duration::from_secs(30),
        request_bytes_max: 8192,
        send_queue_bytes_max: 256 * 1024,
        handshake_timeout: Duration::from_secs(10),
        ping_interval: Duration::from_secs(25),
        idle_timeout: Duration::from_secs(60),
        tcp_keepalive: None,
        echo: true,
        park_after: None,
        subscriptions_max: 64,
        inbox_capacity: INBOX_CAPACITY,
        send_slots: SEND_SLOTS_DEFAULT,
        fanout_backlog: FANOUT_BACKLOG_DEFAULT,
        slow_consumer: SlowConsumer::Close,
        client_publish: None,
        cpu: None,
        oneshot_tick: false,
        recycle_send_queues: true,
        announce_first_in: false,
        auth: None,
        origins: None,
        messages_per_sec_max: 0,
        accepts_per_sec_max: 0,
        peers: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_relations_are_named() {
        let c = test_config();
        assert!(c.validate().is_ok());
        let mut bad = c.clone();
        bad.buffers = 12;
        assert!(bad.validate().unwrap_err().contains("--buffers"));
        let mut bad = c.clone();
        bad.idle_timeout = Duration::from_secs(1);
        assert!(bad.validate().unwrap_err().contains("--idle-timeout"));
        let mut bad = c.clone();
        bad.tcp_keepalive = Some(Duration::from_millis(500));
        assert!(bad.validate().unwrap_err().contains("--tcp-keepalive"));
        let mut bad = c.clone();
        bad.limits.message_bytes_max = 10;
        assert!(bad.validate().unwrap_err().contains("--max-message-size"));
        // The kernel's table bound, whatever RLIMIT_NOFILE allows.
        let mut bad = c.clone();
        bad.connections_max = FIXED_FILES_MAX - REJECT_SLOTS + 1;
        assert!(bad.validate().unwrap_err().contains("--shards"));
        let mut most = c;
        most.connections_max = FIXED_FILES_MAX - REJECT_SLOTS;
        assert!(most.validate().is_ok());
    }

    #[test]
    fn ticks_round_up() {
        assert_eq!(ticks(Duration::from_millis(1)), 1);
        assert_eq!(ticks(Duration::from_millis(1000)), 1);
        assert_eq!(ticks(Duration::from_millis(1001)), 2);
        assert_eq!(ticks(Duration::from_secs(25)), 25);
    }
}
