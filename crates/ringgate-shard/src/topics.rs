//! A shard's topic index: which local connections subscribe to which topic, and
//! each connection's own subscription set, kept in step.
//!
//! Memory: a subscription costs 4 bytes in its topic's subscriber array (the
//! connection key) and 8 bytes in the connection's set (topic id and position in
//! that array). The first subscription of a connection lives inline in its record;
//! only connections with more than one get a heap array. Subscribe, unsubscribe
//! and disconnect are O(1) in the topic's size: removal swaps the last subscriber
//! into the hole and fixes that subscriber's stored position. A topic's memory
//! is returned when its last subscriber leaves.
//!
//! A topic per user is the common case, so a topic with one subscriber costs no
//! allocation beyond its slab slot: the name (up to 24 bytes) and the single
//! subscriber are held inline, and the name index is a table of 4-byte topic
//! ids hashed by name, not a map holding a second copy of each name. About 60
//! bytes a topic; `std`'s map of `Arc<str>` names, a subscriber vector and a
//! heap name cost about 160.
//!
//! Owns the topic table and the `Subs` type; connections are reached through the
//! slab passed in, so nothing here holds a second reference to a record.

use std::sync::Arc;

use compact_str::CompactString;
use hashbrown::HashTable;
use slab::Slab;

use crate::conn::Conn;
use crate::routes::{topic_hash, RouteWriter};

/// One subscription as the connection records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sub {
    pub topic: u32,
    /// Index of the connection's key in the topic's subscriber array.
    pub pos: u32,
}

const NO_TOPIC: u32 = u32::MAX;

/// A connection's subscriptions: the first inline, the rest on the heap.
/// Invariant: `more` is `None` or non-empty, and only while `first` is set.
#[derive(Debug)]
pub(crate) struct Subs {
    first: Sub,
    // Boxed on purpose: 8 bytes in every connection record instead of a Vec's
    // 24, for the few connections that have more than one topic.
    #[allow(clippy::box_collection)]
    more: Option<Box<Vec<Sub>>>,
}

impl Default for Subs {
    fn default() -> Self {
        Subs {
            first: Sub {
                topic: NO_TOPIC,
                pos: 0,
            },
            more: None,
        }
    }
}

impl Subs {
    /// Heap bytes this set holds beyond the record (its array of further
    /// subscriptions).
    pub fn heap_bytes(&self) -> usize {
        self.more.as_ref().map_or(0, |m| {
            std::mem::size_of::<Vec<Sub>>() + m.capacity() * std::mem::size_of::<Sub>()
        })
    }

    pub fn len(&self) -> usize {
        if self.first.topic == NO_TOPIC {
            0
        } else {
            1 + self.more.as_ref().map_or(0, |m| m.len())
        }
    }

    pub fn find_mut(&mut self, topic: u32) -> Option<&mut Sub> {
        if self.first.topic == topic {
            return Some(&mut self.first);
        }
        self.more.as_mut()?.iter_mut().find(|s| s.topic == topic)
    }

    fn push(&mut self, sub: Sub) {
        if self.first.topic == NO_TOPIC {
            self.first = sub;
        } else {
            self.more.get_or_insert_with(Default::default).push(sub);
        }
    }

    fn remove(&mut self, topic: u32) -> Option<Sub> {
        if self.first.topic == topic {
            let removed = self.first;
            self.first = match self.more.as_mut().and_then(|m| m.pop()) {
                Some(next) => next,
                None => Sub {
                    topic: NO_TOPIC,
                    pos: 0,
                },
            };
            self.drop_empty_more();
            return Some(removed);
        }
        let more = self.more.as_mut()?;
        let at = more.iter().position(|s| s.topic == topic)?;
        let removed = more.swap_remove(at);
        self.drop_empty_more();
        Some(removed)
    }

    fn drop_empty_more(&mut self) {
        if self.more.as_ref().is_some_and(|m| m.is_empty()) {
            self.more = None;
        }
    }

    /// The topic ids subscribed, in no order.
    fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        let first = (self.first.topic != NO_TOPIC).then_some(self.first.topic);
        first
            .into_iter()
            .chain(self.more.iter().flat_map(|m| m.iter().map(|s| s.topic)))
    }

    /// Takes every subscription out, leaving the set empty.
    fn take_all(&mut self) -> Vec<Sub> {
        let mut all = Vec::with_capacity(self.len());
        if self.first.topic != NO_TOPIC {
            all.push(self.first);
        }
        if let Some(more) = self.more.take() {
            all.extend(more.iter().copied());
        }
        self.first = Sub {
            topic: NO_TOPIC,
            pos: 0,
        };
        all
    }
}

