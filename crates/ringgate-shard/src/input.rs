//! What a connection does with the bytes it receives: the upgrade request, then
//! frames. Pure logic over the connection record: no ring, no syscalls, so it is
//! tested here with plain byte slices.
//!
//! Bytes are parsed in place in the buffer they arrived in (payloads unmasked in
//! place). Only an unfinished frame or request head is copied, into
//! [`Partial::tail`], which exists while that frame is incomplete; an unfinished
//! text frame is unmasked and UTF-8-checked as it arrives, so bad text fails fast.
//!
//! Outputs go into the connection's send queue; state changes go into the record.
//! The shard turns both into operations afterwards.
//!
//! Bounds: `/ws` messages (JSON ops) have their own small limit
//! (`--max-op-size`); bytes held for unfinished input count against the shard's
//! `--max-unfinished-bytes` (over it: 1013, or 503 during the upgrade); the sweep
//! closes a connection whose unfinished input is older than `--message-timeout`
//! ([`Partial::started`]), which new fragments do not extend.

use bytes::Bytes;
use ringgate_codec::{
    apply_mask, close_code, decode_header, encode_close_payload, encode_header, parse_request_with,
    write_error_response, write_switching_protocols, DataKind, Decoded, Event, FrameHeader,
    HandshakeError, Limits, OpCode, ProtocolError, Role,
};

use crate::config::ShardConfig;
use crate::conn::{Conn, Partial, Route, State};
use crate::sendq::SendPool;
use crate::stats::ShardStats;

/// The subprotocol `/ws` speaks (its JSON ops), answered in the 101 when a
/// client offers it in `Sec-WebSocket-Protocol`.
pub(crate) const PUBSUB_PROTOCOL: &str = "ringgate.v1";

/// What input handling needs from the shard, and where it leaves work that
/// needs more than the connection (the topic index, the publisher).
pub(crate) struct Env<'a> {
    pub cfg: &'a ShardConfig,
    pub stats: &'a ShardStats,
    pub now: u32,
    pub upcalls: &'a mut Vec<Upcall>,
    /// Where send queues come from and go back to.
    pub pool: &'a mut SendPool,
    /// Bytes the shard holds for unfinished input, over all connections.
    pub unfinished: &'a mut usize,
}

/// Pub/sub work for the shard, from one connection's input.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Upcall {
    /// Subscribe to these topics (from `?topics=` at the upgrade).
    Subscribe(Vec<String>),
    /// Recover these topics: (topic, last seq received, epoch), from `?recover=`.
    Recover(Vec<(String, u64, String)>),
    /// The connection's token was checked (with `--auth-*`): its claims.
    Authenticated(Box<crate::auth::Claims>),
    /// A complete text message on `/ws`.
    Text(Box<[u8]>),
    /// A complete binary message on `/ws` (not part of the protocol).
    Binary,
}

/// Handles bytes received on `conn`. `data` is the receive buffer, lent for the
/// call; it is modified (unmasked) in place.
pub(crate) fn on_recv(conn: &mut Conn, data: &mut [u8], env: &mut Env) {
    env.stats.bytes_received.add(data.len() as u64);
    let held_before = conn.partial.as_ref().map_or(0, |p| p.held_bytes());
    parse(conn, data, env);
    let held_after = conn.partial.as_ref().map_or(0, |p| p.held_bytes());
    *env.unfinished = *env.unfinished + held_after - held_before;
    if held_after > held_before && *env.unfinished > env.cfg.unfinished_bytes_max {
        // The shard's budget for unfinished input is spent: this connection's
        // input goes, not the machine's memory.
        env.stats.unfinished_refused.add(1);
        *env.unfinished -= held_after;
        conn.partial = None;
        match conn.state {
            State::Handshake => reject(
                conn,
                503,
                "server busy: too many unfinished requests, try again later",
                "Retry-After: 1\r\n",
                env,
            ),
            _ => fail_with(
                conn,
                close_code::TRY_AGAIN_LATER,
                "server busy: too much unfinished input",
                env,
            ),
        }
    }
}

/// Frees the connection's unfinished input and returns what it held.
pub(crate) fn drop_partial(conn: &mut Conn) -> usize {
    conn.partial.take().map_or(0, |p| p.held_bytes())
}

