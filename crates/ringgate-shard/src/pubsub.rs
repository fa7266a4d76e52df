//! The pub/sub protocol on `/ws` (design.md section 6), as pure functions.
//!
//! Client to gateway, text frames of JSON:
//! `{"op":"sub","topic":T}`, `{"op":"unsub","topic":T}` and, where allowed,
//! `{"op":"pub","topic":T,"data":<JSON>}`. Replies: `{"op":"subscribed","topic":T}`,
//! `{"op":"unsubscribed","topic":T}`, `{"op":"error","code":C,"msg":M}`.
//! Gateway to client, one text frame per event: `{"topic":T,"seq":N,"data":D}`,
//! built once per publish ([`event_frame`]) and shared by every subscriber.
//!
//! Owns the formats and the topic-name rule; not who is subscribed (`topics.rs`)
//! nor where `seq` comes from (the publisher).

use std::borrow::Cow;

use bytes::Bytes;
use ringgate_codec::OpCode;
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

/// A request from a client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Request<'a> {
    Sub(Cow<'a, str>),
    Unsub(Cow<'a, str>),
    /// `data` is raw JSON, checked by the parser.
    Pub {
        topic: Cow<'a, str>,
        data: &'a str,
    },
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow, default)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// Parses a client's text message; the error is the reason to send back.
pub(crate) fn parse_request(text: &[u8]) -> Result<Request<'_>, &'static str> {
    let wire: Wire<'_> = serde_json::from_slice(text)
        .map_err(|_| "expected a JSON object like {\"op\":\"sub\",\"topic\":\"name\"}")?;
    let topic = wire.topic.ok_or("missing \"topic\"")?;
    if !valid_topic(&topic) {
        return Err("invalid topic name: 1-128 bytes of A-Z a-z 0-9 _ . : / -");
    }
    match &*wire.op {
        "sub" => Ok(Request::Sub(topic)),
        "unsub" => Ok(Request::Unsub(topic)),
        "pub" => Ok(Request::Pub {
            topic,
            data: wire.data.ok_or("missing \"data\"")?.get(),
        }),
        _ => Err("unknown \"op\": expected sub, unsub or pub"),
    }
}

/// The topics named by `topics=a,b` in a request's query string, percent-decoded.
/// `Err` names the problem for a 400 answer.
pub(crate) fn query_topics(query: Option<&str>) -> Result<Vec<String>, &'static str> {
    let Some(query) = query else {
        return Ok(Vec::new());
    };
    let mut topics = Vec::new();
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
            if !topics.iter().any(|t| t == topic) {
                topics.push(topic.to_string());
            }
        }
    }
    Ok(topics)
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
    /// Classifies a publish body: JSON if it parses as JSON, text if UTF-8,
    /// `None` otherwise (events are text frames).
    pub fn classify(body: &'a [u8]) -> Option<EventData<'a>> {
        let text = std::str::from_utf8(body).ok()?;
        if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
            Some(EventData::Json(text.trim()))
        } else {
            Some(EventData::Text(text))
        }
    }
}

/// Builds the one WebSocket text frame of an event, ready to be sent as is to
/// every subscriber: `{"topic":T,"seq":N,"data":D}`.
pub fn event_frame(topic: &str, seq: u64, data: EventData<'_>) -> Bytes {
    debug_assert!(valid_topic(topic), "topic names need no escaping");
    let mut payload = Vec::with_capacity(40 + topic.len() + 20 + data_len(&data));
    payload.extend_from_slice(b"{\"topic\":\"");
    payload.extend_from_slice(topic.as_bytes());
    payload.extend_from_slice(b"\",\"seq\":");
    payload.extend_from_slice(seq.to_string().as_bytes());
    payload.extend_from_slice(b",\"data\":");
    match data {
        EventData::Json(json) => payload.extend_from_slice(json.as_bytes()),
        EventData::Text(text) => {
            serde_json::to_writer(&mut payload, text).expect("writing to a Vec")
        }
    }
    payload.push(b'}');
    crate::input::frame(OpCode::Text, &payload)
}

fn data_len(data: &EventData<'_>) -> usize {
    match data {
        EventData::Json(s) | EventData::Text(s) => s.len() + 2,
    }
}

/// `{"op":"subscribed","topic":T}` and the like, as a text frame.
pub(crate) fn reply(op: &str, topic: &str) -> Bytes {
    debug_assert!(valid_topic(topic), "topic names need no escaping");
    let body = format!("{{\"op\":\"{op}\",\"topic\":\"{topic}\"}}");
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
            Ok(Request::Sub("a".into()))
        );
        assert_eq!(
            parse_request(br#"{"topic":"a","op":"unsub"}"#),
            Ok(Request::Unsub("a".into()))
        );
        // Escapes in strings are decoded.
        assert_eq!(
            parse_request(br#"{"op":"sub","topic":"a\u002eb"}"#),
            Ok(Request::Sub("a.b".into()))
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
    fn query_topics_are_decoded_deduplicated_and_checked() {
        assert_eq!(query_topics(None), Ok(vec![]));
        assert_eq!(
            query_topics(Some("topics=a,b,a")),
            Ok(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(
            query_topics(Some("x=1&topics=user%3A42,c%2Fd")),
            Ok(vec!["user:42".into(), "c/d".into()])
        );
        assert_eq!(query_topics(Some("topics=")), Ok(vec![]));
        assert!(query_topics(Some("topics=a%2")).is_err());
        assert!(query_topics(Some("topics=bad%20name")).is_err());
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
    fn events_inline_json_and_quote_text() {
        let frame = event_frame("a", 7, EventData::classify(br#" {"x": 1} "#).unwrap());
        assert_eq!(&frame[2..], br#"{"topic":"a","seq":7,"data":{"x": 1}}"#);
        assert_eq!(frame[0], 0x81);
        let frame = event_frame("a", 8, EventData::classify(b"he said \"hi\"\n").unwrap());
        let v: serde_json::Value = serde_json::from_slice(&frame[2..]).unwrap();
        assert_eq!(v["data"], "he said \"hi\"\n");
        assert_eq!(v["seq"], 8);
        assert!(EventData::classify(&[0xff, 0xfe]).is_none());
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
}
