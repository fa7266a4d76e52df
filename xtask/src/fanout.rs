//! Fanout benchmark: one topic, N subscribers, events of B bytes published
//! through the HTTP API as fast as it takes them. Reports delivered events per
//! second, publish-to-receive latency percentiles (hdrhistogram), losses per
//! subscriber, and the server's CPU time per delivery.
//!
//! Every event carries its publish time (`"t"`, nanoseconds of CLOCK_REALTIME),
//! so latency is measured per delivery. Subscribers are raw sockets read by one
//! epoll thread; the publisher keeps one HTTP connection alive. A publish answered
//! 503 (a shard inbox was full) is counted; its `seq` may reach some subscribers
//! and is not counted as lost anywhere.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

use crate::density::{server_stats, upgrade_request};
use crate::process::Ringgate;

#[derive(clap::Args)]
pub struct Args {
    /// Subscribers (one process: at most about 19,000).
    #[arg(long, default_value_t = 10_000)]
    subs: usize,
    /// Events to publish.
    #[arg(long, default_value_t = 2_000)]
    events: u64,
    /// Event body size in bytes (at least 40: it carries a timestamp).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Publish at this many events per second (default: as fast as the API takes them).
    #[arg(long)]
    rate: Option<f64>,
    /// Server shards.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Pin the benchmark's threads to this CPU (the server's shard 0 is pinned to CPU 0).
    #[arg(long, default_value_t = 1)]
    pin: usize,
}

pub fn run(args: &Args) -> Result<(), String> {
    if args.size < 40 {
        return Err("--size must be at least 40 bytes".into());
    }
    crate::process::cargo(&["build", "--release", "-p", "ringgate"])?;
    pin_to(args.pin);
    let shards = args.shards.to_string();
    let server = Ringgate::start(&["--shards", &shards])?;
    let mut subscribers = Vec::with_capacity(args.subs);
    let request = upgrade_request("/ws?topics=bench");
    for i in 0..args.subs {
        let mut s = TcpStream::connect(server.ws).map_err(|e| format!("subscriber {i}: {e}"))?;
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        subscribers.push(s);
    }
    let mut response = [0u8; 129];
    for s in &mut subscribers {
        s.read_exact(&mut response)
            .map_err(|e| format!("reading a 101: {e}"))?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
    }
    wait_until(Duration::from_secs(30), || {
        server_stats(&server).is_ok_and(|s| s["totals"]["subscriptions"] == args.subs as u64)
    })?;
    let cpu_before = cpu_seconds(server.pid())?;
    let done = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(Mutex::new(Vec::<u64>::new()));
    let received_total = Arc::new(AtomicU64::new(0));
    let receiver = {
        let (done, received_total, events) = (done.clone(), received_total.clone(), args.events);
        std::thread::spawn(move || receive(subscribers, events, &done, &received_total))
    };
    let started = Instant::now();
    let publisher = publish(&server, args, &accepted)?;
    let published_in = started.elapsed();
    // Wait for every accepted event to reach every subscriber (or give up).
    let expected = publisher.accepted * args.subs as u64;
    let _ = wait_until(Duration::from_secs(60), || {
        received_total.load(Ordering::Relaxed) >= expected
    });
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let report = receiver.join().map_err(|_| "the receiver panicked")??;
    let cpu = cpu_seconds(server.pid())? - cpu_before;
    let accepted = accepted.lock().unwrap();
    let lost = report.lost(&accepted);
    let delivered = report.latency.len();
    let ms = |v: u64| v as f64 / 1e6;
    let pace = args.rate.map_or("as fast as accepted".to_string(), |r| {
        format!("at {r} events/s")
    });
    println!(
        "fanout: {} subscribers x {} events of {} B, {pace}, {} shard(s)",
        args.subs, args.events, args.size, args.shards
    );
    println!(
        "published            {} accepted, {} answered 503, in {:.2} s",
        publisher.accepted,
        publisher.busy,
        published_in.as_secs_f64()
    );
    println!(
        "delivered            {delivered} in {:.2} s = {:.0} deliveries/s",
        elapsed.as_secs_f64(),
        delivered as f64 / elapsed.as_secs_f64()
    );
    println!(
        "lost                 {lost}   out of order: {}",
        report.out_of_order
    );
    println!(
        "latency ms           p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        ms(report.latency.value_at_quantile(0.5)),
        ms(report.latency.value_at_quantile(0.9)),
        ms(report.latency.value_at_quantile(0.99)),
        ms(report.latency.value_at_quantile(0.999)),
        ms(report.latency.max())
    );
    println!(
        "server CPU           {:.2} s = {:.2} us per delivery",
        cpu,
        cpu * 1e6 / delivered.max(1) as f64
    );
    println!(
        "benchmark CPU        {:.2} s (near the elapsed time: the client was the bottleneck)",
        own_cpu_seconds()
    );
    if lost > 0 || report.out_of_order > 0 {
        return Err(format!(
            "{lost} deliveries lost, {} out of order",
            report.out_of_order
        ));
    }
    Ok(())
}

