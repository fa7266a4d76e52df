//! A fleet member's broker: events are numbered, kept and fanned out through
//! Redis (`--broker redis://...`), so every host delivers the same `seq` and
//! epoch for an event and a client recovers on any host.
//!
//! - A publish runs one script (`keys::PUBLISH`) on a multiplexed connection:
//!   the next `seq`, the history entry and the PUBLISH on the topic's channel,
//!   atomically. Concurrent publishes share the connection without waiting
//!   for each other's answers (pipelined). A 2xx means Redis took the event;
//!   an unreachable or failing Redis answers 503.
//! - The link (`link.rs`, a task on the control thread's runtime; shards never
//!   wait for it) holds a pub/sub connection subscribed to the channel of every
//!   topic this host follows (`follow.rs`: first local subscriber in, last
//!   out, batched), builds each event's frame once and hands it to every
//!   shard's inbox, and answers subscribes and recoveries from Redis.
//! - Faults: a lost link is retried with capped backoff; meanwhile `/readyz`
//!   and `ringgate_broker_up` say so. When it returns every followed topic is
//!   subscribed again and synced: missed events still in the history are
//!   delivered, else subscribers get a gap notice.
//!
//! Why not redis-rs' ConnectionManager: it reconnects on its own, and the
//! fleet must know the moment a link returns to re-subscribe and sync; one
//! owner of both connections (`link.rs`) sees every loss and return.

mod follow;
mod keys;
mod link;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use ringgate_shard::{EventData, ShardSender, Upstream};
use tokio::sync::mpsc;

use crate::broker::{PublishError, Published};
use crate::topic_table::{Epoch, EpochMaker};

pub use follow::Gaps;

/// Events per publish script call: a batch is sent a chunk at a time, in
/// order; each chunk runs atomically in Redis, so it is kept short.
pub const PUBLISH_CHUNK_EVENTS: usize = 100;

/// Time allowed to connect to Redis, and for each answer.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect delays: from the first to the cap, doubling.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(100);
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// What the fleet keeps in Redis, from the history flags.
#[derive(Debug, Clone, Copy)]
pub struct FleetLimits {
    pub history_size: usize,
    pub history_ttl: Duration,
    /// A topic's numbering expires this long after its last publish or subscribe
    /// (`--topic-idle-ttl`); followed topics are kept alive by their host.
    pub topic_idle_ttl: Duration,
}

/// Counters and gauges of the fleet link, for `/metrics` and `/stats`.
#[derive(Default)]
pub struct FleetFigures {
    /// Both connections up (commands and pub/sub).
    pub up: AtomicBool,
    /// Redis took the link's last write probe (a read-only replica, a failed
    /// save with stop-writes-on-bgsave-error, or too few replicas refuse
    /// every write, and with them every publish and subscribe).
    pub writable: AtomicBool,
    pub messages_in: AtomicU64,
    pub published: AtomicU64,
    pub rejected: AtomicU64,
    pub reconnects: AtomicU64,
    pub subscriptions: AtomicU64,
    /// Of those, the topics subscribed and in step with Redis.
    pub topics_live: AtomicU64,
    pub gaps: Mutex<Gaps>,
    /// Publish round trips (microseconds).
    pub publish_latency: Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

pub struct Fleet {
    client: redis::Client,
    /// The URL with any password hidden, for logs and `/stats`.
    pub shown_url: String,
    /// The command connection while the link is up, with the link's generation.
    command: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// Tells the link a command failed on a broken connection (of that generation).
    broken: mpsc::UnboundedSender<u64>,
    /// What the link takes when it starts: the shards' inboxes and the other
    /// end of `broken`.
    for_link: Mutex<Option<(Vec<ShardSender>, mpsc::UnboundedReceiver<u64>)>>,
    epochs: Mutex<EpochMaker>,
    publish: redis::Script,
    standing: redis::Script,
    limits: FleetLimits,
    shards: usize,
    draining: AtomicBool,
    pub figures: FleetFigures,
}

impl Fleet {
    /// Checks the URL; connects later (`spawn`), so a Redis down at start
    /// delays nothing but the fleet.
    pub fn new(url: &str, limits: FleetLimits, shards: Vec<ShardSender>) -> Result<Fleet, String> {
        let client = open(url)?;
        let (broken, broken_rx) = mpsc::unbounded_channel();
        Ok(Fleet {
            client,
            shown_url: hide_password(url),
            command: Mutex::new(None),
            broken,
            shards: shards.len(),
            for_link: Mutex::new(Some((shards, broken_rx))),
            epochs: Mutex::new(EpochMaker::new()),
            publish: redis::Script::new(keys::PUBLISH),
            standing: redis::Script::new(keys::STANDING),
            limits,
            draining: AtomicBool::new(false),
            figures: FleetFigures::default(),
        })
    }

