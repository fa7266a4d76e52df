//! The baseline server `cargo xtask bench` compares ringgate with: the same
//! endpoints and event format, written the way a typical Rust service is, with
//! tokio and tokio-tungstenite, one task per connection, a `broadcast` channel
//! per topic, and default buffer sizes.
//!
//! - `GET /echo` echoes every message; `GET /ws?topics=a,b` subscribes.
//! - Control port: `POST /publish/{topic}` (answers `{"topic","seq","shards":1}`)
//!   and `GET /stats` (`{"totals":{"connections":N,"subscriptions":N}}`).
//!
//! It prints `baseline ready: ws=ADDR control=ADDR` when listening. It is a
//! measuring stick, not a product: no limits beyond tokio-tungstenite's defaults.
//!
//! `--writes batched` writes the way a tuned tokio-tungstenite pub/sub server
//! does (issue 15): a subscriber's task feeds everything its channel holds into
//! the sink and flushes once, with a 4 KiB read buffer; the default, `each`,
//! sends (and so flushes) every event on its own.
//!
//! `--engine fastwebsockets` serves `/echo` with fastwebsockets instead (the
//! fastest peer in issue 6's echo column), as its own echo example does: a
//! task per connection, auto pong and close, fragments collected. It serves
//! nothing else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9091")]
    control: SocketAddr,
    /// Worker threads (default: tokio's, one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// The WebSocket implementation.
    #[arg(long, value_enum, default_value_t = Engine::Tungstenite)]
    engine: Engine,
    /// How a subscriber's task writes events (tungstenite engine).
    #[arg(long, value_enum, default_value_t = Writes::Each)]
    writes: Writes,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Writes {
    /// `sink.send` per event: a write and a flush each.
    Each,
    /// Feed all the channel holds, then flush once; 4 KiB read buffer.
    Batched,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Engine {
    /// tokio-tungstenite: every endpoint.
    Tungstenite,
    /// fastwebsockets: `/echo` only.
    Fastwebsockets,
}

/// Frames a slow subscriber may lag behind before it misses some.
const TOPIC_CAPACITY: usize = 4096;

/// A topic's channel and its last seq.
type Topic = (broadcast::Sender<Arc<str>>, u64);

#[derive(Default)]
struct State {
    topics: Mutex<HashMap<String, Topic>>,
    connections: AtomicU64,
    subscriptions: AtomicU64,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        builder.worker_threads(n);
    }
    builder.enable_all().build()?.block_on(serve(args))
}

async fn serve(args: Args) -> std::io::Result<()> {
    let state = Arc::new(State::default());
    let ws = TcpListener::bind(args.listen).await?;
    let control = TcpListener::bind(args.control).await?;
    println!(
        "baseline ready: ws={} control={}",
        ws.local_addr()?,
        control.local_addr()?
    );
    tokio::spawn(control_plane(control, state.clone()));
    loop {
        let (stream, _) = ws.accept().await?;
        let _ = stream.set_nodelay(true);
        match args.engine {
            Engine::Tungstenite => tokio::spawn(connection(stream, state.clone(), args.writes)),
            // As fastwebsockets' own example: no cooperative-budget yields.
            Engine::Fastwebsockets => {
                tokio::spawn(tokio::task::unconstrained(fast_echo(stream, state.clone())))
            }
        };
    }
}

/// `/echo` with fastwebsockets. Its upgrade helper needs hyper; the handshake
/// here is the same few lines by hand (tungstenite's accept-key function).
async fn fast_echo(mut stream: TcpStream, state: Arc<State>) {
    use fastwebsockets::{FragmentCollector, OpCode, Role, WebSocket};
    let mut buf = Vec::with_capacity(1024);
    let Some((head_len, _)) = read_head(&mut stream, &mut buf).await else {
        return;
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).to_string();
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let key = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_string())
    });
    let (Some(key), true) = (key, path.starts_with("/echo")) else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream.write_all(response.as_bytes()).await.is_err() || buf.len() > head_len {
        // A client that sends frames before the 101 is not one the bench makes.
        return;
    }
    state.connections.fetch_add(1, Ordering::Relaxed);
    let mut ws = WebSocket::after_handshake(stream, Role::Server);
    ws.set_auto_pong(true);
    ws.set_auto_close(true);
    let mut ws = FragmentCollector::new(ws);
    while let Ok(frame) = ws.read_frame().await {
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text | OpCode::Binary => {}
            _ => continue,
        }
        if ws.write_frame(frame).await.is_err() {
            break;
        }
    }
    state.connections.fetch_sub(1, Ordering::Relaxed);
}

