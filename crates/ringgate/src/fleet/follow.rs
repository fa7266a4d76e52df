//! The topics a fleet member follows on the bus, and where each stands: the
//! part of the fleet that decides, with no I/O (`link.rs` does what it asks).
//!
//! A topic is followed while a shard has announced local subscribers of it
//! (first in, last out; `Upstream::Presence`), a subscribe for it waits, or a
//! recovery for it is being read. Each followed topic moves through:
//! - `Subscribing`: the channel's SUBSCRIBE is queued or not yet confirmed.
//! - `Syncing`: subscribed; where the topic stands in Redis is being read.
//!   Messages arriving meanwhile are held (`pending`).
//! - `Live`: messages are delivered as they come: the next `seq` goes to the
//!   inbox of every shard that may hold its subscribers (the shards' route
//!   filters, `ringgate_shard::RouteFilter`; the frame built once); an older one
//!   is a duplicate and dropped; a later one is a gap, and the topic syncs again.
//! - `Stalled`: an inbox was full, so the next event could not go to every
//!   shard it should: the topic syncs again on the next tick, from history.
//!
//! A sync compares Redis' `seq` and epoch with the last event this host
//! delivered: missed events still in the history are delivered in order (a
//! gap repaired); otherwise the topic's subscribers get a gap notice
//! (`{"op":"gap",...}`: events up to `seq` of `epoch` may not have reached
//! them, live events follow from `seq + 1`). A lost link puts every topic back
//! to `Subscribing`, so the same sync runs for each when it returns.
//!
//! Subscribes are answered only while the topic is `Live`, with the last `seq`
//! this host delivered: every event up to it went to the shard's inbox before
//! the answer, every later one goes after it, as with the embedded broker. The
//! asking shard counted the topic in its route filter before it sent the
//! subscribe, and everything here runs on one thread in order, so every event
//! delivered after the answer reaches it.
//! Recovering, the events after `since` are read from Redis' history.
//!
//! A topic nobody holds any more is unsubscribed after `UNSUBSCRIBE_GRACE`
//! (a reconnecting client does not churn the bus), and where it stood is kept
//! for `REMEMBER_FOR`: a subscription made again in that time (a subscribe
//! answered before its shard's last subscriber left, say) continues from the
//! last event this host delivered, gaps repaired. A followed topic's numbering
//! in Redis is kept from expiring (`to_touch`) however long nobody publishes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringgate_shard::{
    clock_ns, event_frame, gap_notice, Command, EventData, HashedTopic, Recovery, ShardSender,
    SubscribeAnswer, SubscribeRequest,
};

use super::keys::Standing;
use crate::topic_table::Epoch;

/// How long a topic nobody holds stays subscribed on the bus.
pub const UNSUBSCRIBE_GRACE: Duration = Duration::from_secs(1);
/// How long where an unsubscribed topic stood is remembered: far longer than
/// a shard takes to act on a subscribe answer (a shard whose loop stops for
/// 5 s is reported stuck).
pub const REMEMBER_FOR: Duration = Duration::from_secs(30);
/// Messages held per topic while it syncs; past it they are dropped and the
/// next sync finds them in the history (or sends a gap notice).
pub const PENDING_MAX: usize = 1024;
/// Bytes of messages held over all topics, the same way: after a reconnect
/// every followed topic holds what arrives while it syncs.
pub const PENDING_BYTES_MAX: usize = 64 << 20;
/// Times a recovery reads the history before giving up, when this host
/// delivers faster than Redis answers.
pub const RECOVERY_READS_MAX: u32 = 8;
/// How long a recovery from a `seq` this host has not delivered yet waits for
/// it (the client comes from a host a little ahead) before it is answered
/// `Future`.
pub const AHEAD_WAIT: Duration = Duration::from_secs(1);

