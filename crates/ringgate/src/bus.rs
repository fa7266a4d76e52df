//! Which broker this host publishes and subscribes through: the embedded one
//! (one host, the default) or a fleet's Redis (`--broker`). The control plane
//! talks to this, never to either directly.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ringgate_shard::{EventData, Upstream};
use tokio::sync::mpsc;

use crate::broker::{Broker, PublishError, Published};
use crate::fleet::Fleet;

pub enum Bus {
    Embedded(Arc<Broker>),
    Fleet(Arc<Fleet>),
}

impl Bus {
    /// Starts serving the shards' messages, on the current (control) runtime.
    pub fn start(&self, upstream: mpsc::Receiver<Upstream>) {
        match self {
            Bus::Embedded(broker) => {
                tokio::spawn(serve_upstream(upstream, broker.clone()));
                tokio::spawn(maintain(broker.clone()));
            }
            Bus::Fleet(fleet) => fleet.spawn(upstream),
        }
    }

    pub async fn publish(
        &self,
        topic: &str,
        data: EventData<'_>,
    ) -> Result<Published, PublishError> {
        match self {
            Bus::Embedded(broker) => {
                let mut answers = publish_waiting(broker, &[(topic, data)]).await;
                answers.pop().expect("one answer per event")
            }
            Bus::Fleet(fleet) => fleet.publish(topic, data).await,
        }
    }

