//! The control plane: a small HTTP server on its own thread (axum on a
//! current-thread tokio runtime) that operators and tests talk to. It never
//! touches a connection; it reads the shards' counters and sends them commands.
//!
//! Endpoints: `POST /publish/{topic}` (the body is the event: JSON is inlined,
//! other UTF-8 text is sent as a JSON string), `GET /healthz` (200 while every
//! shard runs) and `GET /stats` (JSON: every counter per shard and summed, with
//! uptime and version). Client publishes from the shards arrive on a bounded
//! channel and go through the same broker.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use ringgate_shard::{ClientPublish, EventData, ShardStats};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::broker::{Broker, PublishError};

/// What the control thread can see of the running gateway.
pub struct Control {
    pub shards: Vec<Arc<ShardStats>>,
    /// Shard threads still running, by shard; set by the main thread.
    pub alive: Vec<Arc<std::sync::atomic::AtomicBool>>,
    pub started: Instant,
    pub broker: Arc<Broker>,
    /// RSS when the shards were ready: the base of the per-connection figure.
    pub rss_at_start: u64,
    /// The effective configuration, for `/stats`.
    pub settings: Value,
    /// The largest publish body accepted.
    pub message_bytes_max: usize,
}

/// Starts the control thread on an already bound listener.
pub fn spawn(
    listener: std::net::TcpListener,
    control: Arc<Control>,
    client_publishes: mpsc::Receiver<ClientPublish>,
) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("ringgate-control".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::error!("control plane: cannot start its runtime: {e}"),
            };
            runtime.block_on(async move {
                tokio::spawn(forward_client_publishes(
                    client_publishes,
                    control.broker.clone(),
                ));
                let body_max = control.message_bytes_max;
                let app = Router::new()
                    .route("/publish/{*topic}", post(publish))
                    .route("/metrics", get(metrics))
                    .route("/healthz", get(healthz))
                    .route("/stats", get(stats))
                    .layer(DefaultBodyLimit::max(body_max))
                    .with_state(control);
                let result = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => axum::serve(listener, app).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    tracing::error!("control plane stopped: {e}");
                }
            });
        })
}

async fn publish(
    State(control): State<Arc<Control>>,
    Path(topic): Path<String>,
    body: Bytes,
) -> (StatusCode, Json<Value>) {
    let Some(data) = EventData::classify(&body) else {
        let msg = "the event must be UTF-8 text or JSON";
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": msg })));
    };
    match control.broker.publish(&topic, data) {
        Ok(p) => (
            StatusCode::OK,
            Json(json!({ "topic": topic, "seq": p.seq, "shards": p.shards })),
        ),
        Err(e @ PublishError::Busy { seq, delivered, .. }) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": e.message(), "topic": topic, "seq": seq, "shards": delivered })),
        ),
        Err(e @ PublishError::TooManyTopics) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": e.message() })),
        ),
        Err(e @ PublishError::BadTopic) => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": e.message() })),
        ),
    }
}

/// Publishes what clients sent with `{"op":"pub"}` (already allowed by the shard).
async fn forward_client_publishes(mut rx: mpsc::Receiver<ClientPublish>, broker: Arc<Broker>) {
    while let Some(p) = rx.recv().await {
        if let Err(e) = broker.publish(&p.topic, EventData::Json(&p.data)) {
            tracing::debug!(
                topic = p.topic,
                "client publish not fully delivered: {}",
                e.message()
            );
        }
    }
}

async fn metrics(
    State(control): State<Arc<Control>>,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    let body = crate::metrics::render(&control);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn healthz(State(control): State<Arc<Control>>) -> (StatusCode, &'static str) {
    let all_alive = control
        .alive
        .iter()
        .all(|a| a.load(std::sync::atomic::Ordering::Relaxed));
    if all_alive {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "a shard has stopped\n")
    }
}

async fn stats(State(control): State<Arc<Control>>) -> Json<Value> {
    let per_shard: Vec<Map<String, Value>> = control.shards.iter().map(|s| counters(s)).collect();
    let mut totals = Map::new();
    for shard in &per_shard {
        for (name, value) in shard {
            let sum =
                totals.get(name).and_then(Value::as_u64).unwrap_or(0) + value.as_u64().unwrap_or(0);
            totals.insert(name.clone(), json!(sum));
        }
    }
    let shards: Vec<Value> = per_shard
        .into_iter()
        .enumerate()
        .map(|(id, mut m)| {
            m.insert("shard".into(), json!(id));
            Value::Object(m)
        })
        .collect();
    let rss = crate::metrics::rss_bytes().unwrap_or(0);
    let (user, kernel) = crate::metrics::memory_per_connection(&control, rss);
    totals.insert("process_resident_memory_bytes".into(), json!(rss));
    totals.insert("memory_bytes_per_connection_user".into(), json!(user));
    totals.insert(
        "memory_bytes_per_connection_kernel_estimate".into(),
        json!(kernel),
    );
    totals.insert(
        "publish_total".into(),
        json!(control
            .broker
            .published
            .load(std::sync::atomic::Ordering::Relaxed)),
    );
    totals.insert(
        "publish_rejected_total".into(),
        json!(control
            .broker
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed)),
    );
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": control.started.elapsed().as_secs_f64(),
        "settings": control.settings,
        "totals": totals,
        "shards": shards,
    }))
}

/// Every counter of a shard by its `/stats` name.
fn counters(s: &ShardStats) -> Map<String, Value> {
    crate::metrics::shard_counters(s)
        .into_iter()
        .map(|(k, v)| (k, json!(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringgate_shard::ShardSender;

    fn control_with_inbox(capacity: usize) -> Arc<Control> {
        Arc::new(Control {
            shards: vec![Arc::new(ShardStats::default())],
            alive: vec![],
            started: Instant::now(),
            broker: Arc::new(Broker::new(vec![
                ShardSender::detached(0, capacity).unwrap()
            ])),
            rss_at_start: 0,
            settings: Value::Null,
            message_bytes_max: 1024,
        })
    }

    fn call(control: Arc<Control>, topic: &str, body: &'static [u8]) -> (StatusCode, Value) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (status, Json(value)) = runtime.block_on(publish(
            State(control),
            Path(topic.to_string()),
            Bytes::from_static(body),
        ));
        (status, value)
    }

    #[test]
    fn a_full_inbox_answers_503_with_a_reason() {
        let (status, body) = call(control_with_inbox(0), "t", b"1");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body["error"].as_str().unwrap().contains("full"), "{body}");
        assert_eq!(body["shards"], 0);
    }

    #[test]
    fn publish_answers_topic_seq_and_shards() {
        let (status, body) = call(control_with_inbox(10), "news", br#"{"x":1}"#);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!({"topic": "news", "seq": 1, "shards": 1}));
        let (status, _) = call(control_with_inbox(10), "bad topic", b"1");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = call(control_with_inbox(10), "t", b"\xff");
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}