fn parse(conn: &mut Conn, data: &mut [u8], env: &mut Env) {
    match conn.state {
        State::Handshake => on_request_bytes(conn, data, env),
        State::Open | State::Closing => {
            if conn.state == State::Open {
                conn.since = env.now;
                conn.clear(crate::conn::flag::PING_SENT);
            }
            on_frame_bytes(conn, data, env);
        }
        State::Flushing | State::Draining | State::Finished => {}
    }
}

fn on_request_bytes(conn: &mut Conn, data: &mut [u8], env: &mut Env) {
    let request_max = env.cfg.request_bytes_max;
    let mut boxed = conn.partial.take();
    let head: &mut [u8] = match boxed.as_deref_mut() {
        Some(p) => {
            p.tail.extend_from_slice(data);
            &mut p.tail
        }
        None => data,
    };
    let parsed = parse_request_with(head, &[PUBSUB_PROTOCOL], crate::auth::looks_like_jwt)
        .and_then(|req| match req {
            Some(req) if req.head_len > request_max => Err(HandshakeError::TooLarge),
            None if head.len() >= request_max => Err(HandshakeError::TooLarge),
            other => Ok(other),
        });
    let request = match parsed {
        Ok(Some(req)) => req,
        Ok(None) => {
            // Keep the unfinished head: at most request_max plus one buffer.
            conn.partial = Some(boxed.unwrap_or_else(|| {
                let mut p = Partial::new(env.now);
                p.tail.extend_from_slice(data);
                p
            }));
            return;
        }
        Err(e) => return reject(conn, e.status(), e.reason(), e.extra_headers(), env),
    };
    let route = match request.path {
        "/ws" => Route::PubSub,
        "/echo" if env.cfg.echo => Route::Echo,
        "/echo" => {
            return reject(
                conn,
                404,
                "the echo endpoint is off (start ringgate with --echo)",
                "",
                env,
            )
        }
        _ => {
            return reject(
                conn,
                404,
                "no such endpoint (WebSocket endpoints: /ws)",
                "",
                env,
            )
        }
    };
    let key = match request.upgrade {
        Ok(key) => key,
        Err(e) => return reject(conn, e.status(), e.reason(), e.extra_headers(), env),
    };
    if let Some(origins) = &env.cfg.origins {
        if !origins.allows(request.origin) {
            let reason = match request.origin {
                Some(_) => "this Origin is not allowed (--allowed-origins)",
                None => "no Origin header (--allow-missing-origin lets clients without one in)",
            };
            env.stats.rejected_origin.add(1);
            return refuse(conn, 403, reason, "", env);
        }
    }
    let protocol = match route {
        Route::PubSub => {
            let max = env.cfg.subscriptions_max;
            let topics = crate::pubsub::query_topics(request.query, max);
            let recoveries = crate::pubsub::query_recoveries(request.query, max);
            let (topics, recoveries) = match (topics, recoveries) {
                (Ok(topics), Ok(recoveries)) if topics.len() + recoveries.len() <= max => {
                    (topics, recoveries)
                }
                (Ok(_), Ok(_)) => {
                    let reason =
                        "more topics in ?topics= and ?recover= than --max-subscriptions allows";
                    return reject(conn, 400, reason, "", env);
                }
                (Err(reason), _) | (_, Err(reason)) => return reject(conn, 400, reason, "", env),
            };
            let mut protocol: Option<&str> = request.protocol;
            if let Some(verifier) = &env.cfg.auth {
                let token = query_value(request.query, "token")
                    .or_else(|| {
                        request
                            .authorization
                            .and_then(|a| a.strip_prefix("Bearer "))
                            .map(str::trim)
                    })
                    .or(request.token_offer);
                let Some(token) = token else {
                    let reason = "a token is required: ?token=, Authorization: Bearer, or a Sec-WebSocket-Protocol entry";
                    return reject(conn, 401, reason, "WWW-Authenticate: Bearer\r\n", env);
                };
                let claims = match verifier.verify(token) {
                    Ok(claims) => claims,
                    Err(why) => {
                        return reject(conn, 401, &why, "WWW-Authenticate: Bearer\r\n", env)
                    }
                };
                let named = topics.iter().chain(recoveries.iter().map(|r| &r.0));
                if let Some(topic) = named.clone().find(|t| !claims.acl.may_subscribe(t)) {
                    let reason = format!("the token does not allow subscribing to {topic}");
                    tracing::info!(sub = claims.sub, topic, "upgrade refused: forbidden topic");
                    return reject(conn, 403, &reason, "", env);
                }
                // A browser that sent its token as a subprotocol offer needs an
                // offer answered: ours if it offered it, else that one.
                if protocol.is_none() {
                    protocol = request.token_offer;
                }
                env.upcalls.push(Upcall::Authenticated(Box::new(claims)));
            }
            if !topics.is_empty() {
                env.upcalls.push(Upcall::Subscribe(topics));
            }
            if !recoveries.is_empty() {
                env.upcalls.push(Upcall::Recover(recoveries));
            }
            protocol
        }
        Route::Echo => None,
    };
    let mut response = Vec::with_capacity(200);
    write_switching_protocols(&key, protocol, &mut response);
    let head_len = request.head_len;
    conn.queue(Bytes::from(response), env.pool);
    conn.state = State::Open;
    conn.set_route(route);
    conn.since = env.now;
    env.stats.upgraded.add(1);
    let rest = &mut head[head_len..];
    if !rest.is_empty() {
        on_frame_bytes(conn, rest, env);
    }
}

