//! `GET /metrics`: every shard counter and gauge in the Prometheus text
//! exposition format (version 0.0.4), plus process figures and the delivery
//! latency histogram merged over shards.
//!
//! Written by hand: the format is small and fully specified, the scrape path is
//! not hot, and the end-to-end tests parse the output with a real parser. Each
//! metric has one `# HELP` and one `# TYPE` line, then its samples.

use std::fmt::Write as _;

use ringgate_shard::{new_latency_histogram, Counter, ShardStats, RECOVERY_ORDER};

use crate::bus::Bus;
use crate::control::Control;
use crate::fleet::Fleet;

/// Counters and gauges kept per shard, exported with a `shard` label.
/// (name, type, help, accessor)
type Field = fn(&ShardStats) -> &Counter;
const PER_SHARD: &[(&str, &str, &str, Field)] = &[
    (
        "ringgate_connections",
        "gauge",
        "Connections held now (including ones closing).",
        |s| &s.connections,
    ),
    (
        "ringgate_connections_max",
        "gauge",
        "Connections the shard may hold (its share of --max-connections); past it new ones get 503.",
        |s| &s.connections_max,
    ),
    (
        "ringgate_direct_descriptors",
        "gauge",
        "Sockets open now as io_uring direct descriptors.",
        |s| &s.direct_descriptors,
    ),
    (
        "ringgate_connections_accepted_total",
        "counter",
        "Connections accepted.",
        |s| &s.accepted,
    ),
    (
        "ringgate_connections_upgraded_total",
        "counter",
        "Connections upgraded to WebSocket.",
        |s| &s.upgraded,
    ),
    (
        "ringgate_messages_received_total",
        "counter",
        "Complete data messages received from clients.",
        |s| &s.messages_received,
    ),
    (
        "ringgate_messages_sent_total",
        "counter",
        "Data frames queued to clients (events and echoes).",
        |s| &s.messages_sent,
    ),
    (
        "ringgate_bytes_received_total",
        "counter",
        "Bytes received from clients.",
        |s| &s.bytes_received,
    ),
    (
        "ringgate_bytes_sent_total",
        "counter",
        "Bytes sent to clients.",
        |s| &s.bytes_sent,
    ),
    (
        "ringgate_events_received_total",
        "counter",
        "Published events handed to this shard for fanout.",
        |s| &s.events_received,
    ),
    (
        "ringgate_accepts_paused_total",
        "counter",
        "Times a shard stopped accepting until its next tick, at its share of --max-accepts-per-sec.",
        |s| &s.accepts_paused,
    ),
    (
        "ringgate_rate_limited_total",
        "counter",
        "Connections closed with 1008 for sending more than --max-messages-per-sec.",
        |s| &s.rate_limited,
    ),
    (
        "ringgate_ops_forbidden_total",
        "counter",
        "Client subscribes and publishes refused (forbidden) by the token's ACL or --client-publish.",
        |s| &s.ops_forbidden,
    ),
    (
        "ringgate_tokens_expired_total",
        "counter",
        "Connections closed with 1008 because their token expired (--auth-*).",
        |s| &s.tokens_expired,
    ),
    (
        "ringgate_slow_consumer_total",
        "counter",
        "Subscribers closed with 1008 for not keeping up.",
        |s| &s.slow_consumers,
    ),
    (
        "ringgate_events_dropped_total",
        "counter",
        "Events skipped for a subscriber not keeping up (--slow-consumer drop).",
        |s| &s.events_dropped,
    ),
    (
        "ringgate_protocol_errors_total",
        "counter",
        "Connections failed for a protocol violation or abuse.",
        |s| &s.protocol_errors,
    ),
    (
        "ringgate_idle_closed_total",
        "counter",
        "Connections closed after the idle timeout.",
        |s| &s.idle_closed,
    ),
    (
        "ringgate_pings_sent_total",
        "counter",
        "Keepalive pings sent.",
        |s| &s.pings_sent,
    ),
    (
        "ringgate_parked_total",
        "counter",
        "Times a silent connection traded its recv for a poll (--park-after).",
        |s| &s.parked,
    ),
    (
        "ringgate_reads_paused_total",
        "counter",
        "Times a connection's reads paused on a full send queue.",
        |s| &s.reads_paused,
    ),
    (
        "ringgate_buffer_ring_size",
        "gauge",
        "Receive buffers in the shard's provided-buffer ring (--buffers).",
        |s| &s.buffer_ring_size,
    ),
    (
        "ringgate_buffer_ring_in_use",
        "gauge",
        "Provided receive buffers out of the ring now.",
        |s| &s.buffer_ring_in_use,
    ),
    (
        "ringgate_buffer_ring_exhausted_total",
        "counter",
        "Receives ended by an empty buffer ring (ENOBUFS), re-armed later.",
        |s| &s.buffer_ring_exhausted,
    ),
    (
        "ringgate_send_queue_bytes",
        "gauge",
        "Bytes waiting in send queues (updated every second).",
        |s| &s.send_queue_bytes,
    ),
    (
        "ringgate_connection_bytes",
        "gauge",
        "User-space bytes the shard's connections hold (the table, each record's heap, the topic index, token, address and rate tables), fixed per-shard costs apart (updated every second).",
        |s| &s.connection_bytes,
    ),
    (
        "ringgate_send_queue_connections",
        "gauge",
        "Connections with bytes waiting in their send queue (updated every second).",
        |s| &s.send_queue_connections,
    ),
    (
        "ringgate_loop_ticks_total",
        "counter",
        "Ticks the shard's loop has handled (one a second): its liveness.",
        |s| &s.loop_ticks,
    ),
    (
        "ringgate_cq_overflow_total",
        "counter",
        "Loop turns that found completions in the kernel's overflow list (the completion queue was full).",
        |s| &s.cq_overflow,
    ),
    (
        "ringgate_sends_parked_total",
        "counter",
        "Sends refused by a full peer socket that gave their send slot back to wait on the peer.",
        |s| &s.sends_parked,
    ),
    (
        "ringgate_congested_turns_total",
        "counter",
        "Loop turns that left events in the inbox while a subscriber over its limit had bytes not yet offered to the kernel.",
        |s| &s.congested_turns,
    ),
    (
        "ringgate_fanout_held_turns_total",
        "counter",
        "Loop turns that left events in the inbox while an earlier fanout waited for send slots with its backlog full.",
        |s| &s.fanout_held_turns,
    ),
    (
        "ringgate_unfinished_bytes",
        "gauge",
        "Bytes held for unfinished frames, messages and request heads (updated every second).",
        |s| &s.unfinished_bytes,
    ),
    (
        "ringgate_unfinished_refused_total",
        "counter",
        "Connections closed (1013) or refused (503) because the shard's budget for unfinished input was spent.",
        |s| &s.unfinished_refused,
    ),
    (
        "ringgate_message_timeouts_total",
        "counter",
        "Connections closed (1008) because a message was not completed within --message-timeout.",
        |s| &s.message_timeouts,
    ),
    (
        "ringgate_events_replayed_total",
        "counter",
        "Events replayed from history to recovering clients.",
        |s| &s.events_replayed,
    ),
    (
        "ringgate_replays_stalled_total",
        "counter",
        "Recovering clients closed (1008) because their replay did not move for 30 s.",
        |s| &s.replays_stalled,
    ),
    (
        "ringgate_topics",
        "gauge",
        "Topics with at least one local subscriber.",
        |s| &s.topics,
    ),
    (
        "ringgate_subscriptions",
        "gauge",
        "Subscriptions held by local connections.",
        |s| &s.subscriptions,
    ),
];