struct Publisher {
    accepted: u64,
    busy: u64,
}

/// Publishes on one keep-alive connection, each event as soon as the previous
/// answer arrives. Records the seq of every accepted event.
fn publish(
    server: &Ringgate,
    args: &Args,
    accepted: &Mutex<Vec<u64>>,
) -> Result<Publisher, String> {
    let mut conn = TcpStream::connect(server.control).map_err(|e| e.to_string())?;
    conn.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut result = Publisher {
        accepted: 0,
        busy: 0,
    };
    let mut buf = vec![0u8; 4096];
    let started = Instant::now();
    for i in 0..args.events {
        if let Some(rate) = args.rate {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let head = format!("{{\"t\":{t},\"p\":\"");
        let pad = args.size.saturating_sub(head.len() + 2);
        let body = format!("{head}{}\"}}", "x".repeat(pad));
        let request = format!(
            "POST /publish/bench HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        let (status, answer) = read_response(&mut conn, &mut buf)?;
        match status {
            200 => {
                let seq = serde_json::from_slice::<serde_json::Value>(&answer)
                    .ok()
                    .and_then(|v| v["seq"].as_u64())
                    .ok_or("publish answer without seq")?;
                accepted.lock().unwrap().push(seq);
                result.accepted += 1;
            }
            503 => {
                result.busy += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            other => {
                return Err(format!(
                    "publish answered {other}: {}",
                    String::from_utf8_lossy(&answer)
                ))
            }
        }
    }
    Ok(result)
}

/// Reads one HTTP/1.1 response with a Content-Length body.
fn read_response(conn: &mut TcpStream, buf: &mut [u8]) -> Result<(u16, Vec<u8>), String> {
    let mut have = 0;
    loop {
        let n = conn.read(&mut buf[have..]).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the control plane closed the connection".into());
        }
        have += n;
        let text = &buf[..have];
        if let Some(end) = text.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&text[..end]).to_ascii_lowercase();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or("bad status line")?;
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if have >= end + 4 + length {
                return Ok((status, text[end + 4..end + 4 + length].to_vec()));
            }
        }
        if have == buf.len() {
            return Err("response too large".into());
        }
    }
}

struct Report {
    latency: Histogram<u64>,
    /// Per subscriber, which seqs arrived (bit seq-1).
    seen: Vec<Vec<u64>>,
    out_of_order: u64,
}

impl Report {
    fn lost(&self, accepted: &[u64]) -> u64 {
        let mut lost = 0;
        for seen in &self.seen {
            for &seq in accepted {
                let bit = (seq - 1) as usize;
                if seen
                    .get(bit / 64)
                    .is_none_or(|w| w & (1 << (bit % 64)) == 0)
                {
                    lost += 1;
                }
            }
        }
        lost
    }
}

