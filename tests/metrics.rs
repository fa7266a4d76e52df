//! End to end: `/metrics` in the Prometheus exposition format, parsed by a real
//! parser and checked line by line, with figures that match what the test did.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use tungstenite::Message;

/// A parsed scrape: sample values by metric name and sorted labels.
struct Metrics {
    samples: Vec<prometheus_parse::Sample>,
}

impl Metrics {
    fn scrape(server: &Server) -> Metrics {
        let (status, body) = server.control_get("/metrics");
        assert_eq!(status, 200);
        check_exposition(&body);
        let lines = body.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("the exposition parses");
        Metrics {
            samples: scrape.samples,
        }
    }

    /// The sum over every sample of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(buckets) => {
                    buckets.last().map_or(0.0, |b| b.count)
                }
                other => panic!("{name}: unexpected {other:?}"),
            })
            .collect();
        assert!(!matching.is_empty(), "no sample {name} {labels:?}");
        matching.iter().sum()
    }
}

/// Every line is a HELP, a TYPE, or a sample `name{labels} value` of a metric
/// whose TYPE came first; names and label syntax follow the format.
fn check_exposition(body: &str) {
    let mut types: HashMap<String, String> = HashMap::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())
            })
    };
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            assert!(valid_name(rest.split(' ').next().unwrap()), "{line}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "TYPE twice: {line}"
            );
        } else {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("no value: {line}"));
            assert!(
                value.parse::<f64>().is_ok() || value == "+Inf",
                "bad value: {line}"
            );
            let name = series.split('{').next().unwrap();
            assert!(valid_name(name), "{line}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(name);
            assert!(types.contains_key(family), "sample before its TYPE: {line}");
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                    for pair in labels[1..labels.len() - 1].split(',') {
                        let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
                        assert!(
                            valid_name(k) && v.starts_with('"') && v.ends_with('"'),
                            "{line}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn metrics_match_what_the_clients_did() {
    let server = Server::start(&["--shards", "2", "--echo"]);
    let before = Metrics::scrape(&server);
    assert_eq!(before.sum("ringgate_connections", &[]), 0.0);
    let subscribers: Vec<_> = (0..10)
        .map(|_| raw_upgrade(&server, "/ws?topics=m"))
        .collect();
    let mut echo = ws_connect(&server, "/echo");
    for i in 0..7 {
        echo.send(Message::text(format!("e{i}"))).unwrap();
        echo.read().unwrap();
    }
    server.wait_for("11 connections", Duration::from_secs(10), |s| {
        s.total("connections") == 11
    });
    for i in 0..5 {
        server.publish("m", &i.to_string());
    }
    let _ = http_get(server.ws, "/nope"); // a refusal: 404
    server.wait_for(
        "every delivery sent and merged",
        Duration::from_secs(10),
        |s| {
            let m = Metrics::scrape(s);
            m.sum("ringgate_delivery_latency_seconds", &[]) >= 50.0
        },
    );
    let m = Metrics::scrape(&server);
    assert_eq!(m.sum("ringgate_connections", &[]), 11.0);
    assert_eq!(m.sum("ringgate_direct_descriptors", &[]), 11.0);
    assert_eq!(m.sum("ringgate_subscriptions", &[]), 10.0);
    // One topic on each shard that holds subscribers: SO_REUSEPORT's hash
    // usually spreads ten clients over both shards, but not always.
    let shards_with_subscribers = ["0", "1"]
        .iter()
        .filter(|id| m.sum("ringgate_subscriptions", &[("shard", id)]) > 0.0)
        .count();
    assert_eq!(
        m.sum("ringgate_topics", &[]),
        shards_with_subscribers as f64,
        "one topic per shard that has subscribers"
    );
    assert_eq!(m.sum("ringgate_publish_total", &[]), 5.0);
    assert_eq!(m.sum("ringgate_messages_sent_total", &[]), 5.0 * 10.0 + 7.0);
    assert_eq!(m.sum("ringgate_messages_received_total", &[]), 7.0);
    assert_eq!(m.sum("ringgate_delivery_latency_seconds", &[]), 50.0);
    assert_eq!(
        m.sum(
            "ringgate_connections_rejected_total",
            &[("reason", "not_found")]
        ),
        1.0
    );
    assert_eq!(m.sum("ringgate_connections_accepted_total", &[]), 12.0);
    assert!(m.sum("ringgate_bytes_sent_total", &[]) > 0.0);
    let rss = m.sum("ringgate_process_resident_memory_bytes", &[]);
    assert!(rss > 1e6);
    // RSS growth since start over the 11 connections cannot exceed the whole
    // RSS shared among them (a figure in the wrong unit, or over the wrong
    // count, would).
    let growth = m.sum(
        "ringgate_memory_bytes_per_connection",
        &[("kind", "rss_growth")],
    );
    assert!(
        growth * 11.0 <= rss + 11.0,
        "rss_growth {growth} B x 11 connections is more than the RSS {rss}"
    );
    assert!(
        m.sum(
            "ringgate_memory_bytes_per_connection",
            &[("kind", "kernel_host")]
        ) >= 0.0
    );
    let per_shard: Vec<f64> = ["0", "1"]
        .iter()
        .map(|id| m.sum("ringgate_connections", &[("shard", id)]))
        .collect();
    assert_eq!(per_shard.iter().sum::<f64>(), 11.0);
    drop(subscribers);
    server.wait_for("the subscribers to go", Duration::from_secs(10), |s| {
        s.total("connections") == 1
    });
    let m = Metrics::scrape(&server);
    assert_eq!(m.sum("ringgate_subscriptions", &[]), 0.0);
    assert_eq!(m.sum("ringgate_topics", &[]), 0.0);
}

#[test]
fn an_enobufs_run_moves_the_exhausted_counter() {
    let server = Server::start(STARVED_RING);
    assert_eq!(
        Metrics::scrape(&server).sum("ringgate_buffer_ring_exhausted_total", &[]),
        0.0
    );
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let mut ws = ws_connect(&server, "/echo");
            std::thread::spawn(move || {
                for _ in 0..10 {
                    ws.send(Message::binary(vec![7u8; 2000])).unwrap();
                }
                for _ in 0..10 {
                    assert_eq!(ws.read().unwrap().len(), 2000);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let m = Metrics::scrape(&server);
    assert!(m.sum("ringgate_buffer_ring_exhausted_total", &[]) > 0.0);
    // Every buffer went back, except (with incremental consumption) the one the
    // kernel is partly filling.
    assert!(m.sum("ringgate_buffer_ring_in_use", &[]) <= 1.0);
}

/// The standard process metrics and the build's version and revision, so stock
/// dashboards and alerts work.
#[test]
fn process_metrics_and_build_info_are_exported() {
    let server = Server::start(&[]);
    let m = Metrics::scrape(&server);
    // Present (a fresh process may not have used a 10 ms tick yet).
    assert!(m.sum("process_cpu_seconds_total", &[]) >= 0.0);
    let rss = m.sum("process_resident_memory_bytes", &[]);
    assert!(rss > 1e6 && rss < 1e9, "{rss}");
    assert!(m.sum("process_virtual_memory_bytes", &[]) >= rss);
    let open = m.sum("process_open_fds", &[]);
    assert!(open >= 3.0 && open <= m.sum("process_max_fds", &[]));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = m.sum("process_start_time_seconds", &[]);
    assert!(
        start <= now + 1.0 && start > now - 120.0,
        "{start} vs {now}"
    );
    let build = m
        .samples
        .iter()
        .find(|s| s.metric == "ringgate_build_info")
        .expect("ringgate_build_info");
    assert_eq!(build.labels.get("version"), Some(env!("CARGO_PKG_VERSION")));
    let revision = build.labels.get("revision").expect("a revision label");
    assert!(!revision.is_empty());
    // Per-shard figures all carry the shard label, refusals, recoveries and
    // the latency histogram included; an empty histogram's sum is plain 0.
    let (_, body) = server.control_get("/metrics");
    for prefix in [
        "ringgate_connections_rejected_total{",
        "ringgate_recoveries_total{",
        "ringgate_delivery_latency_seconds_",
        "ringgate_connections{",
    ] {
        let lines: Vec<&str> = body.lines().filter(|l| l.starts_with(prefix)).collect();
        assert!(!lines.is_empty(), "{prefix}");
        assert!(
            lines.iter().all(|l| l.contains("shard=\"")),
            "{prefix}: {lines:?}"
        );
    }
    assert!(
        body.contains("ringgate_delivery_latency_seconds_sum{shard=\"0\"} 0\n"),
        "{body}"
    );
}

#[test]
fn a_backlog_shows_its_bytes_its_clients_and_its_age_then_drains() {
    let server = Server::start(&["--shards", "1", "--send-queue-limit", "64MiB"]);
    // A subscriber with a small receive buffer that does not read.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.ws.into()).unwrap();
    let mut s: std::net::TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    use std::io::Write;
    s.write_all(upgrade_request("/ws?topics=big", "").as_bytes())
        .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 101 "));
    // 12 MB of events: more than the kernel's socket buffers hold.
    let event = format!("\"{}\"", "x".repeat(512 * 1024));
    for _ in 0..24 {
        let (status, body) = post(server.control, "/publish/big", event.as_bytes());
        assert_eq!(status, 200, "{body}");
    }
    server.wait_for("a backlog", Duration::from_secs(10), |s| {
        s.total("send_queue_connections") == 1 && s.total("send_queue_oldest_microseconds") > 0
    });
    let first = server.total("send_queue_oldest_microseconds");
    server.wait_for("the backlog to age", Duration::from_secs(10), |s| {
        s.total("send_queue_oldest_microseconds") >= first + 1_000_000
    });
    let m = Metrics::scrape(&server);
    assert!(m.sum("ringgate_send_queue_bytes", &[]) > 1_000_000.0);
    assert_eq!(
        m.sum("ringgate_send_queue_connections", &[("shard", "0")]),
        1.0
    );
    assert!(m.sum("ringgate_send_queue_oldest_seconds", &[("shard", "0")]) >= 1.0);
    // The client reads everything: the backlog is gone at the next tick.
    let mut got = 0;
    while got < 24 {
        let (b0, _) = read_frame(&mut s).expect("an event");
        if b0 & 0x0f == 1 {
            got += 1;
        }
    }
    server.wait_for("the backlog to drain", Duration::from_secs(10), |s| {
        s.total("send_queue_connections") == 0
            && s.total("send_queue_oldest_microseconds") == 0
            && s.total("send_queue_bytes") == 0
    });
}

#[test]
fn memory_per_connection_is_what_the_connections_hold() {
    let server = Server::start(&["--shards", "1"]);
    let clients: Vec<std::net::TcpStream> = (0..300)
        .map(|_| raw_upgrade(&server, "/ws?topics=news"))
        .collect();
    server.wait_for("300 connections counted", Duration::from_secs(10), |s| {
        s.total("connections") == 300 && s.total("connection_bytes") > 0
    });
    // A tick later the figure covers all of them.
    std::thread::sleep(Duration::from_millis(1100));
    let m = Metrics::scrape(&server);
    let user = m.sum("ringgate_memory_bytes_per_connection", &[("kind", "user")]);
    // Each holds its 48-byte record (in a table grown by doubling: 512 slots
    // for 300) and a 4-byte place in the topic's subscriber array; fixed
    // per-shard costs (rings, buffers, pools) are not in it, whatever the
    // count. README's figure at 15,000 is 46-61 B.
    assert!(
        (48.0..=128.0).contains(&user),
        "user {user} B per connection"
    );
    let stats = server.stats();
    let in_stats = stats["totals"]["memory_bytes_per_connection_user"]
        .as_f64()
        .unwrap();
    assert!(
        (in_stats - user).abs() < 0.1,
        "{in_stats} in /stats, {user} in /metrics"
    );
    drop(clients);
}
