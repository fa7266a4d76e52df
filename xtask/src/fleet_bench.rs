//! `cargo xtask fleet-bench`: one host alone (the embedded broker) against two
//! hosts sharing a real `redis-server`, in one run on this machine: fanout to
//! the same subscribers as a burst and at a steady rate, publish throughput
//! from one publisher, from eight concurrent ones and in batches of 100 (the
//! batch API: one Redis round trip per 100 events), and what a Redis
//! restart costs (time until a publish is taken and delivered again).
//!
//! Every process shares the machine's cores, so the two-host figures include
//! the second host's and Redis' CPU: they show what the bus costs, not what two
//! machines would do.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bench::{base_args, human};
use crate::loadgen::{self, publish, Scenario};
use crate::process::Ringgate;

#[derive(clap::Args)]
pub struct Args {
    /// Smaller figures, about a minute.
    #[arg(long)]
    quick: bool,
    /// Seconds Redis stays down in the restart measurement.
    #[arg(long, default_value_t = 3.0)]
    outage: f64,
}

/// redis-server without persistence on a free loopback port.
struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    fn start() -> Result<Redis, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let mut redis = Redis { child: None, port };
        redis.restart()?;
        Ok(redis)
    }

    fn restart(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e} (apt-get install redis-server)"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return Err("redis-server did not start".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The figures of one setup.
#[derive(Default)]
struct Figures {
    burst_per_s: f64,
    burst_lost: u64,
    steady_p50_ms: f64,
    steady_p99_ms: f64,
    steady_lost: u64,
    publish_one: f64,
    publish_eight: f64,
    publish_eight_p99_ms: f64,
    publish_batched: f64,
}

fn measure(hosts: &[&Ringgate], quick: bool) -> Result<Figures, String> {
    let ws: Vec<String> = hosts.iter().map(|h| format!("ws://{}", h.ws)).collect();
    let controls: Vec<String> = hosts
        .iter()
        .map(|h| format!("http://{}", h.control))
        .collect();
    let fanout = |events: u64, rate: Option<f64>| -> Result<loadgen::report::Report, String> {
        let mut a = base_args(
            Scenario::Fanout,
            &hosts[0].ws.to_string(),
            &hosts[0].control.to_string(),
            quick,
        );
        a.targets = Some(ws.join(","));
        a.control = controls.join(",");
        a.procs = 2;
        a.conns = if quick { 2_000 } else { 10_000 };
        (a.events, a.rate) = (events, rate);
        loadgen::run(&a)
    };
    let burst = fanout(if quick { 100 } else { 200 }, None)?;
    let steady = fanout(if quick { 30 } else { 100 }, Some(10.0))?;
    let publishing = |publishers: usize, events: u64, batch: usize| {
        let mut a = base_args(
            Scenario::Publish,
            &hosts[0].ws.to_string(),
            &hosts[0].control.to_string(),
            quick,
        );
        a.control = controls.join(",");
        (a.publishers, a.events, a.topics, a.batch) = (Some(publishers), events, 100, batch);
        publish::run(&a)
    };
    let one = publishing(1, if quick { 2_000 } else { 10_000 }, 1)?;
    let eight = publishing(8, if quick { 8_000 } else { 40_000 }, 1)?;
    let batched = publishing(1, if quick { 50_000 } else { 200_000 }, 100)?;
    let lost = |r: &loadgen::report::Report| r.expected.saturating_sub(r.delivered);
    let ms = |r: &loadgen::report::Report, p99: bool| {
        r.latency_ms
            .as_ref()
            .map_or(f64::NAN, |l| if p99 { l.p99 } else { l.p50 })
    };
    Ok(Figures {
        burst_per_s: burst.deliveries_per_second.unwrap_or(0.0),
        burst_lost: lost(&burst),
        steady_p50_ms: ms(&steady, false),
        steady_p99_ms: ms(&steady, true),
        steady_lost: lost(&steady),
        publish_one: one.events_per_second,
        publish_eight: eight.events_per_second,
        publish_eight_p99_ms: eight.answer_ms.as_ref().map_or(f64::NAN, |p| p.p99),
        publish_batched: batched.events_per_second,
    })
}

