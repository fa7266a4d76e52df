//! `cargo xtask loadgen soak`: a long run with churn that must lose nothing and
//! not grow.
//!
//! Workers hold `--conns` subscribers and close and reopen some of them all the
//! time (`--churn` a second, `--burst` at once every `--burst-every` seconds);
//! each connection checks that every event after its first one follows the one
//! before (no gap, no repeat, no reordering). The parent publishes `--rate`
//! events a second round robin over the topics and every `--sample` seconds
//! records the server's RSS and its connection, subscription, send-queue and
//! unfinished-input gauges. The verdict fails on any lost, repeated or
//! reordered event, any publish not answered 200, any connection the server
//! closed or refused, and on RSS above its level at `--settle` seconds by more
//! than `--tolerance` (plus 8 MiB, page-granularity noise).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::report::Percentiles;
use super::wire::Http;
use super::worker::{Line, WorkerResult};
use super::{percentiles, pid_listening_on, pin_to, proc_kib, Args};

/// RSS may also grow by this much whatever the tolerance: the allocator and the
/// kernel hand memory out in pages and arenas.
const RSS_SLACK_BYTES: u64 = 8 << 20;

/// One sample of the server.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub rss: Option<u64>,
    pub connections: Option<u64>,
    pub subscriptions: Option<u64>,
    pub send_queue_bytes: Option<u64>,
    pub unfinished_bytes: Option<u64>,
    /// Client connections open now, over all workers.
    pub open_clients: u64,
    /// Events the clients received so far.
    pub received: u64,
    pub published: u64,
}

/// Everything a soak measured, and its verdict.
#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub conns: usize,
    pub topics: usize,
    pub duration_s: f64,
    pub rate: f64,
    pub churn: f64,
    pub burst: usize,
    pub burst_every_s: f64,
    pub samples: Vec<Sample>,
    pub published: u64,
    pub publish_failures: u64,
    pub received: u64,
    pub gaps: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub reconnects: u64,
    pub failures: BTreeMap<String, u64>,
    pub latency_ms: Option<Percentiles>,
    /// RSS when the population had settled, the most after, and the last.
    pub rss_settled: Option<u64>,
    pub rss_max_after: Option<u64>,
    pub rss_last: Option<u64>,
    pub rss_limit: Option<u64>,
    pub problems: Vec<String>,
}

pub fn main(args: &Args) -> Result<(), String> {
    let report = run(args)?;
    report.print();
    super::write_json(args, &report)?;
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(format!("soak failed: {}", report.problems.join("; ")))
    }
}

fn run(args: &Args) -> Result<SoakReport, String> {
    let (target, control, sources) = super::endpoints(args)?;
    if args.size < 40 {
        return Err("soak --size must be at least 40 bytes (events carry a timestamp)".into());
    }
    if args.duration <= args.settle {
        return Err("soak --duration must be longer than --settle".into());
    }
    if let Some(cpu) = args.pin {
        pin_to(cpu);
    }
    let pid = pid_listening_on(target.port());
    let mut http = Http::connect(control)?;
    let mut workers = super::spawn_workers(args, &[target], &sources, None)?;
    let rx = super::worker_lines(&mut workers);
    let mut watch = Watch::new(workers.len());
    // Phase 1: the population comes up.
    let up_by = Instant::now() + Duration::from_secs_f64(args.timeout);
    while watch.ready < workers.len() {
        let left = up_by.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, line)) => watch.take(i, line),
            Err(_) => return Err("the connections did not all open in --timeout".into()),
        }
    }
    super::wait_for_subscriptions(&mut http, args.conns as u64)?;
    eprintln!(
        "soak: {} connections up; publishing {}/s for {} s",
        args.conns,
        args.rate.unwrap_or(50.0),
        args.duration
    );
    // Phase 2: publish, churn (the workers), sample.
    let rate = args.rate.unwrap_or(50.0);
    let started = Instant::now();
    let mut published = 0u64;
    let mut publish_failures = 0u64;
    let mut samples = Vec::new();
    let mut next_sample = started;
    let mut results: Vec<Option<WorkerResult>> = (0..workers.len()).map(|_| None).collect();
    while started.elapsed().as_secs_f64() < args.duration {
        while let Ok((i, line)) = rx.try_recv() {
            match line {
                // A worker stopped early (its deadline): keep what it saw.
                Line::Result(r) => results[i] = Some(*r),
                line => watch.take(i, line),
            }
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs_f64(args.sample);
            let sample = take_sample(&mut http, pid, started, &watch, published);
            eprintln!("{}", sample_line(&sample));
            samples.push(sample);
        }
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        if published + publish_failures < due {
            let topic = format!("t{}", published % args.topics.max(1) as u64);
            match publish_one(&mut http, &topic, args.size)? {
                200 => published += 1,
                status => {
                    publish_failures += 1;
                    eprintln!("soak: a publish was answered {status}");
                }
            }
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // Phase 3: stop the workers (closing stdin) and collect their results.
    for w in &mut workers {
        drop(w.stdin.take());
    }
    let collect_by = Instant::now() + Duration::from_secs(60);
    while results.iter().any(Option::is_none) {
        let left = collect_by.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, Line::Result(r))) => results[i] = Some(*r),
            Ok((i, line)) => watch.take(i, line),
            Err(_) => break,
        }
    }
    for mut w in workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let results: Vec<WorkerResult> = results.into_iter().map(Option::unwrap_or_default).collect();
    Ok(SoakReport::build(
        args,
        samples,
        published,
        publish_failures,
        &results,
    ))
}

