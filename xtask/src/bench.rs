//! `cargo xtask bench`: the standard scenarios against ringgate and the
//! baseline server (tokio + tokio-tungstenite), alternately, each on a fresh
//! server pinned to CPU 0 with the load generator pinned to CPU 1. Before the
//! connect scenario both servers get the same short echo warm-up, so memory per
//! connection excludes fixed memory touched by a server's first traffic. Prints one
//! table: each figure for both servers and the ratio (baseline / ringgate, so
//! above 1 means ringgate is better for costs and latencies, and for rates the
//! other way round: ringgate / baseline).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::loadgen::report::Report;
use crate::loadgen::{self, Scenario};

#[derive(clap::Args)]
pub struct Args {
    /// A two-minute version with smaller figures.
    #[arg(long)]
    quick: bool,
    /// CPU for the servers (the load generator takes --loadgen-cpu).
    #[arg(long, default_value_t = 0)]
    server_cpu: usize,
    #[arg(long, default_value_t = 1)]
    loadgen_cpu: usize,
    /// Run one section only: `auth` (the connect scenario with tokens), `burst` (burst fanout
    /// against tokio-tungstenite writing in batches), `notify` (a topic per subscriber against
    /// broadcast, bench_notify.rs). The full run has them all.
    #[arg(long, value_parser = ["auth", "burst", "notify"])]
    only: Option<String>,
}

pub(crate) struct Server {
    pub child: Child,
    pub ws: String,
    pub control: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Ringgate,
    /// ringgate with send-queue recycling off (`--no-recycle`): what recycling
    /// saves per delivery, measured in the same run.
    RinggateNoRecycle,
    Baseline,
    /// The baseline binary serving `/echo` with fastwebsockets: the best echo
    /// peer in issue 6's table, measured in the same run.
    FastEcho,
    /// The baseline writing as a tuned tokio-tungstenite pub/sub server does
    /// (`--writes batched`): the burst-fanout peer of issue 15.
    BaselineBatched,
}

fn start(kind: Kind, cpu: usize) -> Result<Server, String> {
    start_with(kind, cpu, &[])
}

/// [`start`] with more arguments for the server (`--shards` among them replaces the one shard).
pub(crate) fn start_with(kind: Kind, cpu: usize, extra: &[&str]) -> Result<Server, String> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release"));
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpu.to_string()]);
    match kind {
        Kind::Ringgate | Kind::RinggateNoRecycle => cmd
            .arg(dir.join("ringgate"))
            .args(if extra.contains(&"--shards") {
                &[][..]
            } else {
                &["--shards", "1"][..]
            })
            .args([
                "--echo",
                "--listen",
                "127.0.0.1:0",
                "--control",
                "127.0.0.1:0",
            ]),
        Kind::Baseline | Kind::FastEcho | Kind::BaselineBatched => {
            cmd.arg(dir.join("ringgate-baseline")).args([
                "--threads",
                "1",
                "--listen",
                "127.0.0.1:0",
                "--control",
                "127.0.0.1:0",
            ])
        }
    };
    if kind == Kind::FastEcho {
        cmd.args(["--engine", "fastwebsockets"]);
    }
    if kind == Kind::RinggateNoRecycle {
        cmd.arg("--no-recycle");
    }
    if kind == Kind::BaselineBatched {
        cmd.args(["--writes", "batched"]);
    }
    cmd.args(extra);
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting a server: {e}"))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .map(String::from)
            .ok_or_else(|| format!("server did not start: {line:?}"))
    };
    Ok(Server {
        ws: field("ws")?,
        control: field("control")?,
        child,
    })
}

/// Steady fanout: 10,000 subscribers (2,000 quick), 5 events a second.
fn steady(quick: bool) -> (usize, usize, f64) {
    if quick {
        (2_000, 20, 5.0)
    } else {
        (10_000, 60, 5.0)
    }
}

