//! `cargo xtask loadgen reconnect`: a reconnect storm under a steady publish
//! rate, and whether every subscriber got back exactly what it missed.
//!
//! Workers open `--conns` subscribers over `--topics` topics (each subscribes
//! with `{"op":"sub"}` and keeps the reply's `seq` and epoch). The parent
//! publishes `--rate` events a second (default 50) round robin over the topics
//! throughout. After `--hold` seconds of live traffic it tells every worker to
//! drop all its connections at once; each comes back after `--down` seconds
//! (spread evenly over `--window` seconds; 0: all at once) with
//! `/ws?recover=TOPIC@SEQ@EPOCH`. The run ends a second after every subscriber
//! is live again (or at `--timeout`).
//!
//! Reported: recovered % (and the server's outcomes), events replayed, gaps,
//! duplicates and reordering over every subscriber's whole run, and time to
//! recover (from when a subscriber's return was due to holding the reply's
//! `seq`) p50/p99/max. Exits non-zero on any gap, duplicate or reordering, any
//! connection that failed or did not come back, or any publish refused.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::report::Percentiles;
use super::wire::Http;
use super::worker::{Line, WorkerResult};
use super::{percentiles, pin_to, Args};

/// Everything a storm measured, and its verdict.
#[derive(Debug, Serialize)]
pub struct ReconnectReport {
    pub conns: usize,
    pub topics: usize,
    pub rate: f64,
    pub down_s: f64,
    pub window_s: f64,
    pub published: u64,
    pub publish_refused: u64,
    pub reconnects: u64,
    pub recovered: u64,
    pub not_recovered: u64,
    pub recovered_percent: f64,
    /// Events the clients received as replays, and what the server counts.
    pub replayed: u64,
    pub server_replayed: Option<u64>,
    /// The server's `recoveries_{outcome}_total` increase over the run.
    pub server_outcomes: BTreeMap<String, u64>,
    pub gaps: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub failures: BTreeMap<String, u64>,
    pub time_to_recover_ms: Option<Percentiles>,
    /// Seconds from the storm until the last subscriber was live again.
    pub storm_seconds: Option<f64>,
    pub problems: Vec<String>,
}

pub fn main(args: &Args) -> Result<(), String> {
    let report = run(args)?;
    report.print();
    super::write_json(args, &report)?;
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(format!("reconnect failed: {}", report.problems.join("; ")))
    }
}

/// Publishes at the rate; remembers how far it got.
struct Publisher {
    http: Http,
    rate: f64,
    topics: usize,
    size: usize,
    started: Instant,
    published: u64,
    refused: u64,
}

impl Publisher {
    /// Publishes whatever is due by now.
    fn catch_up(&mut self) -> Result<(), String> {
        let due = (self.started.elapsed().as_secs_f64() * self.rate) as u64;
        while self.published + self.refused < due {
            let topic = format!("t{}", self.published % self.topics as u64);
            match super::soak::publish_one(&mut self.http, &topic, self.size)? {
                200 => self.published += 1,
                status => {
                    self.refused += 1;
                    eprintln!("reconnect: a publish was answered {status}");
                }
            }
        }
        Ok(())
    }
}

