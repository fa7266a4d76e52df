//! `cargo xtask floor`: the kernel's own cost of one delivery, with no gateway.
//!
//! A sender pinned to one CPU writes `--size` bytes to each of `--conns`
//! loopback TCP sockets, `--rate` times a second, while a reader process pinned
//! to the other CPU sleeps in epoll and reads them, as the load generator's
//! workers do. The sender's CPU time per write is what the kernel charges for a
//! delivery on this machine: its own send path plus, on loopback, the reader's
//! receive path and wake-up, which run in the sender's softirq. No server,
//! whatever its design, spends less per delivery through such sockets, so this
//! is the yardstick for issue 6's steady-fanout and idle figures.
//!
//! Two ways of writing are measured in one run: plain `send()` per socket (what
//! an epoll server does) and io_uring `Send` on registered files submitted in
//! batches (what ringgate does), without any WebSocket work. `--spread N`
//! writes N sockets per event instead of every one, the next ones in turn, or
//! with `--scatter` far apart over the table, as notifications to random
//! subscribers are. Past one process's open files (`CONNS_ONE_PROCESS`), only
//! the io_uring way, over several rings and reader processes (floor_wide.rs).
//! `--echo` measures the echo case instead (floor_echo.rs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Sockets written to per event (default 10,000), or echo clients (default 100).
    #[arg(long)]
    pub(crate) conns: Option<usize>,
    /// Events (one write to every socket each) per way of writing.
    #[arg(long, default_value_t = 60)]
    pub(crate) events: usize,
    /// Events per second.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) rate: f64,
    /// Bytes per write.
    #[arg(long, default_value_t = 64)]
    pub(crate) size: usize,
    /// The reader polls without sleeping, so the sender is not charged for
    /// waking it (as `loadgen --spin`).
    #[arg(long)]
    pub(crate) spin: bool,
    /// Measure an echo instead: a bare epoll server answering clients that
    /// keep one message in flight each (see floor_echo.rs).
    #[arg(long)]
    echo: bool,
    /// echo: seconds to run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Count the kernel memory of idle connections by slab cache instead, for the plainest
    /// epoll server, ringgate, and ringgate with --park-after (see floor_slab.rs; root only).
    #[arg(long)]
    slab: bool,
    /// slab: the --park-after, in seconds, of the parked run.
    #[arg(long, default_value_t = 2)]
    park_after: u64,
    /// Write to this many sockets per event, the next ones in turn, instead of to every one
    /// (a topic per subscriber: 100 at --rate 500 is 50,000 writes a second, each socket
    /// written every 200 ms, as notifications in batches of 100).
    #[arg(long)]
    pub(crate) spread: Option<usize>,
    /// With --spread, each event's sockets scattered over the table instead of
    /// the next ones in turn: notifications to random subscribers, whose
    /// sockets' kernel memory is cold and far apart.
    #[arg(long, requires = "spread")]
    pub(crate) scatter: bool,
}

/// Sockets one process holds on each side, with its plain fds: under the
/// open-file limit (20,000 here). Past it, floor_wide.rs.
const CONNS_ONE_PROCESS: usize = 18_000;

/// io_uring submission queue size for the batched sends.
pub(crate) const SQ_ENTRIES: u32 = 4096;

pub fn run(args: &Args) -> Result<(), String> {
    if args.slab {
        return crate::floor_slab::run(args.conns.unwrap_or(10_000), args.park_after);
    }
    if args.echo {
        let conns = args.conns.unwrap_or(100);
        let floor = crate::floor_echo::measure(conns, args.size, args.seconds)?;
        println!(
            "floor: echo, {conns} loopback clients x 1 message of {} B in flight, {} s (server on CPU 0, clients on CPU 1)",
            args.size, args.seconds
        );
        println!(
            "  epoll + recv() + send(), no WebSocket work   {:.2} us of server CPU per echo ({:.0} echoes/s)",
            floor.us_per_echo, floor.per_second
        );
        return Ok(());
    }
    let conns = args.conns.unwrap_or(10_000);
    let spread = args.spread.map_or(String::new(), |n| {
        let how = if args.scatter { "scattered" } else { "in turn" };
        format!(", {n} sockets per event {how}")
    });
    println!(
        "floor: {conns} loopback sockets x {} events at {}/s{spread}, {} B per write (sender on CPU 0, {} on CPU 1{})",
        args.events,
        args.rate,
        args.size,
        if conns > CONNS_ONE_PROCESS { "readers" } else { "reader" },
        if args.spin { ", spinning" } else { ", sleeping in epoll" }
    );
    if conns > CONNS_ONE_PROCESS {
        // Past one process's open files: direct descriptors only (floor_wide.rs).
        let rings = conns.div_ceil(crate::floor_wide::FILES_PER_RING);
        println!(
            "  io_uring Send, batched submits   {:.2} us of sender CPU per write ({rings} rings, sockets as direct descriptors only)",
            crate::floor_wide::measure_wide(args)?
        );
        return Ok(());
    }
    let floor = measure_floor(args)?;
    println!(
        "  plain send() per socket          {:.2} us of sender CPU per write",
        floor.plain_us
    );
    println!(
        "  io_uring Send, batched submits   {:.2} us of sender CPU per write",
        floor.uring_us
    );
    Ok(())
}

