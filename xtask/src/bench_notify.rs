//! `cargo xtask bench --only notify`: the notification workload (issue 15,
//! item 1) against steady broadcast fanout, in the same run.
//!
//! Every subscriber has a topic of its own ("new mail for user 42") and events
//! arrive through the batch API (`POST /publish`, 100 events a request). Each
//! delivery is then one event, one topic lookup and one write to one socket,
//! where a broadcast event is one lookup for 10,000 writes: what the
//! notification costs beyond its write is the per-event path (HTTP, JSON,
//! broker, inbox, shard). Both run at the same delivery rate (50,000 a second:
//! a broadcast to 10,000 subscribers at 5 events a second, a notification to
//! each of them 5 times a second), so each write finds its reader asleep in
//! both. Three alternating rounds, medians; ringgate pinned to one CPU, the load
//! generator to the other. Before each run the server's history is filled
//! (events on the same topics until `--history-memory` or `--history-size`
//! bounds it): the runs then see the steady state, each publish evicting an
//! old event, not a heap growing toward its bound.
//!
//! Rows: CPU per delivery of each and their ratio (target at most 1.3), the
//! publish-to-receive p99 of the notifications at that rate (target under
//! 10 ms), the most notifications a second one shard takes (target 100,000)
//! and the p99 at half of what it took. Under each p99 row, run by run, the
//! server's own share (its publish-to-send-completion p99, from `/stats`) and
//! the hypervisor's steal over the run, with which on a shared host the tail
//! grows.
//!
//! Beside them, the kernel's floor at the same sockets (`cargo xtask floor` at
//! the same write rate, no server; past one process's open files, on six rings
//! of direct descriptors as ringgate holds them): the CPU one 64 B write to a
//! sleeping loopback reader costs here, and so the most writes a second one CPU
//! can make whatever the server. Once in the broadcast's pattern (every socket
//! in table order) and once in the notifications' (100 sockets per event
//! scattered over the table, as random subscribers are). At 100,000 sockets a
//! scattered write costs the kernel more than one in order (their memory is
//! cold and far apart), so the floors' own ratio is what a server that cost
//! nothing would show against the 1.3x target.
//!
//! The paced runs publish from four
//! connections so that one slow answer does not make the schedule slip (a
//! single publisher waiting for each answer falls behind, then catches up in a
//! burst the server must queue). Without `--quick`, the same again with 100,000 subscribers and
//! topics over six shards (a shard's direct-descriptor table holds about
//! 20,000 sockets here) and six load-generator processes.
//!
//! On loopback a write to a sleeping reader also pays for waking it (the
//! reader's receive path and wake-up run in the writer's context), which a
//! server's clients on other machines would not charge it; notifications,
//! spread over time, wake their reader far more often per delivery than a
//! broadcast does. So at one shard the two CPU figures are measured again with
//! the load generator's workers polling without sleeping (`--spin`): the
//! server's own cost per delivery, wake-ups apart. And at both scales the paced
//! notifications once more in batches of 1,000: each request's fixed cost
//! (reading it, answering, waking the publisher, the control thread and each
//! shard it reaches: six at 100,000 topics) shared by ten times the events;
//! what a publisher that batches more saves.

use crate::bench::{base_args, human, start_with, warm_up, Kind, Server};
use crate::loadgen::wire::Http;
use crate::loadgen::{self, proc_kib, report::Report, Scenario};

/// The server's `/stats`.
fn stats(control: &str) -> Result<serde_json::Value, String> {
    let addr = control.parse().map_err(|e| format!("{control}: {e}"))?;
    Http::connect(addr)?.stats()
}

/// Deliveries a second in the paced runs, broadcast and notification alike.
const DELIVERIES_PER_SEC: f64 = 50_000.0;
/// Events per batch request.
const BATCH: usize = 100;
/// Events per batch request in the run that shows what a request costs: the
/// paced notifications again in batches this large, at every scale.
const LARGE_BATCH: usize = 1_000;
/// Events published before each run: fills the default 64 MiB history (about
/// 160 B per held event) or every topic's 100 events, whichever comes first.
const WARM_UP_EVENTS_MAX: u64 = 500_000;