/// How long a `sub` waits for its topic to be live (Redis away, or its sync
/// failing) before it is refused (`busy`), so the client hears within that
/// time and may try again; its requests behind it wait no longer either.
pub const SUBSCRIBE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Subscribing,
    Syncing,
    Stalled,
    Live,
}

struct Follow {
    /// Shards that announced local subscribers (a bit per shard).
    present: Vec<u64>,
    /// Subscribes waiting for the topic to be live, with when they came.
    waiting: VecDeque<(SubscribeRequest, Instant)>,
    /// Recoveries reading the history now.
    reading: usize,
    phase: Phase,
    /// The numbering of the last event delivered (`None`: never synced).
    epoch: Option<Epoch>,
    delivered: u64,
    /// The `seq` the last sync found in Redis: a message up to it may arrive
    /// after the sync (the two connections are not ordered); a message above it
    /// and not above `delivered` means Redis went back (restored from an old
    /// snapshot), and the topic syncs again.
    synced_to: u64,
    pending: VecDeque<Held>,
    /// Messages were dropped at `PENDING_MAX`: sync again once live.
    overflowed: bool,
    /// Recoveries from a `seq` this host has not delivered yet, with when they came.
    ahead: Vec<(SubscribeRequest, Instant)>,
    /// Which follow this is (a topic left and followed again is a new one).
    id: u64,
    /// When the last holder left; `None` while held.
    unused_since: Option<Instant>,
    /// The sync under way (its answer is the only one taken).
    sync: u64,
    /// When the topic's numbering in Redis was last kept from expiring.
    touched: Instant,
}

impl Follow {
    fn is_held(&self) -> bool {
        self.present.iter().any(|&w| w != 0)
            || !self.waiting.is_empty()
            || self.reading > 0
            || !self.ahead.is_empty()
    }
}

/// A message held while its topic is not live.
struct Held {
    seq: u64,
    epoch: Epoch,
    data: Bytes,
    /// The last sync id issued anywhere when it arrived: a message that arrived
    /// before a sync was issued was published before that sync's read.
    arrived_after: u64,
}

/// What a recovery must read from Redis: the history from `from` on.
#[derive(Debug)]
pub struct RecoveryRead {
    pub request: SubscribeRequest,
    pub from: u64,
    pub attempt: u32,
    /// The topic's numbering when the read was asked for.
    pub epoch: Epoch,
}

/// A sync to run: where `topic` stands in Redis, and its history from `from`
/// (0: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sync {
    pub topic: Arc<str>,
    pub from: u64,
    pub id: u64,
    /// Where this host stands (numbering, last delivered), if it ever synced:
    /// Redis found behind it under the same numbering (restored from an old
    /// snapshot) starts a new numbering.
    pub host: Option<(Epoch, u64)>,
}

/// Gap and delivery counters, for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Gaps {
    /// Syncs that found events this host had not delivered, or a new numbering.
    pub detected: u64,
    /// Of those, the ones whose events were all delivered from the history.
    pub repaired: u64,
    /// Of those, the ones that sent a gap notice instead.
    pub notified: u64,
    /// Events delivered from the history (repairs).
    pub replayed: u64,
}

pub struct Follows {
    shards: Vec<ShardSender>,
    topics: HashMap<Arc<str>, Follow>,
    /// Unsubscribed topics' numbering and last delivered `seq`.
    remembered: HashMap<Arc<str>, (Epoch, u64, Instant)>,
    forget_queue: VecDeque<(Arc<str>, Instant)>,
    /// Topics that became unused, in order.
    unused_queue: VecDeque<(Arc<str>, Instant)>,
    stalled: Vec<Arc<str>>,
    /// Followed topics by when their numbering was last kept alive.
    touch_queue: VecDeque<(Arc<str>, Instant)>,
    touch_every: Duration,
    history_size: usize,
    history_ttl_secs: u64,
    link_up: bool,
    syncs: u64,
    follows_made: u64,
    /// Bytes held in every topic's `pending`.
    pending_bytes: usize,
    /// Topics with recoveries waiting in `ahead`, by when they came.
    ahead_queue: VecDeque<(Arc<str>, Instant)>,
    /// Topics with subscribes waiting in `waiting`, by when they came.
    waiting_queue: VecDeque<(Arc<str>, Instant)>,
    /// Followed topics that are live.
    live: usize,
    /// Work for the link: channels to subscribe and unsubscribe, topics to sync.
    /// (topic, follow id): the answer names the follow it is for.
    pub to_subscribe: Vec<(Arc<str>, u64)>,
    pub to_unsubscribe: Vec<Arc<str>>,
    pub to_sync: VecDeque<Sync>,
    pub to_read: Vec<RecoveryRead>,
    /// Topics whose numbering must be kept from expiring in Redis.
    pub to_touch: Vec<Arc<str>>,
    pub gaps: Gaps,
}