/// `ringgate_connections_rejected_total{reason}`: why connections were refused.
const REJECTED: &[(&str, Field)] = &[
    ("limit", |s| &s.rejected_limit),
    ("table_full", |s| &s.rejected_table_full),
    ("bad_request", |s| &s.rejected_bad_request),
    ("unauthorized", |s| &s.rejected_unauthorized),
    ("forbidden", |s| &s.rejected_forbidden),
    ("origin", |s| &s.rejected_origin),
    ("per_ip", |s| &s.rejected_per_ip),
    ("not_found", |s| &s.rejected_not_found),
    ("method_not_allowed", |s| &s.rejected_method),
    ("unsupported_version", |s| &s.rejected_version),
    ("request_too_large", |s| &s.rejected_too_large),
    ("handshake_timeout", |s| &s.handshake_timeouts),
];

/// Latency bucket bounds, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Every counter of a shard under its `/stats` name (the metric name without
/// `ringgate_`; refusals as `connections_rejected_{reason}_total`).
pub fn shard_counters(s: &ShardStats) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = PER_SHARD
        .iter()
        .map(|(name, _, _, field)| {
            (
                name.trim_start_matches("ringgate_").to_string(),
                field(s).get(),
            )
        })
        .collect();
    for (reason, field) in REJECTED {
        out.push((
            format!("connections_rejected_{reason}_total"),
            field(s).get(),
        ));
    }
    out.push(("handshake_failed_total".into(), s.handshake_failed()));
    for (outcome, counter) in RECOVERY_ORDER.iter().zip(&s.recoveries) {
        out.push((
            format!("recoveries_{}_total", outcome.label()),
            counter.get(),
        ));
    }
    out.push((OLDEST_QUEUED.into(), s.send_queue_oldest_us.get()));
    out
}