/// One population: subscribers, shards, load-generator processes.
struct Scale {
    conns: usize,
    shards: usize,
    procs: usize,
    sources: Option<&'static str>,
    /// Seconds of each paced run.
    seconds: f64,
}

/// The figures of one round at one scale.
#[derive(Default)]
struct Round {
    floor_us: Option<f64>,
    /// The floor for the notifications' pattern: each event one write, in
    /// batches of `BATCH` sockets scattered over the table (random subscribers).
    notify_floor_us: Option<f64>,
    /// Server RSS growth per idle subscribed connection, a topic each.
    rss_per_conn: Option<f64>,
    /// Server RSS growth per topic once one event was published to each
    /// (the broker's topic state and the held event), and the held event's
    /// accounted share (`history_bytes` / topics).
    broker_per_topic: Option<f64>,
    history_per_topic: Option<f64>,
    broadcast_cpu: Option<f64>,
    notify_cpu: Option<f64>,
    notify_p99_ms: Option<f64>,
    notify_max_rate: Option<f64>,
    /// Publish-to-receive p99 at half the rate the flat-out run reached.
    notify_half_max_p99_ms: Option<f64>,
    /// Beside each p99: the server's own (publish to send completion) and the
    /// hypervisor's steal over the run (percent).
    notify_server_p99_ms: Option<f64>,
    notify_steal: Option<f64>,
    half_max_server_p99_ms: Option<f64>,
    half_max_steal: Option<f64>,
    /// The paced runs again with spinning clients (one worker process only).
    broadcast_cpu_spin: Option<f64>,
    notify_cpu_spin: Option<f64>,
    notify_p99_ms_spin: Option<f64>,
    /// The paced notifications in batches of `LARGE_BATCH`.
    notify_cpu_large: Option<f64>,
    notify_p99_ms_large: Option<f64>,
}

pub fn run(quick: bool, server_cpu: usize, loadgen_cpu: usize) -> Result<(), String> {
    let mut scales = vec![Scale {
        conns: if quick { 2_000 } else { 10_000 },
        shards: 1,
        procs: 1,
        sources: None,
        seconds: if quick { 4.0 } else { 10.0 },
    }];
    if !quick {
        scales.push(Scale {
            conns: 100_000,
            shards: 6,
            procs: 6,
            sources: Some("127.0.0.2-127.0.0.11"),
            seconds: 10.0,
        });
    }
    let rounds = if quick { 1 } else { 3 };
    for scale in &scales {
        let mut all = Vec::new();
        for _ in 0..rounds {
            all.push(round(scale, quick, server_cpu, loadgen_cpu)?);
        }
        print(scale, &all);
    }
    Ok(())
}