struct Topic {
    name: CompactString,
    subscribers: Subscribers,
}

/// Whether an `ids` value is the topic called `name`.
fn names<'a>(topics: &'a Slab<Topic>, name: &'a str) -> impl Fn(&u32) -> bool + 'a {
    move |&id| topics[(id & !ANNOUNCED) as usize].name == name
}

/// The layout of a slot of `Slab<Topic>` (the slab's own entry type is
/// private): what the index's table costs per topic it has room for.
#[allow(dead_code)]
enum SlabSlot {
    Vacant(usize),
    Occupied(Topic),
}

/// A topic's subscriber keys: one inline (a topic per user), more on the heap
/// (boxed: 16 bytes in every topic instead of a vector's 24).
#[allow(clippy::box_collection)]
enum Subscribers {
    One(u32),
    Many(Box<Vec<u32>>),
}

impl Subscribers {
    fn as_slice(&self) -> &[u32] {
        match self {
            Subscribers::One(key) => std::slice::from_ref(key),
            Subscribers::Many(keys) => keys,
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn push(&mut self, key: u32) {
        match self {
            Subscribers::One(first) => *self = Subscribers::Many(Box::new(vec![*first, key])),
            Subscribers::Many(keys) => keys.push(key),
        }
    }

    /// Removes the key at `pos` by moving the last one into its place; the
    /// key now at `pos`, if any, is returned (its position changed). The
    /// caller drops a topic whose single subscriber leaves: `One` never
    /// empties.
    fn swap_remove(&mut self, pos: usize) -> Option<u32> {
        let Subscribers::Many(keys) = self else {
            unreachable!("a topic's only subscriber is removed with the topic")
        };
        keys.swap_remove(pos);
        let moved = keys.get(pos).copied();
        if let [only] = keys[..] {
            *self = Subscribers::One(only);
        } else if keys.capacity() > 16 && keys.len() < keys.capacity() / 4 {
            // Give memory back after a mass unsubscribe.
            keys.shrink_to(keys.capacity() / 2);
        }
        moved
    }

    /// Heap bytes beyond the topic's slot.
    fn heap_bytes(&self) -> usize {
        match self {
            Subscribers::One(_) => 0,
            Subscribers::Many(keys) => std::mem::size_of::<Vec<u32>>() + 4 * keys.capacity(),
        }
    }
}

/// Outcome of a subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Subscribed {
    New,
    Already,
    /// The connection holds its maximum number of subscriptions.
    Full,
}

/// The bit of an `ids` value saying the broker was told the topic has
/// subscribers here (the rest is the topic's slab index).
const ANNOUNCED: u32 = 1 << 31;

/// Topic name -> local subscribers, for one shard.
///
/// Presence: the broker must never forget (and renumber) a topic while a
/// subscriber here holds events of its numbering, and should hold nothing for
/// topics nobody publishes to (a topic per user, most of them silent). So a
/// topic is *announced* to the broker only once it matters: when an event of it
/// is delivered here, or a subscribe answered by the broker takes effect; and
/// its last subscriber leaving is reported only if it was announced. A
/// subscriber that has seen no event and asked nothing loses nothing if the
/// broker renumbers: its first event is simply the new numbering's. With
/// `announce_first_in` (a fleet member) every topic is announced when its first
/// subscriber arrives: the broker subscribes to it on the bus then.
#[derive(Default)]
pub(crate) struct TopicIndex {
    announce_first_in: bool,
    /// Slab indexes with the `ANNOUNCED` bit, hashed by their topic's name
    /// ([`topic_hash`], keyed per process: names come from clients).
    ids: HashTable<u32>,
    /// The broker's view of which topics may have subscribers here: every topic
    /// of the index, and every subscribe forwarded and not yet answered.
    routes: RouteWriter,
    topics: Slab<Topic>,
    subscriptions: usize,
    /// Topics announced (true), and announced topics that lost their last
    /// subscriber (false), since `take_changes`, in order.
    changes: Vec<(Arc<str>, bool)>,
}

impl TopicIndex {
    /// Bytes the index holds: its name table, its topic table, and each
    /// topic's name and subscriber array (allocator headers left out). A walk
    /// over the topics, made once a tick.
    pub fn heap_bytes(&self) -> usize {
        let table = self.ids.capacity() * (std::mem::size_of::<u32>() + 1)
            + self.topics.capacity() * std::mem::size_of::<SlabSlot>();
        let topics: usize = self
            .topics
            .iter()
            .map(|(_, t)| {
                let name = if t.name.is_heap_allocated() {
                    t.name.capacity()
                } else {
                    0
                };
                name + t.subscribers.heap_bytes()
            })
            .sum();
        table + topics
    }

