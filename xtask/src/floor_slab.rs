//! `cargo xtask floor --slab`: the kernel memory of one idle WebSocket
//! connection, counted object by object.
//!
//! MemAvailable and the Slab total move by megabytes on their own here, so this
//! counts objects per slab cache (`/proc/slabinfo`, active objects times object
//! size; root only) before and after `--conns` connections are opened and left
//! idle, for three servers holding the same connections:
//!
//! - the floor: the plainest epoll server (a child process: accept, read the
//!   upgrade request, answer 129 bytes as ringgate does, register the socket for
//!   input in one epoll set, nothing else);
//! - ringgate as it runs by default: a multishot recv armed per connection;
//! - ringgate with `--park-after`: idle connections watched by a one-shot poll.
//!
//! Both ends of every connection are in this kernel (the client sockets are the
//! same in all three runs), so the difference between a server's figure and the
//! floor's is what that server costs the kernel beyond any server. Clients
//! close with a reset (SO_LINGER 0): no TIME_WAIT sockets linger into the next
//! run's counts.
//!
//! Something on these machines lists `/proc/PID/fd` of processes with many
//! descriptors: each listed descriptor gets a proc inode, its dentry and its LSM
//! blob, which is not a cost of the connection. A first, unreported round warms
//! this for the client side (whose descriptors live through every run), and
//! the "/proc listing" row takes out what the server's own listing added (proc
//! inodes, and one dentry and one LSM inode blob each); ringgate's sockets are
//! direct descriptors, which no listing sees.
//!
//! It also measures what parking costs when a connection wakes: three cycles of
//! every client sending a ping and reading the pong, each followed by the park
//! delay and a tick (so a parked connection is parked again), the server's CPU
//! over the cycles divided by connections and cycles. A parked connection's
//! cycle is a poll completion, a recv armed, and later the recv cancelled and a
//! poll armed again; an armed one's is the recv's completion.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::floor::{Epoll, KillOnDrop};
use crate::loadgen::wire::upgrade_request;
use crate::process::Ringgate;

/// ringgate's answer to `upgrade_request` is this long; the floor server sends
/// as many bytes, so the sockets have carried the same traffic.
const UPGRADE_ANSWER_BYTES: usize = 129;

/// Caches whose figure is below this (bytes per connection, every server) are
/// summed as "other".
const SHOWN_BYTES_MIN: f64 = 4.0;

/// Active objects and object size per slab cache now.
fn slab_objects() -> Result<BTreeMap<String, (u64, u64)>, String> {
    let text = std::fs::read_to_string("/proc/slabinfo")
        .map_err(|e| format!("/proc/slabinfo: {e} (it needs root)"))?;
    let mut out = BTreeMap::new();
    for line in text.lines().skip(2) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(active), Some(size)) = (f.first(), f.get(1), f.get(3)) else {
            continue;
        };
        let (Ok(active), Ok(size)) = (active.parse::<u64>(), size.parse::<u64>()) else {
            continue;
        };
        out.insert(name.to_string(), (active, size));
    }
    Ok(out)
}

/// Bytes per connection per cache between two counts, and what a listing of
/// `/proc/PID/fd` added (see the module doc).
fn per_connection(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    conns: usize,
) -> (BTreeMap<String, f64>, f64) {
    let delta = |name: &str| {
        let (objects, size) = after.get(name).copied().unwrap_or((0, 0));
        let was = before.get(name).map_or(0, |b| b.0);
        (objects as f64 - was as f64, size as f64)
    };
    let mut per_cache = BTreeMap::new();
    for name in after.keys() {
        let (objects, size) = delta(name);
        per_cache.insert(name.clone(), objects * size / conns as f64);
    }
    let (proc_inodes, proc_inode_size) = delta("proc_inode_cache");
    let listed = proc_inodes.max(0.0)
        * (proc_inode_size + delta("dentry").1 + delta("lsm_inode_cache").1)
        / conns as f64;
    (per_cache, listed)
}

/// A server holding the connections under test.
enum Server {
    Floor { child: KillOnDrop, addr: SocketAddr },
    Ringgate(Ringgate),
}

impl Server {
    fn addr(&self) -> SocketAddr {
        match self {
            Server::Floor { addr, .. } => *addr,
            Server::Ringgate(r) => r.ws,
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Server::Floor { child, .. } => child.0.id(),
            Server::Ringgate(r) => r.pid(),
        }
    }
}