impl Follows {
    /// `touch_every`: how often a followed topic's numbering is kept from
    /// expiring (well within `--topic-idle-ttl`): a topic with subscribers keeps
    /// its epoch however long nobody publishes, as with the embedded broker.
    pub fn new(
        shards: Vec<ShardSender>,
        history_size: usize,
        history_ttl: Duration,
        touch_every: Duration,
    ) -> Self {
        Follows {
            shards,
            topics: HashMap::new(),
            remembered: HashMap::new(),
            forget_queue: VecDeque::new(),
            unused_queue: VecDeque::new(),
            stalled: Vec::new(),
            touch_queue: VecDeque::new(),
            // At least a second, whatever the TTL: the queue is walked by time.
            touch_every: touch_every.max(Duration::from_secs(1)),
            history_size,
            history_ttl_secs: history_ttl.as_secs().max(1),
            link_up: false,
            syncs: 0,
            follows_made: 0,
            pending_bytes: 0,
            ahead_queue: VecDeque::new(),
            waiting_queue: VecDeque::new(),
            live: 0,
            to_subscribe: Vec::new(),
            to_unsubscribe: Vec::new(),
            to_sync: VecDeque::new(),
            to_read: Vec::new(),
            to_touch: Vec::new(),
            gaps: Gaps::default(),
        }
    }

    /// Topics followed (each is one channel subscribed on the bus, or about to be).
    pub fn len(&self) -> usize {
        self.topics.len()
    }

    /// Followed topics that are live: subscribed and in step with Redis.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Checks the running totals against the table (tests).
    #[cfg(test)]
    pub fn check(&self) {
        let held: usize = self
            .topics
            .values()
            .flat_map(|f| f.pending.iter().map(|h| h.data.len()))
            .sum();
        assert_eq!(held, self.pending_bytes);
        let live = self
            .topics
            .values()
            .filter(|f| f.phase == Phase::Live)
            .count();
        assert_eq!(live, self.live);
    }

    /// The topic's follow, made (from what was remembered) if new.
    fn follow(&mut self, topic: &Arc<str>, now: Instant) -> &mut Follow {
        if !self.topics.contains_key(topic) {
            let (epoch, delivered) = match self.remembered.remove(topic) {
                Some((epoch, delivered, _)) => (Some(epoch), delivered),
                None => (None, 0),
            };
            self.follows_made += 1;
            let id = self.follows_made;
            if self.link_up {
                self.to_subscribe.push((topic.clone(), id));
            }
            let words = self.shards.len().div_ceil(64);
            self.topics.insert(
                topic.clone(),
                Follow {
                    present: vec![0; words],
                    waiting: VecDeque::new(),
                    reading: 0,
                    phase: Phase::Subscribing,
                    epoch,
                    delivered,
                    synced_to: delivered,
                    pending: VecDeque::new(),
                    overflowed: false,
                    ahead: Vec::new(),
                    id,
                    unused_since: None,
                    sync: 0,
                    touched: now,
                },
            );
            self.touch_queue.push_back((topic.clone(), now));
            if self.touch_queue.len() > 2 * self.topics.len() + 1024 {
                // Entries of topics no longer followed: drop them now.
                let topics = &self.topics;
                self.touch_queue
                    .retain(|(t, at)| topics.get(t).is_some_and(|f| f.touched == *at));
            }
        }
        self.topics.get_mut(topic).expect("just made")
    }