fn round(s: &Scale, quick: bool, server_cpu: usize, loadgen_cpu: usize) -> Result<Round, String> {
    let shards = s.shards.to_string();
    let mut broker = None;
    let mut run = |topics: usize,
                   events: u64,
                   rate: Option<f64>,
                   spin: bool,
                   batch: usize|
     -> Result<Report, String> {
        let server = start_with(Kind::Ringgate, server_cpu, &["--shards", &shards])?;
        let pid = server.child.id();
        let rss = || proc_kib(&format!("/proc/{pid}/status"), "VmRSS:");
        let mut warm = base_args(Scenario::Publish, &server.ws, &server.control, quick);
        warm.pin = Some(loadgen_cpu);
        (warm.topics, warm.batch, warm.publishers) = (s.conns, 1000, Some(1));
        // One event per topic first: what the broker holds per topic.
        let before = rss();
        warm.events = s.conns as u64;
        let mut refused = loadgen::publish::run(&warm)?.refused;
        if let (Some(before), Some(after), Ok(stats)) = (before, rss(), stats(&server.control)) {
            let topics = stats["totals"]["broker_topics"].as_f64().unwrap_or(0.0);
            let held = stats["totals"]["history_bytes"].as_f64().unwrap_or(0.0);
            if topics > 0.0 && broker.is_none() {
                broker = Some((after.saturating_sub(before) as f64 / topics, held / topics));
            }
        }
        warm.events = WARM_UP_EVENTS_MAX.min(s.conns as u64 * 100);
        refused += loadgen::publish::run(&warm)?.refused;
        if refused > 0 {
            return Err(format!("{refused} warm-up events were refused"));
        }
        let mut a = population_args(Scenario::Fanout, s, &server, quick, loadgen_cpu);
        (a.topics, a.events, a.rate, a.spin) = (topics, events, rate, spin);
        a.timeout = 300.0;
        if topics > 1 {
            (a.batch, a.publishers) = (batch, Some(if rate.is_some() { 4 } else { 2 }));
        }
        let r = loadgen::run(&a)?;
        r.verdict()?;
        Ok(r)
    };
    let broadcast_rate = DELIVERIES_PER_SEC / s.conns as f64;
    let broadcast_events = (broadcast_rate * s.seconds).ceil() as u64;
    let notify_events = (DELIVERIES_PER_SEC * s.seconds) as u64;
    let broadcast = run(1, broadcast_events, Some(broadcast_rate), false, 1)?;
    let paced = run(
        s.conns,
        notify_events,
        Some(DELIVERIES_PER_SEC),
        false,
        BATCH,
    )?;
    let flat_out = run(s.conns, notify_events, None, false, BATCH)?;
    let half_max = match flat_out.deliveries_per_second {
        Some(max) => {
            let rate = max / 2.0;
            Some(run(
                s.conns,
                (rate * s.seconds) as u64,
                Some(rate),
                false,
                BATCH,
            )?)
        }
        None => None,
    };
    let paced_large = run(
        s.conns,
        notify_events,
        Some(DELIVERIES_PER_SEC),
        false,
        LARGE_BATCH,
    )?;
    // A spinning worker keeps the load generator's CPU busy: one only.
    let (broadcast_spin, paced_spin) = if s.procs == 1 {
        (
            Some(run(1, broadcast_events, Some(broadcast_rate), true, 1)?),
            Some(run(
                s.conns,
                notify_events,
                Some(DELIVERIES_PER_SEC),
                true,
                BATCH,
            )?),
        )
    } else {
        (None, None)
    };
    // The kernel's floor for both patterns of writes, with no server.
    let floor = crate::floor::uring_us;
    let events = (broadcast_rate * s.seconds).ceil() as usize;
    let batches = DELIVERIES_PER_SEC / BATCH as f64;
    let floor_us = Some(floor(&crate::floor::Args::new(
        s.conns,
        events,
        broadcast_rate,
        64,
    ))?);
    let notify_floor_us = Some(floor(
        &crate::floor::Args::new(s.conns, (batches * s.seconds) as usize, batches, 64)
            .scatter(BATCH),
    )?);
    Ok(Round {
        floor_us,
        notify_floor_us,
        rss_per_conn: connect_rss(s, quick, server_cpu, loadgen_cpu)?,
        broker_per_topic: broker.map(|b| b.0),
        history_per_topic: broker.map(|b| b.1),
        broadcast_cpu: broadcast.server_cpu_us_per_message,
        notify_cpu: paced.server_cpu_us_per_message,
        notify_p99_ms: paced.latency_ms.as_ref().map(|p| p.p99),
        notify_max_rate: flat_out.deliveries_per_second,
        notify_half_max_p99_ms: half_max
            .as_ref()
            .and_then(|r| r.latency_ms.as_ref().map(|p| p.p99)),
        notify_server_p99_ms: paced.server.delivery_ms.map(|(_, p99)| p99),
        notify_steal: paced.server.steal_percent,
        half_max_server_p99_ms: half_max
            .as_ref()
            .and_then(|r| r.server.delivery_ms.map(|(_, p99)| p99)),
        half_max_steal: half_max.as_ref().and_then(|r| r.server.steal_percent),
        broadcast_cpu_spin: broadcast_spin.and_then(|r| r.server_cpu_us_per_message),
        notify_cpu_spin: paced_spin
            .as_ref()
            .and_then(|r| r.server_cpu_us_per_message),
        notify_p99_ms_spin: paced_spin.and_then(|r| r.latency_ms.map(|p| p.p99)),
        notify_cpu_large: paced_large.server_cpu_us_per_message,
        notify_p99_ms_large: paced_large.latency_ms.map(|p| p.p99),
    })
}

