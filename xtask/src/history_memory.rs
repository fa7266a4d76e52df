//! `cargo xtask history-memory`: what the broker's topic state and history cost
//! in RSS, per topic and per held event, against what `--history-memory`
//! charges for them.
//!
//! A release ringgate (one shard, a history budget large enough to evict
//! nothing) gets one small event on each of `--topics` new topics, then
//! `--more` events on each of the first `--of` of them; RSS is read from /proc
//! and the broker's figures from `/stats` before and after each phase.

use std::time::Duration;

use crate::loadgen::proc_kib;
use crate::loadgen::wire::Http;
use crate::process::Ringgate;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// New topics, one event each.
    #[arg(long, default_value_t = 100_000)]
    topics: usize,
    /// Topics that then get `--more` events each.
    #[arg(long, default_value_t = 1_000)]
    of: usize,
    /// Further events per topic (at most --history-size 100 minus one are held).
    #[arg(long, default_value_t = 99)]
    more: usize,
}

pub fn run(args: &Args) -> Result<(), String> {
    if args.of > args.topics || args.more >= 100 {
        return Err("--of must be at most --topics and --more below 100 (the history size)".into());
    }
    crate::process::cargo(&["build", "--release", "-p", "ringgate"])?;
    let server = Ringgate::start(&["--shards", "1", "--history-memory", "4GiB"])?;
    let mut http = Http::connect(server.control)?;
    let body = br#"{"n":1}"#;
    let mut publish = |topic: &str| -> Result<(), String> {
        match http.request("POST", &format!("/publish/{topic}"), body)? {
            (200, _) => Ok(()),
            (status, answer) => Err(format!(
                "publish answered {status}: {}",
                String::from_utf8_lossy(&answer)
            )),
        }
    };
    // Warm the HTTP path and the allocator's arenas first.
    for i in 0..2_000 {
        publish(&format!("warm.{}", i % 10))?;
    }
    let measure = |server: &Ringgate| -> Result<(u64, serde_json::Value), String> {
        std::thread::sleep(Duration::from_millis(300));
        let rss = proc_kib(&format!("/proc/{}/status", server.pid()), "VmRSS:")
            .ok_or("cannot read the server's RSS")?;
        let stats = Http::connect(server.control)?.stats()?;
        Ok((rss, stats["totals"].clone()))
    };
    let (rss0, s0) = measure(&server)?;
    for i in 0..args.topics {
        publish(&format!("user.{i}"))?;
    }
    let (rss1, s1) = measure(&server)?;
    for _ in 0..args.more {
        for i in 0..args.of {
            publish(&format!("user.{i}"))?;
        }
    }
    let (rss2, s2) = measure(&server)?;
    let grew = |a: &serde_json::Value, b: &serde_json::Value, name: &str| {
        b[name].as_u64().unwrap_or(0) as f64 - a[name].as_u64().unwrap_or(0) as f64
    };
    let topics = grew(&s0, &s1, "broker_topics");
    let events = grew(&s1, &s2, "history_events");
    println!(
        "topics          +{topics:.0}: RSS per topic with one held event {:.0} B (charged to the history budget {:.0} B)",
        (rss1 - rss0) as f64 / topics,
        grew(&s0, &s1, "history_bytes") / topics
    );
    println!(
        "held events     +{events:.0}: RSS per further held event {:.0} B (charged {:.0} B; frames of {} B)",
        (rss2 - rss1) as f64 / events,
        grew(&s1, &s2, "history_bytes") / events,
        r#"{"topic":"user.1","seq":2,"data":{"n":1}}"#.len() + 2
    );
    Ok(())
}
