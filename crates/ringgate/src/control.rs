//! The control plane: a small HTTP server on its own thread (axum on a
//! current-thread tokio runtime) that operators and tests talk to. It never
//! touches a connection; it reads the shards' counters and sends them commands.
//!
//! Endpoints: `POST /publish/{topic}` (the body is the event: JSON is inlined,
//! other UTF-8 text is sent as a JSON string; with `--control-token` it needs
//! `Authorization: Bearer TOKEN`), `POST /publish` (a batch, `batch.rs`), `GET /healthz` (200 while every shard runs),
//! `GET /readyz` (200 while every shard runs, the server is not draining and,
//! for a fleet member, its link to Redis is up and Redis takes writes),
//! `GET /metrics` and `GET /stats` (JSON: every counter per shard and summed,
//! with uptime, version and the settings, secrets redacted). `--metrics ADDR`
//! serves `/metrics`, `/healthz` and `/readyz` alone on a second listener, for
//! a scraper that must not be able to publish. What shards tell the broker (client
//! publishes, subscribes, presence) arrives on a bounded channel and is handed
//! to the broker (`bus.rs`) on this thread's runtime, in order.
//!
//! Bounds, so no client can take the process's descriptors or memory: at most
//! [`connections_max`] connections (more are answered 503 at once and closed),
//! a listen backlog of the same size, `--control-timeout` to send a request's
//! headers (also between keep-alive requests) and again to send its body, and
//! `--max-message-size` for the body.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use ringgate_shard::{EventData, ShardStats, Upstream};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, Semaphore};

use crate::broker::PublishError;
use crate::bus::Bus;

/// Control-plane connections at most: far below any sane descriptor limit, far
/// above what publishers and scrapers need.
pub const CONNECTIONS_MAX: usize = 512;

/// Bytes of publish bodies the control plane holds at once over all its
/// connections (being read, parsed, or waiting for inbox room): four of the
/// largest batch ([`crate::batch::BATCH_BYTES_MAX`]), or one largest event
/// where `--max-message-size` is larger ([`bodies_budget`]). Without it,
/// [`CONNECTIONS_MAX`] publishers could make it hold 512 batches of 16 MiB. A
/// body takes room as its bytes arrive; one that finds none is answered 503
/// (`read_body`).
pub const BODIES_BYTES_MAX: usize = 4 * crate::batch::BATCH_BYTES_MAX;

/// The bodies' budget for a largest event of `message_bytes_max`.
pub fn bodies_budget(message_bytes_max: usize) -> usize {
    BODIES_BYTES_MAX.max(message_bytes_max)
}

/// The connection cap on this host: [`CONNECTIONS_MAX`], or a quarter of the
/// soft RLIMIT_NOFILE where that is lower, so the control plane alone can never
/// run the process out of descriptors.
pub fn connections_max() -> usize {
    let quarter = (ringgate_shard::nofile_soft_limit() / 4).max(1);
    CONNECTIONS_MAX.min(usize::try_from(quarter).unwrap_or(usize::MAX))
}

/// What the control thread can see of the running gateway.
pub struct Control {
    pub shards: Vec<Arc<ShardStats>>,
    /// Shard threads still running, by shard; set by the main thread.
    pub alive: Vec<Arc<std::sync::atomic::AtomicBool>>,
    pub started: Instant,
    pub bus: Arc<Bus>,
    /// RSS when the shards were ready: the base of the per-connection figure.
    pub rss_at_start: u64,
    /// The host's slab and TCP buffer bytes at start (`metrics::kernel_bytes`).
    pub kernel_at_start: u64,
    /// The effective configuration, for `/stats` (secrets redacted).
    pub settings: Value,
    /// `--control-token`: what `POST /publish` must present as a bearer token.
    pub token: Option<String>,
    /// The largest publish body accepted.
    pub message_bytes_max: usize,
    /// Time allowed for a request's headers, and again for its body.
    pub timeout: Duration,
    /// Room for publish bodies, in bytes ([`bodies_budget`]).
    pub bodies: Arc<Semaphore>,
    /// Turns true when the server starts draining: the listeners close then.
    pub leaving: tokio::sync::watch::Receiver<bool>,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Connections refused at the cap.
    pub refused: AtomicU64,
    /// Publishes refused (401) for a missing or wrong `--control-token`.
    pub unauthorized: AtomicU64,
}

