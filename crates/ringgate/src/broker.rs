//! The embedded broker: the one place that numbers events, keeps their history
//! and answers subscribes.
//!
//! A publish (from the HTTP API or from a client allowed to publish) goes to
//! the shards that may hold subscribers of its topic (their route filters, read
//! under the topic table's lock: `ringgate_shard::RouteFilter`), and is
//! all-or-nothing: a place is reserved in each of those shards' inboxes first,
//! and only if each has one does the event get its topic's next `seq`, its
//! frame (encoded once, held in the history as is), and the pushes. A full
//! inbox among them refuses the event with no `seq` used, so a retry cannot
//! duplicate it for anyone; or, for the control plane's publishes
//! ([`Broker::publish_until_full`]), stops there before it, and the caller
//! waits for room (`bus.rs`, `--publish-wait`) and goes on where it stopped,
//! refusing only what still finds no room at its deadline. An event nobody
//! subscribes to is numbered and kept in the history, handed to no shard. The topic table's lock is held from the
//! `seq` to the last push, so events of one topic reach every inbox in `seq`
//! order whichever thread publishes.
//!
//! A subscribe is answered under the same lock, into the asking shard's inbox:
//! every event numbered before the answer is in it (its `seq`, and the replay
//! when recovering), every later event reaches the shard after it. That is what
//! makes a recovery exact (no gap, no duplicate) while publishing goes on.
//! During a drain every publish is refused: nobody is left to receive it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringgate_shard::{
    clock_ns, event_frame, valid_topic, Command, EventData, HashedTopic, ShardSender,
    SubscribeAnswer, SubscribeRequest,
};

use crate::topic_table::{Epoch, HistoryLimits, TooManyTopics, TopicTable};

/// The shards each event of a chunk goes to: those whose route filter says
/// they may hold its topic (a subscriber, or a subscribe on its way), read
/// once per event under the topic table's lock. Every event's shard indexes
/// in one array, each event's ending at `ends[event]`.
struct Routes {
    targets: Vec<usize>,
    ends: Vec<usize>,
}

impl Routes {
    fn new(shards: &[ShardSender], topics: &[Option<HashedTopic<'_>>]) -> Self {
        let mut targets = Vec::new();
        let mut ends = Vec::with_capacity(topics.len());
        for topic in topics {
            if let Some(topic) = topic {
                let hash = topic.hash();
                targets.extend((0..shards.len()).filter(|&s| shards[s].may_hold(hash)));
            }
            ends.push(targets.len());
        }
        Routes { targets, ends }
    }

    /// The shards event `i` goes to, in order.
    fn of(&self, i: usize) -> &[usize] {
        let start = i.checked_sub(1).map_or(0, |before| self.ends[before]);
        &self.targets[start..self.ends[i]]
    }

    /// How many events of the chunk go to each of `shards` shards.
    fn wanted(&self, shards: usize) -> Vec<usize> {
        let mut wanted = vec![0; shards];
        for &s in &self.targets {
            wanted[s] += 1;
        }
        wanted
    }
}

/// A publish that reached every shard that may hold its topic's subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    pub epoch: Epoch,
    /// Shards it was handed to: those that may hold subscribers of its topic.
    pub shards: usize,
    /// Fleet members that received it (Redis' count), in a fleet.
    pub hosts: Option<u64>,
}

/// Why a publish was refused. Nothing was delivered to anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    BadTopic,
    /// Some shards' inboxes were full: the event went nowhere, no `seq` was used.
    Busy {
        full: usize,
        shards: usize,
    },
    /// The server is shutting down: every subscriber is being closed.
    Draining,
    /// Every known topic has subscribers and the table is full.
    TooManyTopics,
    /// A fleet member's Redis is unreachable or failed (the reason): the event
    /// was not published (or, if the answer was lost, maybe was).
    BrokerDown(String),
}

impl PublishError {
    pub fn message(&self) -> String {
        match self {
            Self::BadTopic => "invalid topic name: 1-128 bytes of A-Z a-z 0-9 _ . : / -".into(),
            Self::Busy { full, shards } => format!(
                "{full} of {shards} shard inboxes are full: the event was not delivered to anyone; retry later"
            ),
            Self::Draining => {
                "the server is shutting down: the event was not delivered to anyone".into()
            }
            Self::BrokerDown(why) => format!("{why}: the event was not published"),
            Self::TooManyTopics => format!(
                "too many topics in use (at most {}); the event was not delivered to anyone",
                crate::topic_table::TOPICS_MAX
            ),
        }
    }
}