/// The other side's process; killed if the measurement ends early, so a failed
/// run leaves nothing behind.
pub(crate) struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// Waits for a floor reader (`name` in the error) to exit and checks the
    /// byte count it printed against `expected`.
    pub(crate) fn read_all(&mut self, name: &str, expected: u64) -> Result<(), String> {
        let mut out = String::new();
        self.0
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut out)
            .map_err(|e| e.to_string())?;
        let status = self.0.wait().map_err(|e| e.to_string())?;
        if !status.success() || out.trim() != expected.to_string() {
            return Err(format!(
                "{name} did not get every byte: {out:?} of {expected}"
            ));
        }
        Ok(())
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Sender CPU per write, both ways.
pub struct Floor {
    pub plain_us: f64,
    pub uring_us: f64,
}

impl Args {
    pub fn new(conns: usize, events: usize, rate: f64, size: usize) -> Args {
        Args {
            conns: Some(conns),
            events,
            rate,
            size,
            spin: false,
            echo: false,
            seconds: 0.0,
            slab: false,
            park_after: 0,
            spread: None,
            scatter: false,
        }
    }
}

impl Args {
    /// Each event writes to `n` sockets scattered over the table.
    pub fn scatter(mut self, n: usize) -> Args {
        self.spread = Some(n);
        self.scatter = true;
        self
    }

    /// Which sockets the run writes, of `conns`.
    pub(crate) fn pattern(&self, conns: usize) -> Pattern {
        let coprime = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a == 1
        };
        Pattern {
            conns,
            per_event: self.spread.unwrap_or(conns).clamp(1, conns),
            stride: if self.scatter {
                (7919..)
                    .find(|&s| coprime(s, conns))
                    .expect("a coprime stride")
            } else {
                1
            },
        }
    }
}

/// Which sockets a run writes: `per_event` an event, the next ones in turn
/// (`stride` 1) or scattered (`stride` a prime near 8,000 coprime with
/// `conns`, so that neighbours in the run land far apart and every socket is
/// still written equally often).
pub(crate) struct Pattern {
    conns: usize,
    pub per_event: usize,
    stride: usize,
}

impl Pattern {
    /// The socket the `write`th write of the run goes to.
    pub fn socket_of(&self, write: usize) -> usize {
        (write % self.conns) * self.stride % self.conns
    }

    /// The sockets event `event` writes to, in order, into `out`.
    pub fn event(&self, event: usize, out: &mut Vec<usize>) {
        out.clear();
        out.extend(
            (event * self.per_event..(event + 1) * self.per_event).map(|w| self.socket_of(w)),
        );
    }
}

/// io_uring's sender CPU per write, in microseconds, with the sockets in one
/// process ([`measure_floor`]) or past its open files (floor_wide.rs).
pub fn uring_us(args: &Args) -> Result<f64, String> {
    if args.conns.unwrap_or(10_000) <= CONNS_ONE_PROCESS {
        Ok(measure_floor(args)?.uring_us)
    } else {
        crate::floor_wide::measure_wide(args)
    }
}

/// Runs the measurement (see the module comment).
pub fn measure_floor(args: &Args) -> Result<Floor, String> {
    let conns = args.conns.unwrap_or(10_000);
    if conns == 0 || conns > CONNS_ONE_PROCESS {
        return Err(format!(
            "--conns must be from 1 to {CONNS_ONE_PROCESS} (one process holds each side)"
        ));
    }
    if args.events == 0 || args.size == 0 || args.rate <= 0.0 {
        return Err("--events, --size and --rate must be above 0".into());
    }
    let listener = listener()?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let pattern = args.pattern(conns);
    let per_event = pattern.per_event;
    let expected = (per_event * args.events * args.size * 2) as u64;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut reader = KillOnDrop(
        Command::new(exe)
            .args([
                "floor-reader",
                &addr.to_string(),
                &conns.to_string(),
                &expected.to_string(),
                if args.spin { "spin" } else { "sleep" },
            ])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the reader: {e}"))?,
    );
    let sockets = accept_all(&listener, conns, false)?;
    pin(0);
    let payload = vec![b'x'; args.size];
    let mut targets = Vec::with_capacity(per_event);
    let plain = measure(args, per_event, |event| {
        pattern.event(event, &mut targets);
        for &socket in &targets {
            send_plain(&sockets[socket], &payload)?;
        }
        Ok(())
    })?;
    let mut ring = Ring::new(&sockets)?;
    let uring = measure(args, per_event, |event| {
        pattern.event(event, &mut targets);
        ring.send_to(&targets, &payload)
    })?;
    reader.read_all("the reader", expected)?;
    Ok(Floor {
        plain_us: plain,
        uring_us: uring,
    })
}

