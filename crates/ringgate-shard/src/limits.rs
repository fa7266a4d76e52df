//! Every fixed limit of a shard, in one place, with how each relates to the
//! others (TigerBeetle's `constants.zig`). Relations between constants are
//! checked at compile time below; relations with settings (flags) are checked
//! once at start by [`crate::ShardConfig::validate`].
//!
//! Owns numbers only: no code here allocates or decides anything. A limit that
//! an operator may change is a setting in `config.rs`; its bounds are here.

use std::time::Duration;

// ---- the ring -----------------------------------------------------------------

/// Submission queue entries per ring. Handlers stage SQEs in memory and the loop
/// flushes them in batches, so a full SQ only costs an extra submit.
pub const SQ_ENTRIES: u32 = 4096;

/// Completion queue entries. A CQE the ring has no room for goes to the kernel's
/// overflow list: not lost (IORING_FEAT_NODROP), but slow, and counted in
/// `ringgate_cq_overflow_total`.
pub const CQ_ENTRIES: u32 = 4 * SQ_ENTRIES;

/// Completions copied out and handled per loop turn before submitting again:
/// bounds the latency one busy turn adds to everything else on the shard.
pub const CQE_BATCH_MAX: usize = 1024;

/// The most send slots per shard (`--send-slots`; see [`SEND_SLOTS_DEFAULT`]):
/// sends offered to the kernel and not yet refused. A
/// fanout to more subscribers than the slots queues the rest on a ready list and
/// submits them as earlier sends complete, so a 100,000-subscriber fanout never
/// posts 100,000 CQEs at once. A send the kernel did not complete when offered
/// (the peer's socket is full) gives its slot back: it now waits on the peer,
/// as an armed receive does, and stalled clients cannot hold every slot.
pub const SENDS_INFLIGHT_MAX: usize = 8192;

/// Send slots per shard by default (`--send-slots`, at most
/// [`SENDS_INFLIGHT_MAX`]): the sends one turn offers the kernel at most. The
/// kernel runs a turn's sends back to back as they are submitted (2-5 us apiece
/// to a reader on this machine), so this bounds how long the shard goes without
/// looking at its inbox and its completions: about a millisecond. It also
/// coalesces: a fanout to more subscribers than this leaves the rest on the
/// ready list, where events published meanwhile join their queues, so in a
/// burst a subscriber gets many events per send instead of a send per event
/// (10,000 subscribers x 100 events: 0.8 us of CPU per delivery with 8,192
/// slots, 0.35 us with 256; `cargo xtask bench --only burst`). With the default,
/// every send of a turn completes within one CQE batch.
pub const SEND_SLOTS_DEFAULT: usize = 256;

/// The CQ has room for every send that holds a slot and as much again for what
/// else completes in one turn: accepts, closes, cancels, and the operations
/// that wait on peers (armed receives, sends given back their slot, polls),
/// which complete as peers act. A flood of those at one instant is what
/// `ringgate_cq_overflow_total` watches (overflow is not loss: the kernel keeps
/// the completions, IORING_FEAT_NODROP).
const _: () = assert!(CQ_ENTRIES as usize >= 2 * SENDS_INFLIGHT_MAX);
const _: () = assert!(CQE_BATCH_MAX <= SENDS_INFLIGHT_MAX);
const _: () = assert!(SEND_SLOTS_DEFAULT <= CQE_BATCH_MAX);
const _: () = assert!(SQ_ENTRIES as usize >= CQE_BATCH_MAX);

/// Scratch vectors (staged SQEs, the sweep's list, the ready list) keep at most
/// this many entries of capacity after a burst: a fanout to 100,000 subscribers
/// must not leave megabytes of scratch space behind for good.
pub const SCRATCH_KEEP: usize = 1024;

/// The kernel's limit on provided-buffer ring entries.
pub const BUFFERS_MAX: u32 = 32768;

/// Extra fixed-file slots beyond the connection limit, so a connection over the
/// limit can still be accepted and answered 503 instead of being reset.
pub const REJECT_SLOTS: u32 = 64;

/// Slots one ring's registered-file table may have: the kernel's
/// IORING_MAX_FIXED_FILES (1 << 20); a larger table is refused (EMFILE)
/// whatever RLIMIT_NOFILE allows.
pub const FIXED_FILES_MAX: u32 = 1 << 20;

/// One-shot accepts a shard keeps armed when it must see each client's
/// address (`--max-connections-per-ip`; a multishot accept into the fixed-file
/// table reports none). Each has its own address buffer, so a connect storm
/// is still taken several per loop turn. With `--max-accepts-per-sec`, one.
pub const ACCEPTS_ARMED_MAX: usize = 16;

