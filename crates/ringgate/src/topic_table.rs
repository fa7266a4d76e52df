//! The broker's per-topic state: `seq`, epoch, history, and which shards have
//! subscribers; and every bound on it.
//!
//! Bounds: a topic's history holds at most `--history-size` events no older than
//! `--history-ttl`; all histories together at most `--history-memory` bytes (the
//! oldest events of the least recently published topics go first). A topic with
//! no publish and no subscriber on any shard for `--topic-idle-ttl` is forgotten;
//! if it comes back it gets a new epoch, so no client can take a restarted
//! numbering for the old one. At most `TOPICS_MAX` topics are known; past it the
//! longest-quiet topic without subscribers is forgotten early, and if every
//! topic has subscribers a new one is refused.
//!
//! Two ordered indexes keep each of these O(log topics): topics with history by
//! their last publish, topics without subscribers by when they went quiet. A
//! logical clock (one tick per change) keys both, so keys never collide.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringgate_shard::{Recovery, Since};

use crate::history::History;

/// Topics known at most; a publish or subscribe that would need one more, when
/// every topic has subscribers, is refused. About 150 bytes each without history.
pub const TOPICS_MAX: usize = 1_000_000;

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

struct TopicState {
    name: Arc<str>,
    seq: u64,
    epoch: Arc<str>,
    history: History,
    last_publish: Instant,
    /// Key in `by_publish` while the history is not empty.
    publish_stamp: u64,
    /// Shards with local subscribers.
    present: u32,
    /// Key in `quiet` while no shard has subscribers.
    quiet_stamp: u64,
    quiet_since: Instant,
}

/// What a publish took.
pub struct Numbered {
    pub name: Arc<str>,
    pub seq: u64,
    pub epoch: Arc<str>,
    pub frame: Bytes,
}

/// Where a topic stands for a subscriber, and what it missed.
pub struct Standing {
    pub name: Arc<str>,
    pub seq: u64,
    pub epoch: Arc<str>,
    pub recovery: Recovery,
    pub replay: Vec<Bytes>,
}

/// Every topic is in use: a new one cannot be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyTopics;

