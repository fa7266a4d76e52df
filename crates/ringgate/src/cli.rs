//! The command line: every setting with a default good enough to run with none.

use std::net::SocketAddr;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::Parser;

use crate::units::{parse_duration, parse_duration_or_off, parse_size};

/// ringgate: a WebSocket gateway on io_uring for millions of mostly idle connections.
///
/// Every setting can also come from the environment (RINGGATE_<FLAG>, e.g.
/// RINGGATE_MAX_CONNECTIONS=100000) or a TOML file (--config; keys are the flag
/// names, e.g. max-connections = 100000). Precedence: flag > environment > file > default.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Subcommand>,

    /// Read settings from this TOML file (flags and RINGGATE_* variables override it).
    #[arg(long, env = "RINGGATE_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Address the WebSocket endpoints listen on (every shard binds it with SO_REUSEPORT).
    #[arg(
        long,
        env = "RINGGATE_LISTEN",
        default_value = "0.0.0.0:8080",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,

    /// Address of the control plane (POST /publish, /stats, /metrics, /healthz, /readyz). A
    /// non-loopback address needs --control-token.
    #[arg(
        long,
        env = "RINGGATE_CONTROL",
        default_value = "127.0.0.1:9090",
        value_name = "ADDR"
    )]
    pub control: SocketAddr,

    /// POST /publish then needs `Authorization: Bearer TOKEN` (401 otherwise).
    #[arg(
        long,
        env = "RINGGATE_CONTROL_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        conflicts_with = "control_token_file"
    )]
    pub control_token: Option<String>,

    /// Read the control token from this file (its first line), so it appears in no process list.
    #[arg(long, env = "RINGGATE_CONTROL_TOKEN_FILE", value_name = "FILE")]
    pub control_token_file: Option<std::path::PathBuf>,

    /// Also serve /metrics, /healthz and /readyz (and nothing else) on this address, for a
    /// scraper on the network that must not be able to publish [default: off].
    #[arg(long, env = "RINGGATE_METRICS", value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// Shard threads, each with its own io_uring [default: number of CPUs].
    #[arg(long, env = "RINGGATE_SHARDS", value_name = "N", value_parser = at_least_one)]
    pub shards: Option<usize>,

    /// Share --listen with a ringgate already serving it (a zero-downtime restart: start the new
    /// one with --takeover, then SIGTERM the old). Without it, an address another process
    /// listens on is refused rather than silently split (SO_REUSEPORT).
    #[arg(long, env = "RINGGATE_TAKEOVER", value_parser = BoolishValueParser::new())]
    pub takeover: bool,

    /// Do not pin shard threads to CPUs.
    #[arg(long, env = "RINGGATE_NO_PIN", value_parser = BoolishValueParser::new())]
    pub no_pin: bool,

    /// Serve GET /echo, which echoes every message (for conformance tests and benchmarks).
    #[arg(long, env = "RINGGATE_ECHO", value_parser = BoolishValueParser::new())]
    pub echo: bool,

    /// Connections held at most, over all shards; more are answered 503
    /// [default: as many as the shards' rings hold: shards x (RLIMIT_NOFILE - 64)].
    #[arg(long, env = "RINGGATE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<u64>,

    /// Largest frame payload accepted (close 1009 past it).
    #[arg(long, env = "RINGGATE_MAX_FRAME_SIZE", default_value = "64KiB", value_parser = parse_size, value_name = "SIZE")]
    pub max_frame_size: u64,

    /// Largest message accepted, over all its fragments (close 1009 past it).
    #[arg(long, env = "RINGGATE_MAX_MESSAGE_SIZE", default_value = "1MiB", value_parser = parse_size, value_name = "SIZE")]
    pub max_message_size: u64,

    /// Largest client message on /ws (a JSON op), over all its fragments (close 1009 past it).
    #[arg(long, env = "RINGGATE_MAX_OP_SIZE", default_value = "16KiB", value_parser = parse_size, value_name = "SIZE")]
    pub max_op_size: u64,

    /// Bytes one shard holds at most for unfinished frames, messages and request heads, and for
    /// `/ws` requests waiting behind a subscribe, over all its connections; input past it closes
    /// its connection (1013, or 503 during the upgrade), a waiting request past it is answered busy.
    #[arg(long, env = "RINGGATE_MAX_UNFINISHED_BYTES", default_value = "64MiB", value_parser = parse_size, value_name = "SIZE")]
    pub max_unfinished_bytes: u64,

    /// An unfinished frame or message must be complete this long after its first byte (close 1008
    /// past it); further fragments do not extend it.
    #[arg(long, env = "RINGGATE_MESSAGE_TIMEOUT", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub message_timeout: Duration,

    /// Largest HTTP upgrade request head accepted (431 past it).
    #[arg(long, env = "RINGGATE_MAX_REQUEST_SIZE", default_value = "8KiB", value_parser = parse_size, value_name = "SIZE")]
    pub max_request_size: u64,

    /// What may wait to be sent to one client, each frame counted with 64 bytes of overhead. A /ws
    /// subscriber past it whose socket is full is a slow consumer (see --slow-consumer); /echo
    /// stops reading the client. No /ws queue passes twice this plus one largest event.
    #[arg(long, env = "RINGGATE_SEND_QUEUE_LIMIT", default_value = "256KiB", value_parser = parse_size, value_name = "SIZE")]
    pub send_queue_limit: u64,

    /// Provided receive buffers per shard (a power of two, at most 32768).
    #[arg(
        long,
        env = "RINGGATE_BUFFERS",
        default_value_t = 512,
        value_name = "N"
    )]
    pub buffers: u32,

    /// Bytes per provided receive buffer.
    #[arg(long, env = "RINGGATE_BUFFER_SIZE", default_value = "16KiB", value_parser = parse_size, value_name = "SIZE")]
    pub buffer_size: u64,

    /// Close connections that have not completed the upgrade after this long.
    #[arg(long, env = "RINGGATE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub handshake_timeout: Duration,

    /// Ping clients silent this long (pings are spread over the last fifth). Behind a proxy that
    /// closes idle connections, set it below the proxy's idle timeout.
    #[arg(long, env = "RINGGATE_PING_INTERVAL", default_value = "120s", value_parser = parse_duration, value_name = "DURATION")]
    pub ping_interval: Duration,

    /// After this long without input, watch a connection with a one-shot poll instead of an armed
    /// multishot recv: about 0.5 KB less kernel memory per idle connection (0.2 KB over the
    /// plainest epoll server instead of 0.7), 1-3 us more CPU when it wakes (`cargo xtask floor
    /// --slab`). `off` (or 0) keeps every recv armed.
    #[arg(long, env = "RINGGATE_PARK_AFTER", default_value = "30s", value_parser = parse_duration_or_off, value_name = "DURATION|off")]
    pub park_after: Duration,

    /// Close clients silent this long.
    #[arg(long, env = "RINGGATE_IDLE_TIMEOUT", default_value = "150s", value_parser = parse_duration, value_name = "DURATION")]
    pub idle_timeout: Duration,

    /// Kernel TCP keepalive: probe clients silent this long and drop those that acknowledge
    /// nothing for twice as long. Finds dead peers and keeps NAT state without waking ringgate or
    /// the client's application. Many connections accepted together probe together: on loopback
    /// raise net.core.netdev_max_backlog (scripts/tune-host.sh) first.
    #[arg(long, env = "RINGGATE_TCP_KEEPALIVE", default_value = "off", value_parser = parse_duration_or_off, value_name = "DURATION|off")]
    pub tcp_keepalive: Duration,

    /// Time a control-plane client has to send a request's headers (also between keep-alive
    /// requests), and again to send its body.
    #[arg(long, env = "RINGGATE_CONTROL_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub control_timeout: Duration,

    /// On SIGTERM/SIGINT, wait this long for clients to finish closing (the process exits at
    /// most a second or two after it, whatever the clients do).
    #[arg(long, env = "RINGGATE_DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub drain_timeout: Duration,

    /// Topics one connection may subscribe to.
    #[arg(
        long,
        env = "RINGGATE_MAX_SUBSCRIPTIONS",
        default_value_t = 64,
        value_name = "N"
    )]
    pub max_subscriptions: usize,

    /// Events one shard's inbox holds while the shard catches up. A control-plane publish that
    /// finds an inbox full waits for room (`--publish-wait`); one still refused reaches nobody.
    #[arg(
        long,
        env = "RINGGATE_INBOX_CAPACITY",
        default_value_t = 4096,
        value_name = "N"
    )]
    pub inbox_capacity: usize,

    /// How long a control-plane publish (`POST /publish`, `POST /publish/{topic}`) waits for room
    /// when a shard's inbox is full, so a publisher faster than the shards is slowed to their pace
    /// (waiting requests go on in arrival order); then an event still finding an inbox full is
    /// refused (503, or its line of a batch). `off` (or 0) refuses at once; at most 30s. Clients'
    /// own publishes never wait, nor does a fleet member's (`--broker`).
    #[arg(long, env = "RINGGATE_PUBLISH_WAIT", default_value = "1s", value_parser = parse_duration_or_off, value_name = "DURATION|off")]
    pub publish_wait: Duration,

    /// What to do with a subscriber whose send queue is full when an event arrives.
    #[arg(long, env = "RINGGATE_SLOW_CONSUMER", value_enum, default_value_t = SlowConsumerPolicy::Close)]
    pub slow_consumer: SlowConsumerPolicy,

    /// Let clients publish with {"op":"pub"} to topics matching PATTERN: `*`, `prefix*` or one name
    /// [default: clients may not publish].
    #[arg(long, env = "RINGGATE_CLIENT_PUBLISH", value_name = "PATTERN")]
    pub client_publish: Option<String>,

    /// Events each topic's history holds for recovery (`{"op":"sub",...,"since":N}`); 0 turns
    /// history and recovery off.
    #[arg(
        long,
        env = "RINGGATE_HISTORY_SIZE",
        default_value_t = 100,
        value_name = "N"
    )]
    pub history_size: usize,

    /// Events older than this leave the history.
    #[arg(long, env = "RINGGATE_HISTORY_TTL", default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub history_ttl: Duration,

    /// Bytes all histories hold together; past it the oldest events of the least recently
    /// published topics go first.
    #[arg(long, env = "RINGGATE_HISTORY_MEMORY", default_value = "64MiB", value_parser = parse_size, value_name = "SIZE")]
    pub history_memory: u64,

    /// A topic with no publish and no subscriber for this long is forgotten (its `seq` and
    /// history); when it comes back it has a new epoch. At least --history-ttl.
    #[arg(long, env = "RINGGATE_TOPIC_IDLE_TTL", default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub topic_idle_ttl: Duration,

    /// Make this host a fleet member: `redis://HOST:PORT/[DB]`. Events are numbered, kept
    /// (history) and fanned out through Redis, so every host delivers the same `seq` and epoch
    /// and a client recovers on any host [default: the embedded broker, one host].
    #[arg(
        long,
        env = "RINGGATE_BROKER",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub broker: Option<String>,

    /// Require a JWT signed with HS256 and this secret to open /ws (from ?token=,
    /// `Authorization: Bearer`, or a Sec-WebSocket-Protocol entry); its `topics` and `publish`
    /// claims are the connection's ACL.
    #[arg(long, env = "RINGGATE_AUTH_HS256_SECRET", hide_env_values = true, value_name = "SECRET", conflicts_with_all = ["auth_hs256_secret_file", "auth_public_key"])]
    pub auth_hs256_secret: Option<String>,

    /// Like --auth-hs256-secret, the secret being the file's first line.
    #[arg(
        long,
        env = "RINGGATE_AUTH_HS256_SECRET_FILE",
        value_name = "FILE",
        conflicts_with = "auth_public_key"
    )]
    pub auth_hs256_secret_file: Option<std::path::PathBuf>,

    /// Require a JWT signed with the private half of this PEM public key: RS256 (RSA), ES256
    /// (P-256) or EdDSA (Ed25519), by the key's kind.
    #[arg(long, env = "RINGGATE_AUTH_PUBLIC_KEY", value_name = "FILE")]
    pub auth_public_key: Option<std::path::PathBuf>,

    /// New connections accepted per second over all shards; past it the shards stop accepting
    /// until their next tick and new clients wait in the listen backlog, so a reconnect storm
    /// cannot starve the connections already served [default: no limit].
    #[arg(
        long,
        env = "RINGGATE_MAX_ACCEPTS_PER_SEC",
        value_name = "N",
        default_value_t = 0,
        hide_default_value = true
    )]
    pub max_accepts_per_sec: u32,

    /// Connections one client address may hold open, over all shards (IPv6: per /64); past it
    /// the next is answered 429 [default: no limit].
    #[arg(
        long,
        env = "RINGGATE_MAX_CONNECTIONS_PER_IP",
        value_name = "N",
        default_value_t = 0,
        hide_default_value = true
    )]
    pub max_connections_per_ip: u32,

    /// Messages a /ws client may send per second (bursts of as many); past it the connection is
    /// closed with 1008 [default: no limit].
    #[arg(
        long,
        env = "RINGGATE_MAX_MESSAGES_PER_SEC",
        value_name = "N",
        default_value_t = 0,
        hide_default_value = true
    )]
    pub max_messages_per_sec: u32,

    /// Browser origins allowed to open WebSockets, comma-separated: exact
    /// (`https://app.example.com`) or by subdomain (`*.example.com`, `https://*.example.com`);
    /// others get 403 [default: any origin].
    #[arg(long, env = "RINGGATE_ALLOWED_ORIGINS", value_name = "LIST")]
    pub allowed_origins: Option<String>,

    /// With --allowed-origins: let requests without an Origin header in (non-browser clients).
    // Checked once every layer is in (`shard_config`), not by clap: clap's
    // first pass, before the file is read, would refuse the flag with the list
    // in the file.
    #[arg(long, env = "RINGGATE_ALLOW_MISSING_ORIGIN", value_parser = BoolishValueParser::new())]
    pub allow_missing_origin: bool,

    /// With token checking on: the `aud` tokens must name.
    #[arg(long, env = "RINGGATE_AUTH_AUDIENCE", value_name = "AUD")]
    pub auth_audience: Option<String>,

    /// With token checking on: the `iss` tokens must carry.
    #[arg(long, env = "RINGGATE_AUTH_ISSUER", value_name = "ISS")]
    pub auth_issuer: Option<String>,

    /// (testing) Tick with a re-armed one-shot timeout, as on kernels before 6.4.
    #[arg(long, hide = true, env = "RINGGATE_ONESHOT_TICK", value_parser = BoolishValueParser::new())]
    pub oneshot_tick: bool,

    /// Sends a shard offers the kernel at once (1 to 8192). Fewer keeps each loop turn short and
    /// coalesces bursts (subscribers waiting for a slot get the events published meanwhile in the
    /// same send); more only helps when sends complete slowly.
    #[arg(long, env = "RINGGATE_SEND_SLOTS", default_value_t = ringgate_shard::limits::SEND_SLOTS_DEFAULT, value_name = "N")]
    pub send_slots: usize,

    /// (tuning) Events a shard queues on subscribers while an earlier fanout waits for send
    /// slots (a queue slot each, about 40-60 bytes); past it new events wait in the inbox. More
    /// coalesces bigger bursts into fewer sends for more memory; 0 queues nothing ahead.
    #[arg(long, hide = true, env = "RINGGATE_FANOUT_BACKLOG", default_value_t = ringgate_shard::limits::FANOUT_BACKLOG_DEFAULT, value_name = "N")]
    pub fanout_backlog: usize,

    /// (benchmarks) Do not recycle emptied send queues, to measure what recycling saves.
    #[arg(long, hide = true, env = "RINGGATE_NO_RECYCLE", value_parser = BoolishValueParser::new())]
    pub no_recycle: bool,

    /// Log lines as text (coloured only on a terminal) or as JSON objects, one per line, for
    /// log shippers.
    #[arg(long, env = "RINGGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, env = "RINGGATE_VERBOSE", action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// What to do instead of running the gateway.