fn run(args: &Args) -> Result<ReconnectReport, String> {
    let (target, control, sources) = super::endpoints(args)?;
    if args.size < 40 {
        return Err("reconnect --size must be at least 40 bytes (events carry a timestamp)".into());
    }
    if args.down < 0.0 || args.window < 0.0 {
        return Err("--down and --window are seconds, at least 0".into());
    }
    if args.conns < args.procs {
        return Err(
            "reconnect needs at least one connection per worker (--conns >= --procs)".into(),
        );
    }
    if let Some(cpu) = args.pin {
        pin_to(cpu);
    }
    let mut stats = Http::connect(control)?;
    let before = stats.stats()?;
    let mut workers = super::spawn_workers(args, &[target], &sources, None)?;
    let rx = super::worker_lines(&mut workers);
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    let mut ready = 0;
    while ready < workers.len() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((_, Line::Ready)) => ready += 1,
            Ok(_) => {}
            Err(_) => return Err("the subscribers did not all subscribe in --timeout".into()),
        }
    }
    super::wait_for_subscriptions(&mut stats, args.conns as u64)?;
    let mut publisher = Publisher {
        http: Http::connect(control)?,
        rate: args.rate.unwrap_or(50.0),
        topics: args.topics.max(1),
        size: args.size,
        started: Instant::now(),
        published: 0,
        refused: 0,
    };
    eprintln!(
        "reconnect: {} subscribers up; publishing {}/s; the storm comes in {} s",
        args.conns, publisher.rate, args.hold
    );
    let storm_at = publisher.started + Duration::from_secs_f64(args.hold);
    let mut storm_sent = false;
    // Per worker: (failed, settled) from its latest progress line after it
    // took the storm (its reconnect count moved).
    let mut latest = vec![(0u64, 0u64); workers.len()];
    let mut settled_at = None;
    let mut results: Vec<Option<WorkerResult>> = (0..workers.len()).map(|_| None).collect();
    loop {
        publisher.catch_up()?;
        while let Ok((i, line)) = rx.try_recv() {
            match line {
                Line::Progress {
                    failed,
                    settled,
                    reconnects,
                    ..
                } if reconnects > 0 => latest[i] = (failed, settled),
                Line::Result(r) => results[i] = Some(*r),
                _ => {}
            }
        }
        let now = Instant::now();
        if !storm_sent && now >= storm_at {
            storm_sent = true;
            send(&mut workers, &Line::Storm);
        }
        let (failed, settled) = latest.iter().fold((0, 0), |a, l| (a.0 + l.0, a.1 + l.1));
        if storm_sent && settled_at.is_none() && settled + failed >= args.conns as u64 {
            settled_at = Some(now);
        }
        // A second of live traffic after everyone is back, then stop.
        let over = settled_at.is_some_and(|t| now >= t + Duration::from_secs(1));
        if over || now >= deadline || results.iter().any(Option::is_some) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for w in &mut workers {
        drop(w.stdin.take());
    }
    let collect_by = Instant::now() + Duration::from_secs(60);
    while results.iter().any(Option::is_none) {
        match rx.recv_timeout(collect_by.saturating_duration_since(Instant::now())) {
            Ok((i, Line::Result(r))) => results[i] = Some(*r),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    for mut w in workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    // A fresh connection: the first sat idle through the storm, past the
    // control plane's keep-alive timeout.
    let after = Http::connect(control)?.stats()?;
    let results: Vec<WorkerResult> = results.into_iter().map(Option::unwrap_or_default).collect();
    let grew = |name: &str| {
        let get = |s: &serde_json::Value| s["totals"][name].as_u64();
        Some(get(&after)?.saturating_sub(get(&before)?))
    };
    let mut server_outcomes = BTreeMap::new();
    for outcome in [
        "recovered",
        "too_old",
        "epoch_changed",
        "future",
        "history_off",
        "already_subscribed",
    ] {
        if let Some(n) = grew(&format!("recoveries_{outcome}_total")) {
            server_outcomes.insert(outcome.to_string(), n);
        }
    }
    let sum = |f: fn(&WorkerResult) -> u64| results.iter().map(f).sum::<u64>();
    let failures = super::report::merged_failures(&results);
    let recovered = sum(|r| r.recovery.recovered);
    let not_recovered = sum(|r| r.recovery.not_recovered);
    let mut report = ReconnectReport {
        conns: args.conns,
        topics: args.topics.max(1),
        rate: publisher.rate,
        down_s: args.down,
        window_s: args.window,
        published: publisher.published,
        publish_refused: publisher.refused,
        reconnects: sum(|r| r.reconnects),
        recovered,
        not_recovered,
        recovered_percent: 100.0 * recovered as f64 / (recovered + not_recovered).max(1) as f64,
        replayed: sum(|r| r.recovery.replayed),
        server_replayed: grew("events_replayed_total"),
        server_outcomes,
        gaps: sum(|r| r.gaps),
        duplicates: sum(|r| r.duplicates),
        out_of_order: sum(|r| r.out_of_order),
        failures,
        time_to_recover_ms: percentiles(results.iter().map(|r| r.recovery.recover_us.clone())),
        storm_seconds: settled_at.map(|t| t.duration_since(storm_at).as_secs_f64()),
        problems: Vec::new(),
    };
    report.judge();
    Ok(report)
}

fn send(workers: &mut [std::process::Child], line: &Line) {
    let text = serde_json::to_string(line).expect("serialisable");
    for w in workers {
        if let Some(stdin) = w.stdin.as_mut() {
            let _ = writeln!(stdin, "{text}");
            let _ = stdin.flush();
        }
    }
}

impl ReconnectReport {
    fn judge(&mut self) {
        let mut problems = Vec::new();
        if self.gaps + self.duplicates + self.out_of_order > 0 {
            problems.push(format!(
                "events lost {}, repeated {}, reordered {}",
                self.gaps, self.duplicates, self.out_of_order
            ));
        }
        let failed: u64 = self.failures.values().sum();
        if failed > 0 {
            problems.push(format!("connections failed: {:?}", self.failures));
        }
        let back = self.recovered + self.not_recovered;
        if back < self.reconnects {
            problems.push(format!(
                "{} of {} dropped subscribers did not come back",
                self.reconnects - back,
                self.reconnects
            ));
        }
        if self.reconnects == 0 {
            problems.push("the storm dropped no connection".into());
        }
        if self.publish_refused > 0 {
            problems.push(format!("{} publishes refused", self.publish_refused));
        }
        self.problems = problems;
    }

    fn print(&self) {
        println!(
            "loadgen Reconnect: {} subscribers over {} topics; {} events/s; down {} s, back over {} s",
            self.conns, self.topics, self.rate, self.down_s, self.window_s
        );
        println!(
            "  published                    {} accepted, {} refused",
            self.published, self.publish_refused
        );
        println!(
            "  came back                    {} of {} dropped: {} recovered ({:.1} %), {} not",
            self.recovered + self.not_recovered,
            self.reconnects,
            self.recovered,
            self.recovered_percent,
            self.not_recovered
        );
        println!("  server outcomes              {:?}", self.server_outcomes);
        println!(
            "  events replayed              {} (server: {})",
            self.replayed,
            self.server_replayed.map_or("-".into(), |n| n.to_string())
        );
        println!(
            "  lost / repeated / reordered  {} / {} / {}",
            self.gaps, self.duplicates, self.out_of_order
        );
        if let Some(p) = &self.time_to_recover_ms {
            println!(
                "  time to recover ms           p50 {:.3}  p99 {:.3}  max {:.3}",
                p.p50, p.p99, p.max
            );
        }
        if let Some(s) = self.storm_seconds {
            println!("  storm over after             {s:.3} s");
        }
        println!("  connection failures          {:?}", self.failures);
        if self.problems.is_empty() {
            println!("  verdict                      ok");
        } else {
            println!(
                "  verdict                      FAILED: {}",
                self.problems.join("; ")
            );
        }
        let _ = std::io::stdout().flush();
    }
}
