//! Entry points for the fuzz targets in `fuzz/` (built only with `--cfg
//! fuzzing`, which `cargo fuzz` sets): the shard's input state machine, the
//! `/ws` op parser and the `?topics=` parser, without a ring.
//!
//! Owns no logic of its own beyond simulating the kernel: the harness feeds
//! bytes to the same `input::on_recv` the shard calls, then takes everything
//! queued for sending as if the socket accepted it, and checks the invariants
//! the shard asserts (unfinished-input accounting, the send-queue bound).

use crate::config::{test_config, ShardConfig};
use crate::conn::{Conn, State};
use crate::input::{self, Env, Upcall};
use crate::sendq::SendPool;
use crate::stats::ShardStats;

/// Which endpoint the harness's connection is upgraded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/echo`: every message comes back.
    Echo,
    /// `/ws`: messages are handed to the shard as upcalls.
    PubSub,
}

/// What input handling handed up, for `/ws`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handed {
    Text(Vec<u8>),
    Binary,
    Subscribe(Vec<String>),
    /// `?recover=`: (topic, last seq, epoch).
    Recover(Vec<(String, u64, String)>),
}

/// One connection's input state machine, with a pretend socket that takes
/// every byte queued for sending.
pub struct InputHarness {
    cfg: ShardConfig,
    stats: ShardStats,
    conn: Conn,
    upcalls: Vec<Upcall>,
    pool: SendPool,
    unfinished: usize,
    sent: Vec<u8>,
    handed: Vec<Handed>,
}

impl InputHarness {
    /// A connection before its upgrade request. `small` limits (frames of 200
    /// bytes, messages and ops of 300) make the size checks reachable.
    pub fn new(small: bool) -> Self {
        let mut cfg = test_config();
        if small {
            cfg.limits.frame_bytes_max = 200;
            cfg.limits.message_bytes_max = 300;
            cfg.op_bytes_max = 300;
        }
        InputHarness {
            cfg,
            stats: ShardStats::default(),
            conn: Conn::new(0, 0, 0),
            upcalls: Vec::new(),
            pool: SendPool::new(true),
            unfinished: 0,
            sent: Vec::new(),
            handed: Vec::new(),
        }
    }

    /// The frame and message limits of `endpoint`: (frame, message).
    pub fn limits(&self, endpoint: Endpoint) -> (u64, u64) {
        match endpoint {
            Endpoint::Echo => (
                self.cfg.limits.frame_bytes_max,
                self.cfg.limits.message_bytes_max,
            ),
            Endpoint::PubSub => (
                self.cfg.limits.frame_bytes_max.min(self.cfg.op_bytes_max),
                self.cfg.op_bytes_max,
            ),
        }
    }

    /// Feeds bytes as one receive, then lets the pretend socket take
    /// everything queued. Panics if an invariant breaks.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut copy = bytes.to_vec();
        let mut env = Env {
            cfg: &self.cfg,
            stats: &self.stats,
            now: 1,
            upcalls: &mut self.upcalls,
            pool: &mut self.pool,
            unfinished: &mut self.unfinished,
        };
        input::on_recv(&mut self.conn, &mut copy, &mut env);
        let held = self.conn.partial.as_ref().map_or(0, |p| p.held_bytes());
        assert_eq!(self.unfinished, held, "unfinished-input accounting drifted");
        assert!(
            held <= self.cfg.unfinished_bytes_max,
            "{held} bytes held past the budget"
        );
        assert!(
            self.conn.queued_cost() <= self.cfg.send_queue_hard_max(),
            "a send queue past its hard bound"
        );
        for upcall in self.upcalls.drain(..) {
            self.handed.push(match upcall {
                Upcall::Text(t) => Handed::Text(t.into_vec()),
                Upcall::Binary => Handed::Binary,
                Upcall::Subscribe(topics) => Handed::Subscribe(topics),
                Upcall::Recover(r) => Handed::Recover(r),
            });
        }
        if let Some(mut q) = self.conn.sendq.take() {
            while let Some(next) = q.next_send(0, &mut self.pool) {
                let bytes = crate::sendq::read_send(&next);
                self.sent.extend_from_slice(&bytes);
                q.complete(bytes.len(), &mut self.pool, |_| {});
            }
            self.pool.put(q);
        }
    }

    /// Everything sent so far.
    pub fn sent(&self) -> &[u8] {
        &self.sent
    }

    /// What `/ws` input handed to the shard so far.
    pub fn handed(&self) -> &[Handed] {
        &self.handed
    }

    /// Whether the connection still reads frames (not failed, not closed).
    pub fn is_open(&self) -> bool {
        self.conn.state == State::Open
    }
}

/// The `/ws` op parser: `Ok((op, topic, extra))` or the reason sent back;
/// `extra` is a publish's data, a recovering subscribe's `seq@epoch`, or a
/// refresh's token (its topic is empty).
pub fn parse_op(text: &[u8]) -> Result<(&'static str, String, Option<String>), String> {
    use crate::pubsub::Request;
    match crate::pubsub::parse_request(text) {
        Ok(Request::Sub { topic, since }) => Ok((
            "sub",
            topic.into_owned(),
            since.map(|(seq, epoch)| format!("{seq}@{epoch}")),
        )),
        Ok(Request::Unsub(t)) => Ok(("unsub", t.into_owned(), None)),
        Ok(Request::Pub { topic, data }) => Ok(("pub", topic.into_owned(), Some(data.into()))),
        Ok(Request::Refresh(token)) => Ok(("refresh", String::new(), Some(token.into_owned()))),
        Err(reason) => Err(reason.into_owned()),
    }
}

/// The `?topics=` parser.
pub fn query_topics(query: Option<&str>, max: usize) -> Result<Vec<String>, &'static str> {
    crate::pubsub::query_topics(query, max)
}

/// The `?recover=` parser.
pub fn query_recoveries(
    query: Option<&str>,
    max: usize,
) -> Result<Vec<(String, u64, String)>, &'static str> {
    crate::pubsub::query_recoveries(query, max)
}

pub use crate::pubsub::{valid_epoch, valid_topic, EventData};
