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
//!
//! The fanout scenario's publishers live here too ([`fanout`]): the same
//! threads and batches, each event carrying its send time for the subscribers'
//! latency.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::report::Percentiles;
use super::wire::Http;
use super::{cpu_seconds, fleet_endpoints, pid_listening_on, Args, Published};

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
    let publishers = args.publishers.unwrap_or(8);
    if publishers == 0 {
        return Err("--publishers must be at least 1".into());
    }
    let pid = pid_listening_on(hosts.controls[0].port());
    let cpu_before = pid.and_then(cpu_seconds);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..publishers)
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
        publishers,
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

/// The fanout scenario's publishing: `--publishers` threads (default 1), each
/// with a connection to every control plane, sending its requests through them
/// in turn (a fleet gets events through every host), publish `--events`
/// events round-robin over the topics `t0..`, `--batch` at a time (the batch
/// API above 1), paced to `--rate` if given. Each event's data is
/// `{"t":NANOS,"p":"x..."}` of `--size` bytes, `t` its send time.
pub fn fanout(controls: &[SocketAddr], args: &Args) -> Result<Published, String> {
    let publishers = args.publishers.unwrap_or(1);
    if publishers == 0 {
        return Err("--publishers must be at least 1".into());
    }
    let batch = args.batch.max(1) as u64;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..publishers)
        .map(|p| {
            let controls = controls.to_vec();
            let next = next.clone();
            let (events, topics, size, rate) =
                (args.events, args.topics.max(1), args.size, args.rate);
            std::thread::spawn(move || -> Result<Published, String> {
                let mut https = controls
                    .iter()
                    .map(|&c| Http::connect(c))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut turn = p;
                let mut out = Published::default();
                loop {
                    let first = next.fetch_add(batch, Ordering::Relaxed);
                    if first >= events {
                        return Ok(out);
                    }
                    if let Some(rate) = rate {
                        let due = started + Duration::from_secs_f64(first as f64 / rate);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    }
                    let indices = first..first + batch.min(events - first);
                    let hosts = https.len();
                    let http = &mut https[turn % hosts];
                    turn += 1;
                    let topic = |i: u64| format!("t{}", i % topics as u64);
                    let data = || {
                        let t = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |d| d.as_nanos() as u64);
                        let head = format!("{{\"t\":{t},\"p\":\"");
                        let pad = "x".repeat(size.saturating_sub(head.len() + 2));
                        format!("{head}{pad}\"}}")
                    };
                    let accepted: Vec<String> = if batch == 1 {
                        let topic = topic(first);
                        let (status, answer) =
                            http.request("POST", &format!("/publish/{topic}"), data().as_bytes())?;
                        match status {
                            200 => vec![topic],
                            503 => Vec::new(),
                            other => {
                                return Err(format!(
                                    "publish answered {other}: {}",
                                    String::from_utf8_lossy(&answer)
                                ))
                            }
                        }
                    } else {
                        let body: String = indices
                            .clone()
                            .map(|i| {
                                format!("{{\"topic\":\"{}\",\"data\":{}}}\n", topic(i), data())
                            })
                            .collect();
                        let (status, answer) = http.request("POST", "/publish", body.as_bytes())?;
                        if status != 200 && status != 207 {
                            return Err(format!(
                                "publish answered {status}: {}",
                                String::from_utf8_lossy(&answer)
                            ));
                        }
                        accepted_topics(&answer)?
                    };
                    let sent = indices.end - indices.start;
                    let refused = sent - accepted.len() as u64;
                    out.accepted += accepted.len() as u64;
                    out.busy += refused;
                    for topic in accepted {
                        *out.per_topic.entry(topic).or_default() += 1;
                    }
                    if refused > 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        })
        .collect();
    let mut total = Published::default();
    for t in threads {
        let one = t.join().map_err(|_| "a publisher panicked")??;
        total.accepted += one.accepted;
        total.busy += one.busy;
        for (topic, n) in one.per_topic {
            *total.per_topic.entry(topic).or_default() += n;
        }
    }
    total.seconds = started.elapsed().as_secs_f64();
    Ok(total)
}

/// The topics of the accepted lines of a batch answer (those with a `seq`).
fn accepted_topics(answer: &[u8]) -> Result<Vec<String>, String> {
    let text = std::str::from_utf8(answer).map_err(|_| "a batch answer that is not UTF-8")?;
    let mut topics = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("a batch answer line {line:?}: {e}"))?;
        if v.get("seq").is_some() {
            let topic = v["topic"]
                .as_str()
                .ok_or("an accepted line without its topic")?;
            topics.push(topic.to_string());
        }
    }
    Ok(topics)
}