fn args_for(
    scenario: Scenario,
    server: &Server,
    quick: bool,
    cpu: usize,
    paced: bool,
) -> loadgen::Args {
    let mut a = base_args(scenario, &server.ws, &server.control, quick);
    a.pin = Some(cpu);
    match scenario {
        Scenario::Connect => a.conns = if quick { 5_000 } else { 15_000 },
        Scenario::Fanout => {
            a.conns = if quick { 2_000 } else { 10_000 };
            a.events = if quick { 200 } else { 500 };
        }
        Scenario::Echo => a.conns = 100,
        Scenario::Churn | Scenario::Soak | Scenario::Reconnect | Scenario::Publish => {}
    }
    if paced {
        let (conns, events, rate) = steady(quick);
        (a.conns, a.events, a.rate) = (conns, events as u64, Some(rate));
    }
    a
}

/// The load generator's settings for `scenario` against one server (`ws` and
/// `control` as HOST:PORT), quiet, unpinned, the counts left at 0.
pub(crate) fn base_args(scenario: Scenario, ws: &str, control: &str, quick: bool) -> loadgen::Args {
    loadgen::Args {
        scenario,
        target: format!("ws://{ws}"),
        control: format!("http://{control}"),
        targets: None,
        publishers: None,
        batch: 1,
        token_secret: None,
        token_key: None,
        conns: 0,
        ramp: None,
        hold: 2.0,
        down: 1.0,
        window: 0.0,
        topics: 1,
        events: 0,
        size: 64,
        rate: None,
        inflight: 1,
        duration: if quick { 3.0 } else { 10.0 },
        sources: None,
        procs: 1,
        pin: None,
        json: None,
        plot: None,
        allow_remote: false,
        timeout: 120.0,
        quiet: true,
        thresholds: Vec::new(),
        spin: false,
        churn: 0.0,
        burst: 0,
        burst_every: 300.0,
        sample: 5.0,
        settle: 30.0,
        tolerance: 0.10,
    }
}

/// One second of echo traffic in large messages before measuring memory per
/// connection, the same for both servers: a server's fixed memory (ringgate's
/// receive-buffer ring, an allocator's arenas) is touched by its first traffic,
/// and is not a cost per connection. Connections close before the measurement.
pub(crate) fn warm_up(server: &Server, cpu: usize) -> Result<(), String> {
    let mut warm = args_for(Scenario::Echo, server, true, cpu, false);
    warm.conns = 10;
    warm.inflight = 8;
    warm.size = 16 * 1024;
    warm.duration = 1.0;
    loadgen::run(&warm)?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    Ok(())
}

