//! `cargo xtask loadgen SCENARIO`: drives real load at a ringgate (or anything
//! speaking the same protocol, like the baseline server) and reports what it saw
//! next to what the server reports.
//!
//! The parent process orchestrates: it splits the connections over `--procs`
//! worker processes (each under the open-file limit; `--sources` spreads their
//! sockets over loopback source addresses), publishes events for `fanout`,
//! scrapes `/stats`, reads the server's RSS and CPU time from /proc, merges the
//! workers' histograms and prints a table (and `--json`, `--plot`). Every run is
//! bounded by `--timeout` and stops by itself.

pub mod publish;
pub mod reconnect;
pub mod recover;
pub mod report;
pub mod soak;
pub mod thresholds;
pub mod tokens;
pub mod wire;
pub mod worker;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use report::{HoldFigures, Percentiles, Report, ServerFigures};
use wire::Http;
use worker::{Job, Line, WorkerResult};

const SCENARIOS: &str = "Scenarios:
  connect  open --conns WebSocket connections to /ws?topics=... at --ramp per second (or as fast as
           possible) and hold them --hold seconds: connect rate, handshake latency, failures by cause,
           server memory per connection (RSS and direct descriptors from /stats and /proc, and the
           machine's MemAvailable drop).
  fanout   --conns subscribers over --topics topics; publish --events events of --size bytes through
           the control plane at --rate per second (or as fast as it takes them), each carrying its
           send time, from --publishers connections (default 1), --batch events per request
           (above 1: the batch API): delivered events/s, losses per topic, duplicates and
           out-of-order by seq, publish-to-receive latency percentiles. With --topics equal to
           --conns every subscriber has a topic of its own (notifications: \"new mail for user 42\").
  echo     --conns clients on /echo, each with --inflight messages of --size bytes outstanding, for
           --duration seconds: messages/s and round-trip percentiles.
  churn    open and close connections continuously at --rate per second for --duration seconds;
           checks the server's connection gauge returns to where it started (no leak).
  soak     hold --conns subscribers over --topics topics for --duration seconds while publishing
           --rate events per second, closing and reopening --churn connections a second and
           dropping --burst at once every --burst-every seconds; every --sample seconds it records
           the server's RSS and its connection, subscription, send-queue and unfinished-input
           gauges. Fails on any lost, repeated or reordered event, and on RSS growth beyond
           --tolerance once the population is stable (after --settle seconds).
  reconnect
           --conns subscribers over --topics topics (each subscribes with an op and keeps the
           seq and epoch) while --rate events per second (default 50) are published; after --hold
           seconds every connection drops at once and comes back after --down seconds, spread over
           --window seconds (0: all at once), with /ws?recover=TOPIC@SEQ@EPOCH. Reports recovered %,
           events replayed, gaps, duplicates, reordering and time to recover p50/p99; fails on any
           gap, duplicate or reordering, or any subscriber that did not come back.
  publish  --publishers concurrent HTTP connections (round-robin over the control planes of
           --control) publish --events events of --size bytes over --topics topics, each sending
           the next when the last is answered (--batch N: N events per request, JSON lines to
           POST /publish): accepted events/s, answer-time percentiles, refusals, server CPU per
           event. Against a fleet member: publish throughput through Redis.

Examples:
  cargo xtask loadgen connect --conns 50000 --procs 4 --sources 127.0.0.2-127.0.0.20 --hold 10
  cargo xtask loadgen fanout --conns 10000 --events 2000 --size 64 --plot fanout.svg
  cargo xtask loadgen echo --conns 100 --inflight 4 --duration 10 --json echo.json
  cargo xtask loadgen soak --conns 100000 --procs 6 --sources 127.0.0.2-127.0.0.30 --topics 1000 \
      --duration 3600 --rate 50 --churn 100 --burst 10000 --burst-every 300 --json soak.json
  cargo xtask loadgen reconnect --conns 10000 --procs 2 --sources 127.0.0.2-127.0.0.9 --rate 50 \
      --down 1 --window 0 --json storm.json";

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Connect,
    Fanout,
    Echo,
    Churn,
    Soak,
    Reconnect,
    Publish,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Connect => "connect",
            Scenario::Fanout => "fanout",
            Scenario::Echo => "echo",
            Scenario::Churn => "churn",
            Scenario::Soak => "soak",
            Scenario::Reconnect => "reconnect",
            Scenario::Publish => "publish",
        }
    }

    /// What the server's CPU is charged per in this scenario's report.
    pub fn unit(self) -> &'static str {
        match self {
            Scenario::Connect => "connection",
            Scenario::Fanout | Scenario::Soak | Scenario::Reconnect => "delivery",
            Scenario::Echo => "message",
            Scenario::Churn => "connection cycled",
            Scenario::Publish => "event",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = SCENARIOS)]
