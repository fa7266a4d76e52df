//! The io_uring shard runtime of ringgate.
//!
//! One shard per core: a thread pinned to its CPU that owns one io_uring, one
//! SO_REUSEPORT listener, one provided-buffer ring, one connection table and one
//! timer sweep. Shards share nothing mutable; the control thread talks to them
//! only through a bounded inbox and an eventfd doorbell the ring keeps a read on.
//!
//! ```text
//!   control thread ── Command ──> [inbox] ── doorbell (eventfd) ──┐
//!                                                                 v
//!   shard loop:  submit_and_wait ─> reap CQEs (bounded batch) ─> dispatch
//!        ^                                                          │
//!        └──── flush staged SQEs <── drive(connection) <────────────┘
//!
//!   per connection: multishot accept (direct descriptor) -> multishot recv
//!   (buffer select) -> codec -> send queue of shared `Bytes` -> send/shutdown/close
//! ```
//!
//! This crate is the only one that performs I/O or holds `unsafe` code; the wire
//! rules live in `ringgate-codec`.

pub mod auth;
mod bufring;
mod config;
mod conn;
#[cfg(fuzzing)]
pub mod fuzzing;
mod inbox;
mod input;
mod kernel;
pub mod limits;
mod one_alloc;
pub mod peers;
mod pubsub;
mod routes;
mod sendq;
mod shard;
mod stats;
mod sweep;
mod sys;
mod token;
mod topics;
mod upstream;

use std::io;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

pub use config::{ShardConfig, SlowConsumer};
pub use inbox::{Command, Reservation};
pub use kernel::Features;
pub use limits::{BUFFERS_MAX, CLOSE_TIMEOUT, REJECT_SLOTS, STRIKES_MAX};
pub use pubsub::{
    event_frame, gap_notice, publish_allowed, valid_topic, EventData, TOPIC_BYTES_MAX,
};
pub use routes::{topic_hash, HashedTopic, RouteFilter, RouteWriter};
pub use stats::{
    clock_ns, new_latency_histogram, Counter, ShardStats, LATENCY_MAX_US, RECOVERY_ORDER,
};
pub use sys::{cpu_count, nofile_soft_limit};
pub use upstream::{
    ClientPublish, Recovery, Since, SubscribeAnswer, SubscribeRequest, Upstream, UpstreamSender,
};

use inbox::Inbox;
use shard::{Shard, ShardInit};

/// Why the runtime could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum StartError {
    /// The settings contradict each other.
    Config(String),
    /// The kernel lacks an io_uring feature.
    Kernel(String),
    /// Binding the listen address failed.
    Bind(SocketAddr, io::Error),
    /// A shard failed to set up its ring.
    Shard(usize, io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config(msg) | Self::Kernel(msg) => f.write_str(msg),
            Self::Bind(addr, e) if e.kind() == io::ErrorKind::AddrInUse => {
                write!(
                    f,
                    "cannot listen on {addr}: the address is in use by another program"
                )
            }
            Self::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            Self::Shard(id, e) => write!(f, "shard {id} failed to start: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Checks that the running kernel has what the shards need (a one-line reason
/// if not), and which optional features it has.
pub fn check_kernel() -> Result<kernel::Features, StartError> {
    kernel::check().map_err(StartError::Kernel)
}

/// A running shard, as the control thread sees it.
pub struct ShardHandle {
    /// The shard's index.
    pub id: usize,
    /// The shard's counters.
    pub stats: Arc<ShardStats>,
    inbox: Arc<Inbox>,
    routes: Arc<RouteFilter>,
    thread: JoinHandle<io::Result<()>>,
}

impl ShardHandle {
    /// Delivers a command and, if the shard is not already notified, rings its
    /// doorbell. A full inbox is back-pressure: the command is handed back.
    pub fn send(&self, command: Command) -> Result<(), Command> {
        if self.thread.is_finished() {
            return Err(command);
        }
        self.inbox.push(command)
    }

    /// Tells the shard to stop accepting, close every client with 1001 and exit
    /// once all are closed or at `deadline`. Works whatever the inbox holds.
    pub fn shutdown(&self, deadline: std::time::Instant) {
        self.inbox.request_shutdown(deadline);
    }

    /// A cloneable handle that can only send to this shard.
    pub fn sender(&self) -> ShardSender {
        ShardSender {
            id: self.id,
            inbox: self.inbox.clone(),
            routes: self.routes.clone(),
        }
    }

    /// Whether the shard thread has exited.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the shard thread to exit.
    pub fn join(self) -> io::Result<()> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other(format!("shard {} panicked", self.id))))
    }
}