/// Stripes of the process-wide per-address connection counts: shards accepting
/// at once rarely meet on one lock.
pub const PEER_STRIPES: usize = 64;

/// Accepts armed when the table fills each still find a fixed-file slot to be
/// answered 503 in.
const _: () = assert!(ACCEPTS_ARMED_MAX <= REJECT_SLOTS as usize);

/// How often the shard's sweep runs (timeouts are whole ticks).
pub const TICK: Duration = Duration::from_secs(1);

// ---- the inbox ------------------------------------------------------------------

/// Commands a shard's inbox holds by default (`--inbox-capacity`) before
/// senders see it as full: a burst of this many publishes waits for one shard
/// without loss. Each holds a reference to an event frame, so the memory it can
/// pin is this many events.
pub const INBOX_CAPACITY: usize = 4096;

/// The largest `--inbox-capacity`.
pub const INBOX_CAPACITY_MAX: usize = 1 << 20;

/// Inbox commands handled per loop turn at most. Between turns the shard submits
/// the sends it staged and reaps their completions, so a subscriber that reads
/// is never judged by bytes the kernel was not yet offered.
pub const INBOX_TURN_COMMANDS_MAX: usize = 64;

/// Event bytes taken from the inbox per loop turn at most (at least one command
/// is always taken, whatever its size).
pub const INBOX_TURN_BYTES_MAX: usize = 32 * 1024;

const _: () = assert!(INBOX_CAPACITY <= INBOX_CAPACITY_MAX);

/// Subscribes a shard has forwarded to the broker and not yet had answered.
/// Answers bypass the inbox's capacity (a subscribe must not be lost to a queue
/// of events), so this is what they can add to it; past it subscribes wait in
/// the shard, in order (each connection at most `--max-subscriptions`, counted
/// with the subscriptions it holds), and go as answers come back.
pub const SUBSCRIBES_PENDING_MAX: usize = 1024;

/// Requests one connection may send while its subscribes are outstanding at
/// the broker (they are handled, in order, once the answers are in); past it
/// the client is told `busy`.
pub const REQUESTS_DEFERRED_MAX: usize = 32;