    fn hash(&self, name: &str) -> u64 {
        topic_hash(name)
    }

    /// The `ids` value (slab index and `ANNOUNCED` bit) of `name`.
    fn find(&self, name: &str) -> Option<u32> {
        self.find_hashed(self.hash(name), name)
    }

    /// [`Self::find`] with the name's hash already made.
    fn find_hashed(&self, hash: u64, name: &str) -> Option<u32> {
        self.ids.find(hash, names(&self.topics, name)).copied()
    }

    pub fn new(announce_first_in: bool, routes: RouteWriter) -> Self {
        TopicIndex {
            announce_first_in,
            routes,
            ..TopicIndex::default()
        }
    }

    /// A subscribe to `name` is being forwarded to the broker: every event it
    /// numbers after answering must reach this shard (`routes.rs`), until
    /// [`Self::answer_handled`].
    pub fn await_answer(&mut self, name: &str) {
        self.routes.add(topic_hash(name));
    }

    /// The broker's answer to a subscribe counted by [`Self::await_answer`]
    /// has been handled (or the subscribe was never sent).
    pub fn answer_handled(&mut self, name: &str) {
        self.routes.remove(topic_hash(name));
    }

    pub fn topics(&self) -> usize {
        self.topics.len()
    }

    pub fn subscriptions(&self) -> usize {
        self.subscriptions
    }

    /// The local subscribers of `name` (connection keys).
    #[cfg(test)]
    pub fn subscribers(&self, name: &str) -> &[u32] {
        match self.find(name) {
            Some(id) => self.topics[(id & !ANNOUNCED) as usize]
                .subscribers
                .as_slice(),
            None => &[],
        }
    }

    /// The local subscribers of the topic at slab index `id` (none if it is
    /// gone; the index may since name another topic, which callers tolerate).
    pub fn subscribers_of(&self, id: u32) -> &[u32] {
        self.topics
            .get(id as usize)
            .map_or(&[], |t| t.subscribers.as_slice())
    }

    /// Marks `name` announced, if it has subscribers here and was not yet (the
    /// broker will be told, `take_changes`), and returns its slab index (its
    /// subscribers: [`Self::subscribers_of`]): one lookup for a delivery.
    pub fn announce(&mut self, name: &str) -> Option<u32> {
        self.announce_hashed(name, self.hash(name))
    }

    /// [`Self::announce`] with `name`'s hash at hand (a delivery carries it).
    pub fn announce_hashed(&mut self, name: &str, hash: u64) -> Option<u32> {
        debug_assert_eq!(hash, self.hash(name), "a topic's hash is topic_hash");
        let id = self.ids.find_mut(hash, names(&self.topics, name))?;
        let index = *id & !ANNOUNCED;
        if *id & ANNOUNCED == 0 {
            *id |= ANNOUNCED;
            self.changes.push((Arc::from(name), true));
        }
        Some(index)
    }