/// Sends commands to one shard from any thread.
#[derive(Clone)]
pub struct ShardSender {
    /// The shard's index.
    pub id: usize,
    inbox: Arc<Inbox>,
    routes: Arc<RouteFilter>,
}

impl ShardSender {
    /// A sender whose inbox (of `capacity` commands) no shard drains, for
    /// testing what publishers do when a shard falls behind. Its route filter
    /// lets every topic through.
    #[doc(hidden)]
    pub fn detached(id: usize, capacity: usize) -> io::Result<ShardSender> {
        Ok(ShardSender {
            id,
            inbox: Arc::new(Inbox::new(capacity)?),
            routes: RouteFilter::everything(),
        })
    }

    /// [`Self::detached`] with a route filter the caller writes, as the shard would.
    #[doc(hidden)]
    pub fn detached_routed(id: usize, capacity: usize) -> io::Result<(ShardSender, RouteWriter)> {
        let (routes, writer) = RouteFilter::with_writer();
        let sender = ShardSender {
            id,
            inbox: Arc::new(Inbox::new(capacity)?),
            routes,
        };
        Ok((sender, writer))
    }

    /// Whether the topic of `hash` ([`topic_hash`]) may have subscribers on the
    /// shard, or a subscribe on its way to the broker: an event of a topic it
    /// may not hold needs no place in its inbox (`routes.rs`). Read it under
    /// the lock subscribes are answered under.
    pub fn may_hold(&self, hash: u64) -> bool {
        self.routes.may_hold(hash)
    }

    /// Queues the answer to a subscribe this shard forwarded (never refused:
    /// the shard bounds how many it has outstanding).
    pub fn answer(&self, answer: Box<SubscribeAnswer>) {
        self.inbox.push_answer(answer);
    }

    /// Takes every queued command, as the shard would (tests of senders).
    #[doc(hidden)]
    pub fn take_all_for_tests(&self) -> Vec<Command> {
        let mut out = Vec::new();
        while self.inbox.take(&mut out, usize::MAX, usize::MAX) {}
        out
    }

    /// Promises a place in the shard's inbox for one command (`None`: full), so
    /// a sender can deliver to several shards or to none.
    pub fn reserve(&self) -> Option<Reservation<'_>> {
        self.inbox.reserve()
    }

    /// Commands the shard's inbox holds at most (`--inbox-capacity`).
    pub fn capacity(&self) -> usize {
        self.inbox.capacity()
    }

    /// Free places in the shard's inbox now (a later reservation may find fewer).
    pub fn room(&self) -> usize {
        self.inbox.room()
    }

    /// Promises up to `wanted` places in the shard's inbox (as many as are
    /// free), for a batch of commands committed together.
    pub fn reserve_up_to(&self, wanted: usize) -> Reservation<'_> {
        self.inbox.reserve_up_to(wanted)
    }
}

/// The started shards and the address they listen on.
pub struct Runtime {
    /// One handle per shard.
    pub shards: Vec<ShardHandle>,
    /// The bound address (the real port when port 0 was asked for).
    pub local_addr: SocketAddr,
}

