//! `cargo xtask loadgen publish`: how fast the control plane takes publishes.
//!
//! `--publishers` threads, each with its own keep-alive HTTP connection (spread
//! round-robin over the control planes of `--control`), publish `--events`
//! events of `--size` bytes round-robin over `--topics` topics, each sending the
//! next as soon as the last is answered; with `--batch N`, N events per request
//! through the batch API (`POST /publish`, JSON lines). Reports accepted
//! events/s, the answer-time percentiles (per request) and refusals; with a fleet member behind `--control`
//! this is the publish throughput through Redis, concurrent publishers sharing
//! one pipelined Redis connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::report::Percentiles;
use super::wire::Http;
use super::{cpu_seconds, fleet_endpoints, pid_listening_on, Args};

#[derive(Debug, Serialize)]
pub struct PublishReport {
    pub publishers: usize,
    pub batch: usize,
    pub accepted: u64,
    pub refused: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    pub answer_ms: Option<Percentiles>,
    /// CPU of the process serving the first control plane, per accepted event.
    pub server_cpu_us_per_event: Option<f64>,
}

pub fn main(args: &Args) -> Result<(), String> {
    let report = run(args)?;
    println!(
        "loadgen Publish: {} publishers, {} event(s) per request",
        report.publishers, report.batch
    );
    println!(
        "  published                    {} accepted, {} refused, in {:.2} s",
        report.accepted, report.refused, report.seconds
    );
    println!(
        "  events/s                     {:.0}",
        report.events_per_second
    );
    if let Some(p) = &report.answer_ms {
        println!(
            "  answer ms                    p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (n={})",
            p.p50, p.p90, p.p99, p.p999, p.max, p.count
        );
    }
    if let Some(us) = report.server_cpu_us_per_event {
        println!("  server CPU / event           {us:.2} us");
    }
    super::write_json(args, &report)?;
    if report.refused > 0 {
        return Err(format!("{} publishes were refused", report.refused));
    }
    Ok(())
}

pub fn run(args: &Args) -> Result<PublishReport, String> {
    let hosts = fleet_endpoints(args)?;
    if args.publishers == 0 {
        return Err("--publishers must be at least 1".into());
    }
    let pid = pid_listening_on(hosts.controls[0].port());
    let cpu_before = pid.and_then(cpu_seconds);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..args.publishers)
        .map(|p| {
            let control = hosts.controls[p % hosts.controls.len()];
            let next = next.clone();
            let (events, topics, size) = (args.events, args.topics.max(1), args.size);
            let batch = args.batch.max(1) as u64;
            std::thread::spawn(move || -> Result<(u64, u64, Histogram<u64>), String> {
                let mut http = Http::connect(control)?;
                let mut h =
                    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
                let (mut accepted, mut refused) = (0, 0);
                let data = format!("{{\"p\":\"{}\"}}", "x".repeat(size.saturating_sub(8)));
                loop {
                    let first = next.fetch_add(batch, Ordering::Relaxed);
                    if first >= events {
                        return Ok((accepted, refused, h));
                    }
                    let n = batch.min(events - first);
                    let sent = Instant::now();
                    let (status, answer) = if batch == 1 {
                        let topic = format!("t{}", first % topics as u64);
                        http.request("POST", &format!("/publish/{topic}"), data.as_bytes())?
                    } else {
                        let body: String = (first..first + n)
                            .map(|i| {
                                format!(
                                    "{{\"topic\":\"t{}\",\"data\":{data}}}\n",
                                    i % topics as u64
                                )
                            })
                            .collect();
                        http.request("POST", "/publish", body.as_bytes())?
                    };
                    let _ = h.record((sent.elapsed().as_micros() as u64).max(1));
                    match status {
                        200 => accepted += n,
                        // A batch with refused lines: count them.
                        207 => {
                            let text = String::from_utf8_lossy(&answer);
                            let bad =
                                text.lines().filter(|l| l.contains("\"error\"")).count() as u64;
                            (accepted, refused) = (accepted + n - bad, refused + bad);
                        }
                        503 => refused += n,
                        other => {
                            return Err(format!(
                                "publish answered {other}: {}",
                                String::from_utf8_lossy(&answer)
                            ))
                        }
                    }
                }
            })
        })
        .collect();
    let mut total = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
    let (mut accepted, mut refused) = (0, 0);
    for t in threads {
        let (a, r, h) = t.join().map_err(|_| "a publisher panicked")??;
        accepted += a;
        refused += r;
        total.add(h).map_err(|e| e.to_string())?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_before
        .zip(pid.and_then(cpu_seconds))
        .map(|(b, a)| a - b);
    Ok(PublishReport {
        publishers: args.publishers,
        batch: args.batch.max(1),
        accepted,
        refused,
        seconds,
        events_per_second: accepted as f64 / seconds,
        answer_ms: Percentiles::of(&total),
        server_cpu_us_per_event: cpu
            .filter(|_| accepted > 0)
            .map(|c| c * 1e6 / accepted as f64),
    })
}
