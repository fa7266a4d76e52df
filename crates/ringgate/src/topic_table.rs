//! The broker's per-topic state: `seq`, epoch, history, and how many shards
//! announced subscribers; and every bound on it.
//!
//! Bounds: a topic's history holds at most `--history-size` events no older than
//! `--history-ttl`; all histories together at most `--history-memory` bytes (the
//! oldest events of the least recently published topics go first). A topic with
//! no publish and no announced subscriber for `--topic-idle-ttl` is forgotten;
//! if it comes back it gets a new epoch, so no client can take a restarted
//! numbering for the old one. At most `TOPICS_MAX` topics are known; past it the
//! longest-quiet topic is forgotten early if it has been quiet
//! `QUIET_BEFORE_FORGOTTEN_SECS`, and otherwise a new one is refused.
//!
//! Layout, for a million topics: states live in a slab, found by name through a
//! table of indexes; two intrusive lists thread through them, kept in order by
//! moving a topic to the back whenever it is touched: topics holding history,
//! least recently published first, and topics no shard announced, longest quiet
//! first. Every bound is then O(1) per topic dropped, at 16 bytes of links per
//! topic. Times are whole seconds since the table was made (rounded up).

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashTable;
use ringgate_shard::{HashedTopic, Recovery, Since};
use slab::Slab;

use crate::history::History;

/// Topics known at most; a publish or subscribe that would need one more, when
/// every topic has subscribers, is refused. About 200 bytes each without
/// history (BENCHMARKS.md 2026-12-01).
pub const TOPICS_MAX: usize = 1_000_000;

/// How long a topic must have been quiet (no announced subscriber, no publish
/// or subscribe) before the topic cap may forget it. A subscribe answered just
/// now leaves the topic quiet until its shard's announcement arrives: forgotten
/// meanwhile, the topic would come back numbered from 1 under a new epoch while
/// that subscriber expects the old numbering, and event frames carry no epoch.
pub const QUIET_BEFORE_FORGOTTEN_SECS: u32 = 10;

/// Characters in an epoch.
pub const EPOCH_LEN: usize = 10;

/// The history settings.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    /// Events held per topic; 0 turns history (and recovery) off.
    pub size: usize,
    pub ttl: Duration,
    /// Bytes held over all topics.
    pub memory: usize,
    /// A topic with no publish and no subscriber this long is forgotten.
    pub topic_idle_ttl: Duration,
}

/// A topic's numbering: `EPOCH_LEN` characters of `0-9a-z`, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch([u8; EPOCH_LEN]);

impl std::ops::Deref for Epoch {
    type Target = str;
    fn deref(&self) -> &str {
        std::str::from_utf8(&self.0).expect("epochs are ASCII")
    }
}

impl Epoch {
    /// An epoch as text (from the bus): exactly `EPOCH_LEN` characters of `0-9a-z`.
    pub fn parse(text: &str) -> Option<Epoch> {
        let bytes: [u8; EPOCH_LEN] = text.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
            .then_some(Epoch(bytes))
    }
}

/// Makes epochs: different for every one this process makes and (by a random
/// salt) from every other process's, fleet members included.
pub struct EpochMaker {
    serial: u64,
    salt: u64,
}

impl EpochMaker {
    pub fn new() -> Self {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        hasher.write_u32(std::process::id());
        EpochMaker {
            serial: 0,
            salt: hasher.finish(),
        }
    }

    pub fn next(&mut self) -> Epoch {
        self.serial += 1;
        let mut x = self.salt ^ self.serial.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        // splitmix64's finaliser: every bit of the serial moves every output bit.
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut epoch = [0u8; EPOCH_LEN];
        for (i, c) in epoch.iter_mut().enumerate() {
            *c = DIGITS[((x >> (i * 6)) % 36) as usize];
        }
        Epoch(epoch)
    }
}

impl std::fmt::Debug for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

/// No topic: the end of a list.
const NIL: u32 = u32::MAX;

/// A topic's place in one list.
#[derive(Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
}

const UNLINKED: Link = Link {
    prev: NIL,
    next: NIL,
};