/// Starts `count` shards on `cfg.listen`; returns once every shard is ready.
/// `upstream` carries client publishes, subscribes and presence to the broker.
pub fn start(
    cfg: &ShardConfig,
    count: usize,
    upstream: Option<UpstreamSender>,
) -> Result<Runtime, StartError> {
    cfg.validate().map_err(StartError::Config)?;
    assert!(count > 0, "at least one shard");
    let features = check_kernel()?;
    let first = sys::bind_listener(cfg.listen, cfg.tcp_keepalive)
        .map_err(|e| StartError::Bind(cfg.listen, e))?;
    let local_addr = sys::local_addr(&first).map_err(|e| StartError::Bind(cfg.listen, e))?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(
            sys::bind_listener(local_addr, cfg.tcp_keepalive)
                .map_err(|e| StartError::Bind(local_addr, e))?,
        );
    }
    // Shards are pinned to the CPUs the process may run on, in order (a CPU
    // set or `taskset` is kept). Where a CPU quota (a cgroup's cpu.max,
    // `docker --cpus`) rather than a set limits the process, pinning would
    // crowd every such process onto the same first CPUs: the scheduler
    // places the shards instead.
    let allowed = sys::allowed_cpus();
    let quota_bound = sys::cpu_count() < allowed.len();
    if cfg.cpu.is_some() && quota_bound {
        tracing::info!(
            cpus = allowed.len(),
            quota = sys::cpu_count(),
            "a CPU quota limits this process: shards are not pinned"
        );
    }
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut shards = Vec::with_capacity(count);
    let mut filters = RouteFilter::with_writers(count).into_iter();
    for (id, listener) in listeners.into_iter().enumerate() {
        let mut shard_cfg = cfg.clone();
        shard_cfg.cpu = cfg
            .cpu
            .filter(|_| !quota_bound && !allowed.is_empty())
            .map(|base| allowed[(base + id) % allowed.len()]);
        let inbox = Arc::new(Inbox::new(cfg.inbox_capacity).map_err(|e| StartError::Shard(id, e))?);
        let (routes, writer) = filters.next().expect("a filter per shard");
        let stats = Arc::new(ShardStats::default());
        let init = ShardInit {
            id,
            cfg: shard_cfg,
            listener,
            inbox: inbox.clone(),
            stats: stats.clone(),
            upstream: upstream.clone(),
            routes: writer,
            multishot_timeout: features.multishot_timeout,
        };
        let ready = ready_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ringgate-shard-{id}"))
            .spawn(move || run_shard(init, ready))
            .map_err(|e| StartError::Shard(id, e))?;
        shards.push(ShardHandle {
            id,
            stats,
            inbox,
            routes,
            thread,
        });
    }
    drop(ready_tx);
    let mut failure = None;
    for _ in 0..count {
        match ready_rx.recv() {
            Ok((_, Ok(()))) => {}
            Ok((id, Err(e))) => failure = failure.or(Some(StartError::Shard(id, e))),
            Err(_) => {
                failure = failure.or(Some(StartError::Shard(
                    0,
                    io::Error::other("a shard died while starting"),
                )))
            }
        }
    }
    if let Some(e) = failure {
        let now = std::time::Instant::now();
        for s in shards {
            s.shutdown(now);
            let _ = s.join();
        }
        return Err(e);
    }
    Ok(Runtime { shards, local_addr })
}

fn run_shard(init: ShardInit, ready: mpsc::Sender<(usize, io::Result<()>)>) -> io::Result<()> {
    let id = init.id;
    if let Some(cpu) = init.cfg.cpu {
        if let Err(e) = sys::pin_to_cpu(cpu) {
            tracing::warn!(shard = id, cpu, "could not pin to CPU: {e}");
        }
    }
    let shard = match Shard::new(init) {
        Ok(shard) => shard,
        Err(e) => {
            let msg = e.to_string();
            let _ = ready.send((id, Err(e)));
            return Err(io::Error::other(msg));
        }
    };
    let _ = ready.send((id, Ok(())));
    drop(ready);
    let result = shard.run();
    if let Err(e) = &result {
        tracing::error!(shard = id, "shard stopped on an error: {e}");
    }
    result
}