/// The workers' latest progress.
struct Watch {
    ready: usize,
    /// Per worker: (open, received).
    latest: Vec<(u64, u64)>,
}

impl Watch {
    fn new(workers: usize) -> Watch {
        Watch {
            ready: 0,
            latest: vec![(0, 0); workers],
        }
    }

    fn take(&mut self, i: usize, line: Line) {
        match line {
            Line::Ready => self.ready += 1,
            Line::Progress { open, received, .. } => self.latest[i] = (open, received),
            Line::Expect { .. } | Line::Storm | Line::Result(_) => {}
        }
    }
}

/// Publishes one event of `size` bytes carrying its send time (`t`, ns);
/// returns the status.
pub(crate) fn publish_one(http: &mut Http, topic: &str, size: usize) -> Result<u16, String> {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let head = format!("{{\"t\":{t},\"p\":\"");
    let body = format!(
        "{head}{}\"}}",
        "x".repeat(size.saturating_sub(head.len() + 2))
    );
    let (status, _) = http.request("POST", &format!("/publish/{topic}"), body.as_bytes())?;
    Ok(status)
}

fn take_sample(
    http: &mut Http,
    pid: Option<u32>,
    started: Instant,
    watch: &Watch,
    published: u64,
) -> Sample {
    let stats = http.stats().ok();
    let total = |name: &str| stats.as_ref().and_then(|s| s["totals"][name].as_u64());
    Sample {
        t_s: started.elapsed().as_secs_f64(),
        rss: pid.and_then(|p| proc_kib(&format!("/proc/{p}/status"), "VmRSS:")),
        connections: total("connections"),
        subscriptions: total("subscriptions"),
        send_queue_bytes: total("send_queue_bytes"),
        unfinished_bytes: total("unfinished_bytes"),
        open_clients: watch.latest.iter().map(|l| l.0).sum(),
        received: watch.latest.iter().map(|l| l.1).sum(),
        published,
    }
}

fn mib(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| {
        format!("{:.1} MiB", v as f64 / (1 << 20) as f64)
    })
}

