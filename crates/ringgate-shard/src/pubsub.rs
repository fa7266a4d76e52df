//! The pub/sub protocol on `/ws` (design.md section 6), as pure functions.
//!
//! Client to gateway, text frames of JSON:
//! `{"op":"sub","topic":T}` (recovering: `{"op":"sub","topic":T,"since":N,"epoch":E}`),
//! `{"op":"unsub","topic":T}` and, where allowed, `{"op":"pub","topic":T,"data":<JSON>}`.
//! Replies: `{"op":"subscribed","topic":T,"seq":S,"epoch":E}` (with
//! `"recovered":true|false` when recovering), `{"op":"unsubscribed","topic":T}`,
//! `{"op":"error","code":C,"msg":M}`. At connect, `?topics=a,b` subscribes
//! without replies and `?recover=T@N@E,...` recovers as the op does.
//! Gateway to client, one text frame per event: `{"topic":T,"seq":N,"data":D}`,
//! built once per publish ([`event_frame`]) and shared by every subscriber.
//!
//! Owns the formats and the topic-name rule; not who is subscribed (`topics.rs`)
//! nor where `seq` comes from (the publisher).

use std::borrow::Cow;

use bytes::Bytes;
use ringgate_codec::OpCode;
use serde::de::{self, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The longest topic name.
pub const TOPIC_BYTES_MAX: usize = 128;

/// Topic names: 1-128 bytes of `[A-Za-z0-9_.:/-]`.
pub fn valid_topic(name: &str) -> bool {
    (1..=TOPIC_BYTES_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-'))
}

/// The longest epoch a client may send back (ours are shorter).
pub const EPOCH_BYTES_MAX: usize = 32;

/// Epochs are 1-32 ASCII letters and digits.
pub fn valid_epoch(epoch: &str) -> bool {
    (1..=EPOCH_BYTES_MAX).contains(&epoch.len()) && epoch.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A request from a client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Request<'a> {
    Sub {
        topic: Cow<'a, str>,
        /// Recovering: the last `seq` received, and its epoch.
        since: Option<(u64, Cow<'a, str>)>,
    },
    Unsub(Cow<'a, str>),
    /// `data` is raw JSON, checked by the parser.
    Pub {
        topic: Cow<'a, str>,
        data: &'a str,
    },
    /// A later token for the connection (`--auth-*`).
    Refresh(Cow<'a, str>),
}

/// The fields of a request, each at most once.
#[derive(Default)]
struct Wire<'a> {
    op: Option<Cow<'a, str>>,
    topic: Option<Cow<'a, str>>,
    data: Option<&'a RawValue>,
    since: Option<u64>,
    epoch: Option<Cow<'a, str>>,
    token: Option<Cow<'a, str>>,
}

impl<'de> Deserialize<'de> for Wire<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A map only: serde's derive would also take the array form
        // `["sub","t"]`, which is not the documented protocol.
        deserializer.deserialize_map(WireVisitor)
    }
}

struct WireVisitor;

impl<'de> Visitor<'de> for WireVisitor {
    type Value = Wire<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object like {\"op\":\"sub\",\"topic\":\"name\"}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Wire<'de>, A::Error> {
        let mut wire = Wire::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let duplicate = || de::Error::custom(format_args!("duplicate key \"{key}\""));
            match &*key {
                "op" if wire.op.is_some() => return Err(duplicate()),
                "op" => wire.op = Some(map.next_value()?),
                "topic" if wire.topic.is_some() => return Err(duplicate()),
                "topic" => wire.topic = Some(map.next_value()?),
                "data" if wire.data.is_some() => return Err(duplicate()),
                "data" => wire.data = Some(map.next_value()?),
                "since" if wire.since.is_some() => return Err(duplicate()),
                "since" => {
                    let since = map.next_value::<u64>().map_err(|_| {
                        de::Error::custom("\"since\" must be a whole number from 0")
                    })?;
                    wire.since = Some(since);
                }
                "epoch" if wire.epoch.is_some() => return Err(duplicate()),
                "epoch" => wire.epoch = Some(map.next_value()?),
                "token" if wire.token.is_some() => return Err(duplicate()),
                "token" => wire.token = Some(map.next_value()?),
                _ => {
                    return Err(de::Error::custom(format_args!(
                        "unknown key \"{key}\" (expected op, topic, data, since, epoch, token)"
                    )))
                }
            }
        }
        Ok(wire)
    }
}

/// Checks that every number in a JSON value is a finite double: `1E400` is
/// valid JSON grammar, but most clients cannot parse it back.
struct Finite;

impl<'de> Deserialize<'de> for Finite {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FiniteVisitor)
    }
}