// The handshake callback's error type is tokio-tungstenite's (an HTTP response).
#[allow(clippy::result_large_err)]
async fn connection(stream: TcpStream, state: Arc<State>, writes: Writes) {
    let mut target = String::new();
    let callback = |req: &Request, resp: Response| {
        target = req.uri().to_string();
        Ok(resp)
    };
    let config = (writes == Writes::Batched).then(|| {
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096)
    });
    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, config).await
    else {
        return;
    };
    state.connections.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut source) = ws.split();
    if target.starts_with("/echo") {
        while let Some(Ok(msg)) = source.next().await {
            if (msg.is_text() || msg.is_binary()) && sink.send(msg).await.is_err() {
                break;
            }
        }
    } else {
        let topics: Vec<String> = target
            .split_once("topics=")
            .map(|(_, t)| {
                t.split(['&'])
                    .next()
                    .unwrap_or("")
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        let mut receivers: Vec<broadcast::Receiver<Arc<str>>> = {
            let mut map = state.topics.lock().unwrap();
            topics
                .iter()
                .map(|t| {
                    map.entry(t.clone())
                        .or_insert_with(|| (broadcast::channel(TOPIC_CAPACITY).0, 0))
                        .0
                        .subscribe()
                })
                .collect()
        };
        state
            .subscriptions
            .fetch_add(receivers.len() as u64, Ordering::Relaxed);
        let mut first = receivers.pop();
        loop {
            tokio::select! {
                msg = source.next() => match msg {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
                event = async { first.as_mut().unwrap().recv().await }, if first.is_some() => match event {
                    Ok(text) if writes == Writes::Batched => {
                        // Everything the channel holds now, then one flush.
                        let rx = first.as_mut().unwrap();
                        let mut next = Some(text);
                        let mut failed = false;
                        while let Some(text) = next.take() {
                            if sink.feed(Message::text(text.to_string())).await.is_err() {
                                failed = true;
                                break;
                            }
                            next = match rx.try_recv() {
                                Ok(text) => Some(text),
                                Err(broadcast::error::TryRecvError::Lagged(_)) => rx.try_recv().ok(),
                                Err(_) => None,
                            };
                        }
                        if failed || sink.flush().await.is_err() { break }
                    }
                    Ok(text) => if sink.send(Message::text(text.to_string())).await.is_err() { break },
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            }
        }
        state
            .subscriptions
            .fetch_sub(topics.len() as u64, Ordering::Relaxed);
    }
    state.connections.fetch_sub(1, Ordering::Relaxed);
}

/// A minimal HTTP/1.1 control plane (keep-alive) for publish and stats.
async fn control_plane(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            loop {
                let Some((head_len, content_length)) = read_head(&mut stream, &mut buf).await
                else {
                    return;
                };
                while buf.len() < head_len + content_length {
                    let mut chunk = [0u8; 4096];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf[..head_len]).to_string();
                let body = buf[head_len..head_len + content_length].to_vec();
                buf.drain(..head_len + content_length);
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let answer = if let Some(topic) = path.strip_prefix("/publish/") {
                    publish(&state, topic, &body)
                } else {
                    let c = state.connections.load(Ordering::Relaxed);
                    let s = state.subscriptions.load(Ordering::Relaxed);
                    serde_json::json!({"totals": {"connections": c, "subscriptions": s}})
                        .to_string()
                };
                let response = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}", answer.len());
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn publish(state: &State, topic: &str, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let data = if serde_json::from_str::<serde_json::Value>(&text).is_ok() {
        text.to_string()
    } else {
        serde_json::to_string(&text).unwrap()
    };
    let mut map = state.topics.lock().unwrap();
    let (sender, seq) = map
        .entry(topic.to_string())
        .or_insert_with(|| (broadcast::channel(TOPIC_CAPACITY).0, 0));
    *seq += 1;
    let event: Arc<str> = Arc::from(format!(
        "{{\"topic\":\"{topic}\",\"seq\":{seq},\"data\":{data}}}"
    ));
    let _ = sender.send(event);
    serde_json::json!({"topic": topic, "seq": *seq, "shards": 1}).to_string()
}

async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(usize, usize)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            return Some((end + 4, length));
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