pub struct Args {
    /// connect | fanout | echo | churn (see below).
    pub scenario: Scenario,
    /// The WebSocket address (ws://HOST:PORT).
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub target: String,
    /// The control plane (http://HOST:PORT): /stats, and /publish for fanout. With --targets it
    /// may list several (http://A,http://B, in the order of --targets): publishes go round-robin
    /// through all of them, and each one's /stats is read.
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    pub control: String,
    /// Mint a token per connection (?token=) signed with HS256 and this secret, for a server
    /// with --auth-hs256-secret.
    #[arg(long)]
    pub token_secret: Option<String>,
    /// Mint a token per connection signed with this private PEM key (ES256, EdDSA or RS256 by
    /// kind), for a server with --auth-public-key.
    #[arg(long)]
    pub token_key: Option<PathBuf>,
    /// publish and fanout: concurrent publishers, each with its own HTTP connection [default:
    /// publish 8, fanout 1].
    #[arg(long)]
    pub publishers: Option<usize>,
    /// publish and fanout: events per request; above 1 they go as JSON lines to the batch API
    /// (POST /publish).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// fanout over a fleet: WebSocket addresses of several hosts (ws://A,ws://B); worker
    /// processes are spread over them round-robin (--procs at least as many). Replaces --target.
    #[arg(long)]
    pub targets: Option<String>,
    /// Connections (connect, fanout, echo).
    #[arg(long, default_value_t = 100)]
    pub conns: usize,
    /// New connections per second over all workers [default: as fast as possible].
    #[arg(long)]
    pub ramp: Option<f64>,
    /// connect: seconds to hold the connections once open; reconnect: seconds of live
    /// publishing before the storm.
    #[arg(long, default_value_t = 2.0)]
    pub hold: f64,
    /// fanout: topics the subscribers are spread over.
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// fanout: events to publish.
    #[arg(long, default_value_t = 1000)]
    pub events: u64,
    /// fanout: event body bytes (at least 40); echo: message bytes (at least 8).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// fanout and soak: events per second; churn: connections per second [fanout default: as
    /// fast as accepted; soak: 50].
    #[arg(long)]
    pub rate: Option<f64>,
    /// soak: connections closed and reopened per second.
    #[arg(long, default_value_t = 10.0)]
    pub churn: f64,
    /// soak: connections dropped at once (and reopened) every --burst-every seconds.
    #[arg(long, default_value_t = 0)]
    pub burst: usize,
    /// reconnect: seconds the dropped connections stay away.
    #[arg(long, default_value_t = 1.0)]
    pub down: f64,
    /// reconnect: seconds their returns are spread over (0: all at once).
    #[arg(long, default_value_t = 0.0)]
    pub window: f64,
    /// soak: seconds between reconnect bursts.
    #[arg(long, default_value_t = 300.0)]
    pub burst_every: f64,
    /// soak: seconds between samples of the server's figures.
    #[arg(long, default_value_t = 5.0)]
    pub sample: f64,
    /// soak: seconds after the population is up before RSS is judged.
    #[arg(long, default_value_t = 30.0)]
    pub settle: f64,
    /// soak: RSS may grow by this fraction (plus 8 MiB) over its level at --settle.
    #[arg(long, default_value_t = 0.10)]
    pub tolerance: f64,
    /// echo: messages outstanding per connection.
    #[arg(long, default_value_t = 1)]
    pub inflight: usize,
    /// echo and churn: seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Loopback source addresses for client sockets: a range (127.0.0.2-127.0.0.60) or a list.
    #[arg(long)]
    pub sources: Option<String>,
    /// Worker processes to split the connections over (each under the open-file limit).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Pin the load generator (all its processes) to this CPU.
    #[arg(long)]
    pub pin: Option<usize>,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw the latency percentile distribution to this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Allow targets outside the loopback range.
    #[arg(long)]
    pub allow_remote: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Pass/fail criterion, k6's form, repeatable: `p99<50ms`, `lost==0`, `rate>=10000`. FIGURE OP
    /// VALUE with OP one of < <= > >= == !=; figures: p50, p90, p99, p99.9, max (ms; us and s
    /// allowed), rate, lost, duplicates, out_of_order, failed, cpu_per_unit (us), rss_per_conn (B).
    /// A crossed one ends the run with exit status 99 (connect, fanout, echo, churn).
    #[arg(long = "threshold", value_name = "EXPR")]
    pub thresholds: Vec<String>,
    /// Workers poll for input without ever sleeping. The server is then not
    /// charged for waking them (on loopback a wake-up runs in the sender's
    /// context), which is closer to clients on other machines. Each worker
    /// keeps a CPU busy.
    #[arg(long)]
    pub spin: bool,
}

