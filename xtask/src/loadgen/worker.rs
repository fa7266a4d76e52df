//! A load generator worker: one process, one thread, one epoll loop driving its
//! share of the connections (non-blocking sockets, optionally bound to loopback
//! source addresses). It reports progress and its result as JSON lines on
//! stdout and takes the parent's commands as JSON lines on stdin.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};

use super::recover::{Phase, Seen, Tally, Track};
use super::wire::{client_frame, number_after, parse_frames, string_after, upgrade_request};
use super::Scenario;

/// Connections being connected or upgraded at once, per worker: more would only
/// overflow the server's accept backlog.
const OPENING_MAX: usize = 512;
/// The key of stdin in epoll (connection keys are their indexes).
const STDIN_KEY: u64 = u64::MAX;

/// What one worker does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub scenario: Scenario,
    pub target: SocketAddr,
    /// This worker's connections, and the global index of its first.
    pub conns: usize,
    pub first: usize,
    pub topics: usize,
    /// New connections per second for this worker (0: as fast as possible).
    pub ramp: f64,
    pub sources: Vec<IpAddr>,
    pub inflight: usize,
    pub size: usize,
    pub duration_s: f64,
    pub hold_s: f64,
    pub deadline_s: f64,
    /// Poll without sleeping (see `--spin`).
    pub spin: bool,
    /// soak: connections closed and reopened per second by this worker.
    #[serde(default)]
    pub churn: f64,
    /// soak: connections this worker drops at once every `burst_every_s`.
    #[serde(default)]
    pub burst: usize,
    #[serde(default)]
    pub burst_every_s: f64,
    /// reconnect: seconds the storm keeps connections down, and the window
    /// their returns are spread over (0: all at once).
    #[serde(default)]
    pub down_s: f64,
    #[serde(default)]
    pub window_s: f64,
    /// A file of tokens, one per line by global connection index (`?token=`),
    /// minted by the parent for servers with `--auth-*`.
    #[serde(default)]
    pub tokens: Option<std::path::PathBuf>,
}

/// What one worker measured.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub connected: u64,
    pub failures: BTreeMap<String, u64>,
    /// (microseconds, count) of connect-to-101 times.
    pub handshake_us: Vec<(u64, u64)>,
    /// (microseconds, count) of publish-to-receive (fanout) or round-trip (echo) times.
    pub latency_us: Vec<(u64, u64)>,
    /// Subscribers per topic (fanout).
    pub subscribers: BTreeMap<String, u64>,
    /// Events received per topic (fanout).
    pub received: BTreeMap<String, u64>,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// soak: events missing between two a connection received (its seq jumped).
    #[serde(default)]
    pub gaps: u64,
    /// soak: connections closed and reopened on purpose.
    #[serde(default)]
    pub reconnects: u64,
    /// Echoes completed (echo) or connections opened and closed (churn).
    pub messages: u64,
    /// Seconds of the measured phase.
    pub elapsed_s: f64,
    /// reconnect: how the recoveries went.
    #[serde(default)]
    pub recovery: Tally,
}

/// Lines between parent and workers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    Progress {
        connected: u64,
        failed: u64,
        received: u64,
        /// soak: open connections now, and the loss counters so far.
        #[serde(default)]
        open: u64,
        #[serde(default)]
        gaps: u64,
        #[serde(default)]
        duplicates: u64,
        #[serde(default)]
        out_of_order: u64,
        #[serde(default)]
        reconnects: u64,
        /// The scenario's latency p99 so far in this worker, microseconds
        /// (publish-to-receive, round trip, or handshake for connect/churn).
        #[serde(default)]
        p99_us: u64,
        /// reconnect: subscribers live (before the storm, or back after it).
        #[serde(default)]
        settled: u64,
    },
    /// Every connection is open or has failed (fanout: publishing may start).
    Ready,
    /// Fanout: how many events each topic got accepted.
    Expect {
        per_topic: BTreeMap<String, u64>,
    },
    /// reconnect: drop every connection now and bring them back with `recover`.
    Storm,
    Result(Box<WorkerResult>),
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum State {
    Connecting,
    Upgrading,
    Open,
    Closing,
    Done,
}

