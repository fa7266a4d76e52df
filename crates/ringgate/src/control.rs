//! The control plane: a small HTTP server on its own thread (axum on a
//! current-thread tokio runtime) that operators and tests talk to. It never
//! touches a connection; it reads the shards' counters and sends them commands.
//!
//! Endpoints: `GET /healthz` (200 while every shard runs) and `GET /stats`
//! (JSON: every counter per shard and summed, with uptime and version).

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use ringgate_shard::ShardStats;
use serde_json::{json, Map, Value};

/// What the control thread can see of the running gateway.
pub struct Control {
    pub shards: Vec<Arc<ShardStats>>,
    /// Shard threads still running, by shard; set by the main thread.
    pub alive: Vec<Arc<std::sync::atomic::AtomicBool>>,
    pub started: Instant,
}

/// Starts the control thread on an already bound listener.
pub fn spawn(listener: std::net::TcpListener, control: Arc<Control>) -> io::Result<JoinHandle<()>> {
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
                let app = Router::new()
                    .route("/healthz", get(healthz))
                    .route("/stats", get(stats))
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
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": control.started.elapsed().as_secs_f64(),
        "totals": totals,
        "shards": shards,
    }))
}

/// Every counter of a shard by its metric name.
fn counters(s: &ShardStats) -> Map<String, Value> {
    let pairs = [
        ("connections", &s.connections),
        ("connections_accepted_total", &s.accepted),
        ("connections_upgraded_total", &s.upgraded),
        ("connections_rejected_limit_total", &s.rejected_limit),
        (
            "connections_rejected_table_full_total",
            &s.rejected_table_full,
        ),
        ("handshake_failed_total", &s.handshake_failed),
        ("handshake_timeouts_total", &s.handshake_timeouts),
        ("idle_closed_total", &s.idle_closed),
        ("protocol_errors_total", &s.protocol_errors),
        ("messages_received_total", &s.messages_received),
        ("messages_sent_total", &s.messages_sent),
        ("bytes_received_total", &s.bytes_received),
        ("bytes_sent_total", &s.bytes_sent),
        ("pings_sent_total", &s.pings_sent),
        ("buffer_ring_exhausted_total", &s.buffer_ring_exhausted),
        ("reads_paused_total", &s.reads_paused),
        ("send_queue_bytes", &s.send_queue_bytes),
    ];
    pairs
        .into_iter()
        .map(|(k, c)| (k.to_string(), json!(c.get())))
        .collect()
}