/// One of the two lists: its ends, and which link of a state it uses.
struct List {
    head: u32,
    tail: u32,
    link: fn(&mut TopicState) -> &mut Link,
}

impl List {
    fn new(link: fn(&mut TopicState) -> &mut Link) -> List {
        List {
            head: NIL,
            tail: NIL,
            link,
        }
    }

    fn push_back(&mut self, topics: &mut Slab<TopicState>, id: u32) {
        let tail = self.tail;
        *(self.link)(&mut topics[id as usize]) = Link {
            prev: tail,
            next: NIL,
        };
        match tail {
            NIL => self.head = id,
            tail => (self.link)(&mut topics[tail as usize]).next = id,
        }
        self.tail = id;
    }

    fn unlink(&mut self, topics: &mut Slab<TopicState>, id: u32) {
        let Link { prev, next } =
            std::mem::replace((self.link)(&mut topics[id as usize]), UNLINKED);
        match prev {
            NIL => {
                assert_eq!(self.head, id, "an unlinked topic taken off a list");
                self.head = next;
            }
            prev => (self.link)(&mut topics[prev as usize]).next = next,
        }
        match next {
            NIL => self.tail = prev,
            next => (self.link)(&mut topics[next as usize]).prev = prev,
        }
    }

    fn move_to_back(&mut self, topics: &mut Slab<TopicState>, id: u32) {
        self.unlink(topics, id);
        self.push_back(topics, id);
    }
}

struct TopicState {
    name: Arc<str>,
    seq: u64,
    history: History,
    epoch: Epoch,
    /// Shards that announced subscribers.
    present: u32,
    last_publish: u32,
    /// When the last shard's subscribers left (or the last publish or subscribe
    /// while none were announced).
    quiet_since: u32,
    /// In `published` while the history is not empty.
    published: Link,
    /// In `quiet` while no shard announced subscribers.
    quiet: Link,
}

/// What a publish took.
pub struct Numbered {
    pub name: Arc<str>,
    pub seq: u64,
    pub epoch: Epoch,
    pub frame: Bytes,
}

/// Where a topic stands for a subscriber, and what it missed.
pub struct Standing {
    pub name: Arc<str>,
    pub seq: u64,
    pub epoch: Epoch,
    pub recovery: Recovery,
    pub replay: Vec<Bytes>,
}

/// Every topic is in use: a new one cannot be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyTopics;

pub struct TopicTable {
    /// Each topic's index, found by its `topic_hash` (shared with routing, so
    /// the broker hashes a published topic once) and compared by the state's
    /// name: four bytes a topic where a map entry took 24.
    ids: HashTable<u32>,
    topics: Slab<TopicState>,
    limits: HistoryLimits,
    topics_max: usize,
    /// The clock's zero.
    start: Instant,
    epochs: EpochMaker,
    /// Topics holding history, least recently published first.
    published: List,
    /// Topics no shard announced, longest quiet first.
    quiet: List,
    history_bytes: usize,
    history_events: usize,
    /// Topics forgotten (idle, or to make room).
    pub forgotten: u64,
    /// Events dropped from histories to stay within `--history-memory`.
    pub evicted: u64,
}

impl TopicTable {
    pub fn new(limits: HistoryLimits) -> Self {
        Self::with_topics_max(limits, TOPICS_MAX)
    }