struct Conn {
    /// `None` once the connection is done (the socket is closed).
    stream: Option<TcpStream>,
    state: State,
    buf: Vec<u8>,
    topic: usize,
    started: Instant,
    last_seq: u64,
    received: u64,
    inflight: usize,
    /// reconnect: the subscriber's numbering and recovery.
    track: Track,
}

impl Conn {
    /// A connection being opened, or (without a socket) one that failed to start.
    fn new(stream: Option<TcpStream>, topic: usize) -> Conn {
        let state = if stream.is_some() {
            State::Connecting
        } else {
            State::Done
        };
        Conn {
            stream,
            state,
            buf: Vec::new(),
            topic,
            started: Instant::now(),
            last_seq: 0,
            received: 0,
            inflight: 0,
            track: Track::new(),
        }
    }
}

pub fn run(job: Job) -> Result<(), String> {
    let mut w = Worker::new(job)?;
    w.main_loop()
}

struct Worker {
    job: Job,
    epoll: i32,
    conns: Vec<Conn>,
    opening: usize,
    result: WorkerResult,
    handshake: Histogram<u64>,
    latency: Histogram<u64>,
    expect: Option<BTreeMap<String, u64>>,
    stdin_buf: Vec<u8>,
    started: Instant,
    measuring_since: Option<Instant>,
    chunk: Vec<u8>,
    /// soak: connections reopened so far by churn, bursts done, the next to churn.
    churned: u64,
    bursts: u64,
    next_churn: usize,
    /// The parent closed stdin (soak: the run is over).
    stdin_closed: bool,
    /// reconnect: connections waiting to come back, in order, with when.
    returns: std::collections::VecDeque<(usize, Instant)>,
    recover_us: Histogram<u64>,
    /// Tokens by connection index (minted before connecting).
    tokens: Vec<String>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn topic_name(i: usize) -> String {
    format!("t{i}")
}

impl Worker {
    fn new(job: Job) -> Result<Worker, String> {
        // SAFETY: no pointer arguments; the result is checked.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        // Commands from the parent arrive on stdin.
        // SAFETY: fcntl on our own stdin.
        unsafe {
            libc::fcntl(
                0,
                libc::F_SETFL,
                libc::fcntl(0, libc::F_GETFL) | libc::O_NONBLOCK,
            )
        };
        epoll_add(epoll, 0, STDIN_KEY, libc::EPOLLIN as u32)?;
        let hist = || Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
        let tokens = match &job.tokens {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .lines()
                .skip(job.first)
                .take(job.conns)
                .map(String::from)
                .collect(),
            None => Vec::new(),
        };
        Ok(Worker {
            tokens,
            conns: Vec::with_capacity(job.conns),
            job,
            epoll,
            opening: 0,
            result: WorkerResult::default(),
            handshake: hist(),
            latency: hist(),
            expect: None,
            stdin_buf: Vec::new(),
            started: Instant::now(),
            measuring_since: None,
            chunk: vec![0u8; 256 * 1024],
            churned: 0,
            bursts: 0,
            next_churn: 0,
            stdin_closed: false,
            returns: std::collections::VecDeque::new(),
            recover_us: hist(),
        })
    }