/// The `/stats` name of the oldest queued event's age: its total over the
/// shards is their largest, not their sum.
pub const OLDEST_QUEUED: &str = "send_queue_oldest_microseconds";

/// The broker's figures: (name, type, help, value).
pub fn broker_figures(control: &Control) -> Vec<(&'static str, &'static str, &'static str, u64)> {
    let broker = match &*control.bus {
        Bus::Embedded(broker) => broker,
        Bus::Fleet(fleet) => return fleet_figures(fleet),
    };
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let f = broker.figures();
    vec![
        (
            "ringgate_broker_up",
            "gauge",
            "1 while events can flow: always for the embedded broker; while the link to Redis is up and Redis takes writes for a fleet member.",
            1,
        ),
        (
            "ringgate_publish_total",
            "counter",
            "Events published: numbered, and handed to every shard that may hold subscribers.",
            broker.published.load(relaxed),
        ),
        (
            "ringgate_publish_rejected_total",
            "counter",
            "Publishes refused and delivered to nobody (full inbox, bad topic, draining, too many topics).",
            broker.rejected.load(relaxed),
        ),
        (
            "ringgate_publish_waits_total",
            "counter",
            "Control-plane publish requests that found a shard inbox full and waited for room (--publish-wait).",
            broker.waited.load(relaxed),
        ),
        (
            "ringgate_broker_topics",
            "gauge",
            "Topics known: each has a seq, an epoch and maybe history.",
            f.topics as u64,
        ),
        (
            "ringgate_broker_topics_forgotten_total",
            "counter",
            "Topics forgotten after --topic-idle-ttl without publish or subscriber (or to make room); one that comes back has a new epoch.",
            f.topics_forgotten,
        ),
        (
            "ringgate_history_events",
            "gauge",
            "Events held in topic histories for recovery.",
            f.history_events as u64,
        ),
        (
            "ringgate_history_bytes",
            "gauge",
            "Bytes held in topic histories (frames and bookkeeping), bounded by --history-memory.",
            f.history_bytes as u64,
        ),
        (
            "ringgate_history_evicted_total",
            "counter",
            "Events dropped from histories to stay within --history-memory.",
            f.history_evicted,
        ),
    ]
}

/// A fleet member's broker figures: (name, type, help, value).
fn fleet_figures(fleet: &Fleet) -> Vec<(&'static str, &'static str, &'static str, u64)> {
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let f = &fleet.figures;
    let gaps = *f.gaps.lock().unwrap_or_else(|p| p.into_inner());
    vec![
        (
            "ringgate_broker_up",
            "gauge",
            "1 while events can flow: always for the embedded broker; while the link to Redis is up and Redis takes writes for a fleet member.",
            u64::from(f.up.load(relaxed) && f.writable.load(relaxed)),
        ),
        (
            "ringgate_publish_total",
            "counter",
            "Events published through Redis (numbered, kept and sent to every host that follows the topic).",
            f.published.load(relaxed),
        ),
        (
            "ringgate_publish_rejected_total",
            "counter",
            "Publishes refused (bad topic, draining, Redis unreachable or failing).",
            f.rejected.load(relaxed),
        ),
        (
            "ringgate_broker_messages_received_total",
            "counter",
            "Event messages received from Redis pub/sub.",
            f.messages_in.load(relaxed),
        ),
        (
            "ringgate_broker_reconnects_total",
            "counter",
            "Times the link to Redis was made again after a loss.",
            f.reconnects.load(relaxed).saturating_sub(1),
        ),
        (
            "ringgate_broker_subscriptions",
            "gauge",
            "Topics this host follows: one Redis channel subscribed each.",
            f.subscriptions.load(relaxed),
        ),
        (
            "ringgate_broker_topics_live",
            "gauge",
            "Of the topics followed, those subscribed and in step with Redis (the rest are being subscribed or synced).",
            f.topics_live.load(relaxed),
        ),
        (
            "ringgate_broker_gaps_detected_total",
            "counter",
            "Times a topic was found behind Redis (missed messages, an inbox full, a lost link) or renumbered.",
            gaps.detected,
        ),
        (
            "ringgate_broker_gaps_repaired_total",
            "counter",
            "Gaps closed by delivering the missed events from Redis' history.",
            gaps.repaired,
        ),
        (
            "ringgate_broker_gaps_notified_total",
            "counter",
            "Gaps the history could not close: the topic's subscribers got a gap notice.",
            gaps.notified,
        ),
        (
            "ringgate_broker_events_repaired_total",
            "counter",
            "Events delivered from Redis' history to close gaps.",
            gaps.replayed,
        ),
    ]
}