/// A recovering client whose replay has not moved for this long (its socket
/// full throughout) is closed as a slow consumer: the replay pins frames the
/// history may already have let go.
pub const REPLAY_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages shards may have queued for the broker (client publishes,
/// subscribes, presence) before a shard sees the channel as full.
pub const UPSTREAM_CAPACITY: usize = 16 * 1024;

const _: () = assert!(SUBSCRIBES_PENDING_MAX <= UPSTREAM_CAPACITY);

/// Buckets in a shard's route filter (`routes.rs`): a count of the topics
/// this shard holds (or has asked the broker about) per bucket of topic hashes,
/// which the broker reads to hand an event only to shards that may have its
/// subscribers. One byte each, 128 KiB per shard (every shard's count of a
/// bucket side by side in one array, `routes.rs`). A topic hashing into a
/// bucket some other topic of the shard holds is a false positive (the event
/// goes to the shard, which finds nobody, as every shard did before the
/// filter): with T topics on a shard about 1 - e^(-T/ROUTE_BUCKETS) of the
/// others, 12% at 16,000 topics a shard, 53% at 100,000. Past that the filter
/// saves less and less, never delivers less.
pub const ROUTE_BUCKETS: usize = 1 << 17;

const _: () = assert!(ROUTE_BUCKETS.is_power_of_two());

// ---- send queues ------------------------------------------------------------------

/// What one queued frame costs beyond its bytes: its queue slot (a `Bytes` and a
/// timestamp, 40 bytes) and the queue's growth slack. `--send-queue-limit`
/// counts each frame as its length plus this, so a flood of tiny frames (pongs)
/// hits the limit as surely as a few large ones.
pub const FRAME_OVERHEAD_BYTES: usize = 64;

/// Deliveries (an event queued on one subscriber: a queue slot, 40 bytes, up
/// to twice that with the queue's growth) a shard makes while an earlier fanout
/// still waits for send slots, by default (`--fanout-backlog`); past it new
/// events wait in the inbox, one shared command each, until every connection
/// that was waiting for a slot has been offered one. Up to it, a burst
/// coalesces: a subscriber's next send carries all that arrived before its
/// slot came up. A memory-for-CPU trade: about 40-80 MiB of queue slots per
/// shard, plus the turn that crossed it (at most `INBOX_TURN_COMMANDS_MAX`
/// events times the subscribers); each subscriber's queue stays within
/// `--send-queue-limit` regardless. 10,000 subscribers x 100 events of 64 B:
/// 0.33 us of CPU per delivery and 73 MB peak RSS with this, 0.46 us with half
/// of it, 0.58 us and 48 MB with none (tokio-tungstenite: 0.60 us, 191 MB).
pub const FANOUT_BACKLOG_DEFAULT: usize = 1 << 20;

/// The smallest `--send-queue-limit`: one turn's fanout must fit twice, so a
/// subscriber that reads is not over the limit from one turn's events alone.
pub const SEND_QUEUE_LIMIT_MIN: usize = 2 * INBOX_TURN_BYTES_MAX;

/// The largest `--send-queue-limit` (queue sizes are kept in 32-bit counters).
pub const SEND_QUEUE_LIMIT_MAX: usize = 1 << 30;

/// The hard bound of a queue (twice the limit plus one largest message, which
/// `--max-message-size` keeps within the limit's maximum) fits its 32-bit cost,
/// with room for the close frame that may follow.
const _: () = assert!(3 * SEND_QUEUE_LIMIT_MAX + (1 << 16) <= u32::MAX as usize);

/// Frames gathered into one vectored send of large frames (see
/// [`SEND_COPY_FRAME_MAX`]): fewer, larger sends when a connection has a
/// backlog, one plain send otherwise.
pub const SEND_FRAMES_MAX: usize = 32;

/// Frames up to this size are copied, a run of them at a time, into one buffer
/// that goes out as one plain send, instead of being gathered: a burst of small
/// events leaves in few sends of many frames each (the kernel's cost is per
/// send far more than per byte), and a copy of a small frame costs less than
/// its iovec does the kernel. Larger frames are never copied (encode once).
pub const SEND_COPY_FRAME_MAX: usize = 1024;

/// Bytes in one copy buffer: the most one send of small frames carries.
pub const SEND_COPY_BYTES: usize = 16 * 1024;

/// Copy buffers a shard lends to sends in flight at once (8 MiB); past it,
/// small frames are gathered like large ones. Bounds what copying can cost
/// whatever the connections do: a buffer is held from a send's staging to its
/// completion, and refused sends (parked, no slot) may hold theirs long. Twice
/// the default slots: every send of a turn can copy with as many parked.
pub const SEND_COPY_BUFFERS_MAX: usize = 2 * SEND_SLOTS_DEFAULT;

/// Copy buffers kept for reuse when returned (1 MiB per shard); the rest are
/// freed, so a burst leaves no more than this behind.
pub const SEND_COPY_BUFFERS_KEEP: usize = 64;

const _: () = assert!(2 * SEND_COPY_FRAME_MAX <= SEND_COPY_BYTES);
// A copy send covers at most one frame per two bytes (the smallest frame).
const _: () = assert!(SEND_COPY_BYTES / 2 <= u16::MAX as usize);
const _: () = assert!(SEND_COPY_BUFFERS_KEEP <= SEND_COPY_BUFFERS_MAX);

/// Pongs a connection may have queued and unsent; a ping beyond that replaces the
/// newest unsent pong (RFC 6455 5.5.3 allows answering only the latest ping).
/// Enough for a client's burst of pings (Autobahn 2.10 sends ten at once and
/// expects ten pongs); a flood from a client that does not read costs at most
/// this many small frames.
pub const PONGS_QUEUED_MAX: u8 = 16;

/// Emptied send queues (with their small frame arrays) kept for reuse per shard,
/// so a subscriber receiving one event at a time does not allocate per event.
pub const SEND_QUEUE_POOL_MAX: usize = 4096;

const _: () = assert!(SEND_QUEUE_POOL_MAX <= SENDS_INFLIGHT_MAX);

// ---- input --------------------------------------------------------------------

/// Request heads larger than this are never accepted, whatever the setting.
pub const REQUEST_BYTES_CEILING: usize = 64 * 1024;

/// Client messages that may be bad before a connection is closed with 1008; the
/// sweep forgives one per tick.
pub const STRIKES_MAX: u8 = 10;

/// The largest `--max-op-size` (a `/ws` client message).
pub const OP_BYTES_MAX: u64 = 1 << 20;

// ---- timers ---------------------------------------------------------------------

/// How long a connection may take to finish a close handshake and the TCP close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// After the drain deadline, how long a shard waits for the kernel to finish the
/// cancels and closes it issued before it exits anyway (leaking, not freeing,
/// memory the kernel may still use).
pub const EXIT_GRACE: Duration = Duration::from_secs(1);

const _: () = assert!(EXIT_GRACE.as_millis() >= TICK.as_millis());
