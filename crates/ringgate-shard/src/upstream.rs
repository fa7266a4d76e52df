//! What shards tell the broker, and what the broker answers a subscribe with.
//!
//! Shards never wait for the broker: a message goes on a bounded channel
//! ([`UpstreamSender`]) and, for a subscribe, the answer comes back later
//! through the shard's inbox as [`crate::Command::Subscribed`], in the broker's
//! order relative to the events it numbers. That order is what makes a
//! subscription exact: every event the broker numbered before answering is in
//! the answer (`seq`, and the history replayed when recovering), every event
//! after it reaches the shard after the answer.
//!
//! Owns the message types only; the broker is the binary's business.

use std::sync::Arc;

use bytes::Bytes;

/// A publish request from a client on `/ws` (`{"op":"pub",...}`), already
/// checked against `--client-publish`. `data` is raw JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPublish {
    /// The topic.
    pub topic: String,
    /// The event data, valid JSON.
    pub data: String,
}

/// Where a recovering client says it stands: the last `seq` it received under
/// `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    /// The last `seq` received.
    pub seq: u64,
    /// The epoch it was given with that numbering.
    pub epoch: String,
}

/// A `sub` op, forwarded to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeRequest {
    /// The shard that asks; the answer goes to its inbox.
    pub shard: usize,
    /// The connection (key and generation) the answer is for.
    pub key: u32,
    pub generation: u32,
    pub topic: Arc<str>,
    /// Recovery: replay what the client missed, if the history holds it.
    pub since: Option<Since>,
}

/// Messages from shards to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// A client publish.
    Publish(ClientPublish),
    /// A client subscribes (maybe recovering).
    Subscribe(SubscribeRequest),
    /// The shard announced `topic` (its subscribers hold events of it:
    /// `present`), or the last subscriber of a topic it announced left (see
    /// `topics.rs`). A topic some shard has announced is never forgotten.
    Presence {
        shard: usize,
        topic: Arc<str>,
        present: bool,
    },
}

/// Where shards send [`Upstream`] messages: a bounded channel. A full channel
/// hands the message back; the shard tells the client to retry (or, for
/// presence, keeps it and tries again next turn).
pub type UpstreamSender = Arc<dyn Fn(Upstream) -> Result<(), Upstream> + Send + Sync>;

/// How a recovery went, for the reply and the broker's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// A plain subscribe: nothing was asked.
    NotAsked,
    /// Every event after `since` is replayed.
    Recovered,
    /// The history no longer reaches `since + 1`.
    TooOld,
    /// The epoch is unknown or the topic's numbering restarted.
    EpochChanged,
    /// `since` is past the topic's latest `seq`.
    Future,
    /// History is off (`--history-size 0`).
    HistoryOff,
    /// The connection already holds this subscription: nothing is replayed.
    AlreadySubscribed,
}

impl Recovery {
    /// The `recovered` field of the reply: absent for a plain subscribe.
    pub fn recovered(self) -> Option<bool> {
        match self {
            Recovery::NotAsked => None,
            Recovery::Recovered => Some(true),
            _ => Some(false),
        }
    }

    /// The label of `ringgate_recoveries_total{outcome}`.
    pub fn label(self) -> &'static str {
        match self {
            Recovery::NotAsked => "not_asked",
            Recovery::Recovered => "recovered",
            Recovery::TooOld => "too_old",
            Recovery::EpochChanged => "epoch_changed",
            Recovery::Future => "future",
            Recovery::HistoryOff => "history_off",
            Recovery::AlreadySubscribed => "already_subscribed",
        }
    }
}

/// The broker's answer to a subscribe.
#[derive(Debug, Clone)]
pub struct SubscribeAnswer {
    pub key: u32,
    pub generation: u32,
    pub topic: Arc<str>,
    /// The topic's latest `seq` when the answer was made: the subscription is
    /// live from the next one.
    pub seq: u64,
    pub epoch: Arc<str>,
    pub recovery: Recovery,
    /// Recovered: the frames of `since + 1 ..= seq`, in order (the same shared
    /// bytes every subscriber gets).
    pub replay: Vec<Bytes>,
    /// The broker could not take the subscribe (why, for the client's error).
    pub refused: Option<&'static str>,
}