    pub fn subscribe(
        &mut self,
        conns: &mut Slab<Conn>,
        key: usize,
        name: &str,
        max: usize,
    ) -> Subscribed {
        let key32 = u32::try_from(key).expect("keys fit in 32 bits");
        let conn = &mut conns[key];
        let hash = self.hash(name);
        let Some(id) = self.find_hashed(hash, name) else {
            // A new topic, made with its first subscriber.
            if conn.subs.len() >= max {
                return Subscribed::Full;
            }
            let id = self.topics.insert(Topic {
                name: CompactString::from(name),
                subscribers: Subscribers::One(key32),
            });
            let id = u32::try_from(id)
                .ok()
                .filter(|&id| id < ANNOUNCED)
                .expect("fewer than 2^31 topics");
            let value = if self.announce_first_in {
                self.changes.push((Arc::from(name), true));
                id | ANNOUNCED
            } else {
                id
            };
            let topics = &self.topics;
            self.ids.insert_unique(hash, value, |&id| {
                topic_hash(topics[(id & !ANNOUNCED) as usize].name.as_str())
            });
            self.routes.add(hash);
            conn.subs.push(Sub { topic: id, pos: 0 });
            self.subscriptions += 1;
            return Subscribed::New;
        };
        let id = id & !ANNOUNCED;
        if conn.subs.find_mut(id).is_some() {
            return Subscribed::Already;
        }
        if conn.subs.len() >= max {
            return Subscribed::Full;
        }
        let subscribers = &mut self.topics[id as usize].subscribers;
        let pos = u32::try_from(subscribers.len()).expect("fewer than 2^32 subscribers");
        subscribers.push(key32);
        conn.subs.push(Sub { topic: id, pos });
        self.subscriptions += 1;
        Subscribed::New
    }