/// What `GET /` on the control address answers: its endpoints.
const CONTROL_INDEX: &str = "ringgate control plane
POST /publish/{topic}  publish the body to topic's subscribers (Authorization: Bearer TOKEN with --control-token)
POST /publish          a batch: JSON lines {\"topic\":T,\"data\":D}, answered with one JSON line per event
GET  /stats            every figure per shard and summed, the settings, uptime and version (JSON)
GET  /metrics          the same figures for Prometheus
GET  /healthz          200 while every shard runs
GET  /readyz           200 while every shard runs, the broker is reachable and the server is not shutting down
GET  /dashboard        a live view of the figures per shard and in total, in a browser
";

/// What `GET /` on the `--metrics` address answers.
const METRICS_INDEX: &str = "ringgate metrics
GET  /metrics          every figure for Prometheus
GET  /healthz          200 while every shard runs
GET  /readyz           200 while every shard runs, the broker is reachable and the server is not shutting down
GET  /dashboard        a live view of the figures per shard and in total, in a browser
";

/// Binds the control address with a listen backlog sized to the connection cap.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    // So a process started with --takeover can listen beside this one (the
    // start refuses an address in use without it: `address_is_free`).
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(connections_max() as i32)?;
    Ok(socket.into())
}

/// Starts the control thread on an already bound listener (and the metrics
/// listener, if any).
pub fn spawn(
    listener: std::net::TcpListener,
    metrics: Option<std::net::TcpListener>,
    control: Arc<Control>,
    upstream: mpsc::Receiver<Upstream>,
) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    if let Some(m) = &metrics {
        m.set_nonblocking(true)?;
    }
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
                control.bus.start(upstream);
                let app = Router::new()
                    .route("/", get(|| async { CONTROL_INDEX }))
                    .route("/publish", post(publish_batch))
                    .route("/publish/{*topic}", post(publish))
                    .route("/metrics", get(metrics_text))
                    .route("/healthz", get(healthz))
                    .route("/readyz", get(readyz))
                    .route("/stats", get(stats))
                    .route("/dashboard", get(crate::dashboard::page))
                    .route("/dashboard/stats", get(stats))
                    .layer(axum::middleware::map_response_with_state(
                        control.clone(),
                        close_when_draining,
                    ))
                    .with_state(control.clone());
                if let Some(listener) = metrics {
                    let scrape = Router::new()
                        .route("/", get(|| async { METRICS_INDEX }))
                        .route("/metrics", get(metrics_text))
                        .route("/healthz", get(healthz))
                        .route("/readyz", get(readyz))
                        .route("/dashboard", get(crate::dashboard::page))
                        .route("/dashboard/stats", get(stats))
                        .layer(axum::middleware::map_response_with_state(
                            control.clone(),
                            close_when_draining,
                        ))
                        .with_state(control.clone());
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => {
                            tokio::spawn(serve(listener, scrape, control.clone()));
                        }
                        Err(e) => tracing::error!("metrics listener stopped: {e}"),
                    }
                }
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, app, control).await,
                    Err(e) => tracing::error!("control plane stopped: {e}"),
                }
            });
        })
}