/// One server's figures.
struct Measured {
    /// Bytes per connection, per slab cache.
    per_cache: BTreeMap<String, f64>,
    /// Of those, what a listing of the server's `/proc/PID/fd` added.
    listed: f64,
    /// Server CPU per connection and wake cycle (microseconds).
    wake_us: f64,
}

/// The longest `--park-after` measured (see `run`).
const PARK_AFTER_MAX: u64 = 50;

/// Ping cycles the wake cost is averaged over (the CPU clock ticks at 10 ms).
const WAKE_CYCLES: u32 = 3;

pub fn run(conns: usize, park_after: u64) -> Result<(), String> {
    if conns == 0 || conns > 18_000 {
        return Err("--conns must be from 1 to 18000 (one process holds the clients)".into());
    }
    // The floor server gives up after 60 s without input, and ringgate pings
    // after 120 s: the connections must sit well within both.
    if park_after == 0 || park_after > PARK_AFTER_MAX {
        return Err(format!(
            "--park-after must be from 1 to {PARK_AFTER_MAX} seconds"
        ));
    }
    crate::process::cargo(&["build", "--release", "-p", "ringgate"])?;
    let park = format!("{park_after}s");
    let kinds: [(&str, Option<&[&str]>, u64); 3] = [
        ("epoll floor", None, 0),
        (
            "ringgate",
            Some(&["--shards", "1", "--park-after", "off"]),
            0,
        ),
        (
            "ringgate --park-after",
            Some(&["--shards", "1", "--park-after", &park]),
            park_after,
        ),
    ];
    // Warms what the client side fills once (see the module doc).
    measure(&start_floor(conns)?, conns, park_after)?;
    let mut results = Vec::new();
    for (name, args, wait) in kinds {
        let server = match args {
            None => start_floor(conns)?,
            Some(args) => Server::Ringgate(Ringgate::start(args)?),
        };
        results.push((name, measure(&server, conns, wait.max(park_after))?));
    }
    print(conns, park_after, &results);
    Ok(())
}

