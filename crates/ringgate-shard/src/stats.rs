//! A shard's counters and gauges, written only by the shard's thread and read by
//! the control thread.
//!
//! Each value is an atomic written with a plain load+store (one writer, so no
//! read-modify-write instruction is needed on the hot path) and read with Relaxed
//! loads: a scrape sees each value as of some recent moment.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use hdrhistogram::Histogram;

use crate::upstream::Recovery;

/// Latencies are recorded in microseconds, from 1 us to 10 minutes, to 2
/// significant digits (about 10 KiB per histogram).
pub const LATENCY_MAX_US: u64 = 600_000_000;

/// One single-writer counter or gauge.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning shard's thread may call this.
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Subtracts `n` (gauges). Only the owning shard's thread may call this.
    pub fn sub(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_sub(n),
            Ordering::Relaxed,
        );
    }

    /// Sets the value (gauges). Only the owning shard's thread may call this.
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    /// The current value, from any thread.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Everything a shard counts. Names match the metrics the control plane exports.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Connection records held now (including ones being closed).
    pub connections: Counter,
    /// Connections accepted from the listener.
    pub accepted: Counter,
    /// Connections upgraded to WebSocket.
    pub upgraded: Counter,
    /// Connections answered 503 because the shard was full.
    pub rejected_limit: Counter,
    /// Accepts the kernel failed because the fixed-file table was full.
    pub rejected_table_full: Counter,
    /// Upgrades refused with 400 (malformed or not an upgrade).
    pub rejected_bad_request: Counter,
    /// Upgrades refused with 401 (no token, or a bad one).
    pub rejected_unauthorized: Counter,
    /// Upgrades refused with 403 (`?topics=` outside the token's ACL).
    pub rejected_forbidden: Counter,
    /// Upgrades refused with 403 for their `Origin` (`--allowed-origins`).
    pub rejected_origin: Counter,
    /// Connections refused with 429: their address holds
    /// `--max-connections-per-ip` already.
    pub rejected_per_ip: Counter,
    /// Times a shard stopped accepting until its next tick (`--max-accepts-per-sec`).
    pub accepts_paused: Counter,
    /// Connections closed for sending more than `--max-messages-per-sec` (1008).
    pub rate_limited: Counter,
    /// Connections closed because their token expired (1008).
    pub tokens_expired: Counter,
    /// Client subscribes and publishes answered `forbidden` (the token's ACL,
    /// `--client-publish`).
    pub ops_forbidden: Counter,
    /// Upgrades refused with 404 (unknown path).
    pub rejected_not_found: Counter,
    /// Upgrades refused with 405 (not GET).
    pub rejected_method: Counter,
    /// Upgrades refused with 426 (WebSocket version not 13).
    pub rejected_version: Counter,
    /// Upgrades refused with 431 (request head too large).
    pub rejected_too_large: Counter,
    /// Handshakes that did not finish in time.
    pub handshake_timeouts: Counter,
    /// Connections closed after the idle timeout.
    pub idle_closed: Counter,
    /// Connections failed for a protocol violation (close 1002/1007/1009).
    pub protocol_errors: Counter,
    /// Complete data messages received.
    pub messages_received: Counter,
    /// Data frames queued for sending.
    pub messages_sent: Counter,
    /// Bytes received from clients.
    pub bytes_received: Counter,
    /// Bytes sent to clients.
    pub bytes_sent: Counter,
    /// Keepalive pings sent.
    pub pings_sent: Counter,
    /// Multishot recvs ended by an empty buffer ring (ENOBUFS).
    pub buffer_ring_exhausted: Counter,
    /// Times a connection's reads were paused by a full send queue.
    pub reads_paused: Counter,
    /// Bytes waiting in send queues now.
    pub send_queue_bytes: Counter,
    /// User-space bytes the shard's connections hold, fixed per-shard costs
    /// apart (updated every tick; see `Shard::connection_bytes`).
    pub connection_bytes: Counter,
    /// Connections with something queued to send (updated every tick).
    pub send_queue_connections: Counter,
    /// Microseconds the oldest event still queued has waited since its
    /// publish; 0 with none queued (updated every tick).
    pub send_queue_oldest_us: Counter,
    /// Published events this shard received for fanout.
    pub events_received: Counter,
    /// Subscribers closed with 1008 for not keeping up.
    pub slow_consumers: Counter,
    /// Events not queued for a subscriber that was not keeping up (`--slow-consumer=drop`).
    pub events_dropped: Counter,
    /// Topics with at least one local subscriber.
    pub topics: Counter,
    /// Subscriptions held by local connections.
    pub subscriptions: Counter,
    /// Provided buffers the kernel or the shard holds now (not in the ring).
    pub buffer_ring_in_use: Counter,
    /// The buffer ring's size (`--buffers`), set once at start.
    pub buffer_ring_size: Counter,
    /// Connections this shard may hold (its share of `--max-connections`),
    /// set once at start.
    pub connections_max: Counter,
    /// Direct descriptors (sockets) open now.
    pub direct_descriptors: Counter,
    /// Times a silent connection traded its recv for a poll (--park-after).
    pub parked: Counter,
    /// Ticks the shard's loop has handled (one per second): its liveness.
    pub loop_ticks: Counter,
    /// Loop turns that found completions in the kernel's overflow list (the CQ
    /// was full): a sizing bug, see limits.rs.
    pub cq_overflow: Counter,
    /// Sends the kernel refused (the peer's socket was full) that gave their
    /// send slot back to wait on the peer.
    pub sends_parked: Counter,
    /// Loop turns that left the inbox waiting because a subscriber was over its
    /// limit with bytes the kernel had not yet been offered.
    pub congested_turns: Counter,
    /// Loop turns that left the inbox waiting behind an earlier fanout (see
    /// `FANOUT_BACKLOG_DEFAULT`).
    pub fanout_held_turns: Counter,
    /// Events replayed to recovering clients.
    pub events_replayed: Counter,
    /// Recoveries (`sub` with `since`), by outcome: see [`Recovery`].
    pub recoveries: [Counter; RECOVERY_OUTCOMES],
    /// Recovering clients closed because their replay did not move.
    pub replays_stalled: Counter,
    /// Bytes held now for unfinished frames, messages and request heads.
    pub unfinished_bytes: Counter,
    /// Connections closed (1013) or refused (503) because the shard's budget
    /// for unfinished input was spent.
    pub unfinished_refused: Counter,
    /// Connections closed (1008) because a message was not completed in time.
    pub message_timeouts: Counter,
    /// Publish-to-send-completion latency of events, in microseconds, merged
    /// from the shard's own histogram once per tick.
    pub delivery_latency: Mutex<Option<Histogram<u64>>>,
}