pub struct TopicTable {
    map: HashMap<Arc<str>, TopicState>,
    limits: HistoryLimits,
    topics_max: usize,
    clock: u64,
    by_publish: BTreeMap<u64, Arc<str>>,
    quiet: BTreeMap<u64, Arc<str>>,
    salt: u64,
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
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        TopicTable {
            map: HashMap::new(),
            limits,
            topics_max,
            clock: 0,
            by_publish: BTreeMap::new(),
            quiet: BTreeMap::new(),
            salt: hasher.finish(),
            history_bytes: 0,
            history_events: 0,
            forgotten: 0,
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn history_bytes(&self) -> usize {
        self.history_bytes
    }

    pub fn history_events(&self) -> usize {
        self.history_events
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// A fresh epoch: 10 base-36 characters, different for every topic state
    /// this process makes and (by the random salt) from every other process.
    fn new_epoch(&mut self) -> Arc<str> {
        let serial = self.tick();
        let mut x = self.salt ^ serial.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        // splitmix64's finaliser: every bit of the serial moves every output bit.
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let text: String = (0..10)
            .map(|i| DIGITS[((x >> (i * 6)) % 36) as usize] as char)
            .collect();
        Arc::from(text)
    }

    /// The topic's state, made (seq 0, a new epoch, no subscriber) if unknown.
    fn entry(&mut self, topic: &str, now: Instant) -> Result<&mut TopicState, TooManyTopics> {
        if !self.map.contains_key(topic) {
            if self.map.len() >= self.topics_max && !self.forget_oldest_quiet() {
                return Err(TooManyTopics);
            }
            let name: Arc<str> = Arc::from(topic);
            let epoch = self.new_epoch();
            let quiet_stamp = self.tick();
            self.quiet.insert(quiet_stamp, name.clone());
            let state = TopicState {
                name: name.clone(),
                seq: 0,
                epoch,
                history: History::default(),
                last_publish: now,
                publish_stamp: 0,
                present: 0,
                quiet_stamp,
                quiet_since: now,
            };
            self.map.insert(name, state);
        }
        Ok(self
            .map
            .get_mut(topic)
            .expect("present: found or inserted above"))
    }

    /// Numbers the next event of `topic`, builds its frame with `frame(seq)`
    /// and holds it in the history.
    pub fn publish(
        &mut self,
        topic: &str,
        now: Instant,
        frame: impl FnOnce(u64) -> Bytes,
    ) -> Result<Numbered, TooManyTopics> {
        let limits = self.limits;
        let publish_stamp = self.tick();
        let quiet_stamp = self.tick();
        let state = self.entry(topic, now)?;
        let before = (state.history.bytes(), state.history.len());
        state.seq += 1;
        let seq = state.seq;
        let frame = frame(seq);
        let old_publish = std::mem::replace(&mut state.publish_stamp, publish_stamp);
        state.last_publish = now;
        if limits.size > 0 {
            state.history.push(seq, frame.clone(), now);
            while state.history.len() > limits.size {
                state.history.pop_oldest();
            }
            if let Some(cutoff) = now.checked_sub(limits.ttl) {
                state.history.expire(cutoff);
            }
        }
        let after = (state.history.bytes(), state.history.len());
        let name = state.name.clone();
        let epoch = state.epoch.clone();
        let requiet = if state.present == 0 {
            state.quiet_since = now;
            Some(std::mem::replace(&mut state.quiet_stamp, quiet_stamp))
        } else {
            None
        };
        self.account(before, after);
        self.by_publish.remove(&old_publish);
        if after.1 > 0 {
            self.by_publish.insert(publish_stamp, name.clone());
        }
        if let Some(old) = requiet {
            self.quiet.remove(&old);
            self.quiet.insert(quiet_stamp, name.clone());
        }
        self.enforce_memory();
        Ok(Numbered {
            name,
            seq,
            epoch,
            frame,
        })
    }

    /// Adds a history's change, (bytes, events) before and after, to the totals.
    fn account(&mut self, before: (usize, usize), after: (usize, usize)) {
        self.history_bytes = self.history_bytes + after.0 - before.0;
        self.history_events = self.history_events + after.1 - before.1;
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
        let quiet_stamp = self.tick();
        let state = self.entry(topic, now)?;
        // A subscribe counts as use: the topic cannot be forgotten (and its
        // epoch change) in the moment before the shard's presence arrives.
        let requiet = if state.present == 0 {
            state.quiet_since = now;
            Some(std::mem::replace(&mut state.quiet_stamp, quiet_stamp))
        } else {
            None
        };
        let before = (state.history.bytes(), state.history.len());
        if let Some(cutoff) = now.checked_sub(limits.ttl) {
            state.history.expire(cutoff);
        }
        let (recovery, replay) = match since {
            None => (Recovery::NotAsked, Vec::new()),
            Some(since) if *since.epoch != *state.epoch => (Recovery::EpochChanged, Vec::new()),
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
            epoch: state.epoch.clone(),
            recovery,
            replay,
        };
        let after = (state.history.bytes(), state.history.len());
        let publish_stamp = state.publish_stamp;
        self.account(before, after);
        if before.1 > 0 && after.1 == 0 {
            self.by_publish.remove(&publish_stamp);
        }
        if let Some(old) = requiet {
            self.quiet.remove(&old);
            self.quiet.insert(quiet_stamp, standing.name.clone());
        }
        Ok(standing)
    }

    /// A shard announced `topic` (its subscribers hold events of it: `present`), or
    /// the last subscriber of a topic it announced left.
    ///
    /// A shard announces a topic just after the broker numbered an event of it
    /// or answered a subscribe to it, so the topic is known (and not idle). Only
    /// with the table full of topics in use can it be gone by then: the
    /// announcement is then dropped, and so is the matching departure.
    pub fn presence(&mut self, topic: &str, present: bool, now: Instant) {
        let stamp = self.tick();
        let state = if present {
            match self.entry(topic, now) {
                Ok(state) => state,
                Err(TooManyTopics) => return,
            }
        } else {
            match self.map.get_mut(topic) {
                Some(state) if state.present > 0 => state,
                _ => return,
            }
        };
        let name = state.name.clone();
        if present {
            state.present += 1;
            if state.present == 1 {
                let old = state.quiet_stamp;
                self.quiet.remove(&old);
            }
        } else {
            state.present -= 1;
            if state.present == 0 {
                state.quiet_stamp = stamp;
                state.quiet_since = now;
                self.quiet.insert(stamp, name);
            }
        }
    }

    /// Drops history older than `--history-ttl` and forgets topics idle for
    /// `--topic-idle-ttl`. Called about once a second.
    pub fn maintain(&mut self, now: Instant) {
        if let Some(cutoff) = now.checked_sub(self.limits.ttl) {
            // Topics not published since the cutoff hold only expired events.
            while let Some((&stamp, name)) = self.by_publish.first_key_value() {
                let state = self.map.get_mut(name).expect("indexed topics exist");
                if state.last_publish >= cutoff {
                    break;
                }
                let before = (state.history.bytes(), state.history.len());
                state.history.clear();
                self.account(before, (0, 0));
                self.by_publish.remove(&stamp);
            }
        }
        if let Some(cutoff) = now.checked_sub(self.limits.topic_idle_ttl) {
            while let Some((_, name)) = self.quiet.first_key_value() {
                let state = &self.map[name];
                if state.quiet_since > cutoff || state.last_publish > cutoff {
                    break;
                }
                self.forget_oldest_quiet();
            }
        }
    }

    /// Forgets the topic that has been without subscribers the longest.
    fn forget_oldest_quiet(&mut self) -> bool {
        let Some((_, name)) = self.quiet.pop_first() else {
            return false;
        };
        let state = self.map.remove(&name).expect("indexed topics exist");
        assert_eq!(state.present, 0, "a topic with subscribers was quiet");
        self.account((state.history.bytes(), state.history.len()), (0, 0));
        if !state.history.is_empty() {
            self.by_publish.remove(&state.publish_stamp);
        }
        self.forgotten += 1;
        true
    }

    /// Drops the oldest events of the least recently published topics until
    /// the histories fit `--history-memory`.
    fn enforce_memory(&mut self) {
        while self.history_bytes > self.limits.memory {
            let (&stamp, name) = self
                .by_publish
                .first_key_value()
                .expect("held bytes belong to indexed topics");
            let state = self.map.get_mut(name).expect("indexed topics exist");
            let freed = state
                .history
                .pop_oldest()
                .expect("indexed topics hold events");
            self.history_bytes -= freed;
            self.history_events -= 1;
            self.evicted += 1;
            if state.history.is_empty() {
                self.by_publish.remove(&stamp);
            }
        }
    }

    #[cfg(test)]
    fn new_epoch_for_test(mut self) -> Arc<str> {
        self.new_epoch()
    }

    /// Checks every index against the map (tests).
    #[cfg(test)]
    pub fn check(&self) {
        let bytes: usize = self.map.values().map(|s| s.history.bytes()).sum();
        assert_eq!(bytes, self.history_bytes);
        let events: usize = self.map.values().map(|s| s.history.len()).sum();
        assert_eq!(events, self.history_events);
        let held = self.map.values().filter(|s| !s.history.is_empty()).count();
        assert_eq!(held, self.by_publish.len());
        let quiet = self.map.values().filter(|s| s.present == 0).count();
        assert_eq!(quiet, self.quiet.len());
    }
}

#[cfg(test)]
mod tests;