/// What the broker holds, for `/metrics` and `/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerFigures {
    /// Topics with a `seq` and epoch.
    pub topics: usize,
    /// Topics forgotten (idle for `--topic-idle-ttl`, or to make room).
    pub topics_forgotten: u64,
    /// Events held in histories, and their bytes (frames and bookkeeping).
    pub history_events: usize,
    pub history_bytes: usize,
    /// Events dropped to stay within `--history-memory`.
    pub history_evicted: u64,
}

/// What a publish does with an event that finds an inbox full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WhenFull {
    /// Refuses it ([`PublishError::Busy`]) and goes on with the next.
    Refuse,
    /// Stops before it, for the caller to wait for room.
    Stop,
}

/// Events published under one lock of the topic table and committed to the
/// inboxes together: bounds how long a subscribe waits behind a batch, and is
/// the shard's whole turn of events (`INBOX_TURN_COMMANDS_MAX`, 64).
pub const PUBLISH_CHUNK_EVENTS: usize = 64;

pub struct Broker {
    shards: Vec<ShardSender>,
    topics: Mutex<TopicTable>,
    draining: AtomicBool,
    /// How long a control-plane publish waits for room in a full inbox
    /// before refusing what is left (`--publish-wait`; `bus.rs`).
    pub publish_wait: Duration,
    pub published: AtomicU64,
    pub rejected: AtomicU64,
    /// Control-plane publishes that found an inbox full and waited for room.
    pub waited: AtomicU64,
    /// The queue of control-plane publishes waiting for room: the holder
    /// looks for room, the rest wait their turn in arrival order (`bus.rs`).
    pub wait_turn: tokio::sync::Mutex<()>,
}

impl Broker {
    pub fn new(shards: Vec<ShardSender>, limits: HistoryLimits) -> Self {
        Self::with_table(shards, TopicTable::new(limits))
    }

    fn with_table(shards: Vec<ShardSender>, table: TopicTable) -> Self {
        Broker {
            shards,
            topics: Mutex::new(table),
            draining: AtomicBool::new(false),
            publish_wait: Duration::ZERO,
            published: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            wait_turn: tokio::sync::Mutex::new(()),
        }
    }

    /// Lets control-plane publishes wait this long for room in a full inbox.
    pub fn with_publish_wait(mut self, wait: Duration) -> Self {
        self.publish_wait = wait;
        self
    }