/// The raw value of `name=` in a query string (tokens need no decoding: they
/// are base64url and dots).
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        .filter(|v| !v.is_empty())
}

/// Answers an upgrade request with an HTTP error and drains the connection.
pub(crate) fn reject(
    conn: &mut Conn,
    status: u16,
    reason: &str,
    extra_headers: &str,
    env: &mut Env,
) {
    env.stats.count_rejection(status);
    refuse(conn, status, reason, extra_headers, env);
}

/// [`reject`] for a refusal the caller counted itself.
fn refuse(conn: &mut Conn, status: u16, reason: &str, extra_headers: &str, env: &mut Env) {
    let mut response = Vec::with_capacity(160 + reason.len());
    write_error_response(status, reason, extra_headers, &mut response);
    conn.queue(Bytes::from(response), env.pool);
    // Freed here; on_recv (the only caller while input is held) accounts for it.
    conn.partial = None;
    conn.state = State::Draining;
    conn.since = env.now;
    tracing::debug!(status, reason, "upgrade refused");
}

/// The most a frame's tail reserves up front; a larger frame's tail grows as
/// its bytes arrive, so a header alone cannot make the shard allocate much.
const MAX_TAIL_RESERVE: u64 = 64 * 1024;

/// Whether to go on parsing after a frame.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    /// The connection no longer reads frames: discard the rest.
    Stop,
}

fn on_frame_bytes(conn: &mut Conn, data: &mut [u8], env: &mut Env) {
    let mut boxed = conn.partial.take();
    let mut local = Partial {
        started: env.now,
        ..Partial::default()
    };
    let p: &mut Partial = boxed.as_deref_mut().unwrap_or(&mut local);
    let flow = parse_frames(conn, p, data, env);
    let needed = flow == Flow::Continue && p.is_needed();
    if needed {
        conn.partial = Some(boxed.unwrap_or_else(|| Box::new(local)));
    }
}

/// The frame and message limits of the connection's route: `/ws` carries small
/// JSON ops, `/echo` whatever `--max-message-size` allows.
fn limits(conn: &Conn, cfg: &ShardConfig) -> Limits {
    match conn.route() {
        Route::Echo => cfg.limits,
        Route::PubSub => Limits {
            frame_bytes_max: cfg.limits.frame_bytes_max.min(cfg.op_bytes_max),
            message_bytes_max: cfg.op_bytes_max,
        },
    }
}

fn parse_frames(conn: &mut Conn, p: &mut Partial, data: &mut [u8], env: &mut Env) -> Flow {
    let limits = limits(conn, env.cfg);
    let mut pos = 0;
    if !p.tail.is_empty() {
        match complete_tail(conn, p, data, &mut pos, &limits, env) {
            Ok(Some(Flow::Stop)) => return Flow::Stop,
            Ok(Some(Flow::Continue)) => {}
            Ok(None) => return Flow::Continue, // still incomplete, all of data used
            Err(e) => return fail(conn, e, env),
        }
    }
    while pos < data.len() {
        let decoded = match decode_header(&data[pos..], Role::Server, limits.frame_bytes_max) {
            Ok(d) => d,
            Err(e) => return fail(conn, e, env),
        };
        let frame_len = decoded.frame_len_min();
        let available = (data.len() - pos) as u64;
        match decoded {
            Decoded::Header { header, header_len } if frame_len <= available => {
                let frame = &mut data[pos..pos + frame_len as usize];
                pos += frame_len as usize;
                match on_frame(conn, p, &header, &mut frame[header_len..], 0, &limits, env) {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Stop) => return Flow::Stop,
                    Err(e) => return fail(conn, e, env),
                }
            }
            _ => {
                // An unfinished frame: keep its bytes (bounded by the frame limit),
                // in an allocation of exactly the frame's size once it is known.
                // `started` is when this connection's input became unfinished:
                // now, unless a message is in progress (then it stays). A kept
                // Partial (a read that ended inside a frame) must not carry it
                // over whole messages, or a client streaming without pause
                // would be cut by the message timeout.
                if !p.state.in_message() {
                    p.started = env.now;
                }
                p.tail
                    .reserve_exact(frame_len.min(MAX_TAIL_RESERVE) as usize);
                p.tail.extend_from_slice(&data[pos..]);
                p.checked = 0;
                if let Err(e) = check_tail(p, &limits) {
                    return fail(conn, e, env);
                }
                return Flow::Continue;
            }
        }
    }
    Flow::Continue
}