    /// Starts the link on the current tokio runtime: it serves the shards'
    /// messages (`upstream`) from now on.
    pub fn spawn(self: &Arc<Self>, upstream: mpsc::Receiver<Upstream>) {
        let (shards, broken) = lock(&self.for_link)
            .take()
            .expect("the link is started once");
        let link = tokio::spawn(link::run(self.clone(), shards, upstream, broken));
        let fleet = self.clone();
        // A link that panicked is a bug: nothing would be delivered while
        // /readyz said ready. Stop the process, so it is restarted and seen.
        tokio::spawn(async move {
            if let Err(e) = link.await {
                fleet.figures.up.store(false, Ordering::Relaxed);
                tracing::error!("the broker link failed: {e}; exiting");
                std::process::exit(70);
            }
        });
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Why events cannot flow, if they cannot.
    pub fn why_down(&self) -> Option<&'static str> {
        if !self.figures.up.load(Ordering::Relaxed) {
            Some("the broker (Redis) is unreachable")
        } else if !self.figures.writable.load(Ordering::Relaxed) {
            Some("the broker (Redis) refuses writes")
        } else {
            None
        }
    }

    fn fresh_epoch(&self) -> Epoch {
        lock(&self.epochs).next()
    }

    fn meta_ttl_secs(&self) -> u64 {
        self.limits.topic_idle_ttl.as_secs().max(1)
    }

    /// Numbers, keeps and publishes one event through Redis.
    pub async fn publish(
        &self,
        topic: &str,
        data: EventData<'_>,
    ) -> Result<Published, PublishError> {
        let mut answers = self.publish_many(&[(topic, data)]).await;
        answers.pop().expect("one answer per event")
    }