/// Kills Redis for `outage`, restarts it, and returns how long after the
/// restart a publish through the first host was taken and a subscriber on the
/// second got it.
fn restart_cost(redis: &mut Redis, hosts: &[&Ringgate], outage: Duration) -> Result<f64, String> {
    let mut subscriber = ws_subscribe(hosts[1].ws, "restart.probe")?;
    redis.kill();
    std::thread::sleep(outage);
    redis.restart()?;
    let restarted = Instant::now();
    loop {
        if restarted.elapsed() > Duration::from_secs(30) {
            return Err("events did not flow within 30 s of the restart".into());
        }
        if post(hosts[0].control, "/publish/restart.probe", b"1")? == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The subscriber gets a gap notice (Redis lost the topic), then the event.
    loop {
        let text = read_text(&mut subscriber)?;
        if text.contains("\"seq\":1") && text.contains("\"data\"") {
            return Ok(restarted.elapsed().as_secs_f64());
        }
    }
}

fn ws_subscribe(addr: SocketAddr, topic: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(loadgen::wire::upgrade_request(&format!("/ws?topics={topic}")).as_bytes())
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).map_err(|e| e.to_string())?;
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(format!(
            "upgrade refused: {}",
            String::from_utf8_lossy(&head)
        ));
    }
    Ok(s)
}

/// The next text frame's payload (server frames are unmasked; pings skipped).
fn read_text(s: &mut TcpStream) -> Result<String, String> {
    loop {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).map_err(|e| e.to_string())?;
        let len = match head[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).map_err(|e| e.to_string())?;
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                s.read_exact(&mut b).map_err(|e| e.to_string())?;
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).map_err(|e| e.to_string())?;
        if head[0] & 0x0f == 0x1 {
            return Ok(String::from_utf8_lossy(&payload).into_owned());
        }
    }
}

fn post(addr: SocketAddr, path: &str, body: &[u8]) -> Result<u16, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: b\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    s.write_all(body).map_err(|e| e.to_string())?;
    let mut status = String::new();
    BufReader::new(s)
        .read_line(&mut status)
        .map_err(|e| e.to_string())?;
    status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {status:?}"))
}

pub fn run(args: &Args) -> Result<(), String> {
    crate::process::cargo(&["build", "--release", "-p", "ringgate"])?;
    let one = {
        let host = Ringgate::start(&["--shards", "1", "--no-pin"])?;
        measure(&[&host], args.quick)?
    };
    let mut redis = Redis::start()?;
    let url = redis.url();
    let a = Ringgate::start(&["--shards", "1", "--no-pin", "--broker", &url])?;
    let b = Ringgate::start(&["--shards", "1", "--no-pin", "--broker", &url])?;
    let two = measure(&[&a, &b], args.quick)?;
    let restart = restart_cost(&mut redis, &[&a, &b], Duration::from_secs_f64(args.outage))?;
    let rows: [(&str, &str, f64, f64, bool); 9] = [
        (
            "fanout burst: deliveries/s",
            "/s",
            one.burst_per_s,
            two.burst_per_s,
            false,
        ),
        (
            "fanout burst: lost",
            "",
            one.burst_lost as f64,
            two.burst_lost as f64,
            true,
        ),
        (
            "fanout 10 ev/s: latency p50",
            "ms",
            one.steady_p50_ms,
            two.steady_p50_ms,
            true,
        ),
        (
            "fanout 10 ev/s: latency p99",
            "ms",
            one.steady_p99_ms,
            two.steady_p99_ms,
            true,
        ),
        (
            "fanout 10 ev/s: lost",
            "",
            one.steady_lost as f64,
            two.steady_lost as f64,
            true,
        ),
        (
            "publish, 1 publisher: events/s",
            "/s",
            one.publish_one,
            two.publish_one,
            false,
        ),
        (
            "publish, 8 publishers: events/s",
            "/s",
            one.publish_eight,
            two.publish_eight,
            false,
        ),
        (
            "publish, 8 publishers: answer p99",
            "ms",
            one.publish_eight_p99_ms,
            two.publish_eight_p99_ms,
            true,
        ),
        (
            "publish, batches of 100: events/s",
            "/s",
            one.publish_batched,
            two.publish_batched,
            false,
        ),
    ];
    let subscribers = if args.quick { 2_000 } else { 10_000 };
    println!("{subscribers} subscribers x 64 B events; two hosts: one shard each, both on one redis-server");
    println!(
        "{:<40} {:>14} {:>16} {:>9}",
        "figure", "one host", "two + Redis", "ratio"
    );
    for (name, unit, o, t, lower_better) in rows {
        let ratio = if o == 0.0 && t == 0.0 {
            "-".to_string()
        } else if lower_better {
            format!("{:.2}x", o / t)
        } else {
            format!("{:.2}x", t / o)
        };
        println!(
            "{name:<40} {:>14} {:>16} {ratio:>9}",
            format!("{} {unit}", human(o)),
            format!("{} {unit}", human(t)),
        );
    }
    println!(
        "redis restart after {:.1} s down: events flow again after {:.2} s",
        args.outage, restart
    );
    println!("ratio: two hosts over Redis relative to one host (above 1: the fleet does better)");
    if one.burst_lost + one.steady_lost + two.burst_lost + two.steady_lost > 0 {
        return Err("events were lost".into());
    }
    Ok(())
}