/// (figure, unit, value, lower is better)
type Row = (String, &'static str, Option<f64>, bool);

fn rows(scenario: Scenario, paced: bool, r: &Report) -> Vec<Row> {
    let lat = |p: &Option<loadgen::report::Percentiles>,
               q: fn(&loadgen::report::Percentiles) -> f64| p.as_ref().map(q);
    if paced {
        return vec![
            (
                format!("fanout {} subs at 5 ev/s: CPU / delivery", r.conns),
                "us",
                r.server_cpu_us_per_message,
                true,
            ),
            (
                "fanout at 5 ev/s: latency p99".into(),
                "ms",
                lat(&r.latency_ms, |p| p.p99),
                true,
            ),
            (
                "fanout at 5 ev/s: lost".into(),
                "",
                Some(r.lost() as f64),
                true,
            ),
        ];
    }
    match scenario {
        Scenario::Connect => vec![
            (
                format!("connect {}: server RSS / idle conn", r.conns),
                "B",
                r.rss_per_connection,
                true,
            ),
            (
                "connect: MemAvailable drop / conn".into(),
                "B",
                r.mem_available_drop_per_connection,
                true,
            ),
            (
                "connect: connects/s".into(),
                "/s",
                r.connects_per_second,
                false,
            ),
            (
                "connect: handshake p99".into(),
                "ms",
                lat(&r.handshake_ms, |p| p.p99),
                true,
            ),
            (
                "connect: server CPU / connection".into(),
                "us",
                r.server_cpu_us_per_message,
                true,
            ),
        ],
        Scenario::Fanout => vec![
            (
                format!("fanout {} subs x 64 B: deliveries/s", r.conns),
                "/s",
                r.deliveries_per_second,
                false,
            ),
            (
                "fanout: server CPU / delivery".into(),
                "us",
                r.server_cpu_us_per_message,
                true,
            ),
            (
                "fanout: latency p50".into(),
                "ms",
                lat(&r.latency_ms, |p| p.p50),
                true,
            ),
            (
                "fanout: latency p99".into(),
                "ms",
                lat(&r.latency_ms, |p| p.p99),
                true,
            ),
            ("fanout: lost".into(), "", Some(r.lost() as f64), true),
        ],
        Scenario::Echo => vec![
            (
                "echo 100 x 64 B: messages/s".into(),
                "/s",
                r.messages_per_second,
                false,
            ),
            (
                "echo: server CPU / message".into(),
                "us",
                r.server_cpu_us_per_message,
                true,
            ),
            (
                "echo: round trip p99".into(),
                "ms",
                lat(&r.latency_ms, |p| p.p99),
                true,
            ),
        ],
        Scenario::Churn | Scenario::Soak | Scenario::Reconnect | Scenario::Publish => vec![],
    }
}

pub fn run(args: &Args) -> Result<(), String> {
    crate::process::cargo(&[
        "build",
        "--release",
        "-p",
        "ringgate",
        "-p",
        "ringgate-baseline",
    ])?;
    match args.only.as_deref() {
        Some("auth") => return auth(args),
        Some("burst") => return burst(args),
        Some("notify") => {
            return crate::bench_notify::run(args.quick, args.server_cpu, args.loadgen_cpu)
        }
        _ => {}
    }
    let mut table: Vec<(Row, Option<f64>)> = Vec::new();
    let mut steady_cpu = Vec::new();
    let mut echo_cpu = Vec::new();
    for (scenario, paced) in [
        (Scenario::Connect, false),
        (Scenario::Fanout, false),
        (Scenario::Fanout, true),
        (Scenario::Echo, false),
    ] {
        let mut reports = Vec::new();
        for kind in [Kind::Ringgate, Kind::Baseline] {
            let server = start(kind, args.server_cpu)?;
            if scenario == Scenario::Connect {
                warm_up(&server, args.loadgen_cpu)?;
            }
            let report = loadgen::run(&args_for(
                scenario,
                &server,
                args.quick,
                args.loadgen_cpu,
                paced,
            ))?;
            if paced {
                steady_cpu.push(report.server_cpu_us_per_message);
            }
            if scenario == Scenario::Echo {
                echo_cpu.push(report.server_cpu_us_per_message);
            }
            eprintln!(
                "bench: {scenario:?} on {}: done",
                if kind == Kind::Ringgate {
                    "ringgate"
                } else {
                    "baseline"
                }
            );
            reports.push(report);
        }
        for (ours, theirs) in
            rows(scenario, paced, &reports[0])
                .into_iter()
                .zip(rows(scenario, paced, &reports[1]))
        {
            table.push((ours, theirs.2));
        }
    }
    println!(
        "{:<44} {:>14} {:>14} {:>9}",
        "figure", "ringgate", "baseline", "ratio"
    );
    for ((name, unit, ours, lower_better), theirs) in table {
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{} {unit}", human(v)));
        let ratio = match (ours, theirs) {
            (Some(o), Some(t)) if o > 0.0 && t > 0.0 => {
                format!("{:.2}x", if lower_better { t / o } else { o / t })
            }
            _ => "-".into(),
        };
        println!(
            "{name:<44} {:>14} {:>14} {ratio:>9}",
            show(ours),
            show(theirs)
        );
    }
    println!("ratio: how many times better ringgate is (baseline/ringgate for costs and latencies, ringgate/baseline for rates)");
    let (conns, events, rate) = steady(args.quick);
    let floor = crate::floor::measure_floor(&crate::floor::Args::new(conns, events, rate, 64))?;
    println!(
        "kernel floor (no server: one 64 B write per socket to {conns} sleeping readers at {rate}/s): \
         {} us per write with io_uring, {} us with send()",
        human(floor.uring_us),
        human(floor.plain_us)
    );
    if let [Some(ours), Some(theirs)] = steady_cpu[..] {
        println!(
            "fanout at 5 ev/s, server CPU per delivery over the floor: ringgate {:.2}x, baseline {:.2}x",
            ours / floor.uring_us,
            theirs / floor.uring_us
        );
    }
    // Send-queue recycling (issue 10, item 15): the steady scenario again on a
    // ringgate that allocates a queue per delivery, then on one that recycles.
    let mut recycling = Vec::new();
    for kind in [Kind::RinggateNoRecycle, Kind::Ringgate] {
        let server = start(kind, args.server_cpu)?;
        let a = args_for(
            Scenario::Fanout,
            &server,
            args.quick,
            args.loadgen_cpu,
            true,
        );
        recycling.push(loadgen::run(&a)?.server_cpu_us_per_message);
    }
    if let [Some(without), Some(with)] = recycling[..] {
        println!(
            "fanout at 5 ev/s, server CPU per delivery: {} us allocating each send queue (--no-recycle), {} us recycling them ({:.2}x)",
            human(without),
            human(with),
            without / with
        );
    }
    let peer = {
        let server = start(Kind::FastEcho, args.server_cpu)?;
        loadgen::run(&args_for(
            Scenario::Echo,
            &server,
            args.quick,
            args.loadgen_cpu,
            false,
        ))?
    };
    if let (Some(ours), Some(theirs)) = (echo_cpu[0], peer.server_cpu_us_per_message) {
        println!(
            "echo peer (fastwebsockets, one task per connection): {} us per message, {:.0}/s; ringgate {:.2}x better",
            human(theirs),
            peer.messages_per_second.unwrap_or(0.0),
            theirs / ours
        );
    }
    auth(args)?;
    burst(args)?;
    crate::bench_notify::run(args.quick, args.server_cpu, args.loadgen_cpu)?;
    let echo = crate::floor_echo::measure(100, 64, if args.quick { 3.0 } else { 10.0 })?;
    println!(
        "echo floor (the plainest epoll server: one recv() and one send() per message, no WebSocket work): {} us per echo",
        human(echo.us_per_echo)
    );
    if let [Some(ours), Some(theirs)] = echo_cpu[..] {
        println!(
            "echo, server CPU per message over that: ringgate {:.2}x, baseline {:.2}x",
            ours / echo.us_per_echo,
            theirs / echo.us_per_echo
        );
    }
    Ok(())
}

/// Tokens at the upgrade (issue 13): the connect scenario again, each client
/// with its own token (`sub` its own, `topics` the shared topic, so one ACL is
/// shared), against ringgate without auth, with HS256 and with ES256.
fn auth(args: &Args) -> Result<(), String> {
    const SECRET: &str = "bench-hs256-secret-bench-hs256-secret";
    let dir = std::env::temp_dir().join(format!("ringgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (private, public) = (dir.join("ec.pem"), dir.join("ec.pub.pem"));
    for args in [
        vec![
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ],
        vec!["pkey", "-pubout", "-in"],
    ] {
        let mut cmd = Command::new("openssl");
        cmd.args(&args);
        if args[0] == "pkey" {
            cmd.arg(&private).arg("-out").arg(&public);
        } else {
            cmd.arg(&private);
        }
        let ok = cmd.status().map_err(|e| format!("openssl: {e}"))?.success();
        if !ok {
            return Err("openssl could not make a P-256 key pair".into());
        }
    }
    let public = public.to_str().expect("a UTF-8 temp path").to_string();
    let mut figures = Vec::new();
    for (name, server_args, secret, key) in [
        ("none", vec![], None, None),
        (
            "HS256",
            vec!["--auth-hs256-secret", SECRET],
            Some(SECRET),
            None,
        ),
        (
            "ES256",
            vec!["--auth-public-key", public.as_str()],
            None,
            Some(private.clone()),
        ),
    ] {
        let server = start_with(Kind::Ringgate, args.server_cpu, &server_args)?;
        warm_up(&server, args.loadgen_cpu)?;
        let mut a = args_for(
            Scenario::Connect,
            &server,
            args.quick,
            args.loadgen_cpu,
            false,
        );
        a.token_secret = secret.map(str::to_string);
        a.token_key = key;
        let r = loadgen::run(&a)?;
        eprintln!("bench: connect with tokens ({name}): done");
        figures.push((
            name,
            r.rss_per_connection,
            r.connects_per_second,
            r.server_cpu_us_per_message,
        ));
    }
    let _ = std::fs::remove_dir_all(dir);
    let (_, base_rss, base_rate, _) = figures[0];
    println!("tokens at the upgrade: the connect scenario, one token per client, one shared ACL");
    println!(
        "{:<10} {:>16} {:>16} {:>14} {:>18}",
        "auth", "RSS / idle conn", "more than none", "connects/s", "vs none"
    );
    for (name, rss, rate, _cpu) in &figures {
        let more = rss
            .zip(base_rss)
            .map_or("-".into(), |(a, b)| format!("{:+.1} B", a - b));
        let ratio = rate
            .zip(base_rate)
            .map_or("-".into(), |(a, b)| format!("{:.2}x", a / b));
        println!(
            "{name:<10} {:>16} {:>16} {:>14} {:>18}",
            rss.map_or("-".into(), |v| format!("{v:.1} B")),
            more,
            rate.map_or("-".into(), |v| format!("{v:.0} /s")),
            ratio
        );
    }
    Ok(())
}

/// Burst fanout (issue 15, item 3): 10,000 subscribers of one topic (2,000
/// quick), 100 events of 64 B published as fast as accepted, against ringgate
/// and against tokio-tungstenite written as its users write a pub/sub server
/// (a broadcast channel, a task per connection feeding all it has and flushing
/// once, 4 KiB read buffer), alternately, three times each. The target:
/// ringgate at least 1.5x cheaper per delivery.
fn burst(args: &Args) -> Result<(), String> {
    let mut cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (i, kind) in [Kind::Ringgate, Kind::BaselineBatched]
            .into_iter()
            .enumerate()
        {
            let server = start(kind, args.server_cpu)?;
            let mut a = args_for(
                Scenario::Fanout,
                &server,
                args.quick,
                args.loadgen_cpu,
                false,
            );
            a.events = 100;
            let r = loadgen::run(&a)?;
            r.verdict()?;
            if let Some(c) = r.server_cpu_us_per_message {
                cpu[i].push(c);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let (ours, theirs) = (median(&mut cpu[0]), median(&mut cpu[1]));
    let conns = if args.quick { 2_000 } else { 10_000 };
    println!("burst fanout: {conns} subscribers x 100 events x 64 B, server CPU per delivery, median of 3");
    if let (Some(ours), Some(theirs)) = (ours, theirs) {
        println!(
            "  ringgate {} us, tokio-tungstenite (batched writes) {} us: ringgate {:.2}x cheaper (target 1.5x)",
            human(ours),
            human(theirs),
            theirs / ours
        );
    }
    println!(
        "  runs: ringgate {:?} us, tokio-tungstenite {:?} us",
        cpu[0], cpu[1]
    );
    Ok(())
}

pub(crate) fn human(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}
