//! Memory per idle connection: open N WebSocket connections to `/ws`, let them
//! sit, and divide the server's RSS growth (user space) and the machine's slab
//! growth (kernel: both socket ends on loopback, so it is an upper bound for the
//! server's share) by N.
//!
//! One client process holds the connections, so N is bounded by its open-file
//! limit; the load generator will spread more over processes and source addresses.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::loadgen::wire::{upgrade_request, Http};
use crate::process::Ringgate;

#[derive(clap::Args)]
pub struct Args {
    /// Idle connections to open.
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Shards for the server.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Path the idle connections upgrade on (/ws or /echo).
    #[arg(long, default_value = "/ws?topics=user.42")]
    path: String,
    /// Pass --park-after to the server (idle connections armed with a poll, not a recv).
    #[arg(long)]
    park_after: Option<String>,
    /// Seconds to hold the connections before measuring.
    #[arg(long, default_value_t = 2)]
    hold: u64,
}

pub fn run(args: &Args) -> Result<(), String> {
    crate::process::cargo(&["build", "--release", "-p", "ringgate"])?;
    let shards = args.shards.to_string();
    // Parking is on by default (30 s): a long --hold would otherwise measure it.
    let park_after = args.park_after.as_deref().unwrap_or("off");
    let server_args = vec!["--shards", &shards, "--echo", "--park-after", park_after];
    let server = Ringgate::start(&server_args)?;
    // Touch every receive buffer first: their pages are a fixed cost of the
    // buffer ring (--buffers x --buffer-size per shard), not a cost per connection.
    warm_buffer_ring(&server, 2 * 512 * 16 * 1024 * args.shards)?;
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = rss_bytes(server.pid())?;
    let slab_before = meminfo_bytes("Slab")?;
    let started = Instant::now();
    let request = upgrade_request(&args.path);
    let mut conns = Vec::with_capacity(args.conns);
    for i in 0..args.conns {
        let mut s = TcpStream::connect(server.ws).map_err(|e| format!("connection {i}: {e}"))?;
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        conns.push(s);
    }
    let mut response = [0u8; 129];
    for s in &mut conns {
        s.read_exact(&mut response)
            .map_err(|e| format!("reading a 101: {e}"))?;
        if !response.starts_with(b"HTTP/1.1 101 ") {
            return Err(format!(
                "not upgraded: {:?}",
                String::from_utf8_lossy(&response)
            ));
        }
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(args.hold));
    let held = server_connections(&server)?;
    if held != args.conns as u64 {
        return Err(format!(
            "the server holds {held} connections, not {}",
            args.conns
        ));
    }
    let rss_after = rss_bytes(server.pid())?;
    let slab_after = meminfo_bytes("Slab")?;
    let n = args.conns as f64;
    let user = (rss_after as f64 - rss_before as f64) / n;
    let kernel = (slab_after as f64 - slab_before as f64) / n;
    println!("connections          {}", args.conns);
    println!("shards               {}", args.shards);
    println!("path                 {}", args.path);
    println!(
        "connect+upgrade      {:.2} s ({:.0}/s)",
        connect_seconds,
        n / connect_seconds
    );
    println!(
        "server RSS           {} KiB -> {} KiB",
        rss_before / 1024,
        rss_after / 1024
    );
    println!("user space / conn    {user:.0} B   (server RSS growth / connections)");
    println!("kernel slab / conn   {kernel:.0} B   (machine Slab growth / connections; both loopback ends)");
    println!(
        "{}",
        serde_json::json!({"connections": args.conns, "shards": args.shards, "user_bytes_per_conn": user, "kernel_slab_bytes_per_conn": kernel})
    );
    Ok(())
}

/// Echoes `bytes` through `/echo` in 32 KiB binary frames (masked with a zero
/// key, so the payload goes on the wire as is).
fn warm_buffer_ring(server: &Ringgate, bytes: usize) -> Result<(), String> {
    const CHUNK: usize = 32 * 1024;
    let mut s = TcpStream::connect(server.ws).map_err(|e| e.to_string())?;
    let request = upgrade_request("/echo");
    s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut response = [0u8; 129];
    s.read_exact(&mut response).map_err(|e| e.to_string())?;
    let mut frame = vec![0x82, 0xfe, (CHUNK >> 8) as u8, CHUNK as u8, 0, 0, 0, 0];
    frame.extend(std::iter::repeat_n(0x5a, CHUNK));
    let mut echo = vec![0u8; 4 + CHUNK];
    for _ in 0..bytes.div_ceil(CHUNK) {
        s.write_all(&frame).map_err(|e| e.to_string())?;
        s.read_exact(&mut echo).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `connections` summed over shards, from the control plane's `/stats`.
fn server_connections(server: &Ringgate) -> Result<u64, String> {
    let stats = Http::connect(server.control)?.stats()?;
    stats["totals"]["connections"]
        .as_u64()
        .ok_or_else(|| "/stats has no connections".into())
}

fn rss_bytes(pid: u32) -> Result<u64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    kib_field(&status, "VmRSS:")
}

fn meminfo_bytes(name: &str) -> Result<u64, String> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| e.to_string())?;
    kib_field(&meminfo, &format!("{name}:"))
}

fn kib_field(text: &str, key: &str) -> Result<u64, String> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| format!("no {key} in /proc"))
}