#[derive(Debug, clap::Subcommand)]
pub enum Subcommand {
    /// Validate a configuration file (and the environment) without starting.
    CheckConfig {
        /// The TOML file.
        file: std::path::PathBuf,
    },
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A count that must be at least one.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// `--slow-consumer` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SlowConsumerPolicy {
    /// Close the subscriber with 1008 "slow consumer".
    Close,
    /// Drop the event for that subscriber and count it.
    Drop,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn runs_with_no_flags() {
        let cli = Cli::try_parse_from(["ringgate"]).unwrap();
        assert_eq!(cli.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(cli.max_frame_size, 64 << 10);
        assert_eq!(cli.ping_interval, Duration::from_secs(120));
        assert_eq!(cli.idle_timeout, Duration::from_secs(150));
        assert!(
            cli.tcp_keepalive.is_zero(),
            "TCP keepalive is off by default"
        );
        assert!(!cli.echo);
        assert_eq!(cli.history_size, 100);
        assert_eq!(cli.history_ttl, Duration::from_secs(300));
        assert_eq!(cli.history_memory, 64 << 20);
        assert_eq!(cli.topic_idle_ttl, Duration::from_secs(600));
        assert_eq!(
            cli.park_after,
            Duration::from_secs(30),
            "idle connections park"
        );
        let off = Cli::try_parse_from(["ringgate", "--park-after", "off"]).unwrap();
        assert!(off.park_after.is_zero(), "off keeps every recv armed");
    }

    #[test]
    fn zero_shards_is_an_error_not_one() {
        let err = Cli::try_parse_from(["ringgate", "--shards", "0"]).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
        let cli = Cli::try_parse_from(["ringgate", "--shards", "3"]).unwrap();
        assert_eq!(cli.shards, Some(3));
    }

    #[test]
    fn bad_units_are_named() {
        let err = Cli::try_parse_from(["ringgate", "--max-frame-size", "64 bananas"]).unwrap_err();
        assert!(err.to_string().contains("unknown unit"), "{err}");
    }
}