struct FiniteVisitor;

impl<'de> Visitor<'de> for FiniteVisitor {
    type Value = Finite;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Finite, E> {
        Ok(Finite)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Finite, E> {
        Ok(Finite)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Finite, E> {
        Ok(Finite)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Finite, E> {
        if v.is_finite() {
            Ok(Finite)
        } else {
            Err(E::custom("number out of range"))
        }
    }
    fn visit_str<E>(self, _: &str) -> Result<Finite, E> {
        Ok(Finite)
    }
    fn visit_unit<E>(self) -> Result<Finite, E> {
        Ok(Finite)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Finite, A::Error> {
        while seq.next_element::<Finite>()?.is_some() {}
        Ok(Finite)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Finite, A::Error> {
        while map.next_entry::<de::IgnoredAny, Finite>()?.is_some() {}
        Ok(Finite)
    }
}

const INFINITE_NUMBER: &str = "numbers in a JSON event must fit a double (no 1E400)";

/// Whether `json` is JSON with only finite numbers (false for anything else).
fn numbers_are_finite(json: &str) -> bool {
    serde_json::from_str::<Finite>(json).is_ok()
}

/// [`numbers_are_finite`] for text already known to be JSON (a batch line's or
/// a client publish's `data`), mostly without parsing it again. A JSON number
/// overflows a double only with an exponent or more than 308 integer digits;
/// the full parse also refuses what the raw capture let through: nesting past
/// serde_json's limit (128) and `\u` escapes (a lone surrogate). So the text
/// is scanned (strings skipped) and parsed only if it has any of those. Written
/// by hand because the second parse was a fifth of the batch API's parsing.
fn known_json_numbers_are_finite(json: &str) -> bool {
    /// Digits in a row past which a number might not fit (f64::MAX has 309).
    const DIGITS_SURELY_FINITE: usize = 308;
    /// Nesting the full parse surely accepts (its limit is 128).
    const DEPTH_SURELY_ACCEPTED: usize = 100;
    let bytes = json.as_bytes();
    let (mut digits, mut depth) = (0, 0usize);
    let mut at = 0;
    while let Some(&b) = bytes.get(at) {
        at += 1;
        if b == b'"' {
            // A string: jump to its end, past escapes other than `\u`.
            loop {
                let Some(stop) = memchr::memchr2(b'"', b'\\', &bytes[at..]) else {
                    // Unterminated: not JSON after all; the parse says so.
                    return numbers_are_finite(json);
                };
                at += stop + 1;
                if bytes[at - 1] == b'"' {
                    break;
                }
                match bytes.get(at) {
                    Some(b'u') => return numbers_are_finite(json),
                    Some(_) => at += 1,
                    None => return numbers_are_finite(json),
                }
            }
            digits = 0;
            continue;
        }
        if b.is_ascii_digit() {
            digits += 1;
            if digits > DIGITS_SURELY_FINITE {
                return numbers_are_finite(json);
            }
            continue;
        }
        if digits > 0 && (b == b'e' || b == b'E') {
            return numbers_are_finite(json);
        }
        digits = 0;
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > DEPTH_SURELY_ACCEPTED {
                    return numbers_are_finite(json);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// Why a request was refused, for the error reply.
pub(crate) type Reason = Cow<'static, str>;

/// Parses a client's text message: exactly the documented object form. The
/// error is the reason to send back.
pub(crate) fn parse_request(text: &[u8]) -> Result<Request<'_>, Reason> {
    let wire: Wire<'_> = serde_json::from_slice(text).map_err(|e| match e.classify() {
        // Our own checks (duplicate or unknown keys, not an object): say which.
        serde_json::error::Category::Data => {
            let msg = e.to_string();
            let msg = msg.rsplit_once(" at line ").map_or(&*msg, |(m, _)| m);
            Cow::Owned(msg.to_string())
        }
        _ => Cow::Borrowed("expected a JSON object like {\"op\":\"sub\",\"topic\":\"name\"}"),
    })?;
    let op = wire.op.ok_or("missing \"op\"")?;
    if op == "refresh" {
        if wire.topic.is_some()
            || wire.data.is_some()
            || wire.since.is_some()
            || wire.epoch.is_some()
        {
            return Err("\"refresh\" takes only \"token\"".into());
        }
        return Ok(Request::Refresh(wire.token.ok_or("missing \"token\"")?));
    }
    if wire.token.is_some() {
        return Err(format!("\"token\" is not part of \"{op}\"").into());
    }
    let topic = wire.topic.ok_or("missing \"topic\"")?;
    if !valid_topic(&topic) {
        return Err("invalid topic name: 1-128 bytes of A-Z a-z 0-9 _ . : / -".into());
    }
    let recovering = wire.since.is_some() || wire.epoch.is_some();
    match &*op {
        "sub" | "unsub" if wire.data.is_some() => {
            Err(format!("\"data\" is not part of \"{op}\"").into())
        }
        "unsub" | "pub" if recovering => {
            Err(format!("\"since\" and \"epoch\" are not part of \"{op}\"").into())
        }
        "sub" => {
            let since = match (wire.since, wire.epoch) {
                (None, None) => None,
                (Some(seq), Some(epoch)) if valid_epoch(&epoch) => Some((seq, epoch)),
                (Some(_), Some(_)) => {
                    return Err("invalid \"epoch\": 1-32 letters and digits".into())
                }
                _ => return Err("\"since\" and \"epoch\" go together".into()),
            };
            Ok(Request::Sub { topic, since })
        }
        "unsub" => Ok(Request::Unsub(topic)),
        "pub" => {
            let data = wire.data.ok_or("missing \"data\"")?.get();
            if !known_json_numbers_are_finite(data) {
                return Err("numbers in \"data\" must fit a double (no 1E400)".into());
            }
            Ok(Request::Pub { topic, data })
        }
        _ => Err("unknown \"op\": expected sub, unsub, pub or refresh".into()),
    }
}

/// The topics named by `topics=a,b` in a request's query string, percent-decoded
/// and deduplicated (sorted). `Err` names the problem for a 400 answer. Stops as
/// soon as more than `max` distinct topics were named, so the work is
/// O(n log max) in the query's length and the memory O(max).
pub(crate) fn query_topics(query: Option<&str>, max: usize) -> Result<Vec<String>, &'static str> {
    let Some(query) = query else {
        return Ok(Vec::new());
    };
    let mut topics: Vec<String> = Vec::new();
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "topics" {
            continue;
        }
        let value = percent_decode(value).ok_or("malformed percent-encoding in ?topics=")?;
        for topic in value.split(',').filter(|t| !t.is_empty()) {
            if !valid_topic(topic) {
                return Err(
                    "invalid topic name in ?topics= (1-128 bytes of A-Z a-z 0-9 _ . : / -)",
                );
            }
            topics.push(topic.to_string());
            if topics.len() > max {
                topics.sort_unstable();
                topics.dedup();
                if topics.len() > max {
                    return Err("more topics in ?topics= than --max-subscriptions allows");
                }
            }
        }
    }
    topics.sort_unstable();
    topics.dedup();
    Ok(topics)
}

/// The recoveries named by `recover=T@N@E,...` in a request's query string
/// (topic, last `seq` received, epoch; `@` is in neither a topic nor an epoch),
/// percent-decoded and checked. At most `max`, else the reason for a 400.
pub(crate) fn query_recoveries(
    query: Option<&str>,
    max: usize,
) -> Result<Vec<(String, u64, String)>, &'static str> {
    let Some(query) = query else {
        return Ok(Vec::new());
    };
    let mut out: Vec<(String, u64, String)> = Vec::new();
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "recover" {
            continue;
        }
        let value = percent_decode(value).ok_or("malformed percent-encoding in ?recover=")?;
        for item in value.split(',').filter(|t| !t.is_empty()) {
            const FORM: &str = "?recover= takes topic@seq@epoch, comma-separated";
            let mut parts = item.split('@');
            let (Some(topic), Some(seq), Some(epoch), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(FORM);
            };
            let seq: u64 = seq.parse().map_err(|_| FORM)?;
            if !valid_topic(topic) || !valid_epoch(epoch) {
                return Err(FORM);
            }
            if out.iter().any(|(t, _, _)| t == topic) {
                return Err("a topic appears twice in ?recover=");
            }
            if out.len() == max {
                return Err("more topics in ?recover= than --max-subscriptions allows");
            }
            out.push((topic.to_string(), seq, epoch.to_string()));
        }
    }
    Ok(out)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = text.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Whether client publishing to `topic` is allowed by `pattern`: `*` allows
/// every topic, `prefix*` the topics starting with `prefix`, anything else
/// exactly that topic.
/// Whether `pattern` is a `--client-publish` pattern: `*`, a topic name, or
/// a topic prefix followed by one `*` (anything else could never match, or
/// match by surprise).
pub fn valid_publish_pattern(pattern: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some("") => true,
        Some(prefix) => prefix.len() < TOPIC_BYTES_MAX && valid_topic(prefix),
        None => valid_topic(pattern),
    }
}

pub fn publish_allowed(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

/// An event's data: inlined when it is JSON, else carried as a JSON string.
#[derive(Debug, Clone, Copy)]
pub enum EventData<'a> {
    /// Valid JSON, inlined as is.
    Json(&'a str),
    /// Text, escaped into a JSON string.
    Text(&'a str),
}

impl<'a> EventData<'a> {
    /// Classifies a publish body: JSON if it parses as JSON, text if it is
    /// other UTF-8 (events are text frames). `Err` says why the body cannot be
    /// an event: not UTF-8, or JSON with a number no double holds (`1E400`).
    pub fn classify(body: &'a [u8]) -> Result<EventData<'a>, &'static str> {
        let text = std::str::from_utf8(body).map_err(|_| "the event must be UTF-8 text or JSON")?;
        // One parse for the usual case (finite JSON); a second only to tell
        // text from JSON with an infinite number.
        if numbers_are_finite(text) {
            return Ok(EventData::Json(text.trim()));
        }
        if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
            return Ok(EventData::Text(text));
        }
        Err(INFINITE_NUMBER)
    }

    /// Bytes of the data as the event's frame carries it: JSON as is, text as
    /// a JSON string (quoted, and its quotes, backslashes and control
    /// characters escaped, as `serde_json` writes it: up to six bytes for one).
    pub fn json_len(&self) -> usize {
        match self {
            EventData::Json(json) => json.len(),
            EventData::Text(text) => {
                let escaped: usize = text
                    .bytes()
                    .map(|b| match b {
                        b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
                        0..=0x1f => 6,
                        _ => 1,
                    })
                    .sum();
                escaped + 2
            }
        }
    }

    /// Data already parsed as JSON (a batch line's `data`, captured raw): `Err`
    /// if a number in it does not fit a double, or it is JSON the full parse
    /// refuses (nesting past 128, a lone surrogate). Text that is not JSON at
    /// all is the caller's bug: it is not checked for that.
    pub fn json(json: &'a str) -> Result<EventData<'a>, &'static str> {
        if known_json_numbers_are_finite(json) {
            Ok(EventData::Json(json.trim()))
        } else {
            Err(INFINITE_NUMBER)
        }
    }
}

/// The most an event's frame payload adds to its data (`EventData::json_len`):
/// `{"topic":"T","seq":N,"data":` and `}`, with the longest topic and seq.
pub const EVENT_ENVELOPE_BYTES_MAX: usize =
    r#"{"topic":""#.len() + TOPIC_BYTES_MAX + r#"","seq":"#.len() + 20 + r#","data":"#.len() + 1;

/// Builds the one WebSocket text frame of an event, ready to be sent as is to
/// every subscriber: `{"topic":T,"seq":N,"data":D}`.
pub fn event_frame(topic: &str, seq: u64, data: EventData<'_>) -> Bytes {
    debug_assert!(valid_topic(topic), "topic names need no escaping");
    let escaped;
    let data = match data {
        EventData::Json(json) => json.as_bytes(),
        EventData::Text(text) => {
            escaped = serde_json::to_vec(text).expect("a string serialises");
            &escaped[..]
        }
    };
    let mut digits = [0u8; 20];
    crate::input::frame_of_parts(
        OpCode::Text,
        &[
            b"{\"topic\":\"",
            topic.as_bytes(),
            b"\",\"seq\":",
            decimal(seq, &mut digits),
            b",\"data\":",
            data,
            b"}",
        ],
    )
}

/// `n` in decimal, written into `digits`.
fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[start..];
        }
    }
}