    /// Starts a sync of `topic` (from the event after the last delivered, or
    /// from nothing if it never synced).
    fn start_sync(&mut self, topic: &Arc<str>) {
        self.syncs += 1;
        let f = self.topics.get_mut(topic).expect("followed");
        set_phase(&mut self.live, f, Phase::Syncing);
        f.sync = self.syncs;
        let from = if f.epoch.is_some() {
            f.delivered + 1
        } else {
            0
        };
        self.to_sync.push_back(Sync {
            topic: topic.clone(),
            from,
            id: self.syncs,
            host: f.epoch.map(|e| (e, f.delivered)),
        });
    }

    /// Marks the topic unused now if nothing holds it.
    fn check_unused(&mut self, topic: &Arc<str>, now: Instant) {
        let f = self.topics.get_mut(topic).expect("followed");
        if !f.is_held() && f.unused_since.is_none() {
            f.unused_since = Some(now);
            self.unused_queue.push_back((topic.clone(), now));
        }
    }

    /// A shard announced local subscribers of `topic`, or its last one left.
    pub fn presence(&mut self, shard: usize, topic: Arc<str>, present: bool, now: Instant) {
        let (word, bit) = (shard / 64, 1u64 << (shard % 64));
        if present {
            let f = self.follow(&topic, now);
            assert_eq!(f.present[word] & bit, 0, "a shard announces a topic once");
            f.present[word] |= bit;
            f.unused_since = None;
        } else {
            let f = self
                .topics
                .get_mut(&topic)
                .expect("a departure follows an announcement, which keeps the topic followed");
            assert_ne!(
                f.present[word] & bit,
                0,
                "a departure follows an announcement"
            );
            f.present[word] &= !bit;
            self.check_unused(&topic, now);
        }
    }

    /// A `sub` op from a shard: answered now if the topic is live (reading the
    /// history first when recovering), else when it is.
    pub fn subscribe(&mut self, request: SubscribeRequest) {
        let topic = request.topic.clone();
        let f = self.follow(&topic, Instant::now());
        f.unused_since = None;
        if f.phase != Phase::Live {
            let now = Instant::now();
            f.waiting.push_back((request, now));
            self.waiting_queue.push_back((topic, now));
            return;
        }
        let (epoch, delivered) = (f.epoch.expect("a live topic has synced"), f.delivered);
        let history_size = self.history_size as u64;
        let Some(since) = &request.since else {
            return self.answer(request, delivered, epoch, Recovery::NotAsked, Vec::new());
        };
        let outcome = if history_size == 0 {
            Recovery::HistoryOff
        } else if Epoch::parse(&since.epoch) != Some(epoch) {
            Recovery::EpochChanged
        } else if since.seq > delivered {
            // From a host a little ahead: wait for this one to catch up.
            let now = Instant::now();
            self.ahead_queue.push_back((topic.clone(), now));
            let f = self.topics.get_mut(&topic).expect("followed");
            f.ahead.push((request, now));
            return;
        } else if since.seq == delivered {
            Recovery::Recovered
        } else if delivered - since.seq > history_size {
            Recovery::TooOld
        } else {
            let from = since.seq + 1;
            self.topics.get_mut(&topic).expect("followed").reading += 1;
            self.to_read.push(RecoveryRead {
                request,
                from,
                attempt: 1,
                epoch,
            });
            return;
        };
        self.answer(request, delivered, epoch, outcome, Vec::new());
    }

