//! Which broker this host publishes and subscribes through: the embedded one
//! (one host, the default) or a fleet's Redis (`--broker`). The control plane
//! talks to this, never to either directly.

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
            Bus::Embedded(broker) => broker.publish(topic, data),
            Bus::Fleet(fleet) => fleet.publish(topic, data).await,
        }
    }

    /// Publishes events in order; one answer per event, in the same order.
    pub async fn publish_many(
        &self,
        events: &[(&str, EventData<'_>)],
    ) -> Vec<Result<Published, PublishError>> {
        match self {
            Bus::Embedded(broker) => broker.publish_many(events),
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

    /// Whether events can flow: always for the embedded broker; while the
    /// link to Redis is up for a fleet member.
    pub fn is_up(&self) -> bool {
        match self {
            Bus::Embedded(_) => true,
            Bus::Fleet(fleet) => fleet.is_up(),
        }
    }
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