/// Feeds `data` into the unfinished frame in the tail. Returns `None` when the
/// frame is still incomplete (all of `data` used), else the flow after handling it.
fn complete_tail(
    conn: &mut Conn,
    p: &mut Partial,
    data: &[u8],
    pos: &mut usize,
    limits: &Limits,
    env: &mut Env,
) -> Result<Option<Flow>, ProtocolError> {
    let (header, header_len) = loop {
        let decoded = decode_header(&p.tail, Role::Server, limits.frame_bytes_max)?;
        let need = (decoded.frame_len_min() as usize).saturating_sub(p.tail.len());
        let take = need.min(data.len() - *pos);
        p.tail.extend_from_slice(&data[*pos..*pos + take]);
        *pos += take;
        match decoded {
            Decoded::Header { header, header_len } if take == need => break (header, header_len),
            Decoded::Header { .. } => {
                check_tail(p, limits)?;
                return Ok(None);
            }
            Decoded::NeedHeader(_) if take < need => {
                // Still short of a header, but the new bytes may prove a fault
                // already (a bad length before its mask): fail as soon as they do.
                decode_header(&p.tail, Role::Server, limits.frame_bytes_max)?;
                return Ok(None);
            }
            Decoded::NeedHeader(_) => {} // the header may be complete now: decode again
        }
    };
    let mut tail = std::mem::take(&mut p.tail);
    let checked = std::mem::replace(&mut p.checked, 0);
    let flow = on_frame(
        conn,
        p,
        &header,
        &mut tail[header_len..],
        checked,
        limits,
        env,
    );
    // Keep the allocation only if it is small; a large frame's buffer goes now.
    tail.clear();
    if tail.capacity() <= 256 {
        p.tail = tail;
    }
    flow.map(Some)
}

/// Unmasks and checks the payload bytes of the unfinished data frame in the tail
/// that arrived since the last check, so invalid text fails before the frame ends.
fn check_tail(p: &mut Partial, limits: &Limits) -> Result<(), ProtocolError> {
    let Decoded::Header { header, header_len } =
        decode_header(&p.tail, Role::Server, limits.frame_bytes_max)?
    else {
        return Ok(());
    };
    if header.opcode.is_control() {
        return Ok(());
    }
    let payload = &mut p.tail[header_len..];
    let fresh = &mut payload[p.checked as usize..];
    if fresh.is_empty() {
        return Ok(());
    }
    apply_mask(
        fresh,
        header.mask.expect("server role requires a mask"),
        p.checked as usize,
    );
    p.state.check_partial(&header, p.checked, fresh, limits)?;
    p.checked += fresh.len() as u64;
    Ok(())
}

