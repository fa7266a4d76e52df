//! The load generator's report: every figure, a table for people, JSON for
//! scripts, an SVG of the latency percentile distribution, and a verdict (the
//! exit status) that fails on any loss, duplicate, failure or leak.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::worker::WorkerResult;
use super::{percentiles, Args, Published, Scenario};

/// A second of a run, for `--json`'s time series.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub t_s: u64,
    pub connected: u64,
    pub failed: u64,
    /// Events (fanout), echoes (echo) or cycles (churn) received so far.
    pub received: u64,
    /// ... and in the last second.
    pub per_second: f64,
    /// The worst worker's latency p99 so far.
    pub p99_ms: f64,
    /// Gaps, duplicates and reorderings seen so far.
    pub losses: u64,
}

/// What `--json` writes for connect, fanout, echo and churn: when, against
/// what, with which arguments and version, the thresholds' outcomes, then
/// every figure of the report.
#[derive(Debug, Serialize)]
pub struct Output<'a> {
    pub meta: Meta,
    pub thresholds: &'a [super::thresholds::Outcome],
    #[serde(flatten)]
    pub report: &'a Report,
}

#[derive(Debug, Serialize)]
pub struct Meta {
    /// Seconds since the Unix epoch at the end of the run.
    pub time: u64,
    pub target: String,
    pub control: String,
    pub arguments: Vec<String>,
    pub version: &'static str,
    pub passed: bool,
}

impl<'a> Output<'a> {
    pub fn new(
        args: &Args,
        thresholds: &'a [super::thresholds::Outcome],
        report: &'a Report,
    ) -> Output<'a> {
        Output {
            meta: Meta {
                time: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                target: args.targets.clone().unwrap_or_else(|| args.target.clone()),
                control: args.control.clone(),
                arguments: std::env::args().skip(1).collect(),
                version: env!("CARGO_PKG_VERSION"),
                passed: report.verdict().is_ok() && thresholds.iter().all(|o| o.passed),
            },
            thresholds,
            report,
        }
    }
}

/// The parameters that shape a scenario, as the flags that set them.
pub fn params(a: &Args) -> String {
    let rate = a.rate.map_or(String::new(), |r| format!(" --rate {r}"));
    match a.scenario {
        Scenario::Connect => format!(
            "--conns {} --procs {} --hold {}{}",
            a.conns,
            a.procs,
            a.hold,
            a.ramp.map_or(String::new(), |r| format!(" --ramp {r}"))
        ),
        Scenario::Fanout => format!(
            "--conns {} --topics {} --events {} --size {}{rate} --procs {}",
            a.conns, a.topics, a.events, a.size, a.procs
        ),
        Scenario::Echo => format!(
            "--conns {} --inflight {} --size {} --duration {} --procs {}",
            a.conns, a.inflight, a.size, a.duration, a.procs
        ),
        Scenario::Churn => format!(
            "--conns {} --duration {}{rate} --procs {}",
            a.conns, a.duration, a.procs
        ),
        _ => format!("--conns {} --procs {}", a.conns, a.procs),
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// (percentile, milliseconds) along the distribution, for the plot.
    pub curve: Vec<(f64, f64)>,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        if h.is_empty() {
            return None;
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        // Points evenly spaced in "nines": 0, 0.5, 0.75, ..., 0.9999.
        let curve = (0..=80)
            .map(|i| 1.0 - 0.5f64.powf(i as f64 / 6.0))
            .filter(|q| *q <= 0.9999)
            .map(|q| (q * 100.0, ms(q)))
            .collect();
        Some(Percentiles {
            count: h.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
            curve,
        })
    }
}

/// What the server and the machine showed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ServerFigures {
    pub pid: Option<u32>,
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub mem_available_drop: Option<u64>,
    /// The share of every CPU's time the hypervisor gave to other guests
    /// while the work ran, in percent: on a shared host, what the latencies
    /// and CPU figures of a run lost to its neighbours.
    pub steal_percent: Option<f64>,
    /// The server's own publish-to-send-completion p50 and p99 (ms), when its
    /// `/stats` reports them (ringgate does): the server's share of the
    /// publish-to-receive latency.
    pub delivery_ms: Option<(f64, f64)>,
    pub connections_before: Option<u64>,
    pub connections_after: Option<u64>,
    pub connections_end: Option<u64>,
    pub direct_descriptors_after: Option<u64>,
    pub messages_sent_before: Option<u64>,
    pub messages_sent_end: Option<u64>,
    /// connect: what holding the idle connections cost.
    pub hold: Option<HoldFigures>,
}