    /// The history a recovery asked for (or why it could not be read).
    pub fn recovery_read(&mut self, read: RecoveryRead, result: Result<Standing, String>) {
        let topic = read.request.topic.clone();
        let f = self
            .topics
            .get_mut(&topic)
            .expect("a reading holds its topic");
        f.reading -= 1;
        if f.phase != Phase::Live || f.epoch != Some(read.epoch) {
            // The link or the numbering moved: judge the request afresh (it
            // waits if the topic is not live).
            return self.subscribe(read.request);
        }
        let (epoch, delivered) = (read.epoch, f.delivered);
        let standing = match result {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    topic = &*topic,
                    "reading history for a recovery failed: {e}"
                );
                return self.refuse(read.request, "the history could not be read, try again");
            }
        };
        if standing.epoch != epoch {
            return self.answer(
                read.request,
                delivered,
                epoch,
                Recovery::EpochChanged,
                vec![],
            );
        }
        if standing.seq < delivered {
            // Events this host delivered after Redis answered: read again.
            if read.attempt >= RECOVERY_READS_MAX {
                return self.refuse(
                    read.request,
                    "the topic moves too fast to recover, try again",
                );
            }
            self.topics.get_mut(&topic).expect("followed").reading += 1;
            self.to_read.push(RecoveryRead {
                attempt: read.attempt + 1,
                ..read
            });
            return;
        }
        let Some(events) = standing.events_from(read.from, self.history_ttl_secs) else {
            return self.answer(read.request, delivered, epoch, Recovery::TooOld, vec![]);
        };
        // The numbering is the read's, so `from` is at most `delivered`.
        let wanted = usize::try_from(delivered + 1 - read.from).expect("a short history");
        let Some(events) = events.get(..wanted) else {
            return self.answer(read.request, delivered, epoch, Recovery::TooOld, vec![]);
        };
        let replay = events
            .iter()
            .zip(read.from..)
            .map(|(data, seq)| event_frame(&topic, seq, EventData::Json(data)))
            .collect();
        self.answer(read.request, delivered, epoch, Recovery::Recovered, replay);
    }

    fn answer(
        &mut self,
        request: SubscribeRequest,
        seq: u64,
        epoch: Epoch,
        recovery: Recovery,
        replay: Vec<Bytes>,
    ) {
        let topic = request.topic.clone();
        self.shards[request.shard].answer(Box::new(SubscribeAnswer {
            key: request.key,
            generation: request.generation,
            topic: request.topic,
            seq,
            epoch: Arc::from(&*epoch),
            recovery,
            replay,
            refused: None,
        }));
        self.check_unused(&topic, Instant::now());
    }

    fn refuse(&mut self, request: SubscribeRequest, why: &'static str) {
        let topic = request.topic.clone();
        self.shards[request.shard].answer(Box::new(SubscribeAnswer {
            key: request.key,
            generation: request.generation,
            topic: request.topic,
            seq: 0,
            epoch: Arc::from(""),
            recovery: Recovery::NotAsked,
            replay: Vec::new(),
            refused: Some(why),
        }));
        self.check_unused(&topic, Instant::now());
    }

    /// A message of `topic`'s channel.
    pub fn message(&mut self, topic: &str, seq: u64, epoch: Epoch, data: &str) {
        let Some((topic, _)) = self.topics.get_key_value(topic) else {
            return; // Unsubscribed meanwhile.
        };
        let topic = topic.clone();
        let arrived_after = self.syncs;
        let f = self.topics.get_mut(&topic).expect("followed");
        if f.phase != Phase::Live {
            let held = Held {
                seq,
                epoch,
                data: Bytes::copy_from_slice(data.as_bytes()),
                arrived_after,
            };
            hold(&mut self.pending_bytes, f, held);
            return;
        }
        if f.epoch == Some(epoch) && seq > f.synced_to && seq <= f.delivered {
            tracing::warn!(
                topic = &*topic,
                seq,
                delivered = f.delivered,
                "Redis numbered an event this host already delivered (restored from an old snapshot?): syncing"
            );
            return self.start_sync(&topic);
        }
        self.live_message(&topic, seq, epoch, data.as_bytes());
    }

    /// A message while live: delivered, dropped as a duplicate, or the start of a sync.
    fn live_message(&mut self, topic: &Arc<str>, seq: u64, epoch: Epoch, data: &[u8]) {
        let arrived_after = self.syncs;
        let f = self.topics.get_mut(topic).expect("followed");
        let held = Held {
            seq,
            epoch,
            data: Bytes::copy_from_slice(data),
            arrived_after,
        };
        if f.epoch != Some(epoch) || seq > f.delivered + 1 {
            // A new numbering, or events this host did not get: sync from history.
            hold(&mut self.pending_bytes, f, held);
            return self.start_sync(topic);
        }
        if seq <= f.delivered {
            return;
        }
        let data = std::str::from_utf8(data).expect("messages are checked UTF-8");
        let frame = event_frame(topic, seq, EventData::Json(data));
        if deliver(&self.shards, topic, seq, frame) {
            f.delivered = seq;
            if !f.ahead.is_empty() {
                self.caught_up(topic);
            }
        } else {
            set_phase(&mut self.live, f, Phase::Stalled);
            hold(&mut self.pending_bytes, f, held);
            self.stalled.push(topic.clone());
        }
    }

    /// Recoveries waiting for this host to deliver their `seq` that it now has.
    fn caught_up(&mut self, topic: &Arc<str>) {
        let f = self.topics.get_mut(topic).expect("followed");
        let delivered = f.delivered;
        let (ready, still): (Vec<_>, Vec<_>) = std::mem::take(&mut f.ahead)
            .into_iter()
            .partition(|(r, _)| r.since.as_ref().is_some_and(|s| s.seq <= delivered));
        f.ahead = still;
        for (request, _) in ready {
            self.subscribe(request);
        }
    }

    /// The channels of `topics` are subscribed: each syncs.
    pub fn subscribed(&mut self, topics: &[(Arc<str>, u64)]) {
        for (topic, id) in topics {
            let Some(f) = self.topics.get_mut(topic) else {
                continue; // Unused and dropped meanwhile; its UNSUBSCRIBE follows.
            };
            // A follow made since (left and followed again) waits for its own.
            if f.id == *id && f.phase == Phase::Subscribing {
                self.start_sync(topic);
            }
        }
    }

    /// Where `topic` stands in Redis (read from `from` on), or why it could not be read.
    pub fn synced(&mut self, sync: &Sync, result: Result<Standing, String>) {
        let topic = &sync.topic;
        let Some(f) = self.topics.get_mut(topic) else {
            return;
        };
        if f.phase != Phase::Syncing || f.sync != sync.id {
            return; // Another sync replaced this one (the link went down meanwhile, say).
        }
        let standing = match result {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(topic = &**topic, "reading where a topic stands failed: {e}");
                set_phase(&mut self.live, f, Phase::Stalled);
                self.stalled.push(topic.clone());
                return;
            }
        };
        match f.epoch {
            None => {
                f.epoch = Some(standing.epoch);
                f.delivered = standing.seq;
            }
            Some(epoch) if epoch == standing.epoch && standing.seq <= f.delivered => {}
            Some(epoch) => {
                self.gaps.detected += 1;
                let events = (epoch == standing.epoch)
                    .then(|| standing.events_from(f.delivered + 1, self.history_ttl_secs))
                    .flatten();
                match events {
                    Some(events) => {
                        for (data, seq) in events.into_iter().zip(f.delivered + 1..) {
                            let frame = event_frame(topic, seq, EventData::Json(data));
                            if !deliver(&self.shards, topic, seq, frame) {
                                set_phase(&mut self.live, f, Phase::Stalled);
                                self.stalled.push(topic.clone());
                                return;
                            }
                            f.delivered = seq;
                            self.gaps.replayed += 1;
                        }
                        self.gaps.repaired += 1;
                    }
                    None => {
                        let notice = gap_notice(topic, standing.seq, &standing.epoch);
                        if !deliver(&self.shards, topic, 0, notice) {
                            set_phase(&mut self.live, f, Phase::Stalled);
                            self.stalled.push(topic.clone());
                            return;
                        }
                        self.gaps.notified += 1;
                        f.epoch = Some(standing.epoch);
                        f.delivered = standing.seq;
                    }
                }
            }
        }
        set_phase(&mut self.live, f, Phase::Live);
        f.synced_to = standing.seq;
        let pending = std::mem::take(&mut f.pending);
        let mut rest = pending.into_iter();
        for held in rest.by_ref() {
            self.pending_bytes -= held.data.len();
            // A message published before this sync's read that is not in what
            // the read found is of an old numbering, or not a real event.
            if held.arrived_after < sync.id
                && (held.epoch != standing.epoch || held.seq > standing.seq)
            {
                tracing::warn!(
                    topic = &**topic,
                    seq = held.seq,
                    "dropping a message Redis' standing does not know"
                );
                continue;
            }
            self.live_message(topic, held.seq, held.epoch, &held.data);
            if self.topics[topic].phase != Phase::Live {
                break;
            }
        }
        let f = self.topics.get_mut(topic).expect("followed");
        if f.phase != Phase::Live {
            f.pending.extend(rest);
            return;
        }
        if std::mem::take(&mut f.overflowed) {
            // Messages were dropped while syncing: the history has them.
            return self.start_sync(topic);
        }
        for (request, _) in std::mem::take(&mut f.waiting) {
            self.subscribe(request);
        }
        if !self.topics[topic].ahead.is_empty() {
            self.caught_up(topic);
        }
    }

    /// The link is up (again): every followed topic subscribes and syncs.
    pub fn link_up(&mut self) {
        self.link_up = true;
        self.to_subscribe
            .extend(self.topics.iter().map(|(t, f)| (t.clone(), f.id)));
    }

    /// The link is down: nothing arrives until it is up again.
    pub fn link_down(&mut self) {
        self.link_up = false;
        self.to_subscribe.clear();
        self.to_unsubscribe.clear();
        self.to_sync.clear();
        self.stalled.clear();
        for f in self.topics.values_mut() {
            set_phase(&mut self.live, f, Phase::Subscribing);
            for held in f.pending.drain(..) {
                self.pending_bytes -= held.data.len();
            }
        }
    }

    /// Once in a while: stalled topics sync again, unused ones are unsubscribed
    /// (and remembered), remembered ones forgotten.
    pub fn tick(&mut self, now: Instant) {
        for topic in std::mem::take(&mut self.stalled) {
            let stalled = self.topics.get(&topic).map(|f| f.phase) == Some(Phase::Stalled);
            if stalled && self.link_up {
                self.start_sync(&topic);
            }
        }
        while let Some((topic, at)) = self.unused_queue.front().cloned() {
            if now.duration_since(at) < UNSUBSCRIBE_GRACE {
                break;
            }
            self.unused_queue.pop_front();
            let Some(f) = self.topics.get(&topic) else {
                continue;
            };
            if f.unused_since != Some(at) {
                continue; // Held again since, or unused again later.
            }
            assert!(!f.is_held(), "an unused topic is held by nothing");
            let f = self.topics.remove(&topic).expect("followed");
            if f.phase == Phase::Live {
                self.live -= 1;
            }
            self.pending_bytes -= f.pending.iter().map(|h| h.data.len()).sum::<usize>();
            if self.link_up {
                self.to_unsubscribe.push(topic.clone());
            }
            if let Some(epoch) = f.epoch {
                self.remembered
                    .insert(topic.clone(), (epoch, f.delivered, now));
                self.forget_queue.push_back((topic, now));
            }
        }
        while let Some((topic, at)) = self.touch_queue.front().cloned() {
            if now.duration_since(at) < self.touch_every {
                break;
            }
            self.touch_queue.pop_front();
            if let Some(f) = self.topics.get_mut(&topic).filter(|f| f.touched == at) {
                f.touched = now;
                if self.link_up {
                    self.to_touch.push(topic.clone());
                }
                self.touch_queue.push_back((topic, now));
            }
        }
        while let Some((topic, at)) = self.waiting_queue.front().cloned() {
            if now.duration_since(at) < SUBSCRIBE_WAIT {
                break;
            }
            self.waiting_queue.pop_front();
            let Some(f) = self.topics.get_mut(&topic) else {
                continue;
            };
            // Those that came by then (answered ones left the list already).
            let due = f.waiting.iter().take_while(|(_, came)| *came <= at).count();
            let expired: Vec<_> = f.waiting.drain(..due).collect();
            for (request, _) in expired {
                self.refuse(
                    request,
                    "the broker (Redis) did not answer in time: subscribe again later",
                );
            }
        }
        while let Some((topic, at)) = self.ahead_queue.front().cloned() {
            if now.duration_since(at) < AHEAD_WAIT {
                break;
            }
            self.ahead_queue.pop_front();
            let Some(f) = self.topics.get_mut(&topic) else {
                continue;
            };
            let (expired, still): (Vec<_>, Vec<_>) = std::mem::take(&mut f.ahead)
                .into_iter()
                .partition(|(_, came)| now.duration_since(*came) >= AHEAD_WAIT);
            f.ahead = still;
            let (epoch, delivered) = (f.epoch, f.delivered);
            for (request, _) in expired {
                match epoch {
                    Some(epoch) => self.answer(request, delivered, epoch, Recovery::Future, vec![]),
                    None => self.subscribe(request),
                }
            }
        }
        while let Some((topic, at)) = self.forget_queue.front().cloned() {
            if now.duration_since(at) < REMEMBER_FOR {
                break;
            }
            self.forget_queue.pop_front();
            if self.remembered.get(&topic).is_some_and(|r| r.2 == at) {
                self.remembered.remove(&topic);
            }
        }
    }
}