pub fn main(args: &Args) -> Result<(), String> {
    let thresholds = thresholds::parse_all(&args.thresholds)?;
    let simple = matches!(
        args.scenario,
        Scenario::Connect | Scenario::Fanout | Scenario::Echo | Scenario::Churn
    );
    if !thresholds.is_empty() && !simple {
        return Err(format!(
            "--threshold applies to connect, fanout, echo and churn; {:?} has its own verdict",
            args.scenario
        ));
    }
    if args.scenario == Scenario::Soak {
        return soak::main(args);
    }
    if args.scenario == Scenario::Reconnect {
        return reconnect::main(args);
    }
    if args.scenario == Scenario::Publish {
        return publish::main(args);
    }
    let report = run(args)?;
    report.print();
    let outcomes: Vec<thresholds::Outcome> = thresholds.iter().map(|t| t.check(&report)).collect();
    thresholds::print(&outcomes);
    write_json(args, &report::Output::new(args, &outcomes, &report))?;
    if let Some(path) = &args.plot {
        report::plot(&report, path)?;
    }
    report.verdict()?;
    thresholds::verdict(&outcomes)
}

/// The WebSocket target, the control plane and the source addresses of a run;
/// any of them off the loopback range is refused unless `--allow-remote`.
pub(crate) fn endpoints(args: &Args) -> Result<(SocketAddr, SocketAddr, Vec<IpAddr>), String> {
    let hosts = fleet_endpoints(args)?;
    Ok((hosts.targets[0], hosts.controls[0], hosts.sources))
}

/// The hosts of a run: every WebSocket target (`--targets`, or `--target`),
/// every control plane, and the source addresses.
pub(crate) struct Hosts {
    pub targets: Vec<SocketAddr>,
    pub controls: Vec<SocketAddr>,
    pub sources: Vec<IpAddr>,
}

pub(crate) fn fleet_endpoints(args: &Args) -> Result<Hosts, String> {
    let targets = match &args.targets {
        Some(list) => list
            .split(',')
            .map(|t| address(t.trim(), "ws://"))
            .collect::<Result<Vec<_>, _>>()?,
        None => vec![address(&args.target, "ws://")?],
    };
    let controls = args
        .control
        .split(',')
        .map(|c| address(c.trim(), "http://"))
        .collect::<Result<Vec<_>, _>>()?;
    if controls.len() > 1 && controls.len() != targets.len() && args.scenario != Scenario::Publish {
        return Err(format!(
            "--control lists {} control planes for {} targets: give one, or one per target in the same order",
            controls.len(),
            targets.len()
        ));
    }
    if targets.len() > 1 && args.scenario != Scenario::Fanout {
        return Err("--targets is for the fanout scenario".into());
    }
    if targets.len() > args.procs {
        return Err(format!(
            "--targets names {} hosts: use --procs {} or more (a worker process loads one host)",
            targets.len(),
            targets.len()
        ));
    }
    let sources = parse_sources(args.sources.as_deref())?;
    for ip in targets
        .iter()
        .chain(&controls)
        .map(SocketAddr::ip)
        .chain(sources.iter().copied())
    {
        if !ip.is_loopback() && !args.allow_remote {
            return Err(format!(
                "{ip} is not a loopback address; pass --allow-remote to load another host"
            ));
        }
    }
    Ok(Hosts {
        targets,
        controls,
        sources,
    })
}

