//! The load generator at small scale against the real ringgate binary: every
//! scenario runs, and its report's figures agree with what the server counted.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// A ringgate (the debug build of this workspace) on free loopback ports.
struct Ringgate {
    child: Child,
    ws: String,
    control: String,
}

impl Ringgate {
    fn start(args: &[&str]) -> Ringgate {
        let mut all = vec!["--no-pin"];
        all.extend_from_slice(args);
        Ringgate::start_binary("ringgate", &all)
    }

    /// `binary` (a package of this workspace of the same name) on free ports.
    fn start_binary(binary: &str, args: &[&str]) -> Ringgate {
        let exe = PathBuf::from(env!("CARGO_BIN_EXE_xtask")).with_file_name(binary);
        if !exe.exists() {
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", binary])
                .status()
                .unwrap();
            assert!(status.success(), "building {binary}");
        }
        let mut child = Command::new(&exe)
            .args(["--listen", "127.0.0.1:0", "--control", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap()
                .to_string()
        };
        let (ws, control) = (field("ws"), field("control"));
        Ringgate { child, ws, control }
    }
}

impl Drop for Ringgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-second echo run: 20 clients, two messages in flight each.
const SMALL_ECHO: &[&str] = &[
    "echo",
    "--conns",
    "20",
    "--inflight",
    "2",
    "--duration",
    "1",
];

/// Runs `xtask loadgen ARGS` against `server`; returns its JSON report.
fn loadgen(server: &Ringgate, args: &[&str]) -> Value {
    let (target, control) = (
        format!("ws://{}", server.ws),
        format!("http://{}", server.control),
    );
    let mut all = args.to_vec();
    all.extend_from_slice(&["--target", &target, "--control", &control]);
    loadgen_with(&all)
}

/// Runs `xtask loadgen ARGS` as given (targets included); returns its JSON report.
fn loadgen_with(args: &[&str]) -> Value {
    // Tests run in parallel threads of one process (two may run the same
    // scenario): a file per call.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let json = std::env::temp_dir().join(format!(
        "loadgen-{}-{}-with-{call}.json",
        std::process::id(),
        args[0]
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("loadgen")
        .args(args)
        .args([
            "--quiet",
            "--timeout",
            "60",
            "--json",
            json.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "loadgen {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(json);
    report
}

/// A redis-server on a free loopback port (Debian's package; .ci/run installs it).
struct Redis(Child, u16);

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/run installs it)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Redis(child, port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn publish_counts_match_the_server() {
    let server = Ringgate::start(&[]);
    let r = loadgen(
        &server,
        &[
            "publish",
            "--publishers",
            "4",
            "--events",
            "400",
            "--topics",
            "7",
        ],
    );
    assert_eq!(r["accepted"], 400);
    assert_eq!(r["refused"], 0);
    assert_eq!(r["answer_ms"]["count"], 400);
    let stats = http_get_json(&server.control, "/stats");
    assert_eq!(stats["totals"]["publish_total"], 400, "the server's count");
}

#[test]
fn a_fanout_over_two_fleet_hosts_loses_nothing() {
    let redis = Redis::start();
    let broker = format!("redis://127.0.0.1:{}/", redis.1);
    let a = Ringgate::start(&["--shards", "1", "--broker", &broker]);
    let b = Ringgate::start(&["--shards", "1", "--broker", &broker]);
    let targets = format!("ws://{},ws://{}", a.ws, b.ws);
    let controls = format!("http://{},http://{}", a.control, b.control);
    let r = loadgen_with(&[
        "fanout",
        "--targets",
        &targets,
        "--control",
        &controls,
        "--procs",
        "2",
        "--conns",
        "200",
        "--topics",
        "4",
        "--events",
        "200",
    ]);
    assert_eq!(r["published"], 200);
    assert_eq!(r["expected"], 200 / 4 * 200);
    assert_eq!(r["delivered"], r["expected"]);
    assert_eq!(r["duplicates"], 0);
    assert_eq!(r["out_of_order"], 0);
    for host in [&a, &b] {
        let stats = http_get_json(&host.control, "/stats");
        let totals = &stats["totals"];
        assert_eq!(totals["publish_total"], 100, "round-robin: {totals}");
        assert_eq!(
            totals["connections_upgraded_total"], 100,
            "half the subscribers: {totals}"
        );
        assert_eq!(totals["broker_gaps_detected_total"], 0, "{totals}");
    }
    // One control plane names the first host only; its subscribers are counted.
    let r = loadgen_with(&[
        "fanout",
        "--targets",
        &targets,
        "--control",
        &format!("http://{}", a.control),
        "--procs",
        "2",
        "--conns",
        "100",
        "--events",
        "20",
    ]);
    assert_eq!(r["delivered"], 100 * 20);
}

#[test]
fn connect_counts_match_the_server() {
    let server = Ringgate::start(&[]);
    let r = loadgen(&server, &["connect", "--conns", "200", "--hold", "0.5"]);
    assert_eq!(r["connected"], 200);
    assert_eq!(r["failures"], serde_json::json!({}));
    assert_eq!(
        r["server"]["connections_after"], 200,
        "the server's own gauge"
    );
    assert_eq!(r["server"]["direct_descriptors_after"], 200);
    assert!(r["handshake_ms"]["count"] == 200);
    assert!(r["rss_per_connection"].is_number() && r["server"]["pid"].is_number());
}

#[test]
fn holding_reports_what_idle_connections_cost() {
    let server = Ringgate::start(&["--ping-interval", "1s", "--idle-timeout", "10s"]);
    let r = loadgen(&server, &["connect", "--conns", "100", "--hold", "4"]);
    assert_eq!(r["connected"], 100);
    assert_eq!(r["failures"], serde_json::json!({}));
    let hold = &r["server"]["hold"];
    let seconds = hold["seconds"].as_f64().unwrap();
    assert!((3.0..4.0).contains(&seconds), "{hold}");
    // Pinged after 1 s of silence (and again after each pong): at least once each.
    assert!(hold["pings_sent"].as_u64().unwrap() >= 100, "{hold}");
    assert!(
        hold["server_cpu_seconds"].as_f64().unwrap() >= 0.0,
        "{hold}"
    );
    assert!(
        hold["machine_cpu_seconds"].as_f64().unwrap() > 0.0,
        "{hold}"
    );
}

#[test]
fn fanout_loses_nothing_and_matches_the_server() {
    let server = Ringgate::start(&["--shards", "2"]);
    let r = loadgen(
        &server,
        &[
            "fanout", "--conns", "200", "--topics", "4", "--events", "1000",
        ],
    );
    assert_eq!(r["published"], 1000);
    assert_eq!(r["expected"], 1000 / 4 * 200);
    assert_eq!(r["delivered"], r["expected"]);
    assert_eq!(r["duplicates"], 0);
    assert_eq!(r["out_of_order"], 0);
    let sent = r["server"]["messages_sent_end"].as_u64().unwrap()
        - r["server"]["messages_sent_before"].as_u64().unwrap();
    assert_eq!(
        sent,
        r["delivered"].as_u64().unwrap(),
        "the server sent exactly what the clients received"
    );
    assert_eq!(r["latency_ms"]["count"], r["delivered"]);
}

/// Issue 15, item 1: the notification workload, a topic per subscriber, through
/// the batch API from concurrent publishers: every event reaches its one
/// subscriber once and in order, and the server sent exactly that.
#[test]
fn notifications_in_batches_from_concurrent_publishers_lose_nothing() {
    let server = Ringgate::start(&["--shards", "2"]);
    let r = loadgen(
        &server,
        &[
            "fanout",
            "--conns",
            "300",
            "--topics",
            "300",
            "--events",
            "6000",
            "--batch",
            "50",
            "--publishers",
            "3",
        ],
    );
    // A slow machine may answer some lines "busy" (the inbox is full): those
    // reached nobody and are not expected.
    let published = r["published"].as_u64().unwrap();
    assert_eq!(published + r["publish_busy"].as_u64().unwrap(), 6000);
    assert!(published > 0);
    assert_eq!(r["expected"], published);
    assert_eq!(r["delivered"], published);
    assert_eq!(r["duplicates"], 0);
    assert_eq!(r["out_of_order"], 0);
    let sent = r["server"]["messages_sent_end"].as_u64().unwrap()
        - r["server"]["messages_sent_before"].as_u64().unwrap();
    assert_eq!(
        sent, published,
        "the server sent exactly what the clients received"
    );
}

/// Issue 10, item 14: a fanout stages one send per subscriber, and the CQ holds
/// 16,384 completions. 19,000 subscribers on one shard (as many as one ring's
/// file table holds here: the soft RLIMIT_NOFILE is 20,000) get every event
/// with the CQ never overflowing: sends wait for a slot instead.
#[test]
fn a_fanout_larger_than_the_cq_on_one_shard_never_overflows_it() {
    let server = Ringgate::start(&["--shards", "1"]);
    let r = loadgen(
        &server,
        &[
            "fanout",
            "--conns",
            "19000",
            "--procs",
            "2",
            "--sources",
            "127.0.0.2-127.0.0.3",
            "--events",
            "20",
        ],
    );
    assert_eq!(r["expected"], 20 * 19000);
    assert_eq!(r["delivered"], r["expected"]);
    let stats = http_get_json(&server.control, "/stats");
    assert_eq!(
        stats["totals"]["cq_overflow_total"], 0,
        "{}",
        stats["totals"]
    );
}

/// Issue 10's soak at CI scale: a minute of churn, reconnect bursts and steady
/// publishing, with no event lost and the server's RSS flat once settled.
#[test]
fn a_minute_of_soak_loses_nothing_and_does_not_grow() {
    let server = Ringgate::start(&["--shards", "2"]);
    let r = loadgen(
        &server,
        &[
            "soak",
            "--conns",
            "2000",
            "--topics",
            "50",
            "--duration",
            "60",
            "--rate",
            "40",
            "--churn",
            "20",
            "--burst",
            "400",
            "--burst-every",
            "20",
            "--settle",
            "15",
        ],
    );
    assert_eq!(r["problems"], serde_json::json!([]), "{r}");
    assert!(r["published"].as_u64().unwrap() >= 2000);
    assert!(r["reconnects"].as_u64().unwrap() >= 1200 + 2 * 400);
    assert_eq!(r["gaps"], 0);
    assert!(r["samples"].as_array().unwrap().len() >= 10);
}

/// Issue 11's reconnect storm at CI scale: every subscriber drops at once and
/// comes back with `?recover=`; all recover, exactly.
#[test]
fn a_reconnect_storm_recovers_every_subscriber_exactly() {
    let server = Ringgate::start(&["--shards", "2"]);
    let r = loadgen(
        &server,
        &[
            "reconnect",
            "--conns",
            "2000",
            "--topics",
            "10",
            "--rate",
            "50",
            "--down",
            "1",
        ],
    );
    assert_eq!(r["problems"], serde_json::json!([]), "{r}");
    assert_eq!(r["reconnects"], 2000);
    assert_eq!(r["recovered"], 2000, "{r}");
    assert_eq!(r["server_outcomes"]["recovered"], 2000);
    // About 5 events per topic missed in the second down: all replayed.
    let replayed = r["replayed"].as_u64().unwrap();
    assert!(replayed >= 2000 * 3, "{replayed}");
    assert_eq!(r["server_replayed"], replayed);
    assert_eq!(r["time_to_recover_ms"]["count"], 2000);
    // Spread over a window, with history too short for the late ones: 50
    // events hold one second at 50/s; the first return is due 0.2 s after the
    // drop (0.8 s of slack on a loaded machine), the last 2.2 s after it
    // (always too old; load only makes it later).
    let server = Ringgate::start(&["--history-size", "50"]);
    let r = loadgen(
        &server,
        &[
            "reconnect",
            "--conns",
            "200",
            "--rate",
            "50",
            "--down",
            "0.2",
            "--window",
            "2",
        ],
    );
    assert_eq!(r["problems"], serde_json::json!([]), "{r}");
    let (recovered, not) = (
        r["recovered"].as_u64().unwrap(),
        r["not_recovered"].as_u64().unwrap(),
    );
    assert_eq!(recovered + not, 200);
    assert!(recovered > 0 && not > 0, "{r}");
    assert_eq!(r["server_outcomes"]["too_old"], not);
}

/// GET `path` on `addr` (HOST:PORT) and parse the body as JSON.
fn http_get_json(addr: &str, path: &str) -> Value {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap()
}

#[test]
fn the_fastwebsockets_peer_echoes_for_the_bench() {
    let peer = Ringgate::start_binary(
        "ringgate-baseline",
        &["--threads", "1", "--engine", "fastwebsockets"],
    );
    let r = loadgen(&peer, SMALL_ECHO);
    let echoes = r["messages"].as_u64().unwrap();
    assert!(echoes > 100, "{echoes}");
    assert_eq!(r["failures"], serde_json::json!({}));
    assert_eq!(r["latency_ms"]["count"], echoes);
}

#[test]
fn the_batched_tokio_tungstenite_peer_delivers_every_event_in_order() {
    let peer = Ringgate::start_binary(
        "ringgate-baseline",
        &["--threads", "1", "--writes", "batched"],
    );
    // A burst: events pile up in each subscriber's channel and go out in
    // batches; the loadgen's verdict fails on any loss or reordering.
    let r = loadgen(
        &peer,
        &["fanout", "--conns", "50", "--events", "300", "--size", "64"],
    );
    assert_eq!(r["delivered"], 50 * 300);
    assert_eq!(r["lost_per_topic"], serde_json::json!({"t0": 0}));
}

#[test]
fn echo_round_trips_match_the_server() {
    let server = Ringgate::start(&["--echo"]);
    let r = loadgen(&server, SMALL_ECHO);
    let echoes = r["messages"].as_u64().unwrap();
    assert!(echoes > 100, "{echoes}");
    let sent = r["server"]["messages_sent_end"].as_u64().unwrap()
        - r["server"]["messages_sent_before"].as_u64().unwrap();
    assert_eq!(
        sent, echoes,
        "every echo the server sent came back to a client"
    );
    assert_eq!(r["latency_ms"]["count"], echoes);
}

#[test]
fn churn_leaves_no_connection_behind() {
    let server = Ringgate::start(&[]);
    let r = loadgen(&server, &["churn", "--rate", "200", "--duration", "1"]);
    assert!(r["messages"].as_u64().unwrap() >= 150, "{}", r["messages"]);
    assert_eq!(r["leaked_connections"], 0);
    assert_eq!(r["failures"], serde_json::json!({}));
}

#[test]
fn remote_targets_are_refused_without_allow_remote() {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "loadgen",
            "connect",
            "--target",
            "ws://192.0.2.1:80",
            "--control",
            "http://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));
}

/// Runs `xtask loadgen ARGS` against `server`, its stderr not a terminal;
/// returns (exit status, stdout, stderr).
fn loadgen_run(server: &Ringgate, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("loadgen")
        .args(args)
        .args(["--target", &format!("ws://{}", server.ws)])
        .args(["--control", &format!("http://{}", server.control)])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// [`loadgen_run`] without `--quiet`, with `--json`: also the JSON written.
fn loadgen_raw(server: &Ringgate, args: &[&str]) -> (Option<i32>, String, String, Value) {
    // Tests run in parallel threads of one process: a file per call.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let json = std::env::temp_dir().join(format!("loadgen-{}-raw-{call}.json", std::process::id()));
    let mut all = args.to_vec();
    all.extend(["--timeout", "60", "--json", json.to_str().unwrap()]);
    let (status, stdout, stderr) = loadgen_run(server, &all);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(json);
    (status, stdout, stderr, report)
}

#[test]
fn thresholds_set_the_exit_status_and_a_run_reports_as_it_goes() {
    let server = Ringgate::start(&["--echo"]);
    // Six seconds without a terminal: a plain progress line at 5 s.
    let echo = ["echo", "--conns", "10", "--duration", "6"];
    let mut args = echo.to_vec();
    args.extend(["--threshold", "p99<10s", "--threshold", "lost==0"]);
    let (status, stdout, stderr, report) = loadgen_raw(&server, &args);
    assert_eq!(status, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("loadgen echo: 10 connections over 1 process(es), 6."),
        "{stdout}"
    );
    assert!(
        stdout.contains("--conns 10 --inflight 1 --size 64 --duration 6"),
        "{stdout}"
    );
    assert!(stdout.contains("server CPU / message"), "{stdout}");
    assert!(stdout.contains("✓ p99<10s"), "{stdout}");
    assert!(stdout.contains("✓ lost==0"), "{stdout}");
    let progress: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("loadgen "))
        .collect();
    // One line every 5 s: at least one in a run of over 6 s (more if a loaded
    // machine stretches it), each with the counts.
    assert!(!progress.is_empty(), "a plain progress line: {stderr}");
    for line in &progress {
        assert!(
            line.contains("10 connected") && line.contains("echoes ("),
            "{stderr}"
        );
    }
    assert_eq!(report["meta"]["passed"], true);
    assert_eq!(report["meta"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(report["meta"]["arguments"]
        .as_array()
        .unwrap()
        .contains(&"p99<10s".into()));
    assert_eq!(report["thresholds"][0]["passed"], true);
    let series = report["series"].as_array().unwrap();
    assert!(series.len() >= 5, "a point a second: {series:?}");
    let seconds: Vec<u64> = series.iter().map(|p| p["t_s"].as_u64().unwrap()).collect();
    assert!(seconds.windows(2).all(|w| w[0] < w[1]), "{seconds:?}");
    assert!(
        series
            .iter()
            .all(|p| p["per_second"].as_f64().unwrap() > 0.0),
        "{series:?}"
    );

    // A crossed threshold: exit status 99, named in the summary and the JSON.
    let args = [
        "echo",
        "--conns",
        "5",
        "--duration",
        "1",
        "--threshold",
        "rate>1e12",
    ];
    let (status, stdout, stderr, report) = loadgen_raw(&server, &args);
    assert_eq!(status, Some(99), "{stdout}\n{stderr}");
    assert!(stdout.contains("✗ rate>1e12"), "{stdout}");
    assert!(stderr.contains("thresholds crossed: rate>1e12"), "{stderr}");
    assert_eq!(report["meta"]["passed"], false);
    assert_eq!(report["thresholds"][0]["passed"], false);
    // A threshold the parser cannot read stops the run before it starts.
    let (status, _, stderr) = loadgen_run(&server, &["echo", "--threshold", "p42<1"]);
    assert_eq!(status, Some(1));
    assert!(stderr.contains("unknown figure"), "{stderr}");
}

#[test]
fn plots_mark_the_percentiles_and_runs_overlay() {
    let server = Ringgate::start(&["--echo"]);
    let dir = std::env::temp_dir().join(format!("loadgen-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    // A connect run plots its handshake latency, with its parameters.
    let connect_svg = path("connect.svg");
    let (status, out, err, _) = loadgen_raw(
        &server,
        &[
            "connect",
            "--conns",
            "30",
            "--hold",
            "0.2",
            "--plot",
            &connect_svg,
        ],
    );
    assert_eq!(status, Some(0), "{out}\n{err}");
    let svg = std::fs::read_to_string(&connect_svg).unwrap();
    assert!(
        svg.contains("connect: handshake latency by percentile"),
        "{svg}"
    );
    assert!(svg.contains("--conns 30 --procs 1 --hold 0.2"));
    for mark in ["p50 ", "p99 ", "p99.9 ", "max "] {
        assert!(svg.contains(mark), "{mark} is marked");
    }
    // Two echo runs, overlaid by `xtask plot`.
    for (name, conns) in [("small", "5"), ("large", "15")] {
        let (status, out, err, report) =
            loadgen_raw(&server, &["echo", "--conns", conns, "--duration", "1"]);
        assert_eq!(status, Some(0), "{out}\n{err}");
        std::fs::write(path(&format!("{name}.json")), report.to_string()).unwrap();
    }
    let cmp = path("cmp.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["plot", &path("small.json"), &path("large.json"), "-o", &cmp])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&cmp).unwrap();
    for label in ["small", "large", "--conns 5 ", "--conns 15 "] {
        assert!(svg.contains(label), "{label} is in the overlay");
    }
    assert_eq!(
        svg.matches("p99.9 ").count(),
        2,
        "each run's p99.9 is marked"
    );
    // A file that is no loadgen run is named in the error.
    std::fs::write(path("bad.json"), "{}").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["plot", &path("bad.json"), "-o", &cmp])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.json"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_run_that_cannot_measure_fails_at_once_with_the_reason() {
    let server = Ringgate::start(&[]);
    // No control plane at the address given: an error, not zeros.
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["loadgen", "connect", "--conns", "5"])
        .args(["--target", &format!("ws://{}", server.ws)])
        .args(["--control", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not answer"), "{err}");
    // Echo against a server without --echo: every upgrade is answered 404;
    // the run ends at once (not after --duration) and says why.
    let (status, stdout, stderr) = loadgen_run(
        &server,
        &["echo", "--conns", "4", "--duration", "30", "--quiet"],
    );
    assert_eq!(status, Some(1), "{stdout}\n{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert!(
        stderr.contains("http 404") && stderr.contains("--echo"),
        "{stderr}"
    );
    // Churn counts what it cycles, in its header too.
    let (status, stdout, stderr) = loadgen_run(
        &server,
        &["churn", "--rate", "100", "--duration", "1", "--quiet"],
    );
    assert_eq!(status, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("loadgen churn: ") && stdout.contains("connections opened and closed"),
        "{stdout}"
    );
}