/// The cost of idle connections over the hold (connect scenario).
#[derive(Debug, Default, Clone, Serialize)]
pub struct HoldFigures {
    pub seconds: f64,
    pub server_cpu_seconds: f64,
    /// Every CPU's busy time, both loopback ends and kernel work no process is
    /// charged for (keepalive probes run in timer softirqs).
    pub machine_cpu_seconds: Option<f64>,
    pub pings_sent: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    /// The scenario's parameters, as flags.
    pub params: String,
    /// From the workers' start to the last result.
    pub elapsed_seconds: f64,
    /// One point a second while the run went.
    pub series: Vec<Point>,
    pub procs: usize,
    pub conns: usize,
    pub connected: u64,
    pub failures: BTreeMap<String, u64>,
    pub connect_seconds: Option<f64>,
    pub connects_per_second: Option<f64>,
    pub handshake_ms: Option<Percentiles>,
    pub latency_ms: Option<Percentiles>,
    pub published: u64,
    pub publish_busy: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost_per_topic: BTreeMap<String, i64>,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub deliveries_per_second: Option<f64>,
    pub messages: u64,
    pub messages_per_second: Option<f64>,
    pub server: ServerFigures,
    pub rss_per_connection: Option<f64>,
    pub mem_available_drop_per_connection: Option<f64>,
    pub server_cpu_us_per_message: Option<f64>,
    pub leaked_connections: Option<i64>,
}

