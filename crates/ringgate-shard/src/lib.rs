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

mod bufring;
mod config;
mod conn;
mod input;
mod shard;
mod stats;
mod sweep;
mod sys;
mod token;

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use config::{ShardConfig, BUFFERS_MAX, CLOSE_TIMEOUT, REJECT_SLOTS};
pub use shard::Command;
pub use stats::{Counter, ShardStats};
pub use sys::{cpu_count, nofile_soft_limit};

use shard::{Shard, ShardInit};

/// Commands a shard's inbox holds before senders see it as full.
const INBOX_CAPACITY: usize = 1024;
/// The oldest kernel with every feature the shards use: multishot recv with
/// buffer select (6.0); multishot accept into direct descriptors and provided
/// buffer rings came in 5.19.
const KERNEL_MIN: (u32, u32) = (6, 0);

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

/// Checks that the running kernel has what the shards need.
pub fn check_kernel() -> Result<(), StartError> {
    let (release, version) = sys::kernel_version();
    if version < KERNEL_MIN {
        return Err(StartError::Kernel(format!(
            "ringgate needs Linux {}.{} or newer (io_uring multishot recv with provided buffers); this kernel is {release}",
            KERNEL_MIN.0, KERNEL_MIN.1
        )));
    }
    let ring = io_uring::IoUring::new(8).map_err(|e| {
        StartError::Kernel(format!("io_uring is unavailable ({e}); is it disabled by kernel.io_uring_disabled or a seccomp profile?"))
    })?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| StartError::Kernel(format!("io_uring probe failed: {e} (needs Linux 5.6)")))?;
    let needed = [
        (io_uring::opcode::AcceptMulti::CODE, "accept"),
        (io_uring::opcode::RecvMulti::CODE, "recv"),
        (io_uring::opcode::Send::CODE, "send"),
        (io_uring::opcode::Shutdown::CODE, "shutdown"),
        (io_uring::opcode::Close::CODE, "close"),
        (io_uring::opcode::AsyncCancel2::CODE, "async cancel"),
        (io_uring::opcode::Timeout::CODE, "timeout"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(StartError::Kernel(format!(
                "this kernel's io_uring lacks the {name} operation ({release})"
            )));
        }
    }
    Ok(())
}

/// A running shard, as the control thread sees it.
pub struct ShardHandle {
    /// The shard's index.
    pub id: usize,
    /// The shard's counters.
    pub stats: Arc<ShardStats>,
    inbox: SyncSender<Command>,
    doorbell: Arc<OwnedFd>,
    thread: JoinHandle<io::Result<()>>,
}

impl ShardHandle {
    /// Delivers a command and rings the doorbell. A full inbox is back-pressure:
    /// the command is handed back.
    pub fn send(&self, command: Command) -> Result<(), Command> {
        match self.inbox.try_send(command) {
            Ok(()) => {
                sys::ring_eventfd(sys::raw(&self.doorbell));
                Ok(())
            }
            Err(TrySendError::Full(c) | TrySendError::Disconnected(c)) => Err(c),
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

/// The started shards and the address they listen on.
pub struct Runtime {
    /// One handle per shard.
    pub shards: Vec<ShardHandle>,
    /// The bound address (the real port when port 0 was asked for).
    pub local_addr: SocketAddr,
}

/// Starts `count` shards on `cfg.listen`; returns once every shard is ready.
pub fn start(cfg: &ShardConfig, count: usize) -> Result<Runtime, StartError> {
    cfg.validate().map_err(StartError::Config)?;
    assert!(count > 0, "at least one shard");
    check_kernel()?;
    let first = sys::bind_listener(cfg.listen).map_err(|e| StartError::Bind(cfg.listen, e))?;
    let local_addr = sys::local_addr(&first).map_err(|e| StartError::Bind(cfg.listen, e))?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners
            .push(sys::bind_listener(local_addr).map_err(|e| StartError::Bind(local_addr, e))?);
    }
    let cpus = sys::cpu_count();
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut shards = Vec::with_capacity(count);
    for (id, listener) in listeners.into_iter().enumerate() {
        let mut shard_cfg = cfg.clone();
        shard_cfg.cpu = cfg.cpu.map(|base| (base + id) % cpus);
        let (inbox_tx, inbox_rx) = mpsc::sync_channel(INBOX_CAPACITY);
        let doorbell = Arc::new(sys::eventfd().map_err(|e| StartError::Shard(id, e))?);
        let stats = Arc::new(ShardStats::default());
        let init = ShardInit {
            id,
            cfg: shard_cfg,
            listener,
            doorbell: doorbell.clone(),
            inbox: inbox_rx,
            stats: stats.clone(),
        };
        let ready = ready_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ringgate-shard-{id}"))
            .spawn(move || run_shard(init, ready))
            .map_err(|e| StartError::Shard(id, e))?;
        shards.push(ShardHandle {
            id,
            stats,
            inbox: inbox_tx,
            doorbell,
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
            let _ = s.send(Command::Shutdown { deadline: now });
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