/// `{"op":"subscribed","topic":T,"seq":S,"epoch":E}` (with `"recovered":B`
/// when the client asked to recover), as a text frame.
pub(crate) fn subscribed_reply(
    topic: &str,
    seq: u64,
    epoch: &str,
    recovered: Option<bool>,
) -> Bytes {
    debug_assert!(valid_topic(topic) && valid_epoch(epoch), "need no escaping");
    let mut body = format!(
        "{{\"op\":\"subscribed\",\"topic\":\"{topic}\",\"seq\":{seq},\"epoch\":\"{epoch}\""
    );
    if let Some(recovered) = recovered {
        body.push_str(&format!(",\"recovered\":{recovered}"));
    }
    body.push('}');
    crate::input::frame(OpCode::Text, body.as_bytes())
}

/// `{"op":"gap","topic":T,"seq":S,"epoch":E}` as a text frame: a fleet member
/// could not deliver every event of `topic` up to `seq` (of numbering `epoch`)
/// and cannot replay them; live events go on from `seq + 1`. Sent to the
/// topic's subscribers like an event (README "Fleet").
pub fn gap_notice(topic: &str, seq: u64, epoch: &str) -> Bytes {
    assert!(valid_topic(topic) && valid_epoch(epoch), "need no escaping");
    let body =
        format!("{{\"op\":\"gap\",\"topic\":\"{topic}\",\"seq\":{seq},\"epoch\":\"{epoch}\"}}");
    crate::input::frame(OpCode::Text, body.as_bytes())
}