    pub fn with_topics_max(limits: HistoryLimits, topics_max: usize) -> Self {
        assert!(topics_max < NIL as usize, "topic indexes fit below NIL");
        TopicTable {
            ids: HashTable::new(),
            topics: Slab::new(),
            limits,
            topics_max,
            start: Instant::now(),
            epochs: EpochMaker::new(),
            published: List::new(|s| &mut s.published),
            quiet: List::new(|s| &mut s.quiet),
            history_bytes: 0,
            history_events: 0,
            forgotten: 0,
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.topics.len()
    }

    pub fn history_bytes(&self) -> usize {
        self.history_bytes
    }

    pub fn history_events(&self) -> usize {
        self.history_events
    }

    /// Whole seconds since the table was made, rounded up.
    fn secs(&self, now: Instant) -> u32 {
        let d = now.saturating_duration_since(self.start);
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        u32::try_from(secs).expect("a process runs less than 136 years")
    }

    /// The topic's index, its state made (seq 0, a new epoch, quiet) if unknown;
    /// past `topics_max` only by forgetting the longest quiet topic.
    fn entry(&mut self, topic: HashedTopic<'_>, now: u32) -> Result<u32, TooManyTopics> {
        // One lookup for a known topic: this runs for every event published.
        if let Some(id) = self.find(topic) {
            return Ok(id);
        }
        if self.topics.len() >= self.topics_max {
            if !self.may_forget_oldest_quiet(now) {
                return Err(TooManyTopics);
            }
            self.forget_oldest_quiet();
        }
        Ok(self.insert(topic, now))
    }

    /// The topic's index, its state made if unknown whatever the count.
    fn entry_unbounded(&mut self, topic: HashedTopic<'_>, now: u32) -> u32 {
        match self.find(topic) {
            Some(id) => id,
            None => self.insert(topic, now),
        }
    }

    /// The index of a known topic.
    fn find(&self, topic: HashedTopic<'_>) -> Option<u32> {
        let topics = &self.topics;
        self.ids
            .find(topic.hash(), |&id| {
                *topics[id as usize].name == *topic.name()
            })
            .copied()
    }

    /// Makes the state of a topic not known yet.
    fn insert(&mut self, topic: HashedTopic<'_>, now: u32) -> u32 {
        let name: Arc<str> = Arc::from(topic.name());
        let epoch = self.epochs.next();
        let id = self.topics.insert(TopicState {
            name,
            seq: 0,
            history: History::default(),
            epoch,
            present: 0,
            last_publish: now,
            quiet_since: now,
            published: UNLINKED,
            quiet: UNLINKED,
        });
        let id = u32::try_from(id)
            .ok()
            .filter(|&id| id < NIL)
            .expect("topic indexes fit below NIL");
        let topics = &self.topics;
        self.ids.insert_unique(topic.hash(), id, |&id| {
            ringgate_shard::topic_hash(&topics[id as usize].name)
        });
        self.quiet.push_back(&mut self.topics, id);
        id
    }

    /// Marks a topic without announced subscribers as used now: it idles from here.
    fn touch_quiet(&mut self, id: u32, now: u32) {
        let state = &mut self.topics[id as usize];
        if state.present == 0 {
            state.quiet_since = now;
            self.quiet.move_to_back(&mut self.topics, id);
        }
    }

    /// Applies a change of a topic's history, (bytes, events) before, to the
    /// totals and the `published` list.
    fn account(&mut self, id: u32, before: (usize, usize)) {
        let history = &self.topics[id as usize].history;
        let after = (history.bytes(), history.len());
        self.history_bytes = self.history_bytes + after.0 - before.0;
        self.history_events = self.history_events + after.1 - before.1;
        if before.1 > 0 && after.1 == 0 {
            self.published.unlink(&mut self.topics, id);
        }
    }

    /// Numbers the next event of `topic`, builds its frame with `frame(seq)`
    /// and holds it in the history.
    pub fn publish(
        &mut self,
        topic: HashedTopic<'_>,
        now: Instant,
        frame: impl FnOnce(u64) -> Bytes,
    ) -> Result<Numbered, TooManyTopics> {
        let limits = self.limits;
        let now = self.secs(now);
        let id = self.entry(topic, now)?;
        let state = &mut self.topics[id as usize];
        let before = (state.history.bytes(), state.history.len());
        state.seq += 1;
        state.last_publish = now;
        let seq = state.seq;
        let frame = frame(seq);
        if limits.size > 0 {
            state.history.push(seq, frame.clone(), now);
            while state.history.len() > limits.size {
                state.history.pop_oldest();
            }
            if let Some(cutoff) = now.checked_sub(ttl_secs(limits.ttl)) {
                state.history.expire(cutoff);
            }
        }
        let held = !state.history.is_empty();
        let (name, epoch) = (state.name.clone(), state.epoch);
        self.account(id, before);
        // The most recently published topic goes to the back of the list, on
        // every publish: moving it only once a second would leave a busy topic
        // at the head all second, to be drained of its whole history by the
        // memory bound (`a_busy_topic_keeps_its_history_under_the_memory_bound`).
        match (before.1 > 0, held) {
            (true, true) => self.published.move_to_back(&mut self.topics, id),
            (false, true) => self.published.push_back(&mut self.topics, id),
            (_, false) => {}
        }
        self.touch_quiet(id, now);
        self.enforce_memory();
        Ok(Numbered {
            name,
            seq,
            epoch,
            frame,
        })
    }

    /// Where `topic` stands for a new subscriber, and, when it recovers from
    /// `since`, the frames it missed (if the history still holds every one).
    pub fn subscribe(
        &mut self,
        topic: &str,
        since: Option<&Since>,
        now: Instant,
    ) -> Result<Standing, TooManyTopics> {
        let limits = self.limits;
        let now = self.secs(now);
        let id = self.entry(HashedTopic::new(topic), now)?;
        // A subscribe counts as use: the topic cannot be forgotten (and its
        // epoch change) in the moment before the shard announces it.
        self.touch_quiet(id, now);
        let state = &mut self.topics[id as usize];
        let before = (state.history.bytes(), state.history.len());
        if let Some(cutoff) = now.checked_sub(ttl_secs(limits.ttl)) {
            state.history.expire(cutoff);
        }
        let (recovery, replay) = match since {
            None => (Recovery::NotAsked, Vec::new()),
            Some(since) if since.epoch != *state.epoch => (Recovery::EpochChanged, Vec::new()),
            Some(since) if since.seq > state.seq => (Recovery::Future, Vec::new()),
            Some(_) if limits.size == 0 => (Recovery::HistoryOff, Vec::new()),
            Some(since) => match state.history.since(since.seq, state.seq) {
                Some(frames) => (Recovery::Recovered, frames),
                None => (Recovery::TooOld, Vec::new()),
            },
        };
        let standing = Standing {
            name: state.name.clone(),
            seq: state.seq,
            epoch: state.epoch,
            recovery,
            replay,
        };
        self.account(id, before);
        Ok(standing)
    }

    /// A shard announced `topic` (its subscribers hold events of it: `present`), or
    /// the last subscriber of a topic it announced left.
    ///
    /// An announcement is never refused, even past `topics_max`: subscribers
    /// hold the topic's numbering (the broker numbered an event of it or
    /// answered a subscribe to it a moment ago), and announced topics are
    /// bounded by the shards' subscriptions. So every departure finds its
    /// announcement counted, and a count can never be taken from another shard.
    pub fn presence(&mut self, topic: &str, present: bool, now: Instant) {
        let now = self.secs(now);
        let topic = HashedTopic::new(topic);
        let id = if present {
            self.entry_unbounded(topic, now)
        } else {
            self.find(topic)
                .expect("a departure from a topic never announced")
        };
        let state = &mut self.topics[id as usize];
        if present {
            state.present += 1;
            if state.present == 1 {
                self.quiet.unlink(&mut self.topics, id);
            }
        } else {
            assert!(state.present > 0, "more departures than announcements");
            state.present -= 1;
            if state.present == 0 {
                state.quiet_since = now;
                self.quiet.push_back(&mut self.topics, id);
            }
        }
    }

    /// Drops history older than `--history-ttl` and forgets topics idle for
    /// `--topic-idle-ttl`. Called about once a second.
    pub fn maintain(&mut self, now: Instant) {
        let now = self.secs(now);
        if let Some(cutoff) = now.checked_sub(ttl_secs(self.limits.ttl)) {
            // Topics not published since the cutoff hold only expired events.
            while self.published.head != NIL {
                let id = self.published.head;
                let state = &mut self.topics[id as usize];
                if state.last_publish >= cutoff {
                    break;
                }
                let before = (state.history.bytes(), state.history.len());
                state.history.clear();
                self.account(id, before);
            }
        }
        if let Some(cutoff) = now.checked_sub(ttl_secs(self.limits.topic_idle_ttl)) {
            while self.quiet.head != NIL {
                let state = &self.topics[self.quiet.head as usize];
                assert!(
                    state.last_publish <= state.quiet_since,
                    "quiet since a publish"
                );
                if state.quiet_since > cutoff {
                    break;
                }
                self.forget_oldest_quiet();
            }
        }
    }

    /// Whether the topic cap may forget the longest-quiet topic now: it has
    /// been quiet `QUIET_BEFORE_FORGOTTEN_SECS` at least.
    fn may_forget_oldest_quiet(&self, now: u32) -> bool {
        let id = self.quiet.head;
        id != NIL
            && now.saturating_sub(self.topics[id as usize].quiet_since)
                >= QUIET_BEFORE_FORGOTTEN_SECS
    }

    /// Forgets the topic that has been without subscribers the longest.
    fn forget_oldest_quiet(&mut self) {
        let id = self.quiet.head;
        assert_ne!(id, NIL, "a quiet topic to forget");
        self.quiet.unlink(&mut self.topics, id);
        let state = &mut self.topics[id as usize];
        assert_eq!(state.present, 0, "a topic with subscribers was quiet");
        let before = (state.history.bytes(), state.history.len());
        state.history.clear();
        self.account(id, before);
        let state = self.topics.remove(id as usize);
        self.ids
            .find_entry(ringgate_shard::topic_hash(&state.name), |&other| {
                other == id
            })
            .expect("every topic is in the index")
            .remove();
        self.forgotten += 1;
    }

    /// Drops the oldest events of the least recently published topics until
    /// the histories fit `--history-memory`.
    fn enforce_memory(&mut self) {
        while self.history_bytes > self.limits.memory {
            let id = self.published.head;
            assert_ne!(id, NIL, "held bytes belong to listed topics");
            let state = &mut self.topics[id as usize];
            let before = (state.history.bytes(), state.history.len());
            state
                .history
                .pop_oldest()
                .expect("listed topics hold events");
            self.account(id, before);
            self.evicted += 1;
        }
    }

    #[cfg(test)]
    fn new_epoch_for_test(mut self) -> Epoch {
        self.epochs.next()
    }

    /// Checks every index and list against the states (tests).
    #[cfg(test)]
    pub fn check(&self) {
        let bytes: usize = self.topics.iter().map(|(_, s)| s.history.bytes()).sum();
        assert_eq!(bytes, self.history_bytes);
        let events: usize = self.topics.iter().map(|(_, s)| s.history.len()).sum();
        assert_eq!(events, self.history_events);
        assert_eq!(self.ids.len(), self.topics.len());
        for (id, s) in self.topics.iter() {
            assert_eq!(self.find(HashedTopic::new(&s.name)), Some(id as u32));
        }
        let walk = |list: &List, link: fn(&TopicState) -> Link| {
            let (mut at, mut prev, mut seen) = (list.head, NIL, Vec::new());
            while at != NIL {
                let l = link(&self.topics[at as usize]);
                assert_eq!(l.prev, prev, "a broken back link");
                seen.push(at);
                (prev, at) = (at, l.next);
            }
            assert_eq!(list.tail, prev);
            seen
        };
        let published = walk(&self.published, |s| s.published);
        let held = self
            .topics
            .iter()
            .filter(|(_, s)| !s.history.is_empty())
            .count();
        assert_eq!(published.len(), held);
        let last: Vec<u32> = published
            .iter()
            .map(|&id| self.topics[id as usize].last_publish)
            .collect();
        assert!(
            last.windows(2).all(|w| w[0] <= w[1]),
            "published out of order"
        );
        let quiet = walk(&self.quiet, |s| s.quiet);
        let idle = self.topics.iter().filter(|(_, s)| s.present == 0).count();
        assert_eq!(quiet.len(), idle);
        assert!(quiet
            .iter()
            .all(|&id| self.topics[id as usize].present == 0));
        let since: Vec<u32> = quiet
            .iter()
            .map(|&id| self.topics[id as usize].quiet_since)
            .collect();
        assert!(since.windows(2).all(|w| w[0] <= w[1]), "quiet out of order");
    }
}

/// A TTL in whole seconds (at least one).
fn ttl_secs(ttl: Duration) -> u32 {
    u32::try_from(ttl.as_secs().max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
