//! The `ringgate` binary: parses the command line, starts the shards and the
//! control plane, and turns SIGTERM/SIGINT into a graceful drain.

mod batch;
mod broker;
mod bus;
mod cli;
mod config;
mod control;
mod dashboard;
mod fleet;
mod history;
mod metrics;
mod notify;
mod process_metrics;
mod signals;
mod topic_table;
mod units;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringgate_codec::Limits;
use ringgate_shard::limits::UPSTREAM_CAPACITY;
use ringgate_shard::{ShardConfig, SlowConsumer, Upstream, UpstreamSender, REJECT_SLOTS};

use broker::Broker;
use bus::Bus;
use cli::{Cli, LogFormat, SlowConsumerPolicy, Subcommand};
use topic_table::HistoryLimits;

fn main() -> ExitCode {
    let loaded = match config::load(std::env::args_os().collect()) {
        Ok(loaded) => loaded,
        Err(config::LoadError::Clap(e)) => return flag_error(e),
        Err(config::LoadError::File(msg)) => {
            eprintln!("ringgate: error: {msg}");
            return ExitCode::from(2);
        }
    };
    if loaded.cli.print_config {
        print!("{}", config::print(&loaded.matches));
        return ExitCode::SUCCESS;
    }
    init_logging(loaded.cli.verbose, loaded.cli.log_format);
    let unknown = config::unknown_variables(std::env::vars_os());
    if let Some(Subcommand::CheckConfig { file }) = &loaded.cli.command {
        if !unknown.is_empty() {
            eprintln!(
                "ringgate: error: no setting reads {} (see ringgate --help for each flag's variable)",
                unknown.join(", ")
            );
            return ExitCode::FAILURE;
        }
        return check_config(file);
    }
    for name in &unknown {
        tracing::warn!(
            "ignoring {name}: no setting reads it (see ringgate --help for each flag's variable)"
        );
    }
    let settings = config::effective(&loaded.matches);
    match run(loaded.cli, settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("ringgate: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// A command-line error in one line (with clap's tip, or the allowed values,
/// when it has one) instead of clap's usage block; help and version as usual.
fn flag_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit()
    }
    let text = e.render().to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    eprintln!(
        "ringgate: {}; `ringgate --help` lists every flag",
        parts.join("; ")
    );
    ExitCode::from(2)
}

/// `ringgate check-config FILE`: the file, with the environment, through every
/// check a start makes short of binding ports.
fn check_config(file: &std::path::Path) -> ExitCode {
    let args = vec![
        "ringgate".into(),
        "--config".into(),
        file.as_os_str().to_owned(),
    ];
    let result = match config::load(args) {
        Ok(loaded) => {
            let shards = loaded
                .cli
                .shards
                .unwrap_or_else(ringgate_shard::cpu_count)
                .max(1);
            shard_config(&loaded.cli, shards)
                .and_then(|cfg| cfg.validate())
                .and_then(|()| history_limits(&loaded.cli).map(drop))
                .and_then(|()| control_token(&loaded.cli).map(drop))
                .and_then(|()| publish_wait_bounded(&loaded.cli))
                .and_then(|()| match &loaded.cli.broker {
                    Some(url) => fleet::open(url).map(drop),
                    None => Ok(()),
                })
        }
        Err(config::LoadError::Clap(e)) => Err(first_line(&e.to_string())),
        Err(config::LoadError::File(msg)) => Err(msg),
    };
    match result {
        Ok(()) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("ringgate: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `--publish-wait` within its bound, checked before anything is bound.
fn publish_wait_bounded(cli: &Cli) -> Result<(), String> {
    if cli.publish_wait > bus::PUBLISH_WAIT_MAX {
        return Err(format!(
            "--publish-wait must be at most {:?}: a publisher held longer had better be told to retry",
            bus::PUBLISH_WAIT_MAX
        ));
    }
    // A request's headers and body each get this long: at 0 every request
    // needing a second read would time out.
    if cli.control_timeout < CONTROL_TIMEOUT_MIN {
        return Err(format!(
            "--control-timeout must be at least {CONTROL_TIMEOUT_MIN:?}"
        ));
    }
    Ok(())
}

/// The shortest `--control-timeout`.
const CONTROL_TIMEOUT_MIN: Duration = Duration::from_millis(100);

fn first_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("error: ")
        .to_string()
}

fn init_logging(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colour codes only for a person at a terminal, never into journald or a file.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

fn run(cli: Cli, settings: toml::Table) -> Result<(), String> {
    // Block the shutdown signals before any thread starts, so every thread
    // inherits the mask and only the main thread's sigwait sees them.
    signals::block_shutdown_signals();
    let shard_count = cli.shards.unwrap_or_else(ringgate_shard::cpu_count).max(1);
    let cfg = shard_config(&cli, shard_count)?;
    let history = history_limits(&cli)?;
    let token = control_token(&cli)?;
    publish_wait_bounded(&cli)?;
    if !cli.takeover {
        address_is_free("--listen", cli.listen)?;
        address_is_free("--control", cli.control)?;
        if let Some(addr) = cli.metrics {
            address_is_free("--metrics", addr)?;
        }
    }
    let control_listener = control::bind(cli.control)
        .map_err(|e| format!("cannot listen on the control address {}: {e}", cli.control))?;
    let control_addr = control_listener.local_addr().map_err(|e| e.to_string())?;
    let metrics_listener = match cli.metrics {
        Some(addr) => Some(
            control::bind(addr)
                .map_err(|e| format!("cannot listen on the metrics address {addr}: {e}"))?,
        ),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr().map_err(|e| e.to_string())?),
        None => None,
    };
    // The token is a secret: /stats shows that one is set, not what it is.
    let mut shown = settings;
    for secret in ["control-token", "auth-hs256-secret"] {
        if shown.contains_key(secret) {
            shown.insert(secret.into(), "<redacted>".into());
        }
    }
    if let Some(url) = &cli.broker {
        shown.insert("broker".into(), fleet::hide_password(url).into());
    }
    let (upstream_tx, upstream_rx) = tokio::sync::mpsc::channel::<Upstream>(UPSTREAM_CAPACITY);
    let upstream: UpstreamSender =
        Arc::new(move |message| upstream_tx.try_send(message).map_err(|e| e.into_inner()));
    let runtime =
        ringgate_shard::start(&cfg, shard_count, Some(upstream)).map_err(|e| e.to_string())?;
    let senders = runtime.shards.iter().map(|s| s.sender()).collect();
    let bus = Arc::new(match &cli.broker {
        None => Bus::Embedded(Arc::new(
            Broker::new(senders, history).with_publish_wait(cli.publish_wait),
        )),
        Some(url) => Bus::Fleet(Arc::new(fleet::Fleet::new(
            url,
            fleet::FleetLimits {
                history_size: history.size,
                history_ttl: history.ttl,
                topic_idle_ttl: history.topic_idle_ttl,
            },
            senders,
        )?)),
    });
    let alive: Vec<Arc<AtomicBool>> = runtime
        .shards
        .iter()
        .map(|_| Arc::new(AtomicBool::new(true)))
        .collect();
    let (leave, leaving) = tokio::sync::watch::channel(false);
    let control = Arc::new(control::Control {
        shards: runtime.shards.iter().map(|s| s.stats.clone()).collect(),
        alive: alive.clone(),
        started: Instant::now(),
        bus: bus.clone(),
        rss_at_start: metrics::rss_bytes().unwrap_or(0),
        kernel_at_start: metrics::kernel_bytes().unwrap_or(0),
        settings: serde_json::to_value(&shown).map_err(|e| e.to_string())?,
        token,
        message_bytes_max: usize::try_from(cfg.limits.message_bytes_max).unwrap_or(usize::MAX),
        timeout: cli.control_timeout,
        leaving,
        bodies: Arc::new(tokio::sync::Semaphore::new(control::bodies_budget(
            usize::try_from(cfg.limits.message_bytes_max).unwrap_or(usize::MAX),
        ))),
        connections: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        unauthorized: AtomicU64::new(0),
    });
    control::spawn(control_listener, metrics_listener, control, upstream_rx)
        .map_err(|e| format!("cannot start the control plane: {e}"))?;
    tracing::info!(
        ws = %runtime.local_addr, control = %control_addr, shards = shard_count,
        connections_per_shard = cfg.connections_max, echo = cli.echo, "ringgate ready"
    );
    // One stable line on stdout for scripts and tests that start ringgate on port 0.
    let metrics_field = metrics_addr.map_or(String::new(), |a| format!(" metrics={a}"));
    println!(
        "ringgate ready: ws={} control={} shards={shard_count}{metrics_field}",
        runtime.local_addr, control_addr
    );

    let notifier = notify::Notifier::from_env();
    notifier.send(&format!(
        "READY=1\nSTATUS=serving WebSockets on {} ({shard_count} shards), control on {control_addr}",
        runtime.local_addr
    ));
    let drain = Drain {
        bus: &bus,
        leave: &leave,
    };
    serve(runtime.shards, &alive, &notifier, cli.drain_timeout, drain)
}

/// What starting a drain does outside the shards: publishes are refused from
/// then on, and the control plane leaves its ports (as the shards leave
/// theirs), so new control connections reach a process that took over.
struct Drain<'a> {
    bus: &'a Bus,
    leave: &'a tokio::sync::watch::Sender<bool>,
}

impl Drain<'_> {
    fn start(&self) {
        self.bus.start_draining();
        self.leave.send_replace(true);
    }
}

/// Waits for SIGTERM/SIGINT while watching the shards, then drains them.
fn serve(
    mut shards: Vec<ringgate_shard::ShardHandle>,
    alive: &[Arc<AtomicBool>],
    notifier: &notify::Notifier,
    drain_timeout: Duration,
    drain_outside: Drain<'_>,
) -> Result<(), String> {
    let mut progress = ShardProgress::new(&shards);
    let signal = loop {
        if let Some(sig) = signals::wait(Duration::from_secs(1)) {
            break sig;
        }
        for (s, a) in shards.iter().zip(alive) {
            if s.is_finished() {
                a.store(false, Ordering::Relaxed);
            }
        }
        if let Some(dead) = shards.iter().position(|s| s.is_finished()) {
            let shard = shards.remove(dead);
            let id = shard.id;
            let why = shard
                .join()
                .err()
                .map_or_else(|| "exited".to_string(), |e| e.to_string());
            drain_outside.start();
            let _ = drain(shards, Instant::now());
            return Err(format!("shard {id} stopped unexpectedly: {why}"));
        }
        // The watchdog is fed only while every shard's loop is turning: a hung
        // shard gets the service restarted, not only a dead one.
        if progress.all_turning(&shards) && notifier.watchdog.is_some() {
            notifier.send("WATCHDOG=1");
        }
    };
    tracing::info!(
        signal,
        ?drain_timeout,
        "shutting down: closing every connection with 1001"
    );
    notifier.send("STOPPING=1\nSTATUS=draining");
    // From here a publish is answered 503: every subscriber is being closed.
    drain_outside.start();
    drain(shards, Instant::now() + drain_timeout)?;
    tracing::info!("bye");
    Ok(())
}

/// Whether each shard's loop has ticked recently (it ticks once a second).
struct ShardProgress {
    ticks: Vec<(u64, Instant)>,
}

impl ShardProgress {
    /// A shard whose tick count has not moved for this long is stuck.
    const STUCK_AFTER: Duration = Duration::from_secs(5);

    fn new(shards: &[ringgate_shard::ShardHandle]) -> Self {
        ShardProgress {
            ticks: shards
                .iter()
                .map(|s| (s.stats.loop_ticks.get(), Instant::now()))
                .collect(),
        }
    }

    fn all_turning(&mut self, shards: &[ringgate_shard::ShardHandle]) -> bool {
        let mut all = true;
        for (shard, (seen, at)) in shards.iter().zip(&mut self.ticks) {
            let now = shard.stats.loop_ticks.get();
            if now != *seen {
                (*seen, *at) = (now, Instant::now());
            } else if at.elapsed() > Self::STUCK_AFTER {
                tracing::error!(
                    shard = shard.id,
                    "shard loop has not turned for {:?}",
                    at.elapsed()
                );
                all = false;
            }
        }
        all
    }
}

/// How long after the drain deadline the shards get to exit: their own grace
/// for the kernel to finish closing (`EXIT_GRACE`), plus a tick.
const EXIT_WAIT: Duration = Duration::from_secs(3);

/// Tells every shard to drain by `deadline` and waits for them, but never past
/// `deadline + EXIT_WAIT`: a shard that has not stopped by then is reported and
/// left behind (the process exits anyway).
fn drain(shards: Vec<ringgate_shard::ShardHandle>, deadline: Instant) -> Result<(), String> {
    // A flag, not a queued command: it reaches a shard whatever its inbox holds.
    for shard in &shards {
        shard.shutdown(deadline);
    }
    let give_up = deadline + EXIT_WAIT;
    while shards.iter().any(|s| !s.is_finished()) && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stuck: Vec<usize> = shards
        .iter()
        .filter(|s| !s.is_finished())
        .map(|s| s.id)
        .collect();
    for shard in shards.into_iter().filter(|s| s.is_finished()) {
        let id = shard.id;
        if let Err(e) = shard.join() {
            tracing::error!(shard = id, "shard ended with an error: {e}");
        }
    }
    if stuck.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "shards {stuck:?} did not stop within the drain timeout and {EXIT_WAIT:?}; exiting anyway"
        ))
    }
}