/// `{"op":"unsubscribed","topic":T}` and the like, as a text frame.
pub(crate) fn reply(op: &str, topic: &str) -> Bytes {
    debug_assert!(valid_topic(topic), "topic names need no escaping");
    let body = format!("{{\"op\":\"{op}\",\"topic\":\"{topic}\"}}");
    crate::input::frame(OpCode::Text, body.as_bytes())
}

/// `{"op":OP,"topic":T,"reason":R}` as a text frame (a subscription the
/// server dropped, and why).
pub(crate) fn reply_with_reason(op: &str, topic: &str, reason: &str) -> Bytes {
    debug_assert!(valid_topic(topic), "topic names need no escaping");
    let body = format!("{{\"op\":\"{op}\",\"topic\":\"{topic}\",\"reason\":\"{reason}\"}}");
    crate::input::frame(OpCode::Text, body.as_bytes())
}

/// `{"op":"refreshed","exp":N}` as a text frame.
pub(crate) fn refreshed_reply(exp: u64) -> Bytes {
    let body = format!("{{\"op\":\"refreshed\",\"exp\":{exp}}}");
    crate::input::frame(OpCode::Text, body.as_bytes())
}

/// `{"op":"error","code":"forbidden","topic":T,"msg":M}` as a text frame.
pub(crate) fn forbidden_reply(topic: &str, msg: &str) -> Bytes {
    debug_assert!(valid_topic(topic), "topic names need no escaping");
    let msg = serde_json::to_string(msg).expect("a string serialises");
    let body =
        format!("{{\"op\":\"error\",\"code\":\"forbidden\",\"topic\":\"{topic}\",\"msg\":{msg}}}");
    crate::input::frame(OpCode::Text, body.as_bytes())
}

