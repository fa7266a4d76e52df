//! A shard's route filter: which topics may have subscribers on the shard, as
//! the broker sees it, so an event is handed only to shards that may deliver it.
//!
//! With a topic per user, most events have one subscriber on one shard; staging
//! every event into every shard's inbox cost each notification 2-3 us per
//! shard with nothing to do (measured at six shards). The filter is a counting
//! filter over topic hashes ([`topic_hash`], keyed once per process): one byte
//! per bucket ([`ROUTE_BUCKETS`]), counting the topics of the shard's index and
//! the subscribes the shard has forwarded to the broker and not yet handled the
//! answer of. Only the shard thread writes its filter ([`RouteWriter`], one per
//! filter, not `Clone`); the broker reads it ([`RouteFilter::may_hold`]).
//!
//! Exactness (no event lost): a forwarded subscribe is counted *before* it is
//! sent, and the broker answers it under the topic table's lock, the lock it
//! publishes under; every event numbered after the answer is published under
//! that lock later, after the count (the channel orders the count before the
//! broker's reading of the request), so it reaches the shard. The count stays
//! up until the answer has been handled, by which time the topic is in the
//! index (counted on its own) or the subscribe came to nothing. A subscribe
//! made directly on the shard (`?topics=` at the upgrade) is counted when it is
//! made; it promises no event published before. A false positive costs what
//! every shard cost before the filter: a lookup that finds nobody.
//!
//! A bucket's count past 255 (many topics in it, or a reconnect storm's
//! subscribes to one topic in flight at once) is kept by the writer in a map of
//! its own, the shared byte staying at 255 until the count is back under it:
//! exact, and the map is empty but for such moments.
//!
//! Layout: the filters of a process's shards share one array, bucket by
//! bucket, each bucket's counts for every shard side by side. The broker reads
//! one topic's bucket for every shard on every publish: adjacent bytes, one
//! cache line (two where they straddle one), where a filter of its own per
//! shard cost a miss per shard once the filters outgrew the cache: at 64
//! shards (8 MiB of counts) about a quarter of the broker thread's time per
//! event, at six (768 KiB) nothing measurable (BENCHMARKS.md 2026-12-02).
//! Shards write only on subscribes and unsubscribes, each its own bytes of the
//! shared lines.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, LazyLock};

use crate::limits::ROUTE_BUCKETS;

/// The hash of a topic name every shard and the broker agree on: keyed once
/// per process (names come from clients), SipHash.
pub fn topic_hash(name: &str) -> u64 {
    static HASHER: LazyLock<RandomState> = LazyLock::new(RandomState::new);
    HASHER.hash_one(name)
}

/// A topic name with its [`topic_hash`], hashed once and used by both of the
/// broker's tables that find topics by it (its topic table, the route
/// filters); the deliveries carry the hash on, and each shard finds the topic
/// in its own index by it (`Command::deliver`).
#[derive(Clone, Copy, Debug)]
pub struct HashedTopic<'a> {
    name: &'a str,
    hash: u64,
}

impl<'a> HashedTopic<'a> {
    pub fn new(name: &'a str) -> Self {
        HashedTopic {
            name,
            hash: topic_hash(name),
        }
    }

    pub fn name(&self) -> &'a str {
        self.name
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }
}

/// A full bucket: the rest of its count is in [`RouteWriter::over`].
const FULL: u8 = u8::MAX;

/// The bucket of a hash. The index's hash table uses the low bits (bucket) and
/// the top seven (tag) of the same hash; the filter takes bits above 20.
fn bucket(hash: u64) -> usize {
    (hash >> 20) as usize & (ROUTE_BUCKETS - 1)
}

/// What the broker reads: whether a topic may have subscribers on the shard.
pub struct RouteFilter {
    /// Every filter's counts of the process, `shards` per bucket (module doc).
    counts: Arc<[AtomicU8]>,
    shards: usize,
    /// This filter's place among them.
    shard: usize,
    /// Every topic may (a sender no shard drains, or a filter nobody writes).
    everything: bool,
}

impl RouteFilter {
    /// The filters of `shards` shards (their counts interleaved), each with its
    /// only writer.
    pub fn with_writers(shards: usize) -> Vec<(Arc<RouteFilter>, RouteWriter)> {
        assert!(shards > 0, "at least one shard");
        let counts: Arc<[AtomicU8]> = (0..ROUTE_BUCKETS * shards)
            .map(|_| AtomicU8::new(0))
            .collect();
        (0..shards)
            .map(|shard| {
                let filter = Arc::new(RouteFilter {
                    counts: counts.clone(),
                    shards,
                    shard,
                    everything: false,
                });
                let writer = RouteWriter {
                    filter: filter.clone(),
                    over: HashMap::new(),
                };
                (filter, writer)
            })
            .collect()
    }

    /// A filter of its own and its only writer.
    pub fn with_writer() -> (Arc<RouteFilter>, RouteWriter) {
        Self::with_writers(1).pop().expect("one filter")
    }

    /// A filter that lets every topic through (senders in tests).
    pub fn everything() -> Arc<RouteFilter> {
        Arc::new(RouteFilter {
            counts: Arc::new([]),
            shards: 1,
            shard: 0,
            everything: true,
        })
    }

    /// This filter's count of `bucket`.
    fn count(&self, bucket: usize) -> &AtomicU8 {
        &self.counts[bucket * self.shards + self.shard]
    }