    /// The names of the topics `key` is subscribed to.
    pub fn topics_of<'a>(
        &'a self,
        conns: &'a Slab<Conn>,
        key: usize,
    ) -> impl Iterator<Item = Arc<str>> + 'a {
        conns[key]
            .subs
            .ids()
            .map(|id| Arc::from(self.topics[id as usize].name.as_str()))
    }

    /// Removes `key`'s subscription to `name`; false if it had none.
    pub fn unsubscribe(&mut self, conns: &mut Slab<Conn>, key: usize, name: &str) -> bool {
        let Some(id) = self.find(name) else {
            return false;
        };
        match conns[key].subs.remove(id & !ANNOUNCED) {
            Some(sub) => {
                self.detach(conns, sub);
                true
            }
            None => false,
        }
    }

    /// Removes every subscription of `key` (on disconnect).
    pub fn unsubscribe_all(&mut self, conns: &mut Slab<Conn>, key: usize) {
        for sub in conns[key].subs.take_all() {
            self.detach(conns, sub);
        }
    }

    /// Removes a subscriber from its topic's array by swapping the last one in.
    fn detach(&mut self, conns: &mut Slab<Conn>, sub: Sub) {
        self.subscriptions -= 1;
        let subscribers = &mut self.topics[sub.topic as usize].subscribers;
        if subscribers.len() == 1 {
            assert_eq!(sub.pos, 0, "a single subscriber sits at 0");
            return self.drop_topic(sub.topic);
        }
        if let Some(moved) = subscribers.swap_remove(sub.pos as usize) {
            let moved = conns[moved as usize]
                .subs
                .find_mut(sub.topic)
                .expect("a subscriber's set names its topics");
            moved.pos = sub.pos;
        }
    }

    /// Forgets a topic whose last subscriber left.
    fn drop_topic(&mut self, id: u32) {
        let hash = self.hash(&self.topics[id as usize].name);
        let (was, _) = self
            .ids
            .find_entry(hash, |&v| v & !ANNOUNCED == id)
            .expect("indexed topics have ids")
            .remove();
        let topic = self.topics.remove(id as usize);
        self.routes.remove(hash);
        if was & ANNOUNCED != 0 {
            self.changes.push((Arc::from(topic.name.as_str()), false));
        }
    }

    /// The topics announced (true), and announced ones that lost their last
    /// subscriber (false), since the last call, in order.
    pub fn take_changes(&mut self) -> std::vec::Drain<'_, (Arc<str>, bool)> {
        self.changes.drain(..)
    }

    /// Checks every cross-reference (tests only).
    #[cfg(test)]
    pub fn check(&self, conns: &Slab<Conn>) {
        let mut total = 0;
        for (id, topic) in self.topics.iter() {
            if let Subscribers::Many(keys) = &topic.subscribers {
                assert!(keys.len() > 1, "a single subscriber is held inline");
            }
            assert_eq!(self.find(&topic.name).unwrap() & !ANNOUNCED, id as u32);
            for (pos, &key) in topic.subscribers.as_slice().iter().enumerate() {
                let mut subs = Subs {
                    first: conns[key as usize].subs.first,
                    more: conns[key as usize].subs.more.clone(),
                };
                let sub = subs
                    .find_mut(id as u32)
                    .expect("subscriber knows its topic");
                assert_eq!(sub.pos as usize, pos);
            }
            total += topic.subscribers.len();
        }
        assert_eq!(total, self.subscriptions);
        assert_eq!(self.ids.len(), self.topics.len());
        for (_, topic) in self.topics.iter() {
            assert!(
                self.routes.may_hold(topic_hash(&topic.name)),
                "{}",
                topic.name
            );
        }
    }

    /// The route filter's counts, summed (tests only).
    #[cfg(test)]
    pub fn routes_counted(&self) -> usize {
        self.routes.counted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conns(n: usize) -> Slab<Conn> {
        let mut slab = Slab::new();
        for i in 0..n {
            slab.insert(Conn::new(i as u32, 0, 0));
        }
        slab
    }

    fn changes(index: &mut TopicIndex) -> Vec<(String, bool)> {
        index
            .take_changes()
            .map(|(t, p)| (t.to_string(), p))
            .collect()
    }

    #[test]
    fn only_announced_topics_are_reported_once_in_and_once_out() {
        let mut conns = conns(2);
        let mut index = TopicIndex::default();
        index.subscribe(&mut conns, 0, "a", 64);
        index.subscribe(&mut conns, 1, "a", 64);
        assert_eq!(changes(&mut index), vec![], "a subscribe alone is not news");
        index.announce("a");
        index.announce("a");
        index.announce("never-subscribed");
        assert_eq!(
            changes(&mut index),
            vec![("a".into(), true)],
            "announced once"
        );
        index.unsubscribe(&mut conns, 0, "a");
        index.unsubscribe_all(&mut conns, 1);
        assert_eq!(
            changes(&mut index),
            vec![("a".into(), false)],
            "then the last out"
        );
        index.check(&conns);
        // Unannounced topics come and go without a word.
        index.subscribe(&mut conns, 0, "x", 1);
        assert_eq!(index.subscribe(&mut conns, 0, "y", 1), Subscribed::Full);
        index.unsubscribe_all(&mut conns, 0);
        assert_eq!(changes(&mut index), vec![]);
        // The bit does not disturb lookups.
        index.subscribe(&mut conns, 0, "x", 1);
        index.announce("x");
        assert_eq!(index.subscribe(&mut conns, 0, "x", 1), Subscribed::Already);
        assert_eq!(index.subscribers("x"), &[0]);
        assert!(index.unsubscribe(&mut conns, 0, "x"));
        index.check(&conns);
    }

    #[test]
    fn a_fleet_member_announces_first_in_and_last_out() {
        let mut conns = conns(2);
        let mut index = TopicIndex::new(true, RouteWriter::default());
        index.subscribe(&mut conns, 0, "a", 64);
        index.subscribe(&mut conns, 1, "a", 64);
        index.announce("a");
        assert_eq!(changes(&mut index), vec![("a".into(), true)]);
        index.unsubscribe(&mut conns, 0, "a");
        assert_eq!(changes(&mut index), vec![], "one subscriber is left");
        index.unsubscribe_all(&mut conns, 1);
        assert_eq!(changes(&mut index), vec![("a".into(), false)]);
        // A subscribe refused at the connection's limit announces nothing.
        index.subscribe(&mut conns, 0, "x", 1);
        assert_eq!(index.subscribe(&mut conns, 0, "y", 1), Subscribed::Full);
        assert_eq!(changes(&mut index), vec![("x".into(), true)]);
        index.check(&conns);
    }

    #[test]
    fn subscribe_unsubscribe_and_memory_comes_back() {
        let mut conns = conns(3);
        let mut index = TopicIndex::default();
        assert_eq!(index.subscribe(&mut conns, 0, "a", 64), Subscribed::New);
        assert_eq!(index.subscribe(&mut conns, 1, "a", 64), Subscribed::New);
        assert_eq!(index.subscribe(&mut conns, 1, "a", 64), Subscribed::Already);
        assert_eq!(index.subscribe(&mut conns, 2, "b", 64), Subscribed::New);
        assert_eq!(index.subscribers("a"), &[0, 1]);
        index.check(&conns);
        assert!(index.unsubscribe(&mut conns, 0, "a"));
        assert!(!index.unsubscribe(&mut conns, 0, "a"));
        assert_eq!(index.subscribers("a"), &[1]);
        index.check(&conns);
        index.unsubscribe_all(&mut conns, 1);
        index.unsubscribe_all(&mut conns, 2);
        assert_eq!((index.topics(), index.subscriptions()), (0, 0));
        assert!(index.ids.is_empty());
    }

    #[test]
    fn the_subscription_limit_holds_and_leaves_no_empty_topic() {
        let mut conns = conns(1);
        let mut index = TopicIndex::default();
        assert_eq!(index.subscribe(&mut conns, 0, "a", 2), Subscribed::New);
        assert_eq!(index.subscribe(&mut conns, 0, "b", 2), Subscribed::New);
        assert_eq!(index.subscribe(&mut conns, 0, "c", 2), Subscribed::Full);
        assert_eq!(index.topics(), 2);
        index.check(&conns);
    }

    #[test]
    fn a_topic_per_user_holds_nothing_beyond_its_slot() {
        let n = 1000;
        let mut conns = conns(n);
        let mut index = TopicIndex::default();
        let table = |index: &TopicIndex| {
            index.ids.capacity() * 5 + index.topics.capacity() * std::mem::size_of::<SlabSlot>()
        };
        for key in 0..n {
            index.subscribe(&mut conns, key, &format!("mail:user:{key:012}"), 64);
        }
        assert_eq!(index.heap_bytes(), table(&index), "names and keys inline");
        assert!(
            std::mem::size_of::<SlabSlot>() <= 48,
            "{} bytes a slot",
            std::mem::size_of::<SlabSlot>()
        );
        // A second subscriber moves the keys to the heap, and back inline
        // when one is left; a name over 24 bytes is on the heap.
        index.subscribe(&mut conns, 1, "mail:user:000000000000", 64);
        assert_eq!(index.subscribers("mail:user:000000000000"), &[0, 1]);
        assert!(index.heap_bytes() > table(&index));
        index.unsubscribe(&mut conns, 0, "mail:user:000000000000");
        assert_eq!(index.subscribers("mail:user:000000000000"), &[1]);
        assert_eq!(index.heap_bytes(), table(&index));
        let long = "a-topic-name-longer-than-24-bytes";
        index.subscribe(&mut conns, 2, long, 64);
        assert_eq!(index.heap_bytes(), table(&index) + long.len());
        index.check(&conns);
        for key in 0..n {
            index.unsubscribe_all(&mut conns, key);
        }
        assert_eq!((index.topics(), index.subscriptions()), (0, 0));
        index.check(&conns);
    }

    #[test]
    fn one_inline_subscription_needs_no_heap() {
        let mut conns = conns(1);
        let mut index = TopicIndex::default();
        index.subscribe(&mut conns, 0, "user.42", 64);
        assert!(conns[0].subs.more.is_none());
        index.subscribe(&mut conns, 0, "user.43", 64);
        assert!(conns[0].subs.more.is_some());
        index.unsubscribe(&mut conns, 0, "user.42");
        assert!(
            conns[0].subs.more.is_none(),
            "the heap part goes when one is left"
        );
        assert_eq!(conns[0].subs.len(), 1);
        index.check(&conns);
    }

    #[test]
    fn random_operations_keep_every_cross_reference() {
        // A deterministic pseudo-random walk over 50 connections and 8 topics.
        let mut conns = conns(50);
        let mut index = TopicIndex::default();
        let mut state: u64 = 0x9e3779b97f4a7c15;
        for step in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let key = (state % 50) as usize;
            let topic = format!("t{}", (state >> 8) % 8);
            match (state >> 16) % 5 {
                0 | 1 => {
                    index.subscribe(&mut conns, key, &topic, 5);
                }
                2 | 3 => {
                    index.unsubscribe(&mut conns, key, &topic);
                }
                _ => index.unsubscribe_all(&mut conns, key),
            }
            if step % 997 == 0 {
                index.check(&conns);
                assert_eq!(index.routes_counted(), index.topics());
            }
        }
        index.check(&conns);
        // A subscribe on its way counts beside the index's own count.
        index.await_answer("t1");
        assert_eq!(index.routes_counted(), index.topics() + 1);
        index.answer_handled("t1");
        for key in 0..50 {
            assert!(conns[key].subs.len() <= 5);
            index.unsubscribe_all(&mut conns, key);
        }
        assert_eq!((index.topics(), index.subscriptions()), (0, 0));
        assert_eq!(index.routes_counted(), 0, "every route counted in went out");
    }
}