/// Writes `report` to `--json`, if given.
pub(crate) fn write_json(args: &Args, report: &impl Serialize) -> Result<(), String> {
    let Some(path) = &args.json else {
        return Ok(());
    };
    let text = serde_json::to_string_pretty(report).expect("serialisable");
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs a scenario and returns its report.
pub fn run(args: &Args) -> Result<Report, String> {
    if args.procs == 0 || args.procs > 64 {
        return Err("--procs must be from 1 to 64".into());
    }
    let hosts = fleet_endpoints(args)?;
    let (target, control, sources) = (hosts.targets[0], hosts.controls[0], hosts.sources.clone());
    if args.scenario == Scenario::Fanout && args.size < 40 {
        return Err("fanout --size must be at least 40 bytes (events carry a timestamp)".into());
    }
    if let Some(cpu) = args.pin {
        pin_to(cpu);
    }
    let server_pid = pid_listening_on(target.port());
    // The server's figures (and fanout's publishes) come from the control
    // plane: a run without it would report zeros as if measured.
    let mut http = Some(Http::connect(control).map_err(|e| {
        format!("the control plane at {control} does not answer ({e}): pass the server's --control address")
    })?);
    let stats_before = http.as_mut().and_then(|h| h.stats().ok());
    // Tokens are minted before the clock starts: signing is the client's cost.
    let tokens = tokens::mint_for(args)?;
    let before = Sample::take(server_pid);
    let started = Instant::now();
    let mut workers = spawn_workers(args, &hosts.targets, &sources, tokens.as_deref())?;
    let rx = worker_lines(&mut workers);
    let progress = Progress::new(args);
    let deadline = started + Duration::from_secs_f64(args.timeout + 10.0);
    let mut ready = 0;
    let mut connected_at = None;
    let mut after = None;
    let mut stats_after = None;
    // connect: the server's cost while the connections sit idle, sampled just
    // before the workers let go (closing would be counted otherwise).
    let mut hold_until: Option<Instant> = None;
    let mut held = None;
    let mut published = Published::default();
    let mut results: Vec<Option<WorkerResult>> = (0..workers.len()).map(|_| None).collect();
    let mut progress_by_worker = vec![Snapshot::default(); workers.len()];
    let mut series: Vec<report::Point> = Vec::new();
    while results.iter().any(Option::is_none) {
        let now = Instant::now();
        if hold_until.is_some_and(|u| now >= u) {
            hold_until = None;
            held = Some((
                Sample::take(server_pid),
                http.as_mut().and_then(|h| h.stats().ok()),
            ));
        }
        let left = deadline.saturating_duration_since(now);
        let wait = hold_until.map_or(left, |u| left.min(u.saturating_duration_since(now)));
        let (i, line) = match rx.recv_timeout(wait) {
            Ok(x) => x,
            Err(mpsc::RecvTimeoutError::Timeout) if hold_until.is_some() => continue,
            Err(_) => break,
        };
        match line {
            Line::Progress {
                connected,
                failed,
                received,
                gaps,
                duplicates,
                out_of_order,
                p99_us,
                ..
            } => {
                progress_by_worker[i] = Snapshot {
                    connected,
                    failed,
                    received,
                    losses: gaps + duplicates + out_of_order,
                    p99_us,
                };
                if let Some(point) = progress.update(&progress_by_worker) {
                    series.push(point);
                }
            }
            Line::Ready => {
                ready += 1;
                if ready < workers.len() {
                    continue;
                }
                connected_at = Some(started.elapsed());
                after = Some(Sample::take(server_pid));
                stats_after = http.as_mut().and_then(|h| h.stats().ok());
                if args.scenario == Scenario::Connect && args.hold >= 2.0 {
                    hold_until = Some(Instant::now() + Duration::from_secs_f64(args.hold - 0.5));
                }
                if args.scenario == Scenario::Fanout {
                    // Each control plane counts its own host's subscribers.
                    let mut controls = hosts
                        .controls
                        .iter()
                        .map(|&c| Http::connect(c))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| format!("fanout needs the control plane (--control): {e}"))?;
                    for (h, http) in controls.iter_mut().enumerate() {
                        let subscribers: u64 = progress_by_worker
                            .iter()
                            .enumerate()
                            .filter(|(w, _)| w % hosts.targets.len() == h)
                            .map(|(_, p)| p.connected)
                            .sum();
                        wait_for_subscriptions(http, subscribers)?;
                    }
                    if controls.len() < hosts.targets.len() {
                        // Hosts without a control plane here: give their
                        // links a moment to subscribe on the bus.
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    drop(controls);
                    published = publish::fanout(&hosts.controls, args)?;
                    let line = serde_json::to_string(&Line::Expect {
                        per_topic: published.per_topic.clone(),
                    })
                    .expect("serialisable");
                    for w in &mut workers {
                        let stdin = w.stdin.as_mut().expect("piped");
                        let _ = writeln!(stdin, "{line}");
                        let _ = stdin.flush();
                    }
                }
            }
            Line::Result(result) => results[i] = Some(*result),
            Line::Expect { .. } | Line::Storm => {}
        }
    }
    progress.finish();
    // Every worker has reported and still holds its connections: the end of
    // the measured work, before the connections close.
    let work_end = Sample::take(server_pid);
    for mut w in workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let results: Vec<WorkerResult> = results.into_iter().map(|r| r.unwrap_or_default()).collect();
    let end = Sample::take(server_pid);
    let stats_end = http.as_mut().and_then(|h| h.stats().ok());
    let total = |s: &Option<serde_json::Value>, name: &str| {
        s.as_ref().and_then(|s| s["totals"][name].as_u64())
    };
    let connections_before = total(&stats_before, "connections");
    let connections_end = match args.scenario {
        Scenario::Churn => settle_connections(http.as_mut(), connections_before),
        _ => total(&stats_end, "connections"),
    };
    let figures = ServerFigures {
        pid: server_pid,
        rss_before: after.as_ref().and(before.rss),
        rss_after: after.as_ref().and_then(|a| a.rss),
        // fanout and echo: from all connected to all reported, so opening and
        // closing the connections is not charged to the messages; connect and
        // churn: the whole run, since connections are their work.
        cpu_seconds: match args.scenario {
            Scenario::Fanout | Scenario::Echo => after
                .as_ref()
                .and_then(|a| a.cpu)
                .zip(work_end.cpu)
                .map(|(a, b)| b - a),
            Scenario::Connect
            | Scenario::Churn
            | Scenario::Soak
            | Scenario::Reconnect
            | Scenario::Publish => before.cpu.zip(end.cpu).map(|(a, b)| b - a),
        },
        mem_available_drop: after
            .as_ref()
            .and_then(|a| before.mem_available.zip(a.mem_available))
            .map(|(a, b)| a.saturating_sub(b)),
        // The measured work's window, as for the CPU figures of fanout and echo.
        steal_percent: after
            .as_ref()
            .and_then(|a| a.ticks)
            .zip(work_end.ticks)
            .and_then(|(a, b)| a.steal_percent(b)),
        // ringgate's own histogram (publish to send completion) over the
        // server's life: the run's deliveries when the server was started for it.
        delivery_ms: (args.scenario == Scenario::Fanout)
            .then(|| {
                let p = |q: &str| {
                    stats_end.as_ref()?["totals"][&format!("delivery_latency_{q}_seconds")]
                        .as_f64()
                        .map(|s| s * 1e3)
                };
                p("p50").zip(p("p99"))
            })
            .flatten(),
        connections_before,
        connections_after: total(&stats_after, "connections"),
        connections_end,
        direct_descriptors_after: total(&stats_after, "direct_descriptors"),
        messages_sent_before: total(&stats_before, "messages_sent_total"),
        messages_sent_end: total(&stats_end, "messages_sent_total"),
        hold: after
            .as_ref()
            .zip(held.as_ref())
            .and_then(|(a, (h, stats_held))| {
                Some(HoldFigures {
                    seconds: h.at.duration_since(a.at).as_secs_f64(),
                    server_cpu_seconds: h.cpu? - a.cpu?,
                    machine_cpu_seconds: h.ticks.zip(a.ticks).map(|(h, a)| a.busy_seconds(h)),
                    pings_sent: total(stats_held, "pings_sent_total")
                        .zip(total(&stats_after, "pings_sent_total"))
                        .map(|(h, a)| h.saturating_sub(a)),
                })
            }),
    };
    let mut report = Report::build(args, &results, &published, connected_at, figures);
    report.elapsed_seconds = started.elapsed().as_secs_f64();
    report.series = series;
    Ok(report)
}

/// The workers' lines, each with its worker's index, on one channel (a reader
/// thread per worker's stdout).
pub(crate) fn worker_lines(workers: &mut [Child]) -> mpsc::Receiver<(usize, Line)> {
    let (tx, rx) = mpsc::channel();
    for (i, w) in workers.iter_mut().enumerate() {
        let stdout = w.stdout.take().expect("piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(line) = serde_json::from_str::<Line>(&line) {
                    if tx.send((i, line)).is_err() {
                        break;
                    }
                }
            }
        });
    }
    rx
}

