//! A shard's settings and the limits that bound everything it allocates.
//!
//! Owns the numbers and how they relate (checked once, at start); not where they
//! come from (flags, files: the binary's business).

use std::net::SocketAddr;
use std::time::Duration;

use ringgate_codec::Limits;

/// Request heads larger than this are never accepted, whatever the setting.
pub const REQUEST_BYTES_CEILING: usize = 64 * 1024;
/// The kernel's limit on provided-buffer ring entries.
pub const BUFFERS_MAX: u32 = 32768;
/// Extra fixed-file slots beyond the connection limit, so a connection over the
/// limit can still be accepted and answered 503 instead of being reset.
pub const REJECT_SLOTS: u32 = 64;
/// Completions handled per loop iteration before submitting again: bounds the
/// latency one busy iteration adds to everything else on the shard.
pub const CQE_BATCH_MAX: usize = 1024;
/// Submission queue entries per ring. Handlers stage SQEs in memory and the loop
/// flushes them in batches, so a full SQ only costs an extra submit.
pub const SQ_ENTRIES: u32 = 4096;
/// Completion queue entries: multishot operations post many CQEs per SQE.
pub const CQ_ENTRIES: u32 = 4 * SQ_ENTRIES;
/// Scratch vectors (staged SQEs, the sweep's list) keep at most this many
/// entries of capacity after a burst: a fanout to 100,000 subscribers must not
/// leave 6 MB of SQE space behind for good.
pub const SCRATCH_KEEP: usize = 1024;
/// How long a connection may take to finish a close handshake and the TCP close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What to do with a subscriber whose send queue is full when an event arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Close it with 1008 "slow consumer" (its queued events are dropped).
    Close,
    /// Drop the new event for it, and count the drop.
    Drop,
}

/// Client messages that may be bad before a connection is closed with 1008; the
/// sweep forgives one per second.
pub const STRIKES_MAX: u8 = 10;

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
    /// Frame and message size limits.
    pub limits: Limits,
    /// The largest request head accepted (431 past it).
    pub request_bytes_max: usize,
    /// Bytes queued for sending to one connection before its reads pause.
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
    /// What happens to subscribers that do not keep up.
    pub slow_consumer: SlowConsumer,
    /// Topics clients may publish to (`*`, `prefix*` or one name); `None`: none.
    pub client_publish: Option<String>,
    /// Pin the shard thread to this CPU.
    pub cpu: Option<usize>,
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
        if self.connections_max == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        let limits = &self.limits;
        if limits.frame_bytes_max == 0 || limits.message_bytes_max < limits.frame_bytes_max {
            return Err(format!(
                "--max-message-size ({}) must be at least --max-frame-size ({}), and both above 0",
                limits.message_bytes_max, limits.frame_bytes_max
            ));
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

#[cfg(test)]
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
        request_bytes_max: 8192,
        send_queue_bytes_max: 256 * 1024,
        handshake_timeout: Duration::from_secs(10),
        ping_interval: Duration::from_secs(25),
        idle_timeout: Duration::from_secs(60),
        tcp_keepalive: None,
        echo: true,
        park_after: None,
        subscriptions_max: 64,
        slow_consumer: SlowConsumer::Close,
        client_publish: None,
        cpu: None,
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
        let mut bad = c;
        bad.limits.message_bytes_max = 10;
        assert!(bad.validate().unwrap_err().contains("--max-message-size"));
    }

    #[test]
    fn ticks_round_up() {
        assert_eq!(ticks(Duration::from_millis(1)), 1);
        assert_eq!(ticks(Duration::from_millis(1000)), 1);
        assert_eq!(ticks(Duration::from_millis(1001)), 2);
        assert_eq!(ticks(Duration::from_secs(25)), 25);
    }
}