/// Server RSS growth per idle connection subscribed to a topic of its own
/// (the connect scenario on a fresh server: the record and the topic's share
/// of the index; the broker holds nothing for a topic nobody published to).
fn connect_rss(
    s: &Scale,
    quick: bool,
    server_cpu: usize,
    loadgen_cpu: usize,
) -> Result<Option<f64>, String> {
    let shards = s.shards.to_string();
    let server = start_with(Kind::Ringgate, server_cpu, &["--shards", &shards])?;
    // The receive-buffer ring's pages are a fixed cost, touched by the first traffic.
    warm_up(&server, loadgen_cpu)?;
    let mut a = population_args(Scenario::Connect, s, &server, quick, loadgen_cpu);
    a.topics = s.conns;
    let r = loadgen::run(&a)?;
    r.verdict()?;
    Ok(r.rss_per_connection)
}

/// The load generator's settings for `s`'s population against `server`.
fn population_args(
    scenario: Scenario,
    s: &Scale,
    server: &Server,
    quick: bool,
    loadgen_cpu: usize,
) -> loadgen::Args {
    let mut a = base_args(scenario, &server.ws, &server.control, quick);
    a.pin = Some(loadgen_cpu);
    (a.conns, a.procs) = (s.conns, s.procs);
    a.sources = s.sources.map(String::from);
    // A connection flood on one CPU answers some upgrades later than the
    // handshake timeout: open them at a pace the server keeps up with.
    a.ramp = (s.conns > 20_000).then_some(5_000.0);
    a
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// A paced notification run's rows under its heading: CPU per delivery, its
/// ratio to `broadcast`'s, and the p99 (medians, with every run's figure).
fn print_notify(broadcast: f64, cpu: (Option<f64>, Vec<f64>), p99: (Option<f64>, Vec<f64>)) {
    let (Some(n), runs) = cpu else { return };
    println!(
        "    notify: CPU / delivery                     {} us   runs {runs:.2?}",
        human(n)
    );
    println!(
        "    notify / broadcast CPU per delivery        {:.2}x (target at most 1.3x)",
        n / broadcast
    );
    let (p99, runs) = p99;
    println!(
        "    notify: publish-to-receive p99             {} ms   runs {runs:.2?} (target under 10 ms)",
        p99.map_or("-".to_string(), human)
    );
}

fn print(s: &Scale, rounds: &[Round]) {
    let col = |f: fn(&Round) -> Option<f64>| -> (Option<f64>, Vec<f64>) {
        let v: Vec<f64> = rounds.iter().filter_map(f).collect();
        (median(v.clone()), v)
    };
    let show = |v: Option<f64>| v.map_or("-".to_string(), human);
    let (bcast, bcast_runs) = col(|r| r.broadcast_cpu);
    let (notify, notify_runs) = col(|r| r.notify_cpu);
    let (p99, p99_runs) = col(|r| r.notify_p99_ms);
    let (max, max_runs) = col(|r| r.notify_max_rate);
    let (half, half_runs) = col(|r| r.notify_half_max_p99_ms);
    let (floor, floor_runs) = col(|r| r.floor_us);
    let (notify_floor, notify_floor_runs) = col(|r| r.notify_floor_us);
    let (rss, rss_runs) = col(|r| r.rss_per_conn);
    // Under a p99 row: the server's share and the machine's steal, run by run.
    let beside = |server: fn(&Round) -> Option<f64>, steal: fn(&Round) -> Option<f64>| {
        let (_, server) = col(server);
        let (_, steal) = col(steal);
        println!("    of it the server (publish to sent) p99 runs {server:.2?} ms; machine steal runs {steal:.1?}%");
    };
    let (broker, _) = col(|r| r.broker_per_topic);
    let (held, _) = col(|r| r.history_per_topic);
    println!(
        "notifications: {} subscribers, a topic each, {} shard(s), batches of {BATCH}; median of {}",
        s.conns,
        s.shards,
        rounds.len()
    );
    println!(
        "  broadcast at {:.0} deliveries/s: CPU / delivery   {} us   runs {bcast_runs:.2?}",
        DELIVERIES_PER_SEC,
        show(bcast)
    );
    println!(
        "  notify at {:.0}/s: CPU / delivery             {} us   runs {notify_runs:.2?}",
        DELIVERIES_PER_SEC,
        show(notify)
    );
    if let (Some(b), Some(n)) = (bcast, notify) {
        println!(
            "  notify / broadcast CPU per delivery          {:.2}x (target at most 1.3x)",
            n / b
        );
    }
    println!(
        "  notify at {:.0}/s: publish-to-receive p99     {} ms   runs {p99_runs:.2?} (target under 10 ms)",
        DELIVERIES_PER_SEC,
        show(p99)
    );
    beside(|r| r.notify_server_p99_ms, |r| r.notify_steal);
    let (bcast_spin, bcast_spin_runs) = col(|r| r.broadcast_cpu_spin);
    if let Some(b) = bcast_spin {
        println!("  the same with the clients spinning (no wake-ups charged to the server):");
        println!(
            "    broadcast: CPU / delivery                  {} us   runs {bcast_spin_runs:.2?}",
            human(b)
        );
        print_notify(b, col(|r| r.notify_cpu_spin), col(|r| r.notify_p99_ms_spin));
    }
    if let Some(b) = bcast {
        if rounds.iter().any(|r| r.notify_cpu_large.is_some()) {
            println!("  the same in batches of {LARGE_BATCH} (a tenth of the requests):");
            print_notify(
                b,
                col(|r| r.notify_cpu_large),
                col(|r| r.notify_p99_ms_large),
            );
        }
    }
    println!(
        "  notify flat out: deliveries/s                {}   runs {max_runs:.0?} (target 100,000 on one shard)",
        show(max)
    );
    println!(
        "  notify at half that: publish-to-receive p99  {} ms   runs {half_runs:.2?}",
        show(half)
    );
    beside(|r| r.half_max_server_p99_ms, |r| r.half_max_steal);
    println!(
        "  server RSS / subscribed connection, a topic each  {} B   runs {rss_runs:.0?} (target at most 128 B)",
        show(rss)
    );
    println!(
        "  broker: RSS growth / topic with one event held    {} B, of which the event {} B (history, as accounted)",
        show(broker),
        show(held)
    );
    if let Some(floor) = floor {
        println!(
            "  kernel floor, one write at {:.0}/s: CPU / write {} us   runs {floor_runs:.2?}: at most {:.0} writes/s on one CPU",
            DELIVERIES_PER_SEC,
            human(floor),
            1e6 / floor
        );
        if let Some(b) = bcast {
            println!(
                "  broadcast / its floor                        {:.2}x",
                b / floor
            );
        }
    }
    if let Some(notify_floor) = notify_floor {
        println!(
            "  kernel floor, the notifications' pattern ({BATCH} sockets scattered over the table per event): {} us   runs {notify_floor_runs:.2?}",
            human(notify_floor)
        );
        if let Some(n) = notify {
            println!(
                "  notify / its floor                           {:.2}x",
                n / notify_floor
            );
        }
        if let Some(floor) = floor {
            println!(
                "  the floors' own ratio, notifications' pattern / broadcast's: {:.2}x (a server that cost nothing)",
                notify_floor / floor
            );
        }
    }
}