    fn main_loop(&mut self) -> Result<(), String> {
        let deadline = self.started + Duration::from_secs_f64(self.job.deadline_s);
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        let mut last_progress = Instant::now();
        let mut ready_sent = false;
        let mut open_done_at: Option<Instant> = None;
        loop {
            self.open_more();
            self.return_due();
            // SAFETY: `events` has room for its length.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll,
                    events.as_mut_ptr(),
                    events.len() as i32,
                    if self.job.spin { 0 } else { 10 },
                )
            };
            for ev in &events[..n.max(0) as usize] {
                let (key, flags) = (ev.u64, ev.events);
                if key == STDIN_KEY {
                    self.read_stdin()?;
                } else {
                    self.on_event(key as usize, flags);
                }
            }
            let all_opened = self.conns.len() == self.job.conns
                && self.opening == 0
                && self.job.scenario != Scenario::Churn
                && (self.job.scenario != Scenario::Reconnect
                    || self
                        .conns
                        .iter()
                        .all(|c| c.track.settled() || c.state == State::Done));
            if all_opened && open_done_at.is_none() {
                open_done_at = Some(Instant::now());
                self.measuring_since = Some(Instant::now());
                if self.job.scenario == Scenario::Echo {
                    self.start_echo();
                }
            }
            if all_opened && !ready_sent {
                emit(&Line::Ready);
                ready_sent = true;
            }
            if self.job.scenario == Scenario::Soak {
                if let Some(since) = open_done_at {
                    self.churn(since);
                }
            }
            if last_progress.elapsed() >= Duration::from_millis(250) {
                last_progress = Instant::now();
                emit(&Line::Progress {
                    connected: self.result.connected,
                    failed: self.result.failures.values().sum(),
                    received: self.received_total(),
                    open: self.conns.iter().filter(|c| c.state == State::Open).count() as u64,
                    gaps: self.result.gaps,
                    duplicates: self.result.duplicates,
                    out_of_order: self.result.out_of_order,
                    reconnects: self.result.reconnects,
                    p99_us: self.p99_us(),
                    settled: self
                        .conns
                        .iter()
                        .filter(|c| c.track.settled() && c.state == State::Open)
                        .count() as u64,
                });
            }
            if Instant::now() >= deadline || self.finished(open_done_at) {
                break;
            }
        }
        self.finish();
        // Hold the connections until the parent has read the server's figures
        // (it then ends this process), so closing them is not counted as work.
        // SAFETY: fcntl on our own stdin.
        unsafe {
            libc::fcntl(
                0,
                libc::F_SETFL,
                libc::fcntl(0, libc::F_GETFL) & !libc::O_NONBLOCK,
            )
        };
        let mut sink = [0u8; 4096];
        while matches!(std::io::stdin().lock().read(&mut sink), Ok(n) if n > 0) {}
        Ok(())
    }

    fn received_total(&self) -> u64 {
        match self.job.scenario {
            Scenario::Fanout => self.conns.iter().map(|c| c.received).sum(),
            Scenario::Soak => self.result.messages,
            _ => self.result.messages,
        }
    }

    fn finished(&mut self, open_done_at: Option<Instant>) -> bool {
        let since = |secs: f64| open_done_at.is_some_and(|t| t.elapsed().as_secs_f64() >= secs);
        // Every connection failed (a server answering 404, refusing, ...):
        // nothing is left to measure, and waiting out the run would only
        // delay the reason.
        let all_failed = open_done_at.is_some()
            && self.result.connected == 0
            && !self.result.failures.is_empty();
        if all_failed && self.job.scenario != Scenario::Churn {
            return true;
        }
        match self.job.scenario {
            Scenario::Connect => since(self.job.hold_s),
            Scenario::Publish => unreachable!("publish runs no workers"),
            Scenario::Fanout => {
                let Some(expect) = &self.expect else {
                    return false;
                };
                self.conns
                    .iter()
                    .filter(|c| c.state == State::Open)
                    .all(|c| c.received >= expect.get(&topic_name(c.topic)).copied().unwrap_or(0))
            }
            Scenario::Echo => {
                if !since(self.job.duration_s) {
                    return false;
                }
                // Stop sending, wait for what is in flight (bounded by the deadline).
                self.job.inflight = 0;
                self.conns
                    .iter()
                    .all(|c| c.inflight == 0 || c.state != State::Open)
            }
            Scenario::Churn => {
                let elapsed = self.started.elapsed().as_secs_f64();
                elapsed >= self.job.duration_s
                    && self.opening == 0
                    && self.conns.iter().all(|c| c.state == State::Done)
            }
            // The parent decides when a soak or a storm ends: it closes stdin.
            Scenario::Soak | Scenario::Reconnect => self.stdin_closed,
        }
    }

    /// soak: closes and reopens `churn` connections a second, round robin, and
    /// every `burst_every_s` drops `burst` of them at once, as a deploy or a
    /// flapping network would; half close politely, half just vanish.
    fn churn(&mut self, since: Instant) {
        let elapsed = since.elapsed().as_secs_f64();
        let due = (self.job.churn * elapsed) as u64;
        while self.churned < due {
            self.churned += 1;
            self.reopen_next();
        }
        if self.job.burst_every_s > 0.0 {
            let bursts = (elapsed / self.job.burst_every_s) as u64;
            while self.bursts < bursts {
                self.bursts += 1;
                for _ in 0..self.job.burst {
                    self.reopen_next();
                }
            }
        }
    }

    /// Closes the next open connection (round robin) and starts a new one in
    /// its place, subscribed to the same topic.
    fn reopen_next(&mut self) {
        if self.conns.is_empty() {
            return;
        }
        for _ in 0..self.conns.len() {
            let i = self.next_churn % self.conns.len();
            self.next_churn += 1;
            if self.conns[i].state != State::Open {
                continue;
            }
            if self.next_churn.is_multiple_of(2) {
                let close = client_frame(0x8, &1000u16.to_be_bytes());
                if let Some(stream) = self.conns[i].stream.as_mut() {
                    let _ = stream.write_all(&close);
                }
            }
            self.close(i);
            self.result.reconnects += 1;
            let topic = self.conns[i].topic;
            self.conns[i] = match self.connect(i) {
                Ok(stream) => {
                    self.opening += 1;
                    Conn::new(Some(stream), topic)
                }
                Err(cause) => {
                    *self.result.failures.entry(cause).or_default() += 1;
                    Conn::new(None, topic)
                }
            };
            return;
        }
    }

    /// reconnect: drops every live connection at once (no close frame: the
    /// network went away) and schedules its return, after `down_s`, spread
    /// evenly over `window_s`.
    fn storm(&mut self) {
        let now = Instant::now();
        let live: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].state == State::Open)
            .collect();
        let n = live.len().max(1) as f64;
        for (k, &i) in live.iter().enumerate() {
            self.close(i);
            self.conns[i].track.phase = Phase::Down;
            self.result.reconnects += 1;
            let at =
                now + Duration::from_secs_f64(self.job.down_s + self.job.window_s * k as f64 / n);
            self.returns.push_back((i, at));
        }
    }

    /// reconnect: starts the returns that are due (at most OPENING_MAX
    /// opening). Time to recover counts from when a return was due.
    fn return_due(&mut self) {
        let now = Instant::now();
        while self.opening < OPENING_MAX {
            let Some(&(i, at)) = self.returns.front() else {
                return;
            };
            if at > now {
                return;
            }
            self.returns.pop_front();
            let conn = &mut self.conns[i];
            conn.track.phase = Phase::Asking { started: at };
            conn.buf.clear();
            match self.connect(i) {
                Ok(stream) => {
                    let conn = &mut self.conns[i];
                    conn.stream = Some(stream);
                    conn.state = State::Connecting;
                    conn.started = Instant::now();
                    self.opening += 1;
                }
                Err(cause) => *self.result.failures.entry(cause).or_default() += 1,
            }
        }
    }

    /// Opens connections up to the ramp, with at most OPENING_MAX in progress.
    fn open_more(&mut self) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let target = match self.job.scenario {
            Scenario::Churn if elapsed >= self.job.duration_s => return,
            Scenario::Churn => (self.job.ramp * elapsed).ceil() as usize,
            _ if self.job.ramp > 0.0 => {
                ((self.job.ramp * elapsed).ceil() as usize).min(self.job.conns)
            }
            _ => self.job.conns,
        };
        while self.conns.len() < target && self.opening < OPENING_MAX {
            let index = self.conns.len();
            let topic = (self.job.first + index) % self.job.topics.max(1);
            match self.connect(index) {
                Ok(stream) => {
                    self.conns.push(Conn::new(Some(stream), topic));
                    self.opening += 1;
                }
                Err(cause) => {
                    *self.result.failures.entry(cause).or_default() += 1;
                    // Keep the index taken so the count still ends at `conns`.
                    self.conns.push(Conn::new(None, topic));
                }
            }
        }
    }

    fn connect(&mut self, index: usize) -> Result<TcpStream, String> {
        let socket = Socket::new(Domain::for_address(self.job.target), Type::STREAM, None)
            .map_err(|e| cause(&e))?;
        socket.set_nonblocking(true).map_err(|e| cause(&e))?;
        socket.set_tcp_nodelay(true).map_err(|e| cause(&e))?;
        if !self.job.sources.is_empty() {
            let source = self.job.sources[(self.job.first + index) % self.job.sources.len()];
            bind_source(&socket, source)?;
        }
        match socket.connect(&self.job.target.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(cause(&e)),
        }
        let stream: TcpStream = socket.into();
        let flags = (libc::EPOLLOUT | libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        epoll_add(self.epoll, stream.as_raw_fd(), index as u64, flags)?;
        Ok(stream)
    }

    fn on_event(&mut self, i: usize, flags: u32) {
        match self.conns[i].state {
            State::Connecting
                if flags & (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 =>
            {
                let conn = &mut self.conns[i];
                let stream = conn.stream.as_mut().expect("connecting has a socket");
                match stream.take_error() {
                    Ok(None) => {}
                    Ok(Some(e)) | Err(e) => return self.fail(i, cause(&e)),
                }
                let path = match self.job.scenario {
                    Scenario::Echo => "/echo".to_string(),
                    Scenario::Reconnect if conn.track.phase == Phase::Subscribing => "/ws".into(),
                    Scenario::Reconnect => conn.track.recover_path(&topic_name(conn.topic)),
                    _ => format!("/ws?topics={}", topic_name(conn.topic)),
                };
                let path = match self.tokens.get(i) {
                    Some(token) => format!(
                        "{path}{}token={token}",
                        if path.contains('?') { '&' } else { '?' }
                    ),
                    None => path,
                };
                if stream.write_all(upgrade_request(&path).as_bytes()).is_err() {
                    return self.fail(i, "reset".into());
                }
                let fd = stream.as_raw_fd();
                conn.state = State::Upgrading;
                let _ = epoll_mod(
                    self.epoll,
                    fd,
                    i as u64,
                    (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                );
            }
            State::Connecting => {}
            State::Done => {}
            _ => self.read(i),
        }
    }

    fn read(&mut self, i: usize) {
        loop {
            let Some(stream) = self.conns[i].stream.as_mut() else {
                return;
            };
            let n = match stream.read(&mut self.chunk) {
                Ok(0) => return self.eof(i),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => return self.fail(i, cause(&e)),
            };
            let chunk = std::mem::take(&mut self.chunk);
            self.conns[i].buf.extend_from_slice(&chunk[..n]);
            self.chunk = chunk;
            if self.conns[i].state == State::Upgrading && !self.upgrade(i) {
                return;
            }
            self.frames(i);
            if self.conns[i].state == State::Done {
                return;
            }
        }
    }

    /// Handles the response head; false if the connection is not (yet) open.
    fn upgrade(&mut self, i: usize) -> bool {
        let conn = &mut self.conns[i];
        let Some(end) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let status = String::from_utf8_lossy(&conn.buf[..end])
            .split_whitespace()
            .nth(1)
            .unwrap_or("?")
            .to_string();
        if status != "101" {
            self.fail(i, format!("http {status}"));
            return false;
        }
        conn.buf.drain(..end + 4);
        conn.state = State::Open;
        let us = conn.started.elapsed().as_micros() as u64;
        let _ = self.handshake.record(us.max(1));
        self.result.connected += 1;
        self.opening -= 1;
        if self.job.scenario == Scenario::Churn {
            let close = client_frame(0x8, &1000u16.to_be_bytes());
            let conn = &mut self.conns[i];
            if let Some(stream) = conn.stream.as_mut() {
                let _ = stream.write_all(&close);
            }
            conn.state = State::Closing;
        }
        if self.job.scenario == Scenario::Echo && self.measuring_since.is_some() {
            self.send_echoes(i);
        }
        let conn = &mut self.conns[i];
        if self.job.scenario == Scenario::Reconnect && conn.track.phase == Phase::Subscribing {
            let op = format!(r#"{{"op":"sub","topic":"{}"}}"#, topic_name(conn.topic));
            let sent = conn
                .stream
                .as_mut()
                .is_some_and(|s| s.write_all(&client_frame(0x1, op.as_bytes())).is_ok());
            if !sent {
                self.fail(i, "reset".into());
                return false;
            }
        }
        true
    }

    fn frames(&mut self, i: usize) {
        let mut buf = std::mem::take(&mut self.conns[i].buf);
        let mut replies: Vec<Vec<u8>> = Vec::new();
        let mut closed = false;
        let now = now_ns();
        let scenario = self.job.scenario;
        let conn = &mut self.conns[i];
        let result = &mut self.result;
        let latency = &mut self.latency;
        let recover_us = &mut self.recover_us;
        let mut refused = None;
        parse_frames(&mut buf, |opcode, payload| match opcode {
            0x1 if scenario == Scenario::Reconnect => {
                match conn
                    .track
                    .on_text(payload, Instant::now(), &mut result.recovery, recover_us)
                {
                    Seen::Next => {
                        conn.received += 1;
                        result.messages += 1;
                        if let Some(t) = number_after(payload, b"\"t\":") {
                            let _ = latency.record((now.saturating_sub(t) / 1000).max(1));
                        }
                    }
                    Seen::Gap(missed) => result.gaps += missed,
                    Seen::Duplicate => result.duplicates += 1,
                    Seen::Reordered => result.out_of_order += 1,
                    Seen::Other => {}
                    Seen::Refused(reply) => refused = Some(reply),
                }
            }
            0x1 if scenario == Scenario::Soak => {
                let (Some(seq), Some(t)) = (
                    number_after(payload, b"\"seq\":"),
                    number_after(payload, b"\"t\":"),
                ) else {
                    return;
                };
                // The first event after (re)connecting sets where this
                // connection starts; from then on every seq must follow.
                match conn.last_seq {
                    0 => {}
                    last if seq == last + 1 => {}
                    last if seq > last => result.gaps += seq - last - 1,
                    last if seq == last => result.duplicates += 1,
                    _ => result.out_of_order += 1,
                }
                conn.last_seq = conn.last_seq.max(seq);
                conn.received += 1;
                result.messages += 1;
                let _ = latency.record((now.saturating_sub(t) / 1000).max(1));
            }
            0x1 if scenario == Scenario::Fanout => {
                let (Some(seq), Some(t)) = (
                    number_after(payload, b"\"seq\":"),
                    number_after(payload, b"\"t\":"),
                ) else {
                    return;
                };
                if string_after(payload, b"\"topic\":") != Some(topic_name(conn.topic).as_bytes()) {
                    return;
                }
                if seq == conn.last_seq {
                    result.duplicates += 1;
                    return;
                }
                if seq < conn.last_seq {
                    result.out_of_order += 1;
                }
                conn.last_seq = seq;
                conn.received += 1;
                let _ = latency.record((now.saturating_sub(t) / 1000).max(1));
            }
            0x2 if scenario == Scenario::Echo && payload.len() >= 8 => {
                let t = u64::from_le_bytes(payload[..8].try_into().unwrap());
                let _ = latency.record((now.saturating_sub(t) / 1000).max(1));
                conn.inflight = conn.inflight.saturating_sub(1);
                result.messages += 1;
            }
            0x9 => replies.push(client_frame(0xA, payload)),
            0x8 => closed = true,
            _ => {}
        });
        self.conns[i].buf = buf;
        if let Some(reply) = refused {
            return self.fail(i, format!("refused: {reply}"));
        }
        if let Some(stream) = self.conns[i].stream.as_mut() {
            for reply in replies {
                let _ = stream.write_all(&reply);
            }
        }
        if closed {
            if self.conns[i].state == State::Closing {
                self.result.messages += 1; // a churn cycle completed
                self.close(i);
            } else {
                self.fail(i, "closed by the server".into());
            }
            return;
        }
        if scenario == Scenario::Echo {
            self.send_echoes(i);
        }
    }

    fn start_echo(&mut self) {
        for i in 0..self.conns.len() {
            if self.conns[i].state == State::Open {
                self.send_echoes(i);
            }
        }
    }

    /// Tops the connection up to `inflight` outstanding echo messages.
    fn send_echoes(&mut self, i: usize) {
        let size = self.job.size.max(8);
        let mut batch = Vec::new();
        let conn = &mut self.conns[i];
        while conn.inflight < self.job.inflight {
            let mut payload = vec![0x5au8; size];
            payload[..8].copy_from_slice(&now_ns().to_le_bytes());
            batch.extend(client_frame(0x2, &payload));
            conn.inflight += 1;
        }
        let written = match conn.stream.as_mut() {
            Some(stream) if !batch.is_empty() => stream.write_all(&batch).is_ok(),
            _ => true,
        };
        if !written {
            self.fail(i, "reset".into());
        }
    }

    fn eof(&mut self, i: usize) {
        if self.conns[i].state == State::Closing {
            self.result.messages += 1;
            self.close(i);
        } else {
            self.fail(i, "closed by the server".into());
        }
    }

    fn fail(&mut self, i: usize, cause: String) {
        if matches!(self.conns[i].state, State::Connecting | State::Upgrading) {
            self.opening -= 1;
        }
        *self.result.failures.entry(cause).or_default() += 1;
        self.close(i);
    }

    fn close(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if conn.state == State::Done {
            return;
        }
        conn.state = State::Done;
        if let Some(stream) = conn.stream.take() {
            let _ = epoll_del(self.epoll, stream.as_raw_fd());
        }
    }

    fn read_stdin(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 65536];
        loop {
            match std::io::stdin().lock().read(&mut chunk) {
                Ok(0) => {
                    self.stdin_closed = true;
                    let _ = epoll_del(self.epoll, 0);
                    return Ok(());
                }
                Ok(n) => self.stdin_buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        while let Some(end) = self.stdin_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.stdin_buf.drain(..=end).collect();
            match serde_json::from_slice(&line) {
                Ok(Line::Expect { per_topic }) => self.expect = Some(per_topic),
                Ok(Line::Storm) => self.storm(),
                _ => {}
            }
        }
        Ok(())
    }

    fn finish(&mut self) {
        self.result.elapsed_s = self
            .measuring_since
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        if self.job.scenario == Scenario::Churn {
            self.result.elapsed_s = self.started.elapsed().as_secs_f64();
        }
        for c in &self.conns {
            if c.state == State::Open
                || (self.job.scenario == Scenario::Fanout
                    && c.state == State::Done
                    && c.received > 0)
            {
                *self
                    .result
                    .subscribers
                    .entry(topic_name(c.topic))
                    .or_default() += u64::from(c.state == State::Open);
                *self.result.received.entry(topic_name(c.topic)).or_default() += c.received;
            }
        }
        let pending = self
            .conns
            .iter()
            .filter(|c| matches!(c.state, State::Connecting | State::Upgrading))
            .count();
        // soak: connections being reopened when the parent ends the run are
        // churn in progress, not failures.
        if pending > 0 && self.job.scenario != Scenario::Soak {
            *self.result.failures.entry("timeout".into()).or_default() += pending as u64;
        }
        self.result.recovery.recover_us = recorded(&self.recover_us);
        self.result.handshake_us = recorded(&self.handshake);
        self.result.latency_us = recorded(&self.latency);
        emit(&Line::Result(Box::new(std::mem::take(&mut self.result))));
    }
}

impl Worker {
    /// The scenario's latency p99 so far (0 before the first sample).
    fn p99_us(&self) -> u64 {
        let h = match self.job.scenario {
            Scenario::Connect | Scenario::Churn => &self.handshake,
            _ => &self.latency,
        };
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(0.99)
        }
    }
}

fn recorded(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Binds `socket` to the address `source`, its port left to the connect.
///
/// The port is chosen at connect, for the whole 4-tuple: a bind with port 0
/// would skip every port still in TIME_WAIT from an earlier run to any server,
/// and search the address's taken ports for a free one, so with 100,000 of
/// them connects slow down until upgrades miss the server's handshake timeout.
pub(crate) fn bind_source(socket: &Socket, source: IpAddr) -> Result<(), String> {
    let on: libc::c_int = 1;
    // SAFETY: sets an int option from a live local on a socket the caller owns.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!(
            "IP_BIND_ADDRESS_NO_PORT: {}",
            std::io::Error::last_os_error()
        ));
    }
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .map_err(|e| format!("bind {source}: {}", cause(&e)))
}

/// A short name for an error, to count failures by cause.
fn cause(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ECONNRESET) | Some(libc::EPIPE) => "reset".into(),
        Some(libc::ETIMEDOUT) => "timeout".into(),
        Some(libc::EADDRNOTAVAIL) => "no local port (use --sources)".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "fd limit (use --procs)".into(),
        _ => e.kind().to_string(),
    }
}

fn emit(line: &Line) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, line);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

fn epoll_add(epoll: i32, fd: i32, key: u64, events: u32) -> Result<(), String> {
    epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, key, events)
}

fn epoll_mod(epoll: i32, fd: i32, key: u64, events: u32) -> Result<(), String> {
    epoll_ctl(epoll, libc::EPOLL_CTL_MOD, fd, key, events)
}

fn epoll_del(epoll: i32, fd: i32) -> Result<(), String> {
    epoll_ctl(epoll, libc::EPOLL_CTL_DEL, fd, 0, 0)
}

fn epoll_ctl(epoll: i32, op: i32, fd: i32, key: u64, events: u32) -> Result<(), String> {
    let mut ev = libc::epoll_event { events, u64: key };
    // SAFETY: valid epoll fd, fd and event struct.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut ev) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}