    /// Refuses every publish from now on (the shards are being drained). Set
    /// under the topic table's lock, which a publish holds from reading the flag
    /// to its last commit: once this returns, every event answered as accepted
    /// is in its inboxes, so a shutdown requested next finds it there.
    pub fn start_draining(&self) {
        let _topics = self.lock();
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether publishes are refused because the server is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TopicTable> {
        // Every update of the table leaves it consistent before it can panic.
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The topic table's figures now.
    pub fn figures(&self) -> BrokerFigures {
        let t = self.lock();
        BrokerFigures {
            topics: t.len(),
            topics_forgotten: t.forgotten,
            history_events: t.history_events(),
            history_bytes: t.history_bytes(),
            history_evicted: t.evicted,
        }
    }

    /// Numbers, encodes once, and hands the event to every shard that may hold
    /// its topic's subscribers, or to none.
    pub fn publish(&self, topic: &str, data: EventData<'_>) -> Result<Published, PublishError> {
        let mut answers = self.publish_many(&[(topic, data)]);
        answers.pop().expect("one answer per event")
    }

    /// Publishes events in order, each to all its shards or to none; one answer
    /// per event, in the same order. The events go in chunks of
    /// [`PUBLISH_CHUNK_EVENTS`]: one lock of the topic table, one reservation
    /// and one doorbell per shard for the chunk, not per event. An event that
    /// finds an inbox full is refused at once ([`PublishError::Busy`]).
    pub fn publish_many(
        &self,
        events: &[(&str, EventData<'_>)],
    ) -> Vec<Result<Published, PublishError>> {
        let mut answers = Vec::with_capacity(events.len());
        for chunk in events.chunks(PUBLISH_CHUNK_EVENTS) {
            let stopped = self.publish_chunk(chunk, &mut answers, WhenFull::Refuse);
            assert!(stopped.is_none(), "refusing never stops");
        }
        answers
    }

    /// As [`Broker::publish_many`], but stops at the first event that finds an
    /// inbox full instead of refusing it: `answers` gets one answer per event
    /// before it, and the result names the full inboxes' shards (`None`: every
    /// event was answered). The caller waits for room and goes on from there
    /// (`bus.rs`): the publisher is slowed to what the shards take.
    pub fn publish_until_full(
        &self,
        events: &[(&str, EventData<'_>)],
        answers: &mut Vec<Result<Published, PublishError>>,
    ) -> Option<Vec<usize>> {
        for chunk in events.chunks(PUBLISH_CHUNK_EVENTS) {
            if let Some(full) = self.publish_chunk(chunk, answers, WhenFull::Stop) {
                return Some(full);
            }
        }
        None
    }

    /// Whether each of `shards` has room for half its inbox's capacity: what a
    /// publish stopped by a full inbox waits for, so that it goes on with many
    /// events at once, not one chunk per look.
    pub fn has_room(&self, shards: &[usize]) -> bool {
        shards.iter().all(|&s| {
            let shard = &self.shards[s];
            shard.room() >= shard.capacity().div_ceil(2)
        })
    }

    /// Publishes `chunk` under one lock, appending an answer per event to
    /// `answers`. With [`WhenFull::Stop`], the first event that finds an inbox
    /// full ends it there, unanswered, and the full shards are returned.
    fn publish_chunk(
        &self,
        chunk: &[(&str, EventData<'_>)],
        answers: &mut Vec<Result<Published, PublishError>>,
        when_full: WhenFull,
    ) -> Option<Vec<usize>> {
        // Hashed before the lock; `None` for a bad topic.
        let hashed: Vec<Option<HashedTopic<'_>>> = chunk
            .iter()
            .map(|(topic, _)| valid_topic(topic).then(|| HashedTopic::new(topic)))
            .collect();
        // Held until the last commit: one topic's events enter every inbox in
        // order, and the route filters are read where subscribes are answered.
        let mut topics = self.lock();
        let draining = self.draining.load(Ordering::SeqCst);
        // Which shards each event goes to: those that may hold its topic.
        let routes = Routes::new(&self.shards, &hashed);
        let mut reservations: Vec<_> = if draining {
            Vec::new()
        } else {
            self.shards
                .iter()
                .zip(routes.wanted(self.shards.len()))
                .map(|(s, wanted)| s.reserve_up_to(wanted))
                .collect()
        };
        let now = Instant::now();
        let published_ns = clock_ns();
        let (mut accepted, mut refused) = (0, 0);
        let mut stopped = None;
        for (i, &(topic, data)) in chunk.iter().enumerate() {
            let to = routes.of(i);
            // Draining: nothing was reserved, and nothing goes anywhere.
            let full: Vec<usize> = if draining || hashed[i].is_none() {
                Vec::new()
            } else {
                to.iter()
                    .copied()
                    .filter(|&s| reservations[s].places() == 0)
                    .collect()
            };
            let answer = match hashed[i] {
                None => Err(PublishError::BadTopic),
                Some(_) if draining => Err(PublishError::Draining),
                Some(_) if !full.is_empty() && when_full == WhenFull::Stop => {
                    stopped = Some(full);
                    break;
                }
                // The event needs a place in every inbox it goes to: none was used for it.
                Some(_) if !full.is_empty() => Err(PublishError::Busy {
                    full: full.len(),
                    shards: to.len(),
                }),
                Some(hashed) => topics
                    .publish(hashed, now, |seq| event_frame(topic, seq, data))
                    .map_err(|TooManyTopics| PublishError::TooManyTopics)
                    .map(|numbered| {
                        for &s in to {
                            reservations[s].stage(Command::deliver(
                                hashed,
                                &numbered.name,
                                numbered.seq,
                                numbered.frame.clone(),
                                published_ns,
                            ));
                        }
                        Published {
                            seq: numbered.seq,
                            epoch: numbered.epoch,
                            shards: to.len(),
                            hosts: None,
                        }
                    }),
            };
            match answer {
                Ok(_) => accepted += 1,
                Err(_) => refused += 1,
            }
            answers.push(answer);
        }
        for reservation in reservations {
            reservation.commit();
        }
        self.published.fetch_add(accepted, Ordering::Relaxed);
        self.rejected.fetch_add(refused, Ordering::Relaxed);
        stopped
    }

    /// Answers a subscribe into the asking shard's inbox: where the topic
    /// stands, and, recovering, the events missed (see the module doc).
    pub fn subscribe(&self, request: SubscribeRequest) {
        let mut topics = self.lock();
        let standing = topics.subscribe(&request.topic, request.since.as_ref(), Instant::now());
        let answer = match standing {
            Ok(s) => SubscribeAnswer {
                key: request.key,
                generation: request.generation,
                topic: s.name,
                seq: s.seq,
                epoch: Arc::from(&*s.epoch),
                recovery: s.recovery,
                replay: s.replay,
                refused: None,
            },
            Err(TooManyTopics) => SubscribeAnswer {
                key: request.key,
                generation: request.generation,
                topic: request.topic,
                seq: 0,
                epoch: Arc::from(""),
                recovery: ringgate_shard::Recovery::NotAsked,
                replay: Vec::new(),
                refused: Some("too many topics in use, try again later"),
            },
        };
        self.shards[request.shard].answer(Box::new(answer));
    }

    /// A shard announced `topic` (its subscribers hold its numbering), or the last
    /// subscriber of a topic it announced left.
    pub fn presence(&self, topic: &str, present: bool) {
        self.lock().presence(topic, present, Instant::now());
    }

    /// Expires history and forgets idle topics; about once a second.
    pub fn maintain(&self) {
        self.lock().maintain(Instant::now());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ringgate_shard::topic_hash;
    use std::time::Duration;

    /// History limits for tests of the broker and what drives it.
    pub(crate) const LIMITS: HistoryLimits = HistoryLimits {
        size: 100,
        ttl: Duration::from_secs(300),
        memory: 1 << 20,
        topic_idle_ttl: Duration::from_secs(600),
    };

    fn broker(shards: Vec<ShardSender>) -> Broker {
        Broker::new(shards, LIMITS)
    }

    #[test]
    fn seq_rises_by_one_per_topic_and_bad_topics_are_refused() {
        let broker = broker(Vec::new());
        let data = EventData::Json("1");
        assert_eq!(broker.publish("a", data).unwrap().seq, 1);
        assert_eq!(broker.publish("a", data).unwrap().seq, 2);
        assert_eq!(broker.publish("b", data).unwrap().seq, 1);
        let a = broker.publish("a", data).unwrap();
        assert_eq!(a.seq, 3);
        assert_eq!(
            a.epoch,
            broker.publish("a", data).unwrap().epoch,
            "one epoch per topic"
        );
        assert_eq!(
            broker.publish("bad topic", data),
            Err(PublishError::BadTopic)
        );
        assert_eq!(broker.published.load(Ordering::Relaxed), 5);
        assert_eq!(broker.rejected.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_full_inbox_anywhere_delivers_to_nobody_and_uses_no_seq() {
        let roomy = ShardSender::detached(0, 100).unwrap();
        let tight = ShardSender::detached(1, 2).unwrap();
        let broker = broker(vec![roomy, tight]);
        let data = EventData::Text("x");
        assert_eq!(broker.publish("t", data).unwrap().seq, 1);
        assert_eq!(broker.publish("t", data).unwrap().seq, 2);
        // The second shard's inbox is full: nobody gets the event, and the
        // roomy shard's inbox did not take it either.
        let busy = broker.publish("t", data).unwrap_err();
        assert_eq!(busy, PublishError::Busy { full: 1, shards: 2 });
        assert!(
            busy.message().contains("not delivered to anyone"),
            "{}",
            busy.message()
        );
        let roomy = &broker.shards[0];
        let mut held = 0;
        while roomy.reserve().map(std::mem::forget).is_some() {
            held += 1;
        }
        assert_eq!(held, 100 - 2, "the refused event holds no place");
        assert_eq!(
            broker.figures().history_events,
            2,
            "nor a place in the history"
        );
    }

    #[test]
    fn publishing_until_full_stops_before_the_first_event_with_no_room() {
        let roomy = ShardSender::detached(0, 100).unwrap();
        let tight = ShardSender::detached(1, 4).unwrap();
        let broker = broker(vec![roomy.clone(), tight.clone()]);
        let events = vec![("t", EventData::Json("1")); 7];
        let mut answers = Vec::new();
        let full = broker.publish_until_full(&events, &mut answers);
        assert_eq!(full, Some(vec![1]), "the tight shard is full");
        let seqs: Vec<u64> = answers.iter().map(|a| a.as_ref().unwrap().seq).collect();
        assert_eq!(
            seqs,
            [1, 2, 3, 4],
            "the rest are not answered, nor numbered"
        );
        assert_eq!(broker.rejected.load(Ordering::Relaxed), 0);
        assert_eq!(roomy.take_all_for_tests().len(), 4);
        assert!(broker.has_room(&[0]));
        assert!(!broker.has_room(&[1]));
        assert_eq!(tight.take_all_for_tests().len(), 4);
        assert!(broker.has_room(&[0, 1]), "room for half of each inbox");
        assert_eq!(broker.publish_until_full(&events[4..], &mut answers), None);
        let seqs: Vec<u64> = answers.iter().map(|a| a.as_ref().unwrap().seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6, 7], "it went on where it stopped");
    }

    #[test]
    fn a_batch_takes_what_every_inbox_has_room_for_in_order() {
        let roomy = ShardSender::detached(0, 1000).unwrap();
        let tight = ShardSender::detached(1, 3).unwrap();
        let broker = broker(vec![roomy.clone(), tight.clone()]);
        let data = EventData::Json("1");
        let events = [
            ("a", data),
            ("bad topic", data),
            ("a", data),
            ("b", data),
            ("a", data),
            ("c", data),
        ];
        let answers = broker.publish_many(&events);
        let seqs: Vec<Result<u64, PublishError>> =
            answers.into_iter().map(|a| a.map(|p| p.seq)).collect();
        assert_eq!(
            seqs,
            [
                Ok(1),
                Err(PublishError::BadTopic),
                Ok(2),
                Ok(1),
                Err(PublishError::Busy { full: 1, shards: 2 }),
                Err(PublishError::Busy { full: 1, shards: 2 }),
            ],
            "the events past the tight inbox's room are refused, with no seq used"
        );
        for shard in [&roomy, &tight] {
            let delivered: Vec<(String, u64)> = take_all(shard)
                .into_iter()
                .map(|c| match c {
                    Command::Deliver { topic, seq, .. } => (topic.to_string(), seq),
                    Command::Subscribed(_) => unreachable!(),
                })
                .collect();
            assert_eq!(
                delivered,
                [("a".into(), 1), ("a".into(), 2), ("b".into(), 1)]
            );
        }
        assert_eq!(
            broker.publish("a", data).unwrap().seq,
            3,
            "the refused took no seq"
        );
        assert_eq!(broker.published.load(Ordering::Relaxed), 4);
        assert_eq!(broker.rejected.load(Ordering::Relaxed), 3);
        // Nothing is held back: the roomy inbox gave its unused places back.
        let mut free = 0;
        while roomy.reserve().map(std::mem::forget).is_some() {
            free += 1;
        }
        assert_eq!(free, 1000 - 1);
    }

    #[test]
    fn a_batch_longer_than_a_chunk_keeps_its_order() {
        let inbox = ShardSender::detached(0, 10_000).unwrap();
        let broker = broker(vec![inbox.clone()]);
        let names: Vec<String> = (0..5 * PUBLISH_CHUNK_EVENTS / 2)
            .map(|i| format!("t{}", i % 7))
            .collect();
        let events: Vec<(&str, EventData<'_>)> = names
            .iter()
            .map(|n| (n.as_str(), EventData::Json("1")))
            .collect();
        assert!(broker.publish_many(&events).iter().all(Result::is_ok));
        let mut next = std::collections::HashMap::new();
        for c in take_all(&inbox) {
            let Command::Deliver { topic, seq, .. } = c else {
                unreachable!()
            };
            let expected = next.entry(topic.to_string()).or_insert(1);
            assert_eq!(seq, *expected, "{topic}");
            *expected += 1;
        }
        assert_eq!(
            next.values().map(|n| n - 1).sum::<u64>(),
            events.len() as u64
        );
    }

    #[test]
    fn an_event_goes_only_to_shards_that_may_hold_its_topic() {
        let (a, mut routes_a) = ShardSender::detached_routed(0, 2).unwrap();
        let (b, mut routes_b) = ShardSender::detached_routed(1, 2).unwrap();
        let broker = broker(vec![a.clone(), b.clone()]);
        let data = EventData::Json("1");
        // Nobody holds it: numbered and kept, handed to no shard.
        let nobody = broker.publish("t", data).unwrap();
        assert_eq!((nobody.seq, nobody.shards), (1, 0));
        routes_a.add(topic_hash("t"));
        let one = broker.publish("t", data).unwrap();
        assert_eq!((one.seq, one.shards), (2, 1));
        routes_b.add(topic_hash("t"));
        assert_eq!(broker.publish("t", data).unwrap().shards, 2);
        // Shard a's inbox is full (two places) and holds the topic no more:
        // it does not stop the event. Then shard b's is full too.
        routes_a.remove(topic_hash("t"));
        assert_eq!(broker.publish("t", data).unwrap().shards, 1);
        let busy = broker.publish("t", data).unwrap_err();
        assert_eq!(busy, PublishError::Busy { full: 1, shards: 1 });
        assert_eq!(broker.publish("other", data).unwrap().shards, 0);
        let seqs = |shard: &ShardSender| -> Vec<u64> {
            take_all(shard)
                .into_iter()
                .map(|c| match c {
                    Command::Deliver { seq, .. } => seq,
                    Command::Subscribed(_) => unreachable!(),
                })
                .collect()
        };
        assert_eq!(seqs(&a), [2, 3]);
        assert_eq!(seqs(&b), [3, 4]);
        // With room again, the next event takes the seq the refused one did not use.
        assert_eq!(broker.publish("t", data).unwrap().seq, 5);
        assert_eq!(seqs(&b), [5]);
    }

    #[test]
    fn a_batch_reserves_per_shard_only_what_goes_there() {
        let (a, mut routes_a) = ShardSender::detached_routed(0, 3).unwrap();
        let (b, mut routes_b) = ShardSender::detached_routed(1, 3).unwrap();
        let broker = broker(vec![a.clone(), b.clone()]);
        routes_a.add(topic_hash("for.a"));
        routes_b.add(topic_hash("for.b"));
        let data = EventData::Json("1");
        let events: Vec<_> = (0..3)
            .flat_map(|_| [("for.a", data), ("for.b", data)])
            .collect();
        // Six events, three places per inbox: each shard takes its three.
        let answers = broker.publish_many(&events);
        assert!(answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|p| p.shards == 1)));
        assert_eq!(take_all(&a).len(), 3);
        assert_eq!(take_all(&b).len(), 3);
    }

    #[test]
    fn draining_refuses_every_publish() {
        let broker = broker(vec![ShardSender::detached(0, 10).unwrap()]);
        broker.start_draining();
        assert_eq!(
            broker.publish("t", EventData::Text("x")),
            Err(PublishError::Draining)
        );
    }

    fn take_all(shard: &ShardSender) -> Vec<Command> {
        shard.take_all_for_tests()
    }

    #[test]
    fn a_subscribe_is_answered_in_order_with_the_events() {
        let shard = ShardSender::detached(0, 1000).unwrap();
        let broker = broker(vec![shard.clone()]);
        let data = EventData::Text("x");
        let epoch = broker.publish("t", data).unwrap().epoch;
        broker.publish("t", data).unwrap();
        broker.subscribe(SubscribeRequest {
            shard: 0,
            key: 7,
            generation: 3,
            topic: Arc::from("t"),
            since: Some(ringgate_shard::Since {
                seq: 0,
                epoch: epoch.to_string(),
            }),
        });
        broker.publish("t", data).unwrap();
        let commands = take_all(&shard);
        let kinds: Vec<String> = commands
            .iter()
            .map(|c| match c {
                Command::Deliver { seq, .. } => format!("event {seq}"),
                Command::Subscribed(a) => {
                    format!("answer at {}: {} replayed", a.seq, a.replay.len())
                }
            })
            .collect();
        assert_eq!(
            kinds,
            ["event 1", "event 2", "answer at 2: 2 replayed", "event 3"],
            "the answer sits between the events it covers and the ones after"
        );
    }

    #[test]
    fn concurrent_publishers_keep_each_topics_order_in_every_inbox() {
        let inbox = ShardSender::detached(0, 100_000).unwrap();
        let broker = Arc::new(broker(vec![inbox.clone()]));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let broker = broker.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        broker.publish("t", EventData::Text("x")).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let seqs: Vec<u64> = take_all(&inbox)
            .into_iter()
            .map(|c| match c {
                Command::Deliver { seq, frame, .. } => {
                    let v: serde_json::Value = serde_json::from_slice(&frame[2..]).unwrap();
                    assert_eq!(v["seq"], seq, "the frame carries the seq it is sent with");
                    seq
                }
                Command::Subscribed(_) => unreachable!("nobody subscribed"),
            })
            .collect();
        assert_eq!(seqs, (1..=8000).collect::<Vec<u64>>());
    }
}