/// `ringgate_broker_publish_seconds`: a fleet member's publish round trips.
fn publish_latency(out: &mut String, control: &Control) {
    let Bus::Fleet(fleet) = &*control.bus else {
        return;
    };
    let name = "ringgate_broker_publish_seconds";
    header(
        out,
        name,
        "histogram",
        "Time a publish through Redis took, from the script sent to its answer.",
    );
    let h = fleet
        .figures
        .publish_latency
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_else(new_latency_histogram);
    histogram_lines(out, name, "", &h);
}

/// The whole exposition.
pub fn render(control: &Control) -> String {
    let mut out = String::with_capacity(8 * 1024);
    for (name, kind, help, field) in PER_SHARD {
        header(&mut out, name, kind, help);
        for (id, shard) in control.shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{id}\"}} {}", field(shard).get());
        }
    }
    let name = "ringgate_send_queue_oldest_seconds";
    header(
        &mut out,
        name,
        "gauge",
        "How long the oldest event still queued for a client has waited since its publish (0 with none; updated every second): a backlog's age.",
    );
    for (id, shard) in control.shards.iter().enumerate() {
        let seconds = shard.send_queue_oldest_us.get() as f64 / 1e6;
        let _ = writeln!(out, "{name}{{shard=\"{id}\"}} {seconds}");
    }
    header(
        &mut out,
        "ringgate_connections_rejected_total",
        "counter",
        "Connections refused, by reason.",
    );
    for (reason, field) in REJECTED {
        for (id, shard) in control.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringgate_connections_rejected_total{{shard=\"{id}\",reason=\"{reason}\"}} {}",
                field(shard).get()
            );
        }
    }
    header(
        &mut out,
        "ringgate_recoveries_total",
        "counter",
        "Subscribes that asked to recover (since/epoch), by outcome.",
    );
    for (at, outcome) in RECOVERY_ORDER.iter().enumerate() {
        let label = outcome.label();
        for (id, shard) in control.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringgate_recoveries_total{{shard=\"{id}\",outcome=\"{label}\"}} {}",
                shard.recoveries[at].get()
            );
        }
    }
    for (name, kind, help, value) in broker_figures(control) {
        single(&mut out, name, kind, help, value);
    }
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    single(
        &mut out,
        "ringgate_control_connections",
        "gauge",
        "Connections open to the control plane.",
        control.connections.load(relaxed),
    );
    single(
        &mut out,
        "ringgate_control_refused_total",
        "counter",
        "Control-plane connections refused (503) at the connection cap.",
        control.refused.load(relaxed),
    );
    single(
        &mut out,
        "ringgate_control_unauthorized_total",
        "counter",
        "Publishes refused (401) without the --control-token.",
        control.unauthorized.load(relaxed),
    );
    latency(&mut out, control);
    publish_latency(&mut out, control);
    let rss = rss_bytes().unwrap_or(0);
    single(
        &mut out,
        "ringgate_process_resident_memory_bytes",
        "gauge",
        "Resident set size of the process.",
        rss,
    );
    let m = memory_per_connection(control, rss);
    header(
        &mut out,
        "ringgate_memory_bytes_per_connection",
        "gauge",
        "Memory per connection (0 with none). user: user-space bytes the shards' connections hold (the table, each record's heap, the topic index, token, address and rate tables), fixed per-shard costs apart; rss_growth: RSS growth since start / connections, fixed costs included; kernel_host: the host's slab and TCP buffer memory growth since start / connections, measured here (meaningful when ringgate is the host's main tenant; loopback clients count too).",
    );
    for (kind, value) in [
        ("user", m.user),
        ("rss_growth", m.rss_growth),
        ("kernel_host", m.kernel_host),
    ] {
        let _ = writeln!(
            out,
            "ringgate_memory_bytes_per_connection{{kind=\"{kind}\"}} {value:.1}"
        );
    }
    let uptime = format!("{:.3}", control.started.elapsed().as_secs_f64());
    single(
        &mut out,
        "ringgate_uptime_seconds",
        "gauge",
        "Seconds since start.",
        uptime,
    );
    header(
        &mut out,
        "ringgate_build_info",
        "gauge",
        "The version and source revision this binary was built from.",
    );
    let _ = writeln!(
        out,
        "ringgate_build_info{{version=\"{}\",revision=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        env!("BUILD_INFO_REVISION")
    );
    for (name, kind, help, value) in crate::process_metrics::figures() {
        single(&mut out, name, kind, help, value);
    }
    out
}