    /// Whether the topic of `hash` may have subscribers on the shard (false:
    /// it has none, nor a subscribe on its way; see the module doc).
    pub fn may_hold(&self, hash: u64) -> bool {
        // Acquire: pairs with the shard's release of a count, though the
        // ordering that matters runs through the upstream channel and the
        // topic table's lock (module doc).
        self.everything || self.count(bucket(hash)).load(Ordering::Acquire) > 0
    }
}

/// The shard's side of its filter: the only writer, so counting needs no
/// read-modify-write.
pub struct RouteWriter {
    filter: Arc<RouteFilter>,
    /// Counts past [`FULL`], by bucket (none at 0).
    over: HashMap<usize, u32>,
}

impl Default for RouteWriter {
    /// A writer of a filter nobody reads (an index in tests).
    fn default() -> Self {
        RouteFilter::with_writer().1
    }
}

impl RouteWriter {
    /// Counts a topic (of `hash`) in.
    pub fn add(&mut self, hash: u64) {
        let at = bucket(hash);
        let count = self.filter.count(at);
        let now = count.load(Ordering::Relaxed);
        if now == FULL {
            *self.over.entry(at).or_insert(0) += 1;
        } else {
            count.store(now + 1, Ordering::Release);
        }
    }

    /// Counts a topic counted in before out again.
    pub fn remove(&mut self, hash: u64) {
        let at = bucket(hash);
        if let Some(over) = self.over.get_mut(&at) {
            *over -= 1;
            if *over == 0 {
                self.over.remove(&at);
            }
            return;
        }
        let count = self.filter.count(at);
        let now = count.load(Ordering::Relaxed);
        assert!(now > 0, "a route counted out more often than in");
        count.store(now - 1, Ordering::Release);
    }

    /// Whether the filter lets the topic of `hash` through (tests).
    #[cfg(test)]
    pub(crate) fn may_hold(&self, hash: u64) -> bool {
        self.filter.may_hold(hash)
    }

    /// Every bucket's count, summed (tests).
    #[cfg(test)]
    pub(crate) fn counted(&self) -> usize {
        let counts = (0..ROUTE_BUCKETS).map(|b| self.filter.count(b));
        let shared: usize = counts.map(|c| usize::from(c.load(Ordering::Relaxed))).sum();
        shared + self.over.values().map(|&n| n as usize).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_in_and_out_also_past_a_full_bucket() {
        let (filter, mut writer) = RouteFilter::with_writer();
        let a = topic_hash("a");
        assert_eq!(a, topic_hash("a"), "one key per process");
        assert!(!filter.may_hold(a));
        writer.add(a);
        writer.add(a);
        assert!(filter.may_hold(a));
        writer.remove(a);
        assert!(filter.may_hold(a), "counted in twice, out once");
        writer.remove(a);
        assert!(!filter.may_hold(a));
        for _ in 0..1000 {
            writer.add(a);
        }
        for _ in 0..999 {
            writer.remove(a);
        }
        assert!(filter.may_hold(a), "one count left");
        writer.remove(a);
        assert!(!filter.may_hold(a), "counted out as often as in");
        assert!(writer.over.is_empty());
    }

    #[test]
    #[should_panic(expected = "counted out more often than in")]
    fn counting_out_what_was_not_counted_in_is_a_bug() {
        let (_, mut writer) = RouteFilter::with_writer();
        writer.remove(topic_hash("a"));
    }

    #[test]
    fn shards_sharing_the_counts_count_apart_side_by_side() {
        let filters = RouteFilter::with_writers(3);
        let (mut writers, filters): (Vec<_>, Vec<_>) = filters
            .into_iter()
            .map(|(filter, writer)| (writer, filter))
            .unzip();
        let a = topic_hash("a");
        writers[1].add(a);
        let holds: Vec<bool> = filters.iter().map(|f| f.may_hold(a)).collect();
        assert_eq!(holds, [false, true, false], "only shard 1 counted it");
        for _ in 0..300 {
            writers[2].add(a);
        }
        assert_eq!(
            writers.iter().map(RouteWriter::counted).collect::<Vec<_>>(),
            [0, 1, 300]
        );
        for _ in 0..300 {
            writers[2].remove(a);
        }
        writers[1].remove(a);
        assert!(filters.iter().all(|f| !f.may_hold(a)));
        // One bucket's counts for every shard are adjacent bytes: one line read.
        let at = bucket(a);
        let addresses: Vec<usize> = filters
            .iter()
            .map(|f| f.count(at) as *const _ as usize)
            .collect();
        assert_eq!(
            addresses,
            [addresses[0], addresses[0] + 1, addresses[0] + 2]
        );
    }

    #[test]
    fn other_topics_mostly_miss() {
        let (filter, mut writer) = RouteFilter::with_writer();
        for i in 0..1000 {
            writer.add(topic_hash(&format!("user.{i}")));
        }
        let hits = (1000..11_000)
            .filter(|i| filter.may_hold(topic_hash(&format!("user.{i}"))))
            .count();
        // 1,000 topics in 131,072 buckets: about 0.8% of others hit.
        assert!(hits < 300, "{hits} of 10,000 false positives");
        assert!(RouteFilter::everything().may_hold(topic_hash("x")));
    }
}