/// Refuses an address (`flag`'s) another process already listens on: the
/// shards and the control plane bind theirs with SO_REUSEPORT, so that a
/// process started with `--takeover` can listen beside the one it replaces,
/// which would otherwise silently split connections with that process. A bind
/// without SO_REUSEPORT fails exactly when someone holds the address.
fn address_is_free(flag: &str, addr: std::net::SocketAddr) -> Result<(), String> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| format!("cannot make a socket: {e}"))?;
    // Like the listeners: a port in TIME_WAIT is free.
    probe
        .set_reuse_address(true)
        .map_err(|e| format!("cannot set SO_REUSEADDR: {e}"))?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(format!(
            "{flag} {addr} is in use by another process; pass --takeover to share it with a ringgate for a zero-downtime restart"
        )),
        Err(e) => Err(format!("cannot listen on {addr}: {e}")),
    }
}

/// HS256 secrets shorter than this are refused: a short one can be guessed
/// offline from any token.
const AUTH_SECRET_BYTES_MIN: usize = 32;

/// A secret given as a flag, or as the first line of a file (`file_flag` names
/// it in errors); trimmed.
fn secret_from(
    value: &Option<String>,
    file: &Option<std::path::PathBuf>,
    file_flag: &str,
) -> Result<Option<String>, String> {
    match (value, file) {
        (Some(value), _) => Ok(Some(value.trim().to_string())),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("{file_flag} {}: {e}", path.display()))?;
            Ok(Some(text.lines().next().unwrap_or("").trim().to_string()))
        }
        (None, None) => Ok(None),
    }
}