/// Accepts connections under the cap and serves each with the timeouts, until
/// the server drains: then the listener closes (a process that took over with
/// `--takeover` gets the new connections), and the connections still open are
/// served, every answer closing its connection (`close_when_draining`).
async fn serve(listener: tokio::net::TcpListener, app: Router, control: Arc<Control>) {
    let permits = Arc::new(Semaphore::new(connections_max()));
    let mut leaving = control.leaving.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => Some(accepted),
            _ = leaving.wait_for(|&leaving| leaving) => None,
        };
        let Some(accepted) = accepted else {
            tracing::info!(
                address = ?listener.local_addr().ok(),
                "draining: the control plane takes no new connections"
            );
            drop(listener);
            // Not a return: the control listener's loop is what keeps the
            // thread's runtime, and with it the connections still open and a
            // fleet member's link to Redis, running to the end.
            return std::future::pending().await;
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or memory: wait rather than spin.
                tracing::warn!("control plane: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            control.refused.fetch_add(1, Ordering::Relaxed);
            // One non-blocking read (closing with unread bytes would reset the
            // connection before the client reads the answer), one non-blocking
            // write, then close: a refusal holds nothing.
            let mut request = [0u8; 4096];
            let _ = stream.try_read(&mut request);
            let _ = stream.try_write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 38\r\nConnection: close\r\n\r\ntoo many control-plane connections\r\n\r\n",
            );
            continue;
        };
        control.connections.fetch_add(1, Ordering::Relaxed);
        let service = TowerToHyperService::new(app.clone());
        let control = control.clone();
        tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(control.timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("control connection ended: {e}");
            }
            control.connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

