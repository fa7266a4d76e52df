//! The fleet's link to Redis: one task that owns both connections (commands,
//! pub/sub), connects and reconnects them, and does the I/O `follow.rs` asks
//! for: SUBSCRIBE/UNSUBSCRIBE in batches, the standing reads of syncs and
//! recoveries, and the shards' messages (subscribes, presence, client
//! publishes). Everything it learns goes back to `Follows` in order, on this
//! one task, so the topic table needs no lock.
//!
//! A connection's generation tags every answer: one that arrives after the
//! link was lost (and maybe made again) is dropped, or, for a recovery, put
//! back to wait for the topic to be live.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::AsyncConnectionConfig;
use ringgate_shard::{EventData, ShardSender, Upstream};
use tokio::sync::{mpsc, Semaphore};

use super::follow::{Follows, RecoveryRead, Sync};
use super::keys::{self, Standing};
use super::{lock, Fleet, BROKER_TIMEOUT, RECONNECT_FIRST, RECONNECT_MAX};

/// Channels per SUBSCRIBE or UNSUBSCRIBE command.
const CHANNELS_PER_COMMAND: usize = 1024;
/// Standing reads (syncs and recoveries) in flight at once: a reconnect with
/// many topics syncs them a window at a time.
const READS_INFLIGHT_MAX: usize = 256;
/// Client publishes (`{"op":"pub"}`) in flight at once; past it they are
/// refused (counted in `ringgate_broker_publish_rejected_total`).
const CLIENT_PUBLISHES_INFLIGHT_MAX: usize = 1024;
/// Shard messages handled before the link looks at its other work.
const UPSTREAM_BATCH: usize = 1024;
/// How often unused topics are unsubscribed and stalled ones synced again.
const TICK: Duration = Duration::from_millis(50);
/// How often the pub/sub connection is pinged: a connection that died without
/// a reset (a NAT's idle timeout, a host gone) is found within this plus
/// `BROKER_TIMEOUT`, not when the next publish fails to arrive.
const PING_EVERY: Duration = Duration::from_secs(5);

/// What spawned work reports back to the link.
enum Event {
    Connected {
        commands: MultiplexedConnection,
        sink: PubSubSink,
        stream: PubSubStream,
    },
    ConnectFailed(String),
    Subscribed {
        generation: u64,
        topics: Vec<(Arc<str>, u64)>,
        result: Result<(), String>,
    },
    /// The pub/sub connection answered a ping (or did not in time).
    Pinged {
        generation: u64,
        result: Result<(), String>,
    },
    /// Redis took the write probe on the command connection, or refused it.
    Probed {
        generation: u64,
        result: Result<(), String>,
    },
    Synced {
        generation: u64,
        sync: Sync,
        result: Result<Standing, String>,
    },
    Read {
        read: RecoveryRead,
        result: Result<Standing, String>,
    },
}

struct Link {
    fleet: Arc<Fleet>,
    follows: Follows,
    events: mpsc::UnboundedSender<Event>,
    /// Bumped at every loss: answers of older generations are stale.
    generation: u64,
    sink: Option<PubSubSink>,
    stream: Option<PubSubStream>,
    /// The next reconnect delay.
    backoff: Duration,
    connecting: bool,
    /// When the pub/sub connection was last pinged; whether a ping is out.
    pinged_at: Instant,
    ping_out: bool,
    reads_inflight: usize,
    reads_waiting: std::collections::VecDeque<Read>,
    client_publishes: Arc<Semaphore>,
}

enum Read {
    Sync(Sync),
    Recovery(RecoveryRead),
}

pub async fn run(
    fleet: Arc<Fleet>,
    shards: Vec<ShardSender>,
    mut upstream: mpsc::Receiver<Upstream>,
    mut broken: mpsc::UnboundedReceiver<u64>,
) {
    let (events, mut events_rx) = mpsc::unbounded_channel();
    let limits = fleet.limits;
    let mut link = Link {
        fleet,
        follows: Follows::new(
            shards,
            limits.history_size,
            limits.history_ttl,
            limits.topic_idle_ttl / 3,
        ),
        events,
        generation: 0,
        sink: None,
        stream: None,
        backoff: RECONNECT_FIRST,
        connecting: false,
        pinged_at: Instant::now(),
        ping_out: false,
        reads_inflight: 0,
        reads_waiting: Default::default(),
        client_publishes: Arc::new(Semaphore::new(CLIENT_PUBLISHES_INFLIGHT_MAX)),
    };
    link.connect(Duration::ZERO);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(UPSTREAM_BATCH);
    loop {
        tokio::select! {
            n = upstream.recv_many(&mut batch, UPSTREAM_BATCH) => {
                if n == 0 {
                    return; // The shards are gone.
                }
                for message in batch.drain(..) {
                    link.upstream(message);
                }
            }
            message = next_message(&mut link.stream) => match message {
                Some(m) => link.message(&m),
                None => link.lost("the pub/sub connection closed"),
            },
            Some(event) = events_rx.recv() => link.event(event),
            Some(generation) = broken.recv() => {
                // A late report about a connection already replaced is old news.
                if generation == link.generation && link.stream.is_some() {
                    link.lost("a command failed on a broken connection");
                }
            }
            _ = tick.tick() => {
                link.follows.tick(Instant::now());
                link.ping_if_due();
            }
        }
        link.flush();
    }
}