/// The token checker of `--auth-*`, if token checking is on.
fn auth_verifier(cli: &Cli) -> Result<Option<Arc<ringgate_shard::auth::Verifier>>, String> {
    use ringgate_shard::auth::Verifier;
    let secret = secret_from(
        &cli.auth_hs256_secret,
        &cli.auth_hs256_secret_file,
        "--auth-hs256-secret-file",
    )?;
    let verifier = match (secret, &cli.auth_public_key) {
        (Some(secret), _) if secret.len() < AUTH_SECRET_BYTES_MIN => {
            return Err(format!(
                "the HS256 secret must be at least {AUTH_SECRET_BYTES_MIN} bytes"
            ))
        }
        (Some(secret), _) => Verifier::hs256(secret.as_bytes())?,
        (None, Some(path)) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("--auth-public-key {}: {e}", path.display()))?;
            Verifier::public_key(&pem)
                .map_err(|e| format!("--auth-public-key {}: {e}", path.display()))?
        }
        (None, None) => {
            if cli.auth_audience.is_some() || cli.auth_issuer.is_some() {
                return Err("--auth-audience and --auth-issuer need --auth-hs256-secret or --auth-public-key".into());
            }
            return Ok(None);
        }
    };
    let verifier = match &cli.auth_audience {
        Some(aud) => verifier.with_audience(aud),
        None => verifier,
    };
    let verifier = match &cli.auth_issuer {
        Some(iss) => verifier.with_issuer(iss),
        None => verifier,
    };
    Ok(Some(Arc::new(verifier)))
}