/// While the server drains, every answer closes its connection, so a client's
/// next request opens a new one and reaches the process that took over.
async fn close_when_draining(
    State(control): State<Arc<Control>>,
    mut response: axum::response::Response,
) -> axum::response::Response {
    if *control.leaving.borrow() {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

type Answer = (StatusCode, Json<Value>);

fn answer(status: StatusCode, body: Value) -> Answer {
    (status, Json(body))
}

/// A publish body, read within `--control-timeout` and `limit` bytes
/// (`too_large` says what the limit is), with the room it takes in the bodies'
/// budget, given back when the permit drops. Room is taken as the bytes
/// arrive, never waited for: a body finding none is answered 503 at once, so
/// no request holds room it has not filled (a slow upload declaring 16 MiB
/// holds what it sent), and no large request waiting blocks small ones.
async fn read_body(
    control: &Control,
    body: Body,
    limit: usize,
    too_large: impl FnOnce() -> String,
) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), Answer> {
    let mut room = control
        .bodies
        .clone()
        .try_acquire_many_owned(0)
        .expect("no room is always there");
    let read = async {
        let (mut body, mut chunks, mut len) = (body, Vec::new(), 0);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                let msg = format!("reading the body failed: {e}");
                answer(StatusCode::BAD_REQUEST, json!({ "error": msg }))
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            len += data.len();
            if len > limit {
                return Err(answer(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    json!({ "error": too_large() }),
                ));
            }
            let bytes = u32::try_from(data.len()).expect("a frame under the body limit");
            let more = control
                .bodies
                .clone()
                .try_acquire_many_owned(bytes)
                .map_err(|_| {
                    let msg =
                        "the control plane holds as many publish bodies as it may: retry later";
                    answer(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": msg }))
                })?;
            room.merge(more);
            chunks.push(data);
        }
        Ok(match chunks.len() {
            1 => chunks.pop().expect("one"),
            _ => Bytes::from(chunks.concat()),
        })
    };
    match tokio::time::timeout(control.timeout, read).await {
        Ok(Ok(bytes)) => Ok((bytes, room)),
        Ok(Err(refused)) => Err(refused),
        Err(_) => {
            let msg = "the body did not arrive within --control-timeout";
            Err(answer(StatusCode::REQUEST_TIMEOUT, json!({ "error": msg })))
        }
    }
}

/// Whether `headers` carry `Authorization: Bearer TOKEN` for the configured
/// token; a refusal is counted.
fn authorized(control: &Control, headers: &axum::http::HeaderMap) -> bool {
    let Some(token) = &control.token else {
        return true;
    };
    let ok = bearer_matches(token, headers);
    if !ok {
        control.unauthorized.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

fn bearer_matches(token: &str, headers: &axum::http::HeaderMap) -> bool {
    let offered = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Every byte compared whatever the first difference: the time taken tells
    // nothing about how much of a guess was right.
    offered.len() == token.len()
        && offered
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn publish(
    State(control): State<Arc<Control>>,
    Path(topic): Path<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Answer {
    if !authorized(&control, &headers) {
        let msg = "POST /publish needs Authorization: Bearer <the --control-token>";
        return answer(StatusCode::UNAUTHORIZED, json!({ "error": msg }));
    }
    let max = control.message_bytes_max;
    let too_large = || format!("the event is larger than --max-message-size ({max} bytes)");
    let (body, _room) = match read_body(&control, body, max, too_large).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    let data = match EventData::classify(&body) {
        Ok(data) => data,
        Err(msg) => return answer(StatusCode::BAD_REQUEST, json!({ "error": msg })),
    };
    // Text goes out as a JSON string, up to six times its size escaped: the
    // limit is on what subscribers receive (and what bounds their queues).
    if data.json_len() > control.message_bytes_max {
        let msg = format!(
            "the event is {} bytes as a JSON string (quotes, backslashes and control characters \
             escaped), more than --max-message-size ({} bytes)",
            data.json_len(),
            control.message_bytes_max
        );
        return answer(StatusCode::PAYLOAD_TOO_LARGE, json!({ "error": msg }));
    }
    match control.bus.publish(&topic, data).await {
        Ok(p) => {
            let mut body =
                json!({ "topic": topic, "seq": p.seq, "epoch": &*p.epoch, "shards": p.shards });
            if let Some(hosts) = p.hosts {
                body["hosts"] = json!(hosts);
            }
            answer(StatusCode::OK, body)
        }
        Err(
            e @ (PublishError::Busy { .. }
            | PublishError::Draining
            | PublishError::TooManyTopics
            | PublishError::BrokerDown(_)),
        ) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": e.message(), "topic": topic }),
        ),
        Err(e @ PublishError::BadTopic) => {
            answer(StatusCode::BAD_REQUEST, json!({ "error": e.message() }))
        }
    }
}

/// `POST /publish`: a batch of events as JSON lines (`batch.rs`).
async fn publish_batch(
    State(control): State<Arc<Control>>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if !authorized(&control, &headers) {
        let msg = "POST /publish needs Authorization: Bearer <the --control-token>";
        return answer(StatusCode::UNAUTHORIZED, json!({ "error": msg })).into_response();
    }
    let max = crate::batch::BATCH_BYTES_MAX;
    let too_large = || format!("the batch is larger than {max} bytes: split it");
    let (body, _room) = match read_body(&control, body, max, too_large).await {
        Ok(read) => read,
        Err(refused) => return refused.into_response(),
    };
    let (status, lines) =
        crate::batch::publish(&control.bus, &body, control.message_bytes_max).await;
    (
        StatusCode::from_u16(status).expect("a valid status"),
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        lines,
    )
        .into_response()
}

async fn metrics_text(
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

async fn readyz(State(control): State<Arc<Control>>) -> (StatusCode, String) {
    let all_alive = control
        .alive
        .iter()
        .all(|a| a.load(std::sync::atomic::Ordering::Relaxed));
    let why = if !all_alive {
        Some("a shard has stopped")
    } else if control.bus.is_draining() {
        Some("shutting down")
    } else {
        control.bus.why_down()
    };
    match why {
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        None => (StatusCode::OK, "ready\n".to_string()),
    }
}

async fn stats(State(control): State<Arc<Control>>) -> Json<Value> {
    Json(stats_document(&control))
}

/// The `/stats` document: every figure per shard and summed, the settings,
/// uptime and version. The dashboard reads it too.
pub(crate) fn stats_document(control: &Control) -> Value {
    let per_shard: Vec<Map<String, Value>> = control.shards.iter().map(|s| counters(s)).collect();
    let mut totals = Map::new();
    for shard in &per_shard {
        for (name, value) in shard {
            let (was, value) = (
                totals.get(name).and_then(Value::as_u64).unwrap_or(0),
                value.as_u64().unwrap_or(0),
            );
            // Counts add up over the shards; an age does not: the oldest.
            let total = if name == crate::metrics::OLDEST_QUEUED {
                was.max(value)
            } else {
                was + value
            };
            totals.insert(name.clone(), json!(total));
        }
    }
    // Latency percentiles are not sums: per shard, and of the merged histogram.
    let (latencies, total_latency) = crate::metrics::latency_percentiles(control);
    let shards: Vec<Value> = per_shard
        .into_iter()
        .zip(latencies)
        .enumerate()
        .map(|(id, (mut m, (p50, p99)))| {
            m.insert("shard".into(), json!(id));
            m.insert("delivery_latency_p50_seconds".into(), json!(p50));
            m.insert("delivery_latency_p99_seconds".into(), json!(p99));
            Value::Object(m)
        })
        .collect();
    totals.insert(
        "delivery_latency_p50_seconds".into(),
        json!(total_latency.0),
    );
    totals.insert(
        "delivery_latency_p99_seconds".into(),
        json!(total_latency.1),
    );
    let rss = crate::metrics::rss_bytes().unwrap_or(0);
    let m = crate::metrics::memory_per_connection(control, rss);
    totals.insert("process_resident_memory_bytes".into(), json!(rss));
    totals.insert("memory_bytes_per_connection_user".into(), json!(m.user));
    totals.insert(
        "memory_bytes_per_connection_rss_growth".into(),
        json!(m.rss_growth),
    );
    totals.insert(
        "memory_bytes_per_connection_kernel_host".into(),
        json!(m.kernel_host),
    );
    for (name, _, _, value) in crate::metrics::broker_figures(control) {
        totals.insert(name.trim_start_matches("ringgate_").into(), json!(value));
    }
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    totals.insert(
        "control_connections".into(),
        json!(control.connections.load(relaxed)),
    );
    totals.insert(
        "control_refused_total".into(),
        json!(control.refused.load(relaxed)),
    );
    totals.insert(
        "control_unauthorized_total".into(),
        json!(control.unauthorized.load(relaxed)),
    );
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": control.started.elapsed().as_secs_f64(),
        "settings": control.settings,
        "totals": totals,
        "shards": shards,
    })
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
            bus: Arc::new(Bus::Embedded(Arc::new(crate::broker::Broker::new(
                vec![ShardSender::detached(0, capacity).unwrap()],
                crate::topic_table::HistoryLimits {
                    size: 100,
                    ttl: Duration::from_secs(300),
                    memory: 1 << 20,
                    topic_idle_ttl: Duration::from_secs(600),
                },
            )))),
            rss_at_start: 0,
            kernel_at_start: 0,
            settings: Value::Null,
            token: None,
            message_bytes_max: 1024,
            timeout: Duration::from_secs(10),
            bodies: Arc::new(Semaphore::new(bodies_budget(1024))),
            leaving: tokio::sync::watch::channel(false).1,
            connections: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
        })
    }

    fn call(control: Arc<Control>, topic: &str, body: &'static [u8]) -> (StatusCode, Value) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (status, Json(value)) = runtime.block_on(publish(
            State(control),
            Path(topic.to_string()),
            axum::http::HeaderMap::new(),
            Body::from(body),
        ));
        (status, value)
    }

    #[test]
    fn only_the_exact_bearer_token_is_authorized() {
        let mut control = Arc::try_unwrap(control_with_inbox(1)).ok().unwrap();
        let headers = |value: &str| {
            let mut h = axum::http::HeaderMap::new();
            h.insert(axum::http::header::AUTHORIZATION, value.parse().unwrap());
            h
        };
        assert!(
            authorized(&control, &axum::http::HeaderMap::new()),
            "no token set"
        );
        control.token = Some("0123456789abcdef".into());
        assert!(authorized(&control, &headers("Bearer 0123456789abcdef")));
        assert!(!authorized(&control, &headers("Bearer 0123456789abcdeF")));
        assert!(!authorized(&control, &headers("Bearer 0123456789abcde")));
        assert!(!authorized(&control, &headers("0123456789abcdef")));
        assert!(!authorized(&control, &axum::http::HeaderMap::new()));
    }

    #[test]
    fn a_full_inbox_answers_503_with_a_reason() {
        let (status, body) = call(control_with_inbox(0), "t", b"1");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body["error"].as_str().unwrap().contains("full"), "{body}");
        assert!(body.get("seq").is_none(), "no seq was used: {body}");
    }

    #[test]
    fn a_body_over_the_limit_is_413_and_a_draining_server_503() {
        let big: &'static [u8] = Box::leak(vec![b'x'; 2000].into_boxed_slice());
        let (status, _) = call(control_with_inbox(10), "t", big);
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        // Text under the limit that escapes past it (found in review: 1 MiB of
        // control characters made a 6 MiB frame).
        let escaped: &'static [u8] = Box::leak(vec![1u8; 200].into_boxed_slice());
        let (status, body) = call(control_with_inbox(10), "t", escaped);
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            body["error"].as_str().unwrap().contains("1202 bytes"),
            "{body}"
        );
        let fits: &'static [u8] = Box::leak(vec![1u8; 170].into_boxed_slice());
        assert_eq!(call(control_with_inbox(10), "t", fits).0, StatusCode::OK);
        let control = control_with_inbox(10);
        control.bus.start_draining();
        let (status, body) = call(control, "t", b"1");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body["error"].as_str().unwrap().contains("shutting down"));
        let (status, body) = call(control_with_inbox(10), "t", b"1E400");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body["error"].as_str().unwrap().contains("double"), "{body}");
    }

    #[test]
    fn a_body_takes_room_as_it_arrives_and_finding_none_gets_503() {
        let control = control_with_inbox(10);
        let others = BODIES_BYTES_MAX - 500;
        let held = control
            .bodies
            .clone()
            .try_acquire_many_owned(others as u32)
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let post = |body: Vec<u8>| {
            runtime.block_on(publish(
                State(control.clone()),
                Path("t".to_string()),
                axum::http::HeaderMap::new(),
                Body::from(body),
            ))
        };
        let big = format!("\"{}\"", "x".repeat(598)).into_bytes();
        // 600 bytes do not fit in the 500 left: refused at once, not waited for.
        let (status, Json(body)) = post(big.clone());
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body["error"].as_str().unwrap().contains("retry"), "{body}");
        // A body that fits goes through, and gives its room back.
        assert_eq!(post(b"1".to_vec()).0, StatusCode::OK);
        assert_eq!(control.bodies.available_permits(), 500);
        drop(held);
        assert_eq!(post(big).0, StatusCode::OK);
        assert_eq!(control.bodies.available_permits(), BODIES_BYTES_MAX);
    }

    #[test]
    fn stats_totals_add_counts_and_take_the_oldest_age() {
        // Found in review: the ages of the shards' oldest queued events were
        // summed (four shards with a 10 s backlog each showed 40 s).
        let mut control = Arc::try_unwrap(control_with_inbox(1)).ok().unwrap();
        let shards = [ShardStats::default(), ShardStats::default()].map(Arc::new);
        shards[0].send_queue_oldest_us.set(10);
        shards[1].send_queue_oldest_us.set(30);
        shards[0].messages_sent.add(2);
        shards[1].messages_sent.add(3);
        control.shards = shards.to_vec();
        let doc = stats_document(&control);
        assert_eq!(doc["totals"]["send_queue_oldest_microseconds"], 30);
        assert_eq!(doc["totals"]["messages_sent_total"], 5);
    }

    #[test]
    fn publish_answers_topic_seq_and_shards() {
        let (status, body) = call(control_with_inbox(10), "news", br#"{"x":1}"#);
        assert_eq!(status, StatusCode::OK);
        let epoch = body["epoch"].as_str().unwrap().to_string();
        assert_eq!(epoch.len(), 10, "{body}");
        assert_eq!(
            body,
            json!({"topic": "news", "seq": 1, "epoch": epoch, "shards": 1})
        );
        let (status, _) = call(control_with_inbox(10), "bad topic", b"1");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = call(control_with_inbox(10), "t", b"\xff");
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}