/// Connections back to the count before the run (churn: no leak), or what it is after waiting.
fn settle_connections(http: Option<&mut Http>, before: Option<u64>) -> Option<u64> {
    let http = http?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = http
            .stats()
            .ok()
            .and_then(|s| s["totals"]["connections"].as_u64());
        if now == before || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the server counts `subscribers` subscriptions and, for a fleet
/// member, every topic it follows is live on the bus (an event published before
/// would reach Redis but not this host).
pub(crate) fn wait_for_subscriptions(http: &mut Http, subscribers: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = http.stats()?;
        let totals = &stats["totals"];
        let fleet_live = match totals.get("broker_subscriptions") {
            Some(followed) => totals["broker_up"] == 1 && totals["broker_topics_live"] == *followed,
            None => true,
        };
        if totals["subscriptions"].as_u64().unwrap_or(0) >= subscribers && fleet_live {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the server never counted {subscribers} subscriptions: {}",
                stats["totals"]
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the publisher got accepted.
#[derive(Debug, Default, Clone)]
pub struct Published {
    pub per_topic: BTreeMap<String, u64>,
    pub accepted: u64,
    pub busy: u64,
    pub seconds: f64,
}

/// Starts `--procs` workers; worker `p` loads `targets[p % targets.len()]`.
pub(crate) fn spawn_workers(
    args: &Args,
    targets: &[SocketAddr],
    sources: &[IpAddr],
    tokens: Option<&Path>,
) -> Result<Vec<Child>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let procs = args.procs;
    let mut first = 0;
    let mut children = Vec::with_capacity(procs);
    for p in 0..procs {
        let conns = args.conns / procs + usize::from(p < args.conns % procs);
        let ramp = match args.scenario {
            Scenario::Churn => args.rate.unwrap_or(100.0) / procs as f64,
            _ => args.ramp.unwrap_or(0.0) / procs as f64,
        };
        let job = Job {
            scenario: args.scenario,
            target: targets[p % targets.len()],
            conns: if args.scenario == Scenario::Churn {
                0
            } else {
                conns
            },
            first,
            topics: args.topics,
            ramp,
            sources: sources.to_vec(),
            inflight: args.inflight,
            size: args.size,
            duration_s: args.duration,
            hold_s: args.hold,
            spin: args.spin,
            // A soak runs for its duration; --timeout bounds what comes after.
            deadline_s: match args.scenario {
                Scenario::Soak | Scenario::Reconnect => args.duration + args.timeout,
                _ => args.timeout,
            },
            churn: args.churn / procs as f64,
            burst: args.burst / procs + usize::from(p < args.burst % procs),
            burst_every_s: args.burst_every,
            down_s: args.down,
            window_s: args.window,
            tokens: tokens.map(Path::to_path_buf),
        };
        first += conns;
        let child = Command::new(&exe)
            .arg("loadgen-worker")
            .arg(serde_json::to_string(&job).expect("serialisable"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting a worker: {e}"))?;
        children.push(child);
    }
    Ok(children)
}

/// Server and machine figures read at one moment.
struct Sample {
    at: Instant,
    rss: Option<u64>,
    cpu: Option<f64>,
    ticks: Option<CpuTicks>,
    mem_available: Option<u64>,
}

impl Sample {
    fn take(pid: Option<u32>) -> Sample {
        Sample {
            at: Instant::now(),
            rss: pid.and_then(|p| proc_kib(&format!("/proc/{p}/status"), "VmRSS:")),
            cpu: pid.and_then(cpu_seconds),
            ticks: CpuTicks::read(),
            mem_available: proc_kib("/proc/meminfo", "MemAvailable:"),
        }
    }
}

/// Every CPU's time so far, in clock ticks: all of it, what was busy (user,
/// nice, system, irq and softirq: kernel work such as TCP keepalive probes
/// that no process is charged for), and what the hypervisor gave to other
/// guests (`steal`).
#[derive(Clone, Copy)]
struct CpuTicks {
    all: u64,
    busy: u64,
    steal: u64,
}

impl CpuTicks {
    fn read() -> Option<CpuTicks> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let line = text.lines().next()?.strip_prefix("cpu ")?;
        let f: Vec<u64> = line
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest and guest_nice
        // are already in user and nice).
        Some(CpuTicks {
            all: f.iter().take(8).sum(),
            busy: f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?,
            steal: *f.get(7)?,
        })
    }

    /// The busy time from `self` to `later`, in seconds.
    fn busy_seconds(self, later: CpuTicks) -> f64 {
        // SAFETY: sysconf has no pointer arguments.
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        later.busy.saturating_sub(self.busy) as f64 / tick
    }

    /// The share of the time from `self` to `later` stolen, in percent.
    fn steal_percent(self, later: CpuTicks) -> Option<f64> {
        let all = later.all.checked_sub(self.all).filter(|&t| t > 0)?;
        Some(100.0 * later.steal.saturating_sub(self.steal) as f64 / all as f64)
    }
}

pub(crate) fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// utime + stime of a process, in seconds.
/// CPU time a process has used, all its threads (those gone included), in
/// seconds: from its CPU-time clock (nanoseconds), else from /proc in 10 ms
/// ticks.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_clock_seconds(pid).or_else(|| cpu_tick_seconds(pid))
}

fn cpu_clock_seconds(pid: u32) -> Option<f64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid place for the clock id.
    if unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) } != 0 {
        return None;
    }
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write.
    if unsafe { libc::clock_gettime(clock, &mut t) } != 0 {
        return None;
    }
    Some(t.tv_sec as f64 + t.tv_nsec as f64 / 1e9)
}