async fn next_message(stream: &mut Option<PubSubStream>) -> Option<redis::Msg> {
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

impl Link {
    /// Connects both connections after `delay`, in a task of its own.
    fn connect(&mut self, delay: Duration) {
        assert!(!self.connecting, "one connect at a time");
        self.connecting = true;
        let client = self.fleet.client.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(BROKER_TIMEOUT))
                .set_response_timeout(Some(BROKER_TIMEOUT));
            let connected = async {
                let mut commands = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                // Loaded before any publish can use this connection: an EVALSHA
                // meeting an empty script cache (a restarted Redis) makes
                // redis-rs load the script and send the call again, and a
                // publish sent meanwhile would be numbered before it.
                for script in [keys::PUBLISH, keys::STANDING] {
                    redis::Script::new(script).load_async(&mut commands).await?;
                }
                let pubsub = tokio::time::timeout(BROKER_TIMEOUT, client.get_async_pubsub())
                    .await
                    .map_err(|_| {
                        redis::RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "connecting timed out",
                        ))
                    })??;
                let (sink, stream) = pubsub.split();
                Ok::<_, redis::RedisError>(Event::Connected {
                    commands,
                    sink,
                    stream,
                })
            };
            let event = connected
                .await
                .unwrap_or_else(|e| Event::ConnectFailed(e.to_string()));
            let _ = events.send(event);
        });
    }

    /// The link is lost: everything waits for the next connection.
    fn lost(&mut self, why: &str) {
        tracing::warn!(broker = %self.fleet.shown_url, "broker link lost: {why}; reconnecting");
        self.generation += 1;
        self.sink = None;
        self.stream = None;
        *lock(&self.fleet.command) = None;
        self.fleet.figures.up.store(false, Ordering::Relaxed);
        self.fleet.figures.subscriptions.store(0, Ordering::Relaxed);
        self.fleet.figures.topics_live.store(0, Ordering::Relaxed);
        self.follows.link_down();
        // Syncs waiting to start are void; recoveries wait for their topic.
        for read in std::mem::take(&mut self.reads_waiting) {
            if let Read::Recovery(r) = read {
                self.follows
                    .recovery_read(r, Err("the broker link was lost".into()));
            }
        }
        if !self.connecting {
            self.connect(RECONNECT_FIRST);
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Connected {
                commands,
                sink,
                stream,
            } => {
                self.connecting = false;
                self.generation += 1;
                if self
                    .fleet
                    .figures
                    .reconnects
                    .fetch_add(1, Ordering::Relaxed)
                    == 0
                {
                    tracing::info!(broker = %self.fleet.shown_url, "broker link up");
                } else {
                    tracing::info!(broker = %self.fleet.shown_url, "broker link up again");
                }
                self.backoff = RECONNECT_FIRST;
                *lock(&self.fleet.command) = Some((self.generation, commands));
                self.pinged_at = Instant::now();
                self.ping_out = false;
                self.sink = Some(sink);
                self.stream = Some(stream);
                self.fleet.figures.writable.store(true, Ordering::Relaxed);
                self.fleet.figures.up.store(true, Ordering::Relaxed);
                self.follows.link_up();
                self.probe_writes();
            }
            Event::ConnectFailed(why) => {
                self.connecting = false;
                let delay = self.backoff;
                self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
                tracing::warn!(
                    broker = %self.fleet.shown_url,
                    "cannot reach the broker: {why}; retrying in {delay:?}"
                );
                self.connect(delay);
            }
            Event::Pinged { generation, result } => {
                if generation != self.generation {
                    return;
                }
                self.ping_out = false;
                if let Err(e) = result {
                    self.lost(&format!(
                        "the pub/sub connection did not answer a ping: {e}"
                    ));
                }
            }
            Event::Probed { generation, result } => {
                if generation != self.generation {
                    return;
                }
                let writable = result.is_ok();
                let was = self
                    .fleet
                    .figures
                    .writable
                    .swap(writable, Ordering::Relaxed);
                match result {
                    Err(e) if was => tracing::warn!(
                        broker = %self.fleet.shown_url,
                        "the broker refuses writes: {e}; not ready until it takes them"
                    ),
                    Ok(()) if !was => {
                        tracing::info!(broker = %self.fleet.shown_url, "the broker takes writes again")
                    }
                    _ => {}
                }
            }
            Event::Subscribed {
                generation,
                topics,
                result,
            } => {
                if generation != self.generation {
                    return;
                }
                match result {
                    Ok(()) => self.follows.subscribed(&topics),
                    Err(e) => self.lost(&format!("SUBSCRIBE failed: {e}")),
                }
            }
            Event::Synced {
                generation,
                sync,
                result,
            } => {
                self.reads_inflight -= 1;
                if generation == self.generation {
                    self.follows.synced(&sync, result);
                }
            }
            Event::Read { read, result } => {
                self.reads_inflight -= 1;
                self.follows.recovery_read(read, result);
            }
        }
    }

    fn upstream(&mut self, message: Upstream) {
        match message {
            Upstream::Subscribe(request) => self.follows.subscribe(request),
            Upstream::Presence {
                shard,
                topic,
                present,
            } => self.follows.presence(shard, topic, present, Instant::now()),
            Upstream::Publish(p) => {
                let Ok(permit) = self.client_publishes.clone().try_acquire_owned() else {
                    self.fleet.figures.rejected.fetch_add(1, Ordering::Relaxed);
                    return tracing::debug!(
                        topic = p.topic,
                        "client publish refused: too many in flight"
                    );
                };
                let fleet = self.fleet.clone();
                tokio::spawn(async move {
                    if let Err(e) = fleet.publish(&p.topic, EventData::Json(&p.data)).await {
                        tracing::debug!(topic = p.topic, "client publish failed: {}", e.message());
                    }
                    drop(permit);
                });
            }
        }
    }

    fn message(&mut self, message: &redis::Msg) {
        self.fleet
            .figures
            .messages_in
            .fetch_add(1, Ordering::Relaxed);
        let channel = message.get_channel_name();
        let parsed =
            keys::topic_of_channel(channel).zip(keys::parse_message(message.get_payload_bytes()));
        match parsed {
            Some((topic, m)) => self.follows.message(topic, m.seq, m.epoch, m.data),
            None => tracing::warn!(channel, "ignoring a message that is not ringgate's"),
        }
    }

    /// Does what the follows asked for.
    fn flush(&mut self) {
        self.fleet.figures.subscriptions.store(
            if self.sink.is_some() {
                self.follows.len() as u64
            } else {
                0
            },
            Ordering::Relaxed,
        );
        self.fleet
            .figures
            .topics_live
            .store(self.follows.live() as u64, Ordering::Relaxed);
        *lock(&self.fleet.figures.gaps) = self.follows.gaps;
        if let Some(sink) = &self.sink {
            let unsubscribe = std::mem::take(&mut self.follows.to_unsubscribe);
            for chunk in unsubscribe.chunks(CHANNELS_PER_COMMAND) {
                self.unsubscribe(sink.clone(), chunk);
            }
            let subscribe = std::mem::take(&mut self.follows.to_subscribe);
            for chunk in subscribe.chunks(CHANNELS_PER_COMMAND) {
                self.subscribe(sink.clone(), chunk.to_vec());
            }
        }
        let touch = std::mem::take(&mut self.follows.to_touch);
        if let Some((_, commands)) = lock(&self.fleet.command).clone() {
            for chunk in touch.chunks(CHANNELS_PER_COMMAND) {
                self.touch(commands.clone(), chunk);
            }
        }
        for sync in self.follows.to_sync.drain(..) {
            self.reads_waiting.push_back(Read::Sync(sync));
        }
        for read in self.follows.to_read.drain(..) {
            self.reads_waiting.push_back(Read::Recovery(read));
        }
        while self.reads_inflight < READS_INFLIGHT_MAX {
            let Some(read) = self.reads_waiting.pop_front() else {
                break;
            };
            self.start_read(read);
        }
    }

    /// SUBSCRIBE, answered to the link. The sink sends commands in the order
    /// they are queued: queued when the task is first polled, and tasks are
    /// first polled in the order they are spawned on this current-thread runtime.
    fn subscribe(&self, mut sink: PubSubSink, topics: Vec<(Arc<str>, u64)>) {
        let channels: Vec<String> = topics.iter().map(|(t, _)| keys::channel(t)).collect();
        let generation = self.generation;
        let events = self.events.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(BROKER_TIMEOUT, sink.subscribe(&channels))
                .await
                .map_err(|_| "no answer in time".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            let _ = events.send(Event::Subscribed {
                generation,
                topics,
                result,
            });
        });
    }

    fn unsubscribe(&self, mut sink: PubSubSink, topics: &[Arc<str>]) {
        let channels: Vec<String> = topics.iter().map(|t| keys::channel(t)).collect();
        tokio::spawn(async move {
            if let Err(e) = sink.unsubscribe(&channels).await {
                tracing::debug!("UNSUBSCRIBE failed: {e}");
            }
        });
    }

    /// Pings the pub/sub connection every `PING_EVERY`, one ping at a time.
    fn ping_if_due(&mut self) {
        let Some(sink) = &self.sink else {
            return;
        };
        if self.ping_out || self.pinged_at.elapsed() < PING_EVERY {
            return;
        }
        (self.ping_out, self.pinged_at) = (true, Instant::now());
        let mut sink = sink.clone();
        let generation = self.generation;
        let events = self.events.clone();
        tokio::spawn(async move {
            // Any reply but an error will do, and its form varies: a
            // subscribed RESP2 connection answers ["pong", ""], not PONG
            // (redis-rs passes it on as is). Reading it as a String failed, and
            // lost the link every PING_EVERY once the host followed a topic.
            let result = tokio::time::timeout(BROKER_TIMEOUT, sink.ping::<redis::Value>())
                .await
                .map_err(|_| "no answer in time".to_string())
                .and_then(|r| match r {
                    Ok(redis::Value::ServerError(e)) => Err(e.to_string()),
                    Ok(_) => Ok(()),
                    Err(e) => Err(e.to_string()),
                });
            let _ = events.send(Event::Pinged { generation, result });
        });
        self.probe_writes();
    }

    /// Checks, with each ping, that Redis takes writes: an EXPIRE of a key
    /// nobody sets is a write command that writes nothing, refused as every
    /// write is by a read-only replica, a failed save (MISCONF) or too few
    /// replicas. A broken connection is the ping's to find.
    fn probe_writes(&self) {
        let Some((generation, mut commands)) = lock(&self.fleet.command).clone() else {
            return;
        };
        let events = self.events.clone();
        tokio::spawn(async move {
            let mut expire = redis::cmd("EXPIRE");
            expire.arg(keys::WRITE_PROBE).arg(60);
            let probe = expire.query_async::<i64>(&mut commands);
            let result = match tokio::time::timeout(BROKER_TIMEOUT, probe).await {
                Ok(Err(e)) if !super::is_broken(&e) => Err(e.to_string()),
                _ => Ok(()),
            };
            let _ = events.send(Event::Probed { generation, result });
        });
    }

    /// Keeps the numbering of `topics` from expiring: one pipelined EXPIRE each.
    fn touch(&self, mut commands: MultiplexedConnection, topics: &[Arc<str>]) {
        let (generation, broken) = (self.generation, self.fleet.broken.clone());
        let mut pipe = redis::pipe();
        for topic in topics {
            pipe.cmd("EXPIRE")
                .arg(keys::meta_key(topic))
                .arg(self.fleet.meta_ttl_secs())
                .ignore();
        }
        tokio::spawn(async move {
            if let Err(e) = pipe.query_async::<()>(&mut commands).await {
                tracing::debug!("keeping topics alive failed: {e}");
                if super::is_broken(&e) {
                    let _ = broken.send(generation);
                }
            }
        });
    }

    fn start_read(&mut self, read: Read) {
        let Some((_, mut commands)) = lock(&self.fleet.command).clone() else {
            // Down: syncs are void, recoveries wait for their topic.
            if let Read::Recovery(r) = read {
                self.follows
                    .recovery_read(r, Err("the broker link is down".into()));
            }
            return;
        };
        self.reads_inflight += 1;
        let (topic, from, host) = match &read {
            Read::Sync(s) => (s.topic.clone(), s.from, s.host),
            Read::Recovery(r) => (r.request.topic.clone(), r.from, None),
        };
        let (host_epoch, host_delivered) = match host {
            Some((epoch, delivered)) => (epoch.to_string(), delivered),
            None => (String::new(), 0),
        };
        let fleet = self.fleet.clone();
        let events = self.events.clone();
        let generation = self.generation;
        tokio::spawn(async move {
            let reply: redis::RedisResult<(u64, String, u64, Vec<String>)> = fleet
                .standing
                .key(keys::meta_key(&topic))
                .key(keys::history_key(&topic))
                .arg(&*fleet.fresh_epoch())
                .arg(fleet.meta_ttl_secs())
                .arg(from)
                .arg(host_epoch)
                .arg(host_delivered)
                .invoke_async(&mut commands)
                .await;
            let result = match reply {
                Ok(reply) => Standing::from_reply(reply),
                Err(e) => {
                    if super::is_broken(&e) {
                        let _ = fleet.broken.send(generation);
                    }
                    Err(e.to_string())
                }
            };
            let _ = events.send(match read {
                Read::Sync(sync) => Event::Synced {
                    generation,
                    sync,
                    result,
                },
                Read::Recovery(read) => Event::Read { read, result },
            });
        });
    }
}