/// Reads every subscriber with epoll until `done`; parses frames, checks order,
/// records latencies.
fn receive(
    subs: Vec<TcpStream>,
    events: u64,
    done: &AtomicBool,
    total: &AtomicU64,
) -> Result<Report, String> {
    // SAFETY: epoll_create1 has no pointer arguments; the result is checked.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    for (i, s) in subs.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: a valid epoll fd, socket fd and event struct.
        if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
    }
    let mut report = Report {
        latency: Histogram::new_with_bounds(1_000, 120_000_000_000, 3)
            .map_err(|e| e.to_string())?,
        seen: vec![vec![0u64; (events as usize).div_ceil(64) + 1]; subs.len()],
        out_of_order: 0,
    };
    let mut pending: Vec<Vec<u8>> = vec![Vec::new(); subs.len()];
    let mut last_seq = vec![0u64; subs.len()];
    let mut ready = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut chunk = vec![0u8; 256 * 1024];
    while !done.load(Ordering::Relaxed) {
        // SAFETY: `ready` has room for its length of events.
        let n = unsafe { libc::epoll_wait(epoll, ready.as_mut_ptr(), ready.len() as i32, 50) };
        for ev in &ready[..n.max(0) as usize] {
            let i = ev.u64 as usize;
            loop {
                match (&subs[i]).read(&mut chunk) {
                    Ok(0) => return Err(format!("subscriber {i} was disconnected")),
                    Ok(k) => {
                        pending[i].extend_from_slice(&chunk[..k]);
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap()
                            .as_nanos() as u64;
                        let got = parse_frames(&mut pending[i], |payload| {
                            let (Some(seq), Some(t)) = (
                                number_after(payload, b"\"seq\":"),
                                number_after(payload, b"\"t\":"),
                            ) else {
                                return;
                            };
                            if seq <= last_seq[i] {
                                report.out_of_order += 1;
                            }
                            last_seq[i] = seq;
                            let bit = (seq - 1) as usize;
                            if let Some(word) = report.seen[i].get_mut(bit / 64) {
                                *word |= 1 << (bit % 64);
                            }
                            let _ = report.latency.record(now.saturating_sub(t).max(1_000));
                        });
                        total.fetch_add(got, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("subscriber {i}: {e}")),
                }
            }
        }
    }
    // SAFETY: closes the epoll fd we created.
    unsafe { libc::close(epoll) };
    Ok(report)
}

/// Calls `each` with the payload of every complete unmasked frame at the start
/// of `buf`, removes them, and returns how many there were.
fn parse_frames(buf: &mut Vec<u8>, mut each: impl FnMut(&[u8])) -> u64 {
    let mut at = 0;
    let mut count = 0;
    loop {
        let rest = &buf[at..];
        if rest.len() < 2 {
            break;
        }
        let (len, head) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 if rest.len() >= 10 => (
                u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if rest.len() < head + len {
            break;
        }
        if rest[0] & 0x0f == 0x1 {
            each(&rest[head..head + len]);
            count += 1;
        }
        at += head + len;
    }
    buf.drain(..at);
    count
}

/// The number after `key` in `haystack`. Events start `{"topic":T,"seq":N,"data":{"t":...`,
/// so the search is short.
fn number_after(haystack: &[u8], key: &[u8]) -> Option<u64> {
    let at = haystack.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = haystack[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&haystack[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            return Err("timed out".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    let after_comm = &stat[stat.rfind(')').ok_or("bad /proc stat")? + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().map_err(|e| e.to_string())?
        + fields[12].parse::<f64>().map_err(|e| e.to_string())?;
    // SAFETY: sysconf has no pointer arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// This process's user + system CPU time, in seconds.
fn own_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain data filled by getrusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: passes a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_numbers_parse() {
        let mut buf = vec![0x81, 5, b'{', b'"', b't', b'"', b':'];
        buf.extend_from_slice(&[0x81, 3, b'a', b'b']);
        let mut seen = Vec::new();
        assert_eq!(parse_frames(&mut buf, |p| seen.push(p.to_vec())), 1);
        assert_eq!(buf, vec![0x81, 3, b'a', b'b']);
        assert_eq!(
            number_after(br#"{"topic":"x","seq":42,"data":{"t":7}}"#, b"\"seq\":"),
            Some(42)
        );
        assert_eq!(number_after(br#"{"seq":42}"#, b"\"t\":"), None);
    }
}