/// Opens the connections, lets them sit (`wait` seconds more, the park delay),
/// counts, wakes each with a ping per cycle, and closes them with resets.
fn measure(server: &Server, conns: usize, wait: u64) -> Result<Measured, String> {
    std::thread::sleep(Duration::from_millis(500));
    let before = slab_objects()?;
    let request = upgrade_request("/ws?topics=user.42");
    let mut clients = Vec::with_capacity(conns);
    for i in 0..conns {
        let mut s =
            TcpStream::connect(server.addr()).map_err(|e| format!("connection {i}: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        clients.push(s);
    }
    let mut answer = [0u8; UPGRADE_ANSWER_BYTES];
    for s in &mut clients {
        s.read_exact(&mut answer)
            .map_err(|e| format!("reading the upgrade answer: {e}"))?;
    }
    // The sweep parks a connection once a tick after it was idle long enough.
    std::thread::sleep(Duration::from_secs(2 + wait));
    let after = slab_objects()?;
    let (per_cache, listed) = per_connection(&before, &after, conns);
    let wake_us = wake_cycles(server, &mut clients, wait)?;
    for s in &clients {
        linger_zero(s)?;
    }
    drop(clients);
    Ok(Measured {
        per_cache,
        listed,
        wake_us,
    })
}

/// [`WAKE_CYCLES`] times: every client sends a ping and reads the pong, then
/// the connections sit `wait` seconds and a tick (parked again, if parking).
/// The server's CPU per connection and cycle.
fn wake_cycles(server: &Server, clients: &mut [TcpStream], wait: u64) -> Result<f64, String> {
    // FIN + ping, masked with a zero key, no payload; the answer is a bare pong.
    const PING: [u8; 6] = [0x89, 0x80, 0, 0, 0, 0];
    let cpu_before = process_cpu(server.pid())?;
    for _ in 0..WAKE_CYCLES {
        for s in clients.iter_mut() {
            s.write_all(&PING).map_err(|e| e.to_string())?;
        }
        let mut pong = [0u8; 2];
        for s in clients.iter_mut() {
            s.read_exact(&mut pong)
                .map_err(|e| format!("reading a pong: {e}"))?;
            if pong != [0x8a, 0x00] {
                return Err(format!("not a pong: {pong:?}"));
            }
        }
        std::thread::sleep(Duration::from_secs(wait + 2));
    }
    let spent = process_cpu(server.pid())? - cpu_before;
    Ok(spent * 1e6 / (clients.len() as f64 * f64::from(WAKE_CYCLES)))
}

/// The server's CPU seconds so far (the load generator's clock).
fn process_cpu(pid: u32) -> Result<f64, String> {
    crate::loadgen::cpu_seconds(pid).ok_or_else(|| format!("no CPU time for process {pid}"))
}

/// Closing will send a reset: no TIME_WAIT socket outlives the run.
fn linger_zero(s: &TcpStream) -> Result<(), String> {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .map_err(|e| format!("SO_LINGER: {e}"))
}

fn start_floor(conns: usize) -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["floor-idle-server", &conns.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the floor server: {e}"))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let addr = line
        .trim()
        .parse()
        .map_err(|_| format!("the floor server said {line:?}"))?;
    Ok(Server::Floor {
        child: KillOnDrop(child),
        addr,
    })
}

/// The floor server's process: prints its address, accepts `conns`
/// connections, answers each upgrade request with 129 bytes, keeps every
/// socket registered for input in one epoll set and answers pings with pongs
/// until stdin closes.
pub fn idle_server(conns: usize) -> Result<(), String> {
    let listener = crate::floor::listener()?;
    println!("{}", listener.local_addr().map_err(|e| e.to_string())?);
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut sockets = Vec::with_capacity(conns);
    let answer = [b'x'; UPGRADE_ANSWER_BYTES];
    for _ in 0..conns {
        let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).map_err(|e| e.to_string())?;
            request.push(byte[0]);
        }
        s.write_all(&answer).map_err(|e| e.to_string())?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        sockets.push(s);
    }
    let epoll = Epoll::new(&sockets)?;
    std::thread::spawn(|| {
        // The parent closes stdin when it is done (or dies).
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let mut ready = Vec::new();
    let mut frame = [0u8; 6];
    loop {
        epoll.wait(&mut ready, false)?;
        for &i in &ready {
            let mut s = &sockets[i];
            match s.read(&mut frame) {
                Ok(6) => s.write_all(&[0x8a, 0x00]).map_err(|e| e.to_string())?,
                Ok(0) => epoll.remove(s)?,
                Ok(_) | Err(_) => {}
            }
        }
    }
}

fn print(conns: usize, park_after: u64, results: &[(&str, Measured)]) {
    println!(
        "kernel memory per idle connection, {conns} connections, by slab cache (both loopback ends; \
         active objects x object size, after minus before)"
    );
    let names: Vec<&String> = results[0].1.per_cache.keys().collect();
    let mut shown = Vec::new();
    let mut other = vec![0.0; results.len()];
    for name in names {
        let row: Vec<f64> = results
            .iter()
            .map(|(_, m)| m.per_cache.get(name).copied().unwrap_or(0.0))
            .collect();
        if row.iter().any(|b| b.abs() >= SHOWN_BYTES_MIN) {
            shown.push((name, row));
        } else {
            for (o, b) in other.iter_mut().zip(&row) {
                *o += b;
            }
        }
    }
    shown.sort_by(|a, b| b.1[1].total_cmp(&a.1[1]));
    print!("  {:<28}", "cache (B / connection)");
    for (name, _) in results {
        print!("{name:>24}");
    }
    println!();
    for (name, row) in &shown {
        print!("  {name:<28}");
        for b in row {
            print!("{b:>24.0}");
        }
        println!();
    }
    print!("  {:<28}", "other caches");
    for b in &other {
        print!("{b:>24.0}");
    }
    println!();
    print!("  {:<28}", "of which /proc listing");
    for (_, m) in results {
        print!("{:>24.0}", -m.listed);
    }
    println!();
    let totals: Vec<f64> = results
        .iter()
        .map(|(_, m)| m.per_cache.values().sum::<f64>() - m.listed)
        .collect();
    print!("  {:<28}", "total, listing apart");
    for t in &totals {
        print!("{t:>24.0}");
    }
    println!();
    print!("  {:<28}", "over the epoll floor");
    for t in &totals {
        print!("{:>24.0}", t - totals[0]);
    }
    println!();
    print!("  {:<28}", "server CPU / wake cycle (us)");
    for (_, m) in results {
        print!("{:>24.2}", m.wake_us);
    }
    println!();
    println!(
        "  (--park-after {park_after}s; a wake cycle: a ping answered with a pong, {park_after} s and a tick of \
         silence, so a parked connection parks again)"
    );
}