    /// Publishes events in order; one answer per event, in the same order.
    pub async fn publish_many(
        &self,
        events: &[(&str, EventData<'_>)],
    ) -> Vec<Result<Published, PublishError>> {
        match self {
            Bus::Embedded(broker) => publish_waiting(broker, events).await,
            Bus::Fleet(fleet) => fleet.publish_many(events).await,
        }
    }

    /// Refuses every publish from now on (the shards are being drained).
    pub fn start_draining(&self) {
        match self {
            Bus::Embedded(broker) => broker.start_draining(),
            Bus::Fleet(fleet) => fleet.start_draining(),
        }
    }

    pub fn is_draining(&self) -> bool {
        match self {
            Bus::Embedded(broker) => broker.is_draining(),
            Bus::Fleet(fleet) => fleet.is_draining(),
        }
    }

    /// Why events cannot flow, if they cannot: never for the embedded broker;
    /// for a fleet member, while its link to Redis is down or Redis refuses
    /// writes.
    pub fn why_down(&self) -> Option<&'static str> {
        match self {
            Bus::Embedded(_) => None,
            Bus::Fleet(fleet) => fleet.why_down(),
        }
    }
}

/// The longest `--publish-wait`: well inside a publisher's usual request
/// timeout (and the drain ends any wait at once).
pub const PUBLISH_WAIT_MAX: Duration = Duration::from_secs(30);

/// How often a publish stopped by a full inbox looks for room again. Half a
/// default inbox (2,048 events) takes a shard about 20 ms here (about 11 us a
/// send), so a look every millisecond goes on long before the shard runs dry.
const ROOM_POLL: Duration = Duration::from_millis(1);

/// Publishes through the embedded broker with flow control. Events that find
/// a shard's inbox full wait, in order, until that inbox is half empty, and go
/// on from there; at `--publish-wait` what is left is published as it can be,
/// an event that still finds an inbox full refused as such (503, or its line
/// of a batch). So a publisher faster than the shards is slowed to their pace
/// instead of having its events refused. The wait ends early if the server
/// starts draining (the rest are then refused as such).
///
/// Requests wait in turn, holding the broker's FIFO `wait_turn`: one that
/// finds it taken queues behind the request waiting now instead of taking the
/// places the shard frees, so none is starved to its deadline by newer ones,
/// and only the holder looks for room: one look a millisecond however many
/// wait. A request dropped mid-wait (its client left) gives its turn back.
async fn publish_waiting(
    broker: &Broker,
    events: &[(&str, EventData<'_>)],
) -> Vec<Result<Published, PublishError>> {
    if broker.publish_wait.is_zero() {
        return broker.publish_many(events);
    }
    let mut answers = Vec::with_capacity(events.len());
    // Nobody waiting: go ahead, and wait (in turn already) only if an inbox
    // turns out full.
    let free_turn = broker.wait_turn.try_lock().ok();
    let mut full = None;
    if free_turn.is_some() {
        full = broker.publish_until_full(events, &mut answers);
        if full.is_none() {
            return answers;
        }
    }
    broker.waited.fetch_add(1, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + broker.publish_wait;
    let in_time = tokio::time::timeout_at(deadline, async {
        let _turn = match free_turn {
            Some(turn) => turn,
            None => broker.wait_turn.lock().await,
        };
        loop {
            if let Some(full) = &full {
                while !broker.has_room(full) && !broker.is_draining() {
                    tokio::time::sleep(ROOM_POLL).await;
                }
            }
            full = broker.publish_until_full(&events[answers.len()..], &mut answers);
            if full.is_none() {
                return;
            }
        }
    })
    .await;
    if in_time.is_err() {
        answers.extend(broker.publish_many(&events[answers.len()..]));
    }
    answers
}

/// Hands the embedded broker what the shards sent, in order: client publishes
/// (already allowed by the shard), subscribes (answered into the shard's inbox)
/// and presence changes. Each is a short critical section, never an await.
async fn serve_upstream(mut rx: mpsc::Receiver<Upstream>, broker: Arc<Broker>) {
    while let Some(message) = rx.recv().await {
        match message {
            Upstream::Publish(p) => {
                if let Err(e) = broker.publish(&p.topic, EventData::Json(&p.data)) {
                    tracing::debug!(
                        topic = p.topic,
                        "client publish delivered to nobody: {}",
                        e.message()
                    );
                }
            }
            Upstream::Subscribe(request) => broker.subscribe(request),
            Upstream::Presence { topic, present, .. } => broker.presence(&topic, present),
        }
    }
}

/// Expires history and forgets idle topics, once a second.
async fn maintain(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        broker.maintain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::tests::LIMITS;
    use ringgate_shard::{Command, ShardSender};
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    fn broker(capacity: usize, wait: Duration) -> (Arc<Broker>, ShardSender) {
        let shard = ShardSender::detached(0, capacity).unwrap();
        let broker = Broker::new(vec![shard.clone()], LIMITS).with_publish_wait(wait);
        (Arc::new(broker), shard)
    }

    /// Each answer's `seq`, or its error.
    fn seqs(answers: Vec<Result<Published, PublishError>>) -> Vec<Result<u64, PublishError>> {
        answers.into_iter().map(|a| a.map(|p| p.seq)).collect()
    }

    fn events(n: usize) -> Vec<(&'static str, EventData<'static>)> {
        vec![("t", EventData::Json("1")); n]
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    /// The shard: takes what its inbox holds every 2 ms, slower than a
    /// publisher, until `stop`; then what is left. Returns the events' seqs.
    fn slow_shard(shard: ShardSender, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<u64>> {
        let delivered = |commands: Vec<Command>| -> Vec<u64> {
            commands
                .into_iter()
                .map(|c| match c {
                    Command::Deliver { seq, .. } => seq,
                    _ => panic!("only events were sent"),
                })
                .collect()
        };
        std::thread::spawn(move || {
            let mut taken = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                taken.extend(delivered(shard.take_all_for_tests()));
                std::thread::sleep(Duration::from_millis(2));
            }
            taken.extend(delivered(shard.take_all_for_tests()));
            taken
        })
    }

    #[test]
    fn a_publish_waits_for_a_shard_to_take_its_events_and_loses_none() {
        let (broker, shard) = broker(8, Duration::from_secs(30));
        let stop = Arc::new(AtomicBool::new(false));
        let taker = slow_shard(shard, stop.clone());
        let bus = Bus::Embedded(broker.clone());
        let answers = runtime().block_on(bus.publish_many(&events(500)));
        stop.store(true, Ordering::Relaxed);
        let all: Vec<u64> = (1..=500).collect();
        assert_eq!(
            seqs(answers),
            all.iter().map(|&s| Ok(s)).collect::<Vec<_>>()
        );
        assert_eq!(
            taker.join().unwrap(),
            all,
            "the shard got every event, in order"
        );
        assert_eq!(
            broker.waited.load(Ordering::Relaxed),
            1,
            "one request waited"
        );
        assert_eq!(broker.rejected.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn waiting_requests_go_on_in_arrival_order() {
        let (broker, shard) = broker(4, Duration::from_secs(30));
        let bus = Bus::Embedded(broker.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let first_events = events(30);
        let later_events = events(10);
        let (first, (later, taker)) = runtime().block_on(async {
            let later = async {
                // Once the first request waits on a full inbox, the shard takes
                // it all but one place stays free (three reserved elsewhere):
                // room a later request could take, and must not.
                while broker.waited.load(Ordering::Relaxed) == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                drop(shard.take_all_for_tests());
                let held = shard.reserve_up_to(3);
                assert_eq!(shard.room(), 1, "less than half the inbox is free");
                let release = async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    drop(held);
                    slow_shard(shard.clone(), stop.clone())
                };
                tokio::join!(bus.publish_many(&later_events), release)
            };
            tokio::join!(bus.publish_many(&first_events), later)
        });
        stop.store(true, Ordering::Relaxed);
        taker.join().unwrap();
        let numbered = |from: u64, to: u64| (from..=to).map(Ok).collect::<Vec<_>>();
        assert_eq!(seqs(first), numbered(1, 30), "the first request all first");
        assert_eq!(seqs(later), numbered(31, 40), "then the later one");
        assert_eq!(broker.waited.load(Ordering::Relaxed), 2, "both waited");
        assert!(broker.wait_turn.try_lock().is_ok(), "and are done");
    }

    #[test]
    fn what_finds_no_room_within_the_wait_is_refused_as_full() {
        let wait = Duration::from_millis(100);
        let (broker, _shard) = broker(3, wait);
        let bus = Bus::Embedded(broker.clone());
        let started = Instant::now();
        let answers = runtime().block_on(bus.publish_many(&events(5)));
        assert!(
            started.elapsed() >= wait,
            "it waited {:?}",
            started.elapsed()
        );
        let busy = Err(PublishError::Busy { full: 1, shards: 1 });
        assert_eq!(
            seqs(answers),
            vec![Ok(1), Ok(2), Ok(3), busy.clone(), busy.clone()]
        );
        // A single publish alike.
        let started = Instant::now();
        let one = runtime().block_on(bus.publish("t", EventData::Json("1")));
        assert!(started.elapsed() >= wait);
        assert_eq!(one.map(|p| p.seq), busy);
        assert_eq!(broker.waited.load(Ordering::Relaxed), 2);
        assert_eq!(broker.rejected.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn with_no_wait_a_full_inbox_refuses_at_once() {
        let (broker, _shard) = broker(1, Duration::ZERO);
        let bus = Bus::Embedded(broker.clone());
        let answers = runtime().block_on(bus.publish_many(&events(2)));
        let busy = Err(PublishError::Busy { full: 1, shards: 1 });
        assert_eq!(seqs(answers), vec![Ok(1), busy]);
        assert_eq!(broker.waited.load(Ordering::Relaxed), 0, "nothing waited");
    }

    #[test]
    fn a_drain_ends_the_wait_and_refuses_the_rest_as_draining() {
        let (broker, _shard) = broker(2, Duration::from_secs(30));
        let bus = Bus::Embedded(broker.clone());
        let drainer = {
            let broker = broker.clone();
            std::thread::spawn(move || {
                // Once the publish waits (however late this thread runs).
                while broker.waited.load(Ordering::Relaxed) == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                broker.start_draining();
            })
        };
        let started = Instant::now();
        let answers = runtime().block_on(bus.publish_many(&events(4)));
        drainer.join().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the drain ended the wait: {:?}",
            started.elapsed()
        );
        let draining = Err(PublishError::Draining);
        assert_eq!(
            seqs(answers),
            vec![Ok(1), Ok(2), draining.clone(), draining]
        );
    }
}