fn cpu_tick_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no pointer arguments.
    Some(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// The process that holds a listening TCP socket on `port` on this machine
/// (found through /proc/net/tcp and the processes' fds), for RSS and CPU time.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && f.get(3) == Some(&"0A") {
                inodes.push(format!("socket:[{}]", f.get(9)?));
            }
        }
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| link.to_string_lossy() == *i) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

pub(crate) fn address(url: &str, scheme: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix(scheme)
        .ok_or_else(|| format!("{url}: expected {scheme}HOST:PORT"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    hostport
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: no address"))
}

/// `127.0.0.2-127.0.0.60` or `127.0.0.2,127.0.0.3`.
pub fn parse_sources(text: Option<&str>) -> Result<Vec<IpAddr>, String> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for part in text.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (
                    a.trim().parse().map_err(|_| format!("bad address {a}"))?,
                    b.trim().parse().map_err(|_| format!("bad address {b}"))?,
                );
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a || b - a > 65536 {
                    return Err(format!("bad range {part}"));
                }
                out.extend((a..=b).map(|n| IpAddr::V4(n.into())));
            }
            None => out.push(
                part.trim()
                    .parse()
                    .map_err(|_| format!("bad address {part}"))?,
            ),
        }
    }
    Ok(out)
}

pub(crate) fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; the call reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The live progress line.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    /// Without a terminal: print a plain line this often (CI logs).
    plain_every: Option<Duration>,
    started: Instant,
    /// The last second sampled: (seconds since start, events received).
    last: std::cell::Cell<(u64, u64)>,
    last_plain: std::cell::Cell<Instant>,
    scenario: Scenario,
}