/// A metric with one unlabelled sample.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `ringgate_delivery_latency_seconds{shard}`: publish to send completion.
fn latency(out: &mut String, control: &Control) {
    let name = "ringgate_delivery_latency_seconds";
    header(
        out,
        name,
        "histogram",
        "Time from publish to the send completion of an event (the kernel took it), per subscriber.",
    );
    for (id, shard) in control.shards.iter().enumerate() {
        let mut h = new_latency_histogram();
        let _ = h.add(shard.latency_snapshot());
        histogram_lines(out, name, &format!("shard=\"{id}\","), &h);
    }
}

/// A delivery latency p50 and p99 in seconds; None before any delivery.
pub type Quantiles = (Option<f64>, Option<f64>);

/// Delivery latency quantiles per shard, and of all shards merged.
pub fn latency_percentiles(control: &Control) -> (Vec<Quantiles>, Quantiles) {
    let of = |h: &hdrhistogram::Histogram<u64>| {
        if h.is_empty() {
            (None, None)
        } else {
            (
                Some(h.value_at_quantile(0.5) as f64 / 1e6),
                Some(h.value_at_quantile(0.99) as f64 / 1e6),
            )
        }
    };
    let mut all = new_latency_histogram();
    let per_shard = control
        .shards
        .iter()
        .map(|shard| {
            let h = shard.latency_snapshot();
            let _ = all.add(&h);
            of(&h)
        })
        .collect();
    (per_shard, of(&all))
}

/// A histogram of microseconds as Prometheus lines in seconds; `labels` is
/// empty or ends with a comma.
fn histogram_lines(out: &mut String, name: &str, labels: &str, h: &hdrhistogram::Histogram<u64>) {
    for bound in LATENCY_BUCKETS {
        let us = (bound * 1e6) as u64;
        let count = if h.is_empty() {
            0
        } else {
            h.count_between(0, us)
        };
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {}", h.len());
    let sum_us: f64 = h
        .iter_recorded()
        .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
        .sum();
    // An empty histogram's sum is plain 0 (an empty f64 sum is -0).
    let sum = if h.is_empty() { 0.0 } else { sum_us / 1e6 };
    let bare = labels.trim_end_matches(',');
    let braces = if bare.is_empty() {
        String::new()
    } else {
        format!("{{{bare}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {sum}");
    let _ = writeln!(out, "{name}_count{braces} {}", h.len());
}

/// Memory per connection, three ways (see the metric's help).
pub struct PerConnection {
    pub user: f64,
    pub rss_growth: f64,
    pub kernel_host: f64,
}

/// Bytes per connection now; all 0 with no connections.
pub fn memory_per_connection(control: &Control, rss: u64) -> PerConnection {
    let connections: u64 = control.shards.iter().map(|s| s.connections.get()).sum();
    if connections == 0 {
        return PerConnection {
            user: 0.0,
            rss_growth: 0.0,
            kernel_host: 0.0,
        };
    }
    let n = connections as f64;
    let held: u64 = control
        .shards
        .iter()
        .map(|s| s.connection_bytes.get())
        .sum();
    let kernel = kernel_bytes().unwrap_or(control.kernel_at_start);
    PerConnection {
        user: held as f64 / n,
        rss_growth: rss.saturating_sub(control.rss_at_start) as f64 / n,
        kernel_host: kernel.saturating_sub(control.kernel_at_start) as f64 / n,
    }
}

/// The host's kernel memory that grows with TCP connections: slab objects
/// (`Slab` in /proc/meminfo: sockets, io_uring requests, files) plus TCP socket
/// buffers (`mem` pages in /proc/net/sockstat).
pub fn kernel_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let slab_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("Slab:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let tcp_pages: u64 = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let at = f.iter().position(|w| *w == "mem")?;
            f.get(at + 1)?.parse().ok()
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no pointer arguments.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some(slab_kib * 1024 + tcp_pages * page)
}

/// This process's resident set size, from /proc.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}