/// `{"op":"error","code":C,"msg":M}` as a text frame.
pub(crate) fn error_reply(code: &str, msg: &str) -> Bytes {
    let msg = serde_json::to_string(msg).expect("a string serialises");
    let body = format!("{{\"op\":\"error\",\"code\":\"{code}\",\"msg\":{msg}}}");
    crate::input::frame(OpCode::Text, body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_patterns_are_a_name_a_prefix_or_everything() {
        for good in ["*", "chat.*", "chat.room-1", "a*"] {
            assert!(valid_publish_pattern(good), "{good}");
        }
        for bad in ["", "a*b", "**", "chat room*", "*a", "a**"] {
            assert!(!valid_publish_pattern(bad), "{bad}");
        }
    }

    #[test]
    fn topic_names() {
        assert!(valid_topic("user.42"));
        assert!(valid_topic("a:b/c-d_e"));
        assert!(valid_topic(&"x".repeat(128)));
        assert!(!valid_topic(""));
        assert!(!valid_topic(&"x".repeat(129)));
        assert!(!valid_topic("a b"));
        assert!(!valid_topic("a,b"));
        assert!(!valid_topic("naïve"));
        assert!(!valid_topic("a\"b"));
    }

    #[test]
    fn requests_parse_and_errors_say_why() {
        assert_eq!(
            parse_request(br#"{"op":"sub","topic":"a"}"#),
            Ok(Request::Sub {
                topic: "a".into(),
                since: None
            })
        );
        assert_eq!(
            parse_request(br#"{"topic":"a","op":"unsub"}"#),
            Ok(Request::Unsub("a".into()))
        );
        // Escapes in strings are decoded.
        assert_eq!(
            parse_request(br#"{"op":"sub","topic":"a\u002eb"}"#),
            Ok(Request::Sub {
                topic: "a.b".into(),
                since: None
            })
        );
        match parse_request(br#"{"op":"pub","topic":"a","data":{"x":[1,2]}}"#) {
            Ok(Request::Pub { topic, data }) => {
                assert_eq!(topic, "a");
                assert_eq!(data, r#"{"x":[1,2]}"#);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_request(b"not json").unwrap_err().contains("JSON"));
        assert!(parse_request(br#"{"op":"sub"}"#)
            .unwrap_err()
            .contains("topic"));
        assert!(parse_request(br#"{"op":"sub","topic":"bad name"}"#)
            .unwrap_err()
            .contains("invalid topic"));
        assert!(parse_request(br#"{"op":"dance","topic":"a"}"#)
            .unwrap_err()
            .contains("unknown"));
        assert!(parse_request(br#"{"op":"pub","topic":"a"}"#)
            .unwrap_err()
            .contains("data"));
        assert!(parse_request(br#"[1,2]"#).is_err());
    }

    #[test]
    fn only_the_documented_object_form_is_accepted() {
        let array = parse_request(br#"["pub","t",{"x":1}]"#).unwrap_err();
        assert!(array.contains("JSON object"), "{array}");
        let dup = parse_request(br#"{"op":"sub","topic":"a","topic":"b"}"#).unwrap_err();
        assert_eq!(dup, "duplicate key \"topic\"");
        let unknown = parse_request(br#"{"op":"sub","topic":"a","x":1}"#).unwrap_err();
        assert!(unknown.contains("unknown key \"x\""), "{unknown}");
        let extra = parse_request(br#"{"op":"sub","topic":"a","data":1}"#).unwrap_err();
        assert!(extra.contains("not part of"), "{extra}");
        let missing = parse_request(br#"{"topic":"a"}"#).unwrap_err();
        assert!(missing.contains("\"op\""), "{missing}");
    }

    #[test]
    fn numbers_no_double_holds_are_refused() {
        for data in ["1E400", "[1,-1e999]", "{\"a\":{\"b\":2e308}}"] {
            let op = format!(r#"{{"op":"pub","topic":"a","data":{data}}}"#);
            let e = parse_request(op.as_bytes()).unwrap_err();
            assert!(e.contains("must fit a double"), "{data}: {e}");
            assert!(EventData::classify(data.as_bytes()).is_err(), "{data}");
        }
        for data in ["1e308", "-0", "123456789012345678901234567890", "0.1"] {
            let op = format!(r#"{{"op":"pub","topic":"a","data":{data}}}"#);
            assert!(parse_request(op.as_bytes()).is_ok(), "{data}");
            assert!(matches!(
                EventData::classify(data.as_bytes()),
                Ok(EventData::Json(_))
            ));
        }
    }

    #[test]
    fn the_quick_finiteness_check_agrees_with_parsing() {
        let long = "9".repeat(309);
        let long_fraction = format!("0.{}", "1".repeat(400));
        let cases = [
            "1",
            "1e308",
            "1E400",
            "-2.5e-400",
            "[1,-1e999]",
            "{\"a\":{\"b\":2e308}}",
            "\"1e999 in a string\"",
            "{\"price\":12.5,\"id\":\"abc\"}",
            "\"e\"",
            &long,
            &format!("\"{long}\""),
            &long_fraction,
            &"8".repeat(308),
            r#""\ud800 a lone surrogate""#,
            r#"{"\udc00":1}"#,
            r#""caf\u00e9 \" [[[ \\""#,
            // Escapes that end where a string seems to, then a number outside.
            r#"["\\", 1e999]"#,
            r#"{"k":"a\"b\\\"","n":1E400,"m":"\\"}"#,
            r#"["\"", "x\\\\", 2, "\n\t"]"#,
            &format!("{}1{}", "[".repeat(100), "]".repeat(100)),
            &format!("{}1{}", "[".repeat(150), "]".repeat(150)),
            &format!(r#"["]]]]]]",{}1{}]"#, "[".repeat(126), "]".repeat(126)),
        ];
        for json in cases {
            let raw = serde_json::from_str::<&serde_json::value::RawValue>(json);
            assert!(raw.is_ok(), "the raw capture takes it: {json}");
            assert_eq!(
                known_json_numbers_are_finite(json),
                numbers_are_finite(json),
                "{json}"
            );
        }
        assert!(!known_json_numbers_are_finite(&long), "309 nines overflow");
        assert!(
            !known_json_numbers_are_finite(r#""\ud800""#),
            "refused as before"
        );
        let deep = format!("{}1{}", "[".repeat(150), "]".repeat(150));
        assert!(!known_json_numbers_are_finite(&deep), "refused as before");
    }

    #[test]
    fn query_topics_are_decoded_deduplicated_and_checked() {
        assert_eq!(query_topics(None, 64), Ok(vec![]));
        assert_eq!(
            query_topics(Some("topics=b,a,b"), 64),
            Ok(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(
            query_topics(Some("x=1&topics=user%3A42,c%2Fd"), 64),
            Ok(vec!["c/d".into(), "user:42".into()])
        );
        assert_eq!(query_topics(Some("topics="), 64), Ok(vec![]));
        assert!(query_topics(Some("topics=a%2"), 64).is_err());
        assert!(query_topics(Some("topics=bad%20name"), 64).is_err());
    }

    #[test]
    fn query_topics_stop_at_the_limit_and_duplicates_do_not_count() {
        let three = Some("topics=a,b,c");
        assert_eq!(query_topics(three, 3).map(|t| t.len()), Ok(3));
        assert!(query_topics(three, 2)
            .unwrap_err()
            .contains("--max-subscriptions"));
        // Many repeats of few topics are within a small limit.
        let repeats = format!("topics={}", "a,b,".repeat(2000));
        assert_eq!(
            query_topics(Some(&repeats), 2),
            Ok(vec!["a".to_string(), "b".to_string()])
        );
    }

    #[test]
    fn query_topics_work_is_bounded_by_the_limit_not_the_query() {
        // The issue's attack: thousands of distinct topics in one request. The
        // parser stops at the limit: it never holds more than max+1 of them.
        let many: Vec<String> = (0..2649).map(|i| format!("t{i}")).collect();
        let query = format!("topics={}", many.join(","));
        assert!(query_topics(Some(&query), 64).is_err());
        // And with a limit as large as the query it still sorts once, not n^2.
        let all = query_topics(Some(&query), u16::MAX as usize).unwrap();
        assert_eq!(all.len(), 2649);
    }

    #[test]
    fn recovery_requests_carry_since_and_epoch_together() {
        assert_eq!(
            parse_request(br#"{"op":"sub","topic":"a","since":41,"epoch":"k3x9"}"#),
            Ok(Request::Sub {
                topic: "a".into(),
                since: Some((41, "k3x9".into()))
            })
        );
        for (bad, why) in [
            (
                &br#"{"op":"sub","topic":"a","since":41}"#[..],
                "go together",
            ),
            (br#"{"op":"sub","topic":"a","epoch":"x"}"#, "go together"),
            (
                br#"{"op":"sub","topic":"a","since":-1,"epoch":"x"}"#,
                "since",
            ),
            (
                br#"{"op":"sub","topic":"a","since":1,"epoch":"a b"}"#,
                "epoch",
            ),
            (
                br#"{"op":"unsub","topic":"a","since":1,"epoch":"x"}"#,
                "not part of",
            ),
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.contains(why), "{}: {e}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn recoveries_at_connect_are_parsed_and_bounded() {
        assert_eq!(
            query_recoveries(Some("topics=x&recover=user.42%4017%40ab12,b@0@Z"), 8),
            Ok(vec![
                ("user.42".to_string(), 17, "ab12".to_string()),
                ("b".to_string(), 0, "Z".to_string())
            ])
        );
        assert!(query_recoveries(Some("recover=a@1"), 8).is_err());
        assert!(query_recoveries(Some("recover=a@x@e"), 8).is_err());
        assert!(query_recoveries(Some("recover=a@1@e,a@2@e"), 8).is_err());
        assert!(query_recoveries(Some("recover=a@1@e,b@2@e"), 1).is_err());
        assert_eq!(query_recoveries(None, 8), Ok(vec![]));
    }

    #[test]
    fn subscribed_replies_say_where_the_topic_stands() {
        let plain = subscribed_reply("a.b", 7, "e1", None);
        assert_eq!(
            &plain[2..],
            br#"{"op":"subscribed","topic":"a.b","seq":7,"epoch":"e1"}"#
        );
        let recovered = subscribed_reply("a", 0, "e1", Some(false));
        let v: serde_json::Value = serde_json::from_slice(&recovered[2..]).unwrap();
        assert_eq!(v["recovered"], false);
    }

    #[test]
    fn replies_lead_with_op_and_are_json() {
        let frame = error_reply("bad_request", "a \"quoted\" reason");
        assert!(frame[2..].starts_with(br#"{"op":"error","code":"bad_request","msg":"#));
        let v: serde_json::Value = serde_json::from_slice(&frame[2..]).unwrap();
        assert_eq!(v["msg"], "a \"quoted\" reason");
        assert_eq!(
            &reply("subscribed", "a.b")[2..],
            br#"{"op":"subscribed","topic":"a.b"}"#
        );
    }

    #[test]
    fn publish_patterns() {
        assert!(publish_allowed("*", "anything"));
        assert!(publish_allowed("chat.*", "chat.room1"));
        assert!(!publish_allowed("chat.*", "chatter"));
        assert!(publish_allowed("exact", "exact"));
        assert!(!publish_allowed("exact", "exact.more"));
    }

    #[test]
    fn json_len_is_the_data_s_length_in_the_frame() {
        let every_ascii: String = (0u8..0x80).map(char::from).collect();
        for text in [&every_ascii[..], "", "plain", "é \u{2028} 😀", "\"\\\u{7f}"] {
            let data = EventData::Text(text);
            assert_eq!(
                data.json_len(),
                serde_json::to_vec(text).unwrap().len(),
                "{text:?}"
            );
        }
        assert_eq!(EventData::Json(r#"{"a":1}"#).json_len(), 7);
        // The envelope bound holds for the longest topic and seq.
        let topic = "t".repeat(TOPIC_BYTES_MAX);
        let data = EventData::Text("\u{1}");
        let frame = event_frame(&topic, u64::MAX, data);
        let header = 4; // a payload of 126 to 65,535 bytes
        assert_eq!(
            frame.len() - header,
            data.json_len() + EVENT_ENVELOPE_BYTES_MAX
        );
    }

    #[test]
    fn events_inline_json_and_quote_text() {
        let frame = event_frame("a", 7, EventData::classify(br#" {"x": 1} "#).unwrap());
        assert_eq!(&frame[2..], br#"{"topic":"a","seq":7,"data":{"x": 1}}"#);
        assert_eq!(frame[0], 0x81);
        let frame = event_frame("a", 8, EventData::classify(b"he said \"hi\"\n").unwrap());
        let v: serde_json::Value = serde_json::from_slice(&frame[2..]).unwrap();
        assert_eq!(v["data"], "he said \"hi\"\n");
        assert_eq!(v["seq"], 8);
        assert!(EventData::classify(&[0xff, 0xfe]).is_err());
        // Every event is valid JSON whatever the body.
        for body in [
            &b"42"[..],
            b"\"s\"",
            b"[",
            b"{}",
            b"",
            b"null",
            b"tab\there",
        ] {
            let frame = event_frame("t", 1, EventData::classify(body).unwrap());
            let payload_at = 2;
            serde_json::from_slice::<serde_json::Value>(&frame[payload_at..])
                .unwrap_or_else(|e| panic!("{body:?}: {e}"));
        }
    }

    #[test]
    fn seqs_are_written_in_full_and_infinite_numbers_refused() {
        for seq in [0, 9, 10, 1234567890, u64::MAX] {
            let frame = event_frame("t", seq, EventData::Json("1"));
            let v: serde_json::Value = serde_json::from_slice(&frame[2..]).unwrap();
            assert_eq!(v["seq"], seq);
        }
        let long = "x".repeat(300);
        let frame = event_frame("t", 1, EventData::Text(&long));
        assert_eq!(
            (frame[1], usize::from(frame[2]) << 8 | usize::from(frame[3])),
            (126, frame.len() - 4)
        );
        assert_eq!(
            EventData::classify(b"[1E400]").unwrap_err(),
            INFINITE_NUMBER
        );
        assert_eq!(
            EventData::json("{\"a\":-1e999}").unwrap_err(),
            INFINITE_NUMBER
        );
        assert!(matches!(
            EventData::json(" [1.5] "),
            Ok(EventData::Json("[1.5]"))
        ));
        assert!(matches!(
            EventData::classify(b"1E400x"),
            Ok(EventData::Text(_))
        ));
    }
}
