//! A shard's counters and gauges, written only by the shard's thread and read by
//! the control thread.
//!
//! Each value is an atomic written with a plain load+store (one writer, so no
//! read-modify-write instruction is needed on the hot path) and read with Relaxed
//! loads: a scrape sees each value as of some recent moment.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Handshakes answered with an HTTP error (4xx).
    pub handshake_failed: Counter,
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
}