/// Handles one complete frame whose payload is `payload`, of which the first
/// `checked` bytes are already unmasked and checked.
fn on_frame(
    conn: &mut Conn,
    p: &mut Partial,
    header: &FrameHeader,
    payload: &mut [u8],
    checked: u64,
    limits: &Limits,
    env: &mut Env,
) -> Result<Flow, ProtocolError> {
    let mask = header.mask.expect("server role requires a mask");
    apply_mask(&mut payload[checked as usize..], mask, checked as usize);
    let event = p.state.handle_frame(header, payload, checked, limits)?;
    let open = conn.state == State::Open;
    match event {
        Event::Data {
            kind,
            first,
            fin,
            payload,
        } => {
            if fin {
                env.stats.messages_received.add(1);
            }
            if !open {
                return Ok(Flow::Continue);
            }
            match conn.route() {
                Route::Echo if first && fin => queue_data(conn, kind, payload, env),
                Route::Echo => {
                    p.message.extend_from_slice(payload);
                    if fin {
                        let message = std::mem::take(&mut p.message);
                        queue_data(conn, kind, &message, env);
                    }
                }
                Route::PubSub if kind == DataKind::Binary => {
                    if fin {
                        p.message = Vec::new();
                        env.upcalls.push(Upcall::Binary);
                    }
                }
                Route::PubSub if first && fin => env.upcalls.push(Upcall::Text(payload.into())),
                Route::PubSub => {
                    p.message.extend_from_slice(payload);
                    if fin {
                        let message = std::mem::take(&mut p.message);
                        env.upcalls.push(Upcall::Text(message.into_boxed_slice()));
                    }
                }
            }
        }
        // A flood of pings from a client that does not read costs a few pongs,
        // not one queued frame each: unsent pongs are coalesced.
        Event::Ping(payload) if open => {
            conn.queue_pong(control_frame(OpCode::Pong, payload), env.pool)
        }
        Event::Ping(_) | Event::Pong(_) => {}
        Event::Close(close) => {
            if open {
                // Echo the peer's code (RFC 6455 5.5.1); an empty close gets an empty close.
                let reply = match close.code {
                    Some(code) => close_frame(code, ""),
                    None => control_frame(OpCode::Close, &[]),
                };
                conn.queue(reply, env.pool);
            }
            conn.state = State::Flushing;
            conn.since = env.now;
            return Ok(Flow::Stop);
        }
    }
    Ok(Flow::Continue)
}

/// Fails the connection (RFC 6455 7.1.7): a Close with the error's code if we
/// have not sent one, then drain.
fn fail(conn: &mut Conn, error: ProtocolError, env: &mut Env) -> Flow {
    env.stats.protocol_errors.add(1);
    tracing::debug!(%error, code = error.close_code(), "failing connection");
    fail_with(conn, error.close_code(), error.reason(), env);
    Flow::Stop
}

/// Fails the connection with Close `code` (if we have not sent a Close yet),
/// then drains: the peer may still be sending.
pub(crate) fn fail_with(conn: &mut Conn, code: u16, reason: &str, env: &mut Env) {
    if conn.state == State::Open {
        conn.queue(close_frame(code, reason), env.pool);
    }
    conn.state = State::Draining;
    conn.since = env.now;
}

/// Starts a server-initiated close: sends Close `code` and waits for the peer's.
pub(crate) fn start_close(conn: &mut Conn, code: u16, reason: &str, now: u32, pool: &mut SendPool) {
    if conn.state == State::Open {
        conn.queue(close_frame(code, reason), pool);
        conn.state = State::Closing;
        conn.since = now;
    }
}

fn queue_data(conn: &mut Conn, kind: DataKind, payload: &[u8], env: &mut Env) {
    let opcode = match kind {
        DataKind::Text => OpCode::Text,
        DataKind::Binary => OpCode::Binary,
    };
    conn.queue(frame(opcode, payload), env.pool);
    env.stats.messages_sent.add(1);
}

/// Builds one unmasked, unfragmented frame.
pub(crate) fn frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    frame_of_parts(opcode, &[payload])
}

/// One unmasked frame whose payload is `parts` one after the other, built in
/// a single allocation with its reference count when small (an event's frame
/// is built once per publish: `one_alloc`).
pub(crate) fn frame_of_parts(opcode: OpCode, parts: &[&[u8]]) -> Bytes {
    let payload_len: usize = parts.iter().map(|p| p.len()).sum();
    let header = FrameHeader {
        fin: true,
        opcode,
        mask: None,
        payload_len: payload_len as u64,
    };
    let mut head = [0u8; ringgate_codec::HEADER_BYTES_MAX];
    let head_len = encode_header(&header, &mut head);
    crate::one_alloc::concat(&head[..head_len], parts)
}

pub(crate) fn control_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    debug_assert!(opcode.is_control() && payload.len() <= 125);
    frame(opcode, payload)
}

pub(crate) fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = [0u8; 125];
    let n = encode_close_payload(code, reason, &mut payload);
    control_frame(OpCode::Close, &payload[..n])
}

/// The keepalive ping: empty, so it costs the client nothing to echo.
pub(crate) fn ping_frame() -> Bytes {
    Bytes::from_static(&[0x89, 0x00])
}

#[cfg(test)]
mod tests;