impl Report {
    pub fn build(
        args: &Args,
        results: &[WorkerResult],
        published: &Published,
        connected_at: Option<Duration>,
        server: ServerFigures,
    ) -> Report {
        let connected: u64 = results.iter().map(|r| r.connected).sum();
        let failures = merged_failures(results);
        let mut subscribers: BTreeMap<String, u64> = BTreeMap::new();
        let mut received: BTreeMap<String, u64> = BTreeMap::new();
        for r in results {
            for (k, v) in &r.subscribers {
                *subscribers.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &r.received {
                *received.entry(k.clone()).or_default() += v;
            }
        }
        let elapsed = results.iter().map(|r| r.elapsed_s).fold(0.0, f64::max);
        let per_second = |n: u64| (elapsed > 0.0).then(|| n as f64 / elapsed);
        let messages: u64 = results.iter().map(|r| r.messages).sum();
        let mut lost_per_topic = BTreeMap::new();
        let mut expected = 0;
        if args.scenario == Scenario::Fanout {
            for (topic, &events) in &published.per_topic {
                let want = events * subscribers.get(topic).copied().unwrap_or(0);
                expected += want;
                lost_per_topic.insert(
                    topic.clone(),
                    want as i64 - received.get(topic).copied().unwrap_or(0) as i64,
                );
            }
        }
        let delivered: u64 = received.values().sum();
        let work = match args.scenario {
            Scenario::Fanout => delivered,
            Scenario::Echo
            | Scenario::Churn
            | Scenario::Soak
            | Scenario::Reconnect
            | Scenario::Publish => messages,
            Scenario::Connect => connected,
        };
        let rss_per_connection = match (server.rss_before, server.rss_after) {
            (Some(a), Some(b)) if connected > 0 && args.scenario == Scenario::Connect => {
                Some((b as f64 - a as f64) / connected as f64)
            }
            _ => None,
        };
        let mem_available_drop_per_connection = server
            .mem_available_drop
            .filter(|_| connected > 0 && args.scenario == Scenario::Connect)
            .map(|d| d as f64 / connected as f64);
        let leaked_connections = (args.scenario == Scenario::Churn)
            .then(|| {
                server
                    .connections_end
                    .zip(server.connections_before)
                    .map(|(e, b)| e as i64 - b as i64)
            })
            .flatten();
        Report {
            scenario: args.scenario,
            params: params(args),
            elapsed_seconds: 0.0,
            series: Vec::new(),
            procs: args.procs,
            conns: args.conns,
            connected,
            failures,
            connect_seconds: connected_at.map(|d| d.as_secs_f64()),
            connects_per_second: connected_at.map(|d| connected as f64 / d.as_secs_f64().max(1e-9)),
            handshake_ms: percentiles(results.iter().map(|r| r.handshake_us.clone())),
            latency_ms: percentiles(results.iter().map(|r| r.latency_us.clone())),
            published: published.accepted,
            publish_busy: published.busy,
            expected,
            delivered,
            lost_per_topic,
            duplicates: results.iter().map(|r| r.duplicates).sum(),
            out_of_order: results.iter().map(|r| r.out_of_order).sum(),
            deliveries_per_second: (args.scenario == Scenario::Fanout)
                .then(|| per_second(delivered))
                .flatten(),
            messages,
            messages_per_second: matches!(args.scenario, Scenario::Echo | Scenario::Churn)
                .then(|| per_second(messages))
                .flatten(),
            server_cpu_us_per_message: server
                .cpu_seconds
                .filter(|_| work > 0)
                .map(|c| c * 1e6 / work as f64),
            server,
            rss_per_connection,
            mem_available_drop_per_connection,
            leaked_connections,
        }
    }

    pub fn lost(&self) -> i64 {
        self.lost_per_topic.values().sum()
    }

    /// Ok when nothing was lost, duplicated, reordered, failed or leaked.
    pub fn verdict(&self) -> Result<(), String> {
        let failed: u64 = self.failures.values().sum();
        let mut problems = Vec::new();
        if failed > 0 {
            let hint = if self.failures.contains_key("http 404") {
                match self.scenario {
                    Scenario::Echo => " (404: the server serves no /echo; ringgate needs --echo)",
                    _ => " (404: the server serves no such path)",
                }
            } else {
                ""
            };
            problems.push(format!(
                "{failed} connections failed {:?}{hint}",
                self.failures
            ));
        }
        if self.lost() != 0 {
            problems.push(format!(
                "{} events lost {:?}",
                self.lost(),
                self.lost_per_topic
            ));
        }
        if self.duplicates + self.out_of_order > 0 {
            problems.push(format!(
                "{} duplicates, {} out of order",
                self.duplicates, self.out_of_order
            ));
        }
        if self.leaked_connections.is_some_and(|l| l != 0) {
            problems.push(format!(
                "the server's connection gauge did not return to its start ({:?})",
                self.leaked_connections
            ));
        }
        if self.scenario != Scenario::Churn && self.connected < self.conns as u64 {
            problems.push(format!(
                "only {} of {} connections opened",
                self.connected, self.conns
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    pub fn print(&self) {
        let row = |k: &str, v: String| println!("  {k:<28} {v}");
        if self.scenario == Scenario::Churn {
            // Churn opens and closes connections at a rate: its own count.
            println!(
                "loadgen churn: {} connections opened and closed over {} process(es), {:.1} s",
                self.connected, self.procs, self.elapsed_seconds
            );
        } else {
            println!(
                "loadgen {}: {} connections over {} process(es), {:.1} s",
                self.scenario.name(),
                self.conns,
                self.procs,
                self.elapsed_seconds
            );
        }
        row("parameters", self.params.clone());
        row(
            "connected",
            format!(
                "{} ({} failed{})",
                self.connected,
                self.failures.values().sum::<u64>(),
                failures_text(&self.failures)
            ),
        );
        if let (Some(s), Some(r)) = (self.connect_seconds, self.connects_per_second) {
            row("connect + upgrade", format!("{s:.2} s, {r:.0}/s"));
        }
        if let Some(p) = &self.handshake_ms {
            row("handshake ms", p.text());
        }
        if self.scenario == Scenario::Fanout {
            row(
                "published",
                format!(
                    "{} accepted, {} answered 503",
                    self.published, self.publish_busy
                ),
            );
            row(
                "delivered",
                format!(
                    "{} of {} expected, lost {}, duplicates {}, out of order {}",
                    self.delivered,
                    self.expected,
                    self.lost(),
                    self.duplicates,
                    self.out_of_order
                ),
            );
            if let Some(r) = self.deliveries_per_second {
                row("deliveries/s", format!("{r:.0}"));
            }
        }
        if matches!(self.scenario, Scenario::Echo | Scenario::Churn) {
            row(
                if self.scenario == Scenario::Echo {
                    "echoes"
                } else {
                    "connections cycled"
                },
                format!(
                    "{} ({:.0}/s)",
                    self.messages,
                    self.messages_per_second.unwrap_or(0.0)
                ),
            );
        }
        if let Some(p) = &self.latency_ms {
            row(
                if self.scenario == Scenario::Echo {
                    "round trip ms"
                } else {
                    "publish-to-receive ms"
                },
                p.text(),
            );
        }
        if let Some((p50, p99)) = self.server.delivery_ms {
            row(
                "server: publish to sent ms",
                format!("p50 {p50:.3}  p99 {p99:.3}  (its own histogram since it started: to send completion)"),
            );
        }
        if let Some(s) = self.server.steal_percent {
            row(
                "machine steal",
                format!("{s:.1}% of the CPUs' time went to other guests"),
            );
        }
        if let Some(r) = self.rss_per_connection {
            row("server RSS / connection", format!("{r:.0} B"));
        }
        if let Some(d) = self.server.direct_descriptors_after {
            row("server direct descriptors", d.to_string());
        }
        if let Some(m) = self.mem_available_drop_per_connection {
            row(
                "MemAvailable drop / conn",
                format!("{m:.0} B (machine-wide: both ends, kernel and user)"),
            );
        }
        if let Some(h) = &self.server.hold {
            let percent = |cpu: f64| 100.0 * cpu / h.seconds.max(1e-9);
            row(
                "idle: server CPU",
                format!(
                    "{:.2}% of one core over {:.1} s ({} WebSocket pings sent)",
                    percent(h.server_cpu_seconds),
                    h.seconds,
                    h.pings_sent.map_or("?".into(), |p| p.to_string())
                ),
            );
            if let Some(m) = h.machine_cpu_seconds {
                row(
                    "idle: machine CPU",
                    format!(
                        "{:.2}% of one core (every process and the kernel, both ends)",
                        percent(m)
                    ),
                );
            }
        }
        if let Some(c) = self.server_cpu_us_per_message {
            row(
                &format!("server CPU / {}", self.scenario.unit()),
                format!("{c:.2} us"),
            );
        }
        if let Some(l) = self.leaked_connections {
            row("connections leaked", l.to_string());
        }
    }
}

impl Percentiles {
    fn text(&self) -> String {
        format!(
            "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (n={})",
            self.p50, self.p90, self.p99, self.p999, self.max, self.count
        )
    }
}

/// The workers' connection failures, summed by cause.
pub fn merged_failures(results: &[WorkerResult]) -> BTreeMap<String, u64> {
    let mut failures = BTreeMap::new();
    for r in results {
        for (cause, n) in &r.failures {
            *failures.entry(cause.clone()).or_default() += n;
        }
    }
    failures
}

fn failures_text(f: &BTreeMap<String, u64>) -> String {
    if f.is_empty() {
        String::new()
    } else {
        format!(
            ": {}",
            f.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Draws the latency percentile distribution (x: percentile on a "nines"
/// scale, y: milliseconds) to an SVG file.
pub fn plot(report: &Report, path: &Path) -> Result<(), String> {
    let (p, what) = match report.scenario {
        Scenario::Connect | Scenario::Churn => (&report.handshake_ms, "handshake"),
        Scenario::Echo => (&report.latency_ms, "round trip"),
        _ => (&report.latency_ms, "publish to receive"),
    };
    let Some(p) = p else {
        return Err("no latencies to plot".into());
    };
    let run = PlotRun {
        label: report.scenario.name().to_string(),
        curve: p.curve.clone(),
        marks: marks(p),
    };
    let title = format!("{}: {what} latency by percentile", report.scenario.name());
    let subtitle = format!("{}, {:.1} s", report.params, report.elapsed_seconds);
    plot_runs(&[run], &title, &subtitle, path)
}

/// One run's latency distribution, for [`plot_runs`].
pub struct PlotRun {
    pub label: String,
    /// (percentile, milliseconds).
    pub curve: Vec<(f64, f64)>,
    /// (name, percentile, milliseconds) of p50, p99, p99.9 and max.
    pub marks: Vec<(&'static str, f64, f64)>,
}

pub fn marks(p: &Percentiles) -> Vec<(&'static str, f64, f64)> {
    let top = p.curve.last().map_or(99.99, |(q, _)| *q);
    vec![
        ("p50", 50.0, p.p50),
        ("p99", 99.0, p.p99),
        ("p99.9", 99.9, p.p999),
        ("max", top, p.max),
    ]
}

/// Draws runs' latency distributions on one chart (percentiles in "nines"
/// on x), each with its p50, p99, p99.9 and max marked and labelled.
pub fn plot_runs(runs: &[PlotRun], title: &str, subtitle: &str, path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let nines = |pct: f64| -(1.0 - pct / 100.0).max(1e-6).log10();
    let points = || runs.iter().flat_map(|r| r.curve.iter());
    let x_max = points().map(|(q, _)| nines(*q)).fold(1.0, f64::max);
    let y_max = runs
        .iter()
        .flat_map(|r| {
            r.curve
                .iter()
                .map(|p| p.1)
                .chain(r.marks.iter().map(|m| m.2))
        })
        .fold(0.001, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (head, body) = root.split_vertically(56);
    head.draw(&Text::new(title.to_string(), (20, 8), ("sans-serif", 22)))
        .map_err(|e| err(&e))?;
    head.draw(&Text::new(
        subtitle.to_string(),
        (20, 34),
        ("sans-serif", 14).into_font().color(&RGBColor(90, 90, 90)),
    ))
    .map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&body)
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_labels(x_max.ceil() as usize + 1)
        .x_desc("percentile")
        .y_desc("milliseconds")
        .x_label_formatter(&|x| {
            format!("{:.4}", 100.0 * (1.0 - 10f64.powf(-x)))
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_string()
        })
        .draw()
        .map_err(|e| err(&e))?;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, run) in runs.iter().enumerate() {
        let colour = colours[i % colours.len()];
        chart
            .draw_series(LineSeries::new(
                run.curve.iter().map(|(q, ms)| (nines(*q), *ms)),
                colour.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(run.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        for &(name, q, ms) in &run.marks {
            let at = (nines(q), ms);
            chart
                .draw_series([Circle::new(at, 4, colour.filled())])
                .map_err(|e| err(&e))?;
            // Labels of the max sit left of their point (it is at the right
            // edge); each run's labels a little higher than the last run's.
            let dx = if name == "max" {
                -x_max * 0.09
            } else {
                x_max * 0.005
            };
            let label_at = (at.0 + dx, at.1 + y_max * 0.035 * i as f64);
            chart
                .draw_series([Text::new(
                    format!("{name} {ms:.2}"),
                    label_at,
                    ("sans-serif", 12).into_font().color(&colour),
                )])
                .map_err(|e| err(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// `cargo xtask plot A.json B.json -o cmp.svg`: overlays the latency
/// distributions of runs written by `loadgen --json`.
pub fn plot_files(files: &[std::path::PathBuf], out: &Path) -> Result<(), String> {
    if files.is_empty() {
        return Err("name at least one --json file of a loadgen run".into());
    }
    let mut runs = Vec::new();
    let mut subtitles = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        let scenario = v["scenario"].as_str().unwrap_or("run");
        let key = if matches!(scenario, "connect" | "churn") {
            "handshake_ms"
        } else {
            "latency_ms"
        };
        let p = &v[key];
        let curve: Vec<(f64, f64)> = p["curve"]
            .as_array()
            .ok_or_else(|| {
                format!(
                    "{}: no {key} distribution (a loadgen --json file?)",
                    file.display()
                )
            })?
            .iter()
            .filter_map(|pt| Some((pt[0].as_f64()?, pt[1].as_f64()?)))
            .collect();
        let num = |k: &str| p[k].as_f64().unwrap_or(0.0);
        let top = curve.last().map_or(99.99, |c| c.0);
        let name = file
            .file_stem()
            .map_or("run".into(), |s| s.to_string_lossy().into_owned());
        subtitles.push(format!(
            "{name}: {} {}",
            scenario,
            v["params"].as_str().unwrap_or("")
        ));
        runs.push(PlotRun {
            label: name,
            curve,
            marks: vec![
                ("p50", 50.0, num("p50")),
                ("p99", 99.0, num("p99")),
                ("p99.9", 99.9, num("p999")),
                ("max", top, num("max")),
            ],
        });
    }
    plot_runs(&runs, "latency by percentile", &subtitles.join("; "), out)
}