fn num(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn sample_line(s: &Sample) -> String {
    format!(
        "soak {:>7.1}s  rss {:>10}  connections {:>7}  subscriptions {:>7}  send-queue {:>8} B  unfinished {:>6} B  clients {:>7}  received {:>10}  published {:>8}",
        s.t_s,
        mib(s.rss),
        num(s.connections),
        num(s.subscriptions),
        num(s.send_queue_bytes),
        num(s.unfinished_bytes),
        s.open_clients,
        s.received,
        s.published
    )
}

impl SoakReport {
    fn build(
        args: &Args,
        samples: Vec<Sample>,
        published: u64,
        publish_failures: u64,
        results: &[WorkerResult],
    ) -> SoakReport {
        let sum = |f: fn(&WorkerResult) -> u64| results.iter().map(f).sum::<u64>();
        let failures = super::report::merged_failures(results);
        let settled: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= args.settle).collect();
        let rss_settled = settled.first().and_then(|s| s.rss);
        let rss_max_after = settled.iter().filter_map(|s| s.rss).max();
        let rss_last = samples.last().and_then(|s| s.rss);
        let rss_limit =
            rss_settled.map(|r| (r as f64 * (1.0 + args.tolerance)) as u64 + RSS_SLACK_BYTES);
        let mut report = SoakReport {
            conns: args.conns,
            topics: args.topics,
            duration_s: args.duration,
            rate: args.rate.unwrap_or(50.0),
            churn: args.churn,
            burst: args.burst,
            burst_every_s: args.burst_every,
            samples,
            published,
            publish_failures,
            received: sum(|r| r.messages),
            gaps: sum(|r| r.gaps),
            duplicates: sum(|r| r.duplicates),
            out_of_order: sum(|r| r.out_of_order),
            reconnects: sum(|r| r.reconnects),
            failures,
            latency_ms: percentiles(results.iter().map(|r| r.latency_us.clone())),
            rss_settled,
            rss_max_after,
            rss_last,
            rss_limit,
            problems: Vec::new(),
        };
        report.judge(results.len());
        report
    }

    fn judge(&mut self, workers: usize) {
        let mut problems = Vec::new();
        if self.gaps + self.duplicates + self.out_of_order > 0 {
            problems.push(format!(
                "events lost {}, repeated {}, reordered {}",
                self.gaps, self.duplicates, self.out_of_order
            ));
        }
        if self.publish_failures > 0 {
            problems.push(format!("{} publishes not accepted", self.publish_failures));
        }
        let failed: u64 = self.failures.values().sum();
        if failed > 0 {
            problems.push(format!("connections failed: {:?}", self.failures));
        }
        if self.received == 0 {
            problems.push(format!("no event reached the clients ({workers} workers)"));
        }
        match (self.rss_max_after, self.rss_limit) {
            (Some(max), Some(limit)) if max > limit => problems.push(format!(
                "RSS grew to {} over its settled level {} (limit {})",
                mib(Some(max)),
                mib(self.rss_settled),
                mib(Some(limit))
            )),
            (_, None) => problems.push("no RSS sample after --settle".into()),
            _ => {}
        }
        self.problems = problems;
    }

    fn print(&self) {
        println!(
            "loadgen Soak: {} connections over {} topics for {} s; {} events/s; churn {}/s; bursts of {} every {} s",
            self.conns, self.topics, self.duration_s, self.rate, self.churn, self.burst, self.burst_every_s
        );
        println!(
            "  published                    {} accepted, {} refused",
            self.published, self.publish_failures
        );
        println!("  received                     {} events", self.received);
        println!(
            "  lost / repeated / reordered  {} / {} / {}",
            self.gaps, self.duplicates, self.out_of_order
        );
        println!("  reconnects                   {}", self.reconnects);
        println!("  connection failures          {:?}", self.failures);
        if let Some(p) = &self.latency_ms {
            println!(
                "  publish-to-receive ms        p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                p.p50, p.p99, p.p999, p.max
            );
        }
        let rss: Vec<u64> = self.samples.iter().filter_map(|s| s.rss).collect();
        println!(
            "  server RSS                   first {}, settled {}, max after {}, last {} (limit {}; {} samples)",
            mib(rss.first().copied()),
            mib(self.rss_settled),
            mib(self.rss_max_after),
            mib(self.rss_last),
            mib(self.rss_limit),
            rss.len()
        );
        let queue_max = self.samples.iter().filter_map(|s| s.send_queue_bytes).max();
        let unfinished_max = self.samples.iter().filter_map(|s| s.unfinished_bytes).max();
        println!(
            "  send-queue / unfinished max  {} B / {} B",
            num(queue_max),
            num(unfinished_max)
        );
        let connections: Vec<u64> = self.samples.iter().filter_map(|s| s.connections).collect();
        println!(
            "  server connections           min {}, max {}",
            num(connections.iter().min().copied()),
            num(connections.iter().max().copied())
        );
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