/// Tokens shorter than this are refused: they could be guessed.
const CONTROL_TOKEN_BYTES_MIN: usize = 16;

/// The control plane's token, from `--control-token` or the first line of
/// `--control-token-file`; a control address off the loopback range needs one.
fn control_token(cli: &Cli) -> Result<Option<String>, String> {
    let token = secret_from(
        &cli.control_token,
        &cli.control_token_file,
        "--control-token-file",
    )?;
    match &token {
        Some(t) if t.len() < CONTROL_TOKEN_BYTES_MIN => Err(format!(
            "the control token must be at least {CONTROL_TOKEN_BYTES_MIN} characters"
        )),
        None if !cli.control.ip().is_loopback() => Err(format!(
            "--control {} is not a loopback address: set --control-token (or --control-token-file), or anyone who reaches it can publish",
            cli.control
        )),
        _ => Ok(token),
    }
}

fn history_limits(cli: &Cli) -> Result<HistoryLimits, String> {
    if cli.topic_idle_ttl < cli.history_ttl {
        return Err(format!(
            "--topic-idle-ttl ({:?}) must be at least --history-ttl ({:?}): a forgotten topic loses its history",
            cli.topic_idle_ttl, cli.history_ttl
        ));
    }
    if cli.history_size > 0 && cli.history_ttl.is_zero() {
        return Err(
            "--history-ttl must be more than 0 (use --history-size 0 to turn history off)".into(),
        );
    }
    Ok(HistoryLimits {
        size: cli.history_size,
        ttl: cli.history_ttl,
        memory: usize::try_from(cli.history_memory)
            .map_err(|_| format!("--history-memory is too large: {}", cli.history_memory))?,
        topic_idle_ttl: cli.topic_idle_ttl,
    })
}