/// Sender CPU time per write over `args.events` events at `args.rate`.
pub(crate) fn measure(
    args: &Args,
    per_event: usize,
    mut event: impl FnMut(usize) -> Result<(), String>,
) -> Result<f64, String> {
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let start = thread_cpu();
    let mut next = Instant::now();
    for i in 0..args.events {
        event(i)?;
        next += period;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let spent = thread_cpu() - start;
    Ok(spent.as_secs_f64() * 1e6 / (per_event * args.events) as f64)
}

fn send_plain(s: &TcpStream, payload: &[u8]) -> Result<(), String> {
    // SAFETY: sends from a live slice on an fd owned by `s`.
    let n = unsafe {
        libc::send(
            s.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n != payload.len() as isize {
        return Err(format!(
            "send: {} (a short write means the reader fell behind)",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A ring set up as ringgate's are, with the sockets as registered files.
struct Ring {
    ring: IoUring,
}

impl Ring {
    fn new(sockets: &[TcpStream]) -> Result<Ring, String> {
        let ring = sender_ring()?;
        let fds: Vec<i32> = sockets.iter().map(|s| s.as_raw_fd()).collect();
        ring.submitter()
            .register_files(&fds)
            .map_err(|e| format!("register_files: {e}"))?;
        Ok(Ring { ring })
    }

    /// One send to each of the registered sockets in `slots`, submitted a
    /// full SQ at a time.
    fn send_to(&mut self, slots: &[usize], payload: &[u8]) -> Result<(), String> {
        for batch in slots.chunks(SQ_ENTRIES as usize) {
            send_batch(&mut self.ring, batch, payload)?;
        }
        Ok(())
    }
}

/// A ring set up as a shard's is (one issuer, deferred task work).
pub(crate) fn sender_ring() -> Result<IoUring, String> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_submit_all()
        .setup_cqsize(4 * SQ_ENTRIES)
        .build(SQ_ENTRIES)
        .map_err(|e| format!("io_uring: {e}"))
}

/// One `Send` to each registered file of `slots` (at most an SQ's worth), in
/// one submit; every send completes before it returns.
pub(crate) fn send_batch(
    ring: &mut IoUring,
    slots: &[usize],
    payload: &[u8],
) -> Result<(), String> {
    {
        let mut sq = ring.submission();
        for (i, &slot) in slots.iter().enumerate() {
            let sqe = opcode::Send::new(
                types::Fixed(slot as u32),
                payload.as_ptr(),
                payload.len() as u32,
            )
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(i as u64);
            // SAFETY: `payload` outlives the operation: every send completes
            // before this function returns.
            unsafe { sq.push(&sqe) }.map_err(|_| "SQ full")?;
        }
    }
    ring.submit_and_wait(slots.len())
        .map_err(|e| format!("submit: {e}"))?;
    for cqe in ring.completion() {
        if cqe.result() != payload.len() as i32 {
            return Err(format!("io_uring send: {}", cqe.result()));
        }
    }
    Ok(())
}

/// The reader process: connect `conns` sockets to `addr`, then read with epoll
/// until `expected` bytes have arrived; print the count.
pub fn reader(
    addr: &str,
    conns: usize,
    expected: u64,
    spin: bool,
    source: Option<&str>,
) -> Result<(), String> {
    pin(1);
    let sockets = match source {
        None => connect_all(addr, conns)?,
        Some(source) => connect_all_from(addr, conns, source)?,
    };
    let epoll = Epoll::new(&sockets)?;
    let mut ready = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < expected {
        epoll.wait(&mut ready, spin)?;
        for &i in &ready {
            let mut s = &sockets[i];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return Err("the sender closed early".into()),
                    Ok(k) => got += k as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
        }
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{got}");
    Ok(())
}

/// A listener on a free loopback port whose accept queue holds a reader's
/// bursts. std's backlog of 128 overflowed here when a reader connected
/// 10,000 sockets (the kernel dropped SYNs, and each retransmit held that
/// reader a second or more: 10-28 s a reader, past the others' 60 s wait).
pub(crate) fn listener() -> Result<TcpListener, String> {
    use socket2::{Domain, Socket, Type};
    let socket =
        Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| format!("socket: {e}"))?;
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("a loopback address");
    socket
        .bind(&addr.into())
        .map_err(|e| format!("bind: {e}"))?;
    // The kernel caps it at net.core.somaxconn (4,096 here).
    socket.listen(65_535).map_err(|e| format!("listen: {e}"))?;
    Ok(socket.into())
}

/// `conns` connections accepted from `listener`, with TCP_NODELAY as ringgate's
/// sockets have (no Nagle delay for small frames).
pub(crate) fn accept_all(
    listener: &TcpListener,
    conns: usize,
    nonblocking: bool,
) -> Result<Vec<TcpStream>, String> {
    (0..conns)
        .map(|_| {
            let (s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            s.set_nonblocking(nonblocking).map_err(|e| e.to_string())?;
            Ok(s)
        })
        .collect()
}

/// `conns` non-blocking connections to `addr`, with TCP_NODELAY.
pub(crate) fn connect_all(addr: &str, conns: usize) -> Result<Vec<TcpStream>, String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    (0..conns)
        .map(|_| {
            let s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            Ok(s)
        })
        .collect()
}

/// `conns` connections like [`connect_all`]'s, each from the loopback address
/// `source` (a port of its own there), so that many readers do not exhaust one
/// address's ports.
fn connect_all_from(addr: &str, conns: usize, source: &str) -> Result<Vec<TcpStream>, String> {
    use socket2::{Domain, Socket, Type};
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let source: std::net::IpAddr = source.parse().map_err(|e| format!("{source}: {e}"))?;
    (0..conns)
        .map(|_| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)
                .map_err(|e| format!("socket: {e}"))?;
            crate::loadgen::worker::bind_source(&socket, source)?;
            socket
                .connect(&addr.into())
                .map_err(|e| format!("connect from {source}: {e}"))?;
            let s: TcpStream = socket.into();
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            Ok(s)
        })
        .collect()
}

/// An epoll instance over a set of sockets, each registered for input by its index.
pub(crate) struct Epoll {
    fd: OwnedFd,
    events: std::cell::RefCell<Vec<libc::epoll_event>>,
    /// When a spinning wait last saw input (a wait gives up after 60 s without).
    last_input: std::cell::Cell<Instant>,
}

impl Epoll {
    pub fn new(sockets: &[TcpStream]) -> Result<Epoll, String> {
        // SAFETY: epoll_create1 takes no pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(format!("epoll: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for (i, s) in sockets.iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: registers a live fd with a valid event struct.
            if unsafe {
                libc::epoll_ctl(fd.as_raw_fd(), libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev)
            } != 0
            {
                return Err(format!("epoll_ctl: {}", std::io::Error::last_os_error()));
            }
        }
        Ok(Epoll {
            fd,
            events: std::cell::RefCell::new(vec![libc::epoll_event { events: 0, u64: 0 }; 1024]),
            last_input: std::cell::Cell::new(Instant::now()),
        })
    }

    /// Fills `ready` with the indexes of sockets that have input (or EOF).
    /// Sleeps for it unless `spin`; fails after 60 s without any.
    pub fn wait(&self, ready: &mut Vec<usize>, spin: bool) -> Result<(), String> {
        ready.clear();
        let mut events = self.events.borrow_mut();
        // SAFETY: the kernel writes at most `events.len()` entries into the vector.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                if spin { 0 } else { 60_000 },
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::Interrupted => Ok(()),
                _ => Err(format!("epoll_wait: {e}")),
            };
        }
        if n == 0 {
            if self.last_input.get().elapsed() > Duration::from_secs(60) || !spin {
                return Err("no input for 60 s".into());
            }
            return Ok(());
        }
        self.last_input.set(Instant::now());
        ready.extend(events[..n as usize].iter().map(|e| e.u64 as usize));
        Ok(())
    }

    /// Stops watching `s` (at its EOF).
    pub fn remove(&self, s: &TcpStream) -> Result<(), String> {
        // SAFETY: unregisters a live fd; the event pointer may be null for DEL.
        let rc = unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                s.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(format!("epoll_ctl: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

pub(crate) fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

pub(crate) fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; the call reads it.
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
    fn scattered_writes_reach_every_socket_equally_and_far_apart() {
        for conns in [2_000, 10_000, 100_000] {
            let pattern = Args::new(conns, 1, 1.0, 64).scatter(100).pattern(conns);
            let mut writes = vec![0u8; conns];
            for w in 0..2 * conns {
                writes[pattern.socket_of(w)] += 1;
            }
            assert!(writes.iter().all(|&n| n == 2), "{conns}: not a permutation");
            let (a, b) = (pattern.socket_of(0), pattern.socket_of(1));
            assert!(a.abs_diff(b) > 1_000, "{conns}: neighbours {a} and {b}");
        }
        let in_turn = Args::new(10, 1, 1.0, 64).pattern(10);
        let mut out = Vec::new();
        in_turn.event(1, &mut out);
        assert_eq!(out, (0..10).collect::<Vec<_>>(), "every socket, in order");
    }
}