/// Holds a message while the topic is not live, within `PENDING_MAX` per topic
/// and `PENDING_BYTES_MAX` in all; past them it is dropped and the topic syncs
/// once more when live (`overflowed`).
fn hold(pending_bytes: &mut usize, f: &mut Follow, held: Held) {
    if f.pending.len() >= PENDING_MAX || *pending_bytes + held.data.len() > PENDING_BYTES_MAX {
        f.overflowed = true;
        return;
    }
    *pending_bytes += held.data.len();
    f.pending.push_back(held);
}

/// Moves a topic to `phase`, counting the live ones.
fn set_phase(live: &mut usize, f: &mut Follow, phase: Phase) {
    match (f.phase == Phase::Live, phase == Phase::Live) {
        (true, false) => *live -= 1,
        (false, true) => *live += 1,
        _ => {}
    }
    f.phase = phase;
}

/// Hands `frame` to every shard that may hold subscribers of `topic`, or to
/// none when one of their inboxes is full.
fn deliver(shards: &[ShardSender], topic: &Arc<str>, seq: u64, frame: Bytes) -> bool {
    let hashed = HashedTopic::new(topic);
    let hash = hashed.hash();
    // Each filter read once: a count changing between two reads could leave a
    // shard that holds the topic without the event, or stall it for nothing.
    let mut routed = 0;
    let reservations: Vec<_> = shards
        .iter()
        .filter(|s| s.may_hold(hash))
        .inspect(|_| routed += 1)
        .filter_map(|s| s.reserve())
        .collect();
    if reservations.len() < routed {
        return false;
    }
    let published_ns = clock_ns();
    for reservation in reservations {
        reservation.push(Command::deliver(
            hashed,
            topic,
            seq,
            frame.clone(),
            published_ns,
        ));
    }
    true
}

#[cfg(test)]
mod tests;