fn shard_config(cli: &Cli, shards: usize) -> Result<ShardConfig, String> {
    let nofile = ringgate_shard::nofile_soft_limit();
    // One ring's fixed-file table holds at most the soft RLIMIT_NOFILE slots,
    // and at most the kernel's own bound (a limit of "infinity" is common in
    // containers).
    let table_max = nofile
        .min(u64::from(ringgate_shard::limits::FIXED_FILES_MAX))
        .saturating_sub(u64::from(REJECT_SLOTS))
        .max(1);
    let per_shard = match cli.max_connections {
        None => table_max,
        Some(0) => return Err("--max-connections must be at least 1".into()),
        Some(total) => {
            let wanted = total.div_ceil(shards as u64);
            if wanted > table_max {
                tracing::warn!(
                    "--max-connections {total} is more than {shards} shards can hold: capacity is {} (one ring holds at most RLIMIT_NOFILE ({nofile}) sockets, and at most 1,048,576); use more --shards",
                    table_max * shards as u64
                );
            }
            wanted.min(table_max)
        }
    };
    let to_u32 =
        |v: u64, name: &str| u32::try_from(v).map_err(|_| format!("{name} is too large: {v}"));
    let to_usize =
        |v: u64, name: &str| usize::try_from(v).map_err(|_| format!("{name} is too large: {v}"));
    Ok(ShardConfig {
        listen: cli.listen,
        connections_max: per_shard as u32,
        buffers: cli.buffers,
        buffer_bytes: to_u32(cli.buffer_size, "--buffer-size")?,
        limits: Limits {
            frame_bytes_max: cli.max_frame_size,
            message_bytes_max: cli.max_message_size,
        },
        request_bytes_max: to_usize(cli.max_request_size, "--max-request-size")?,
        send_queue_bytes_max: to_usize(cli.send_queue_limit, "--send-queue-limit")?,
        handshake_timeout: cli.handshake_timeout,
        ping_interval: cli.ping_interval,
        idle_timeout: cli.idle_timeout,
        tcp_keepalive: (!cli.tcp_keepalive.is_zero()).then_some(cli.tcp_keepalive),
        echo: cli.echo,
        park_after: (!cli.park_after.is_zero()).then_some(cli.park_after),
        subscriptions_max: cli.max_subscriptions,
        inbox_capacity: cli.inbox_capacity,
        send_slots: cli.send_slots,
        fanout_backlog: cli.fanout_backlog,
        slow_consumer: match cli.slow_consumer {
            SlowConsumerPolicy::Close => SlowConsumer::Close,
            SlowConsumerPolicy::Drop => SlowConsumer::Drop,
        },
        client_publish: cli.client_publish.clone(),
        cpu: (!cli.no_pin).then_some(0),
        op_bytes_max: cli.max_op_size,
        unfinished_bytes_max: to_usize(cli.max_unfinished_bytes, "--max-unfinished-bytes")?,
        message_timeout: cli.message_timeout,
        oneshot_tick: cli.oneshot_tick,
        recycle_send_queues: !cli.no_recycle,
        announce_first_in: cli.broker.is_some(),
        auth: auth_verifier(cli)?,
        messages_per_sec_max: cli.max_messages_per_sec,
        // Each shard takes its share, at least one a second.
        accepts_per_sec_max: match cli.max_accepts_per_sec {
            0 => 0,
            n => n.div_ceil(u32::try_from(shards).unwrap_or(u32::MAX)).max(1),
        },
        peers: (cli.max_connections_per_ip > 0).then(|| {
            Arc::new(ringgate_shard::peers::PeerCounts::new(
                cli.max_connections_per_ip,
            ))
        }),
        origins: match &cli.allowed_origins {
            Some(list) => Some(Arc::new(ringgate_shard::auth::Origins::parse(
                list,
                cli.allow_missing_origin,
            )?)),
            None if cli.allow_missing_origin => {
                return Err(
                    "--allow-missing-origin needs --allowed-origins (without a list every origin is let in)"
                        .into(),
                )
            }
            None => None,
        },
    })
}