/// The recovery outcomes counted (every [`Recovery`] but `NotAsked`).
pub const RECOVERY_OUTCOMES: usize = 6;

/// The outcomes in the order of [`ShardStats::recoveries`].
pub const RECOVERY_ORDER: [Recovery; RECOVERY_OUTCOMES] = [
    Recovery::Recovered,
    Recovery::TooOld,
    Recovery::EpochChanged,
    Recovery::Future,
    Recovery::HistoryOff,
    Recovery::AlreadySubscribed,
];

impl ShardStats {
    /// Counts a recovery's outcome.
    pub(crate) fn count_recovery(&self, outcome: Recovery) {
        let at = RECOVERY_ORDER
            .iter()
            .position(|&o| o == outcome)
            .expect("a counted outcome");
        self.recoveries[at].add(1);
    }

    /// Counts an upgrade refused with HTTP `status` (503s are counted apart).
    pub fn count_rejection(&self, status: u16) {
        match status {
            401 => self.rejected_unauthorized.add(1),
            403 => self.rejected_forbidden.add(1),
            404 => self.rejected_not_found.add(1),
            405 => self.rejected_method.add(1),
            426 => self.rejected_version.add(1),
            429 => self.rejected_per_ip.add(1),
            431 => self.rejected_too_large.add(1),
            503 => {}
            _ => self.rejected_bad_request.add(1),
        }
    }

    /// Upgrades refused with a 4xx, all causes.
    pub fn handshake_failed(&self) -> u64 {
        self.rejected_bad_request.get()
            + self.rejected_not_found.get()
            + self.rejected_method.get()
            + self.rejected_version.get()
            + self.rejected_too_large.get()
            + self.rejected_unauthorized.get()
            + self.rejected_forbidden.get()
            + self.rejected_origin.get()
            + self.rejected_per_ip.get()
    }

    /// A copy of the delivery latency histogram (microseconds).
    pub fn latency_snapshot(&self) -> Histogram<u64> {
        let shared = self
            .delivery_latency
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        shared.clone().unwrap_or_else(new_latency_histogram)
    }

    /// Adds `local` to the shared histogram and empties it (shard thread, once per tick).
    pub(crate) fn merge_latency(&self, local: &mut Histogram<u64>) {
        if local.is_empty() {
            return;
        }
        let mut shared = self
            .delivery_latency
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let shared = shared.get_or_insert_with(new_latency_histogram);
        // Both have the same bounds, so adding cannot fail.
        let _ = shared.add(&*local);
        local.reset();
    }
}

/// An empty latency histogram with ringgate's bounds.
pub fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 2).expect("valid bounds")
}

/// Nanoseconds since a process-wide epoch: how publishers stamp events and
/// shards measure their delivery.
pub fn clock_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