    /// Publishes events in order, `PUBLISH_CHUNK_EVENTS` per script call (one
    /// round trip each): one answer per event, in the same order.
    pub async fn publish_many(
        &self,
        events: &[(&str, EventData<'_>)],
    ) -> Vec<Result<Published, PublishError>> {
        let mut answers = Vec::with_capacity(events.len());
        for chunk in events.chunks(PUBLISH_CHUNK_EVENTS) {
            answers.extend(self.publish_chunk(chunk).await);
        }
        for answer in &answers {
            let counter = match answer {
                Ok(_) => &self.figures.published,
                Err(_) => &self.figures.rejected,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        answers
    }

    async fn publish_chunk(
        &self,
        events: &[(&str, EventData<'_>)],
    ) -> Vec<Result<Published, PublishError>> {
        let all = |e: PublishError| events.iter().map(|_| Err(e.clone())).collect();
        if self.is_draining() {
            return all(PublishError::Draining);
        }
        let Some((generation, mut connection)) = lock(&self.command).clone() else {
            return all(PublishError::BrokerDown(
                "the broker (Redis) is unreachable".into(),
            ));
        };
        // Bad topics are answered here; the rest go to Redis in one call.
        let valid: Vec<&(&str, EventData<'_>)> = events
            .iter()
            .filter(|(topic, _)| ringgate_shard::valid_topic(topic))
            .collect();
        let mut replies = Vec::new();
        if !valid.is_empty() {
            let mut call = self.publish.prepare_invoke();
            call.arg(self.limits.history_size)
                .arg(self.limits.history_ttl.as_secs().max(1))
                .arg(self.meta_ttl_secs());
            for (topic, data) in &valid {
                call.key(keys::meta_key(topic))
                    .key(keys::history_key(topic))
                    .arg(keys::channel(topic))
                    .arg(&*keys::data_json(data))
                    .arg(&*self.fresh_epoch());
            }
            let started = Instant::now();
            let reply: redis::RedisResult<Vec<(u64, String, u64)>> =
                call.invoke_async(&mut connection).await;
            self.record_latency(started.elapsed());
            replies = match reply {
                Ok(r) if r.len() == valid.len() => r,
                Ok(r) => {
                    return all(PublishError::BrokerDown(format!(
                        "Redis answered {} events for {}",
                        r.len(),
                        valid.len()
                    )))
                }
                Err(e) => return all(self.failed(e, generation)),
            };
        }
        let mut replies = replies.into_iter();
        events
            .iter()
            .map(|(topic, _)| {
                if !ringgate_shard::valid_topic(topic) {
                    return Err(PublishError::BadTopic);
                }
                let (seq, epoch, hosts) = replies.next().expect("one reply per valid event");
                let epoch = Epoch::parse(&epoch).ok_or_else(|| {
                    PublishError::BrokerDown(format!("Redis answered a corrupt epoch {epoch:?}"))
                })?;
                Ok(Published {
                    seq,
                    epoch,
                    shards: self.shards,
                    hosts: Some(hosts),
                })
            })
            .collect()
    }

    /// A failed command: a broken connection is the link's to mend.
    fn failed(&self, e: redis::RedisError, generation: u64) -> PublishError {
        if is_broken(&e) {
            let _ = self.broken.send(generation);
        }
        PublishError::BrokerDown(format!("the broker (Redis) failed: {e}"))
    }

    fn record_latency(&self, took: Duration) {
        let mut h = lock(&self.figures.publish_latency);
        let h = h.get_or_insert_with(ringgate_shard::new_latency_histogram);
        let _ = h.record((took.as_micros() as u64).max(1));
    }
}

/// A client for `--broker URL`, or why the URL cannot be one (for start-up and
/// `check-config`). Connects to nothing.
pub fn open(url: &str) -> Result<redis::Client, String> {
    if !url.starts_with("redis://") {
        return Err(format!(
            "--broker {}: only redis://HOST:PORT/[DB] is supported",
            hide_password(url)
        ));
    }
    redis::Client::open(url).map_err(|e| format!("--broker {}: {e}", hide_password(url)))
}

/// Whether an error means the connection is gone (not a refused command).
fn is_broken(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `redis://user:secret@host/` shown as `redis://user:***@host/`.
pub fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // Up to the last '@' anywhere: a password may hold '@', and also '/', '?'
    // or '#' (unencoded base64), which a URL parser would take for the end of
    // the user info and refuse. Hiding too much (an '@' in the path) is the
    // safe side.
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://***@{host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(hide_password("redis://h:1/"), "redis://h:1/");
        assert_eq!(hide_password("redis://u:pw@h:1/"), "redis://u:***@h:1/");
        assert_eq!(hide_password("redis://pw@h:1/"), "redis://***@h:1/");
        // Found in review: the user info ends at the last '@'.
        assert_eq!(hide_password("redis://u:p@ss@h:1/"), "redis://u:***@h:1/");
        assert_eq!(hide_password("redis://u:ab/c+d@h:1/"), "redis://u:***@h:1/");
    }

    #[test]
    fn only_redis_urls_are_taken() {
        let limits = FleetLimits {
            history_size: 1,
            history_ttl: Duration::from_secs(1),
            topic_idle_ttl: Duration::from_secs(1),
        };
        let e = Fleet::new("rediss://h/", limits, vec![]).err().unwrap();
        assert!(e.contains("only redis://"), "{e}");
        let e = Fleet::new("http://u:pw@h/", limits, vec![]).err().unwrap();
        assert!(!e.contains("pw"), "{e}");
        assert!(Fleet::new("redis://127.0.0.1:1/", limits, vec![]).is_ok());
    }
}