/// One worker's latest progress.
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    connected: u64,
    failed: u64,
    received: u64,
    losses: u64,
    p99_us: u64,
}

/// How often a run without a terminal prints its progress line.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    fn new(args: &Args) -> Progress {
        use std::io::IsTerminal;
        let terminal = std::io::stderr().is_terminal();
        // Churn's own count: the connections it will have opened and closed.
        let (len, what) = if args.scenario == Scenario::Churn {
            let cycles = args.rate.unwrap_or(100.0) * args.duration;
            (cycles as u64, "opened")
        } else {
            (args.conns as u64, "connected")
        };
        let bar = (!args.quiet && terminal).then(|| {
            let bar = indicatif::ProgressBar::new(len);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{spinner}} {{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {what}  {{msg}}"
                ))
                .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            plain_every: (!args.quiet && !terminal).then_some(PLAIN_PROGRESS_EVERY),
            started: Instant::now(),
            last: std::cell::Cell::new((0, 0)),
            last_plain: std::cell::Cell::new(Instant::now()),
            scenario: args.scenario,
        }
    }

    /// Shows the workers' progress; once a second, returns a point of the
    /// run's time series.
    fn update(&self, workers: &[Snapshot]) -> Option<report::Point> {
        let mut t = Snapshot::default();
        for w in workers {
            t.connected += w.connected;
            t.failed += w.failed;
            t.received += w.received;
            t.losses += w.losses;
            t.p99_us = t.p99_us.max(w.p99_us);
        }
        let what = match self.scenario {
            Scenario::Fanout | Scenario::Soak | Scenario::Reconnect => "events",
            Scenario::Echo => "echoes",
            Scenario::Churn => "cycles",
            Scenario::Connect | Scenario::Publish => "",
        };
        let elapsed = self.started.elapsed();
        let second = elapsed.as_secs();
        let (last_second, last_received) = self.last.get();
        let point = (second > last_second).then(|| {
            self.last.set((second, t.received));
            report::Point {
                t_s: second,
                connected: t.connected,
                failed: t.failed,
                received: t.received,
                per_second: (t.received - last_received.min(t.received)) as f64
                    / (second - last_second) as f64,
                p99_ms: t.p99_us as f64 / 1000.0,
                losses: t.losses,
            }
        });
        let rate = point.as_ref().map_or(0.0, |p| p.per_second);
        let line = format!(
            "{} failed  {} {what} ({rate:.0}/s)  p99 {:.2} ms  lost/dup/reordered {}",
            t.failed,
            t.received,
            t.p99_us as f64 / 1000.0,
            t.losses
        );
        if let Some(bar) = &self.bar {
            bar.set_position(t.connected);
            if point.is_some() {
                bar.set_message(line);
            }
        } else if let Some(every) = self.plain_every {
            if point.is_some() && self.last_plain.get().elapsed() >= every {
                self.last_plain.set(Instant::now());
                let what = if self.scenario == Scenario::Churn {
                    "opened"
                } else {
                    "connected"
                };
                eprintln!(
                    "loadgen {:>6.1}s  {} {what}  {line}",
                    elapsed.as_secs_f64(),
                    t.connected
                );
            }
        }
        point
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Merges (value, count) lists into one histogram's percentiles.
pub fn percentiles(parts: impl Iterator<Item = Vec<(u64, u64)>>) -> Option<Percentiles> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
    for part in parts {
        for (value, count) in part {
            let _ = h.record_n(value, count);
        }
    }
    Percentiles::of(&h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_the_stolen_share_of_the_window() {
        let at = |all, steal| CpuTicks {
            all,
            busy: 0,
            steal,
        };
        assert_eq!(at(1000, 10).steal_percent(at(1400, 30)), Some(5.0));
        assert_eq!(
            at(1000, 10).steal_percent(at(1000, 10)),
            None,
            "no time passed"
        );
        let now = CpuTicks::read().expect("/proc/stat has a cpu line");
        assert!(now.steal <= now.all);
    }

    #[test]
    fn sources_parse() {
        assert_eq!(parse_sources(Some("127.0.0.2-127.0.0.4")).unwrap().len(), 3);
        assert_eq!(parse_sources(Some("127.0.0.2,127.0.0.9")).unwrap().len(), 2);
        assert!(parse_sources(Some("127.0.0.9-127.0.0.2")).is_err());
        assert!(parse_sources(None).unwrap().is_empty());
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(
            address("ws://127.0.0.1:8080", "ws://").unwrap().port(),
            8080
        );
        assert!(address("http://127.0.0.1:9", "ws://").is_err());
    }
}
