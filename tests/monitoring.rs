//! End to end: the monitoring files of `scripts/monitoring/` against a real
//! Prometheus (Debian's `prometheus`, which `.ci/run` installs) scraping a real
//! ringgate under load: `promtool check rules` and `promtool test rules` pass,
//! every alert rule loads and evaluates healthy, and every query of the
//! Grafana dashboard returns data.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/monitoring")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(monitoring_dir())
        .output()
        .expect("promtool must be installed (apt-get install prometheus; .ci/run does)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_are_valid_and_each_fires_when_it_should() {
    let checked = promtool(&["check", "rules", "ringgate-alerts.yml"]);
    assert!(checked.contains("SUCCESS: 10 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "ringgate-alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// A Prometheus on a free loopback port, with its data in a temporary
/// directory; killed (and the directory removed) when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("ringgate-prom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rules = monitoring_dir().join("ringgate-alerts.yml");
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: ['{}']\n\
             scrape_configs:\n  - job_name: ringgate\n    static_configs:\n      - targets: ['{target}']\n",
            rules.canonicalize().unwrap().display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        // A free port: the kernel picks one, then Prometheus binds it.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus must be installed (apt-get install prometheus; .ci/run does)");
        let prom = Prometheus { child, addr, dir };
        prom.wait_for("ready", Duration::from_secs(30), |p| {
            p.get_raw("/-/ready")
                .is_some_and(|(status, _)| status == 200)
        });
        prom
    }

    /// GET over HTTP/1.0 (no chunked answers to decode); None if not answering.
    fn get_raw(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        Some(parse_response(&response))
    }

    /// An API answer's `data`.
    fn api(&self, path: &str) -> Value {
        let (status, body) = self.get_raw(path).expect("prometheus answers");
        assert_eq!(status, 200, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{path}: {body}");
        v["data"].clone()
    }

    fn query(&self, expr: &str) -> Vec<Value> {
        self.api(&format!("/api/v1/query?query={}", percent_encode(expr)))["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            let log = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "prometheus: {what} not within {timeout:?}; its log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every query of the dashboard, with Grafana's variables as a dashboard
/// showing every host over a short window would set them.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(monitoring_dir().join("grafana-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".*")
                .replace("$__rate_interval", "15s");
            queries.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    assert!(queries.len() >= 15, "the dashboard has its panels");
    queries
}

#[test]
fn prometheus_scrapes_ringgate_and_every_rule_and_dashboard_query_works() {
    let server = Server::start(&["--shards", "2"]);
    // Load: subscribers on two topics, events published all along.
    let mut subscribers: Vec<Ws> = (0..8)
        .map(|i| ws_connect(&server, &format!("/ws?topics=t{}", i % 2)))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        let control = server.control;
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = post(control, &format!("/publish/t{}", n % 2), b"{\"n\":1}");
                assert_eq!(status, 200, "{body}");
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let reader = std::thread::spawn(move || {
        // Keep the subscribers reading so their queues drain.
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            for ws in &mut subscribers {
                match ws.read() {
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }
    });

    let prom = Prometheus::start(server.control);
    prom.wait_for("the ringgate target up", Duration::from_secs(30), |p| {
        p.api("/api/v1/targets")["activeTargets"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["health"] == "up"))
    });
    // Every rule loaded and evaluates without error.
    prom.wait_for("every rule evaluated", Duration::from_secs(30), |p| {
        let groups = p.api("/api/v1/rules")["groups"].clone();
        let rules: Vec<Value> = groups
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        assert_eq!(rules.len(), 10, "{rules:?}");
        for rule in &rules {
            assert_ne!(rule["health"], "err", "{rule}");
        }
        rules.iter().all(|r| r["health"] == "ok")
    });
    // Nothing is wrong with this host: no alert fires.
    let alerts = prom.api("/api/v1/alerts")["alerts"].clone();
    assert!(
        alerts
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["state"] != "firing"),
        "{alerts}"
    );
    // Every dashboard query returns data once a few scrapes are in.
    let queries = dashboard_queries();
    prom.wait_for("every dashboard query", Duration::from_secs(60), |p| {
        queries.iter().all(|(_, expr)| !p.query(expr).is_empty())
    });
    // And the figures are the host's: 8 connections, events delivered.
    let connections = prom.query("sum(ringgate_connections)");
    assert_eq!(connections[0]["value"][1], "8", "{connections:?}");
    let deliveries = prom.query("sum(increase(ringgate_messages_sent_total[1m]))");
    let delivered: f64 = deliveries[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(delivered > 0.0, "{deliveries:?}");
    stop.store(true, Ordering::Relaxed);
    publisher.join().unwrap();
    drop(server);
    let _ = reader.join();
}
