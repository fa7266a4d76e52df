//! The batch publish API: `POST /publish` whose body is JSON lines, one event
//! per line, `{"topic":T,"data":D}` (D any JSON value). The answer is JSON
//! lines in the same order, `{"topic":T,"seq":N,"epoch":E}` per accepted event
//! or `{"topic":T,"error":REASON}` per refused one (`"topic":null` when the line
//! is not such an object); 200 when every event was accepted, 207 when some
//! were. When none was, the status is an error, as for one event: 503 if the
//! server refused any (inboxes full, shutting down, Redis away; retry later),
//! else 400 (every line was bad); the lines still say why, each. A bad line
//! refuses that line only. Events of one topic are numbered in the order of
//! their lines. Blank lines are skipped.
//!
//! Bounds: at most [`BATCH_EVENTS_MAX`] events and [`BATCH_BYTES_MAX`] bytes
//! per request (413 past either), each event's data at most
//! `--max-message-size` (that line is refused).

use std::borrow::Cow;

use ringgate_shard::EventData;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::broker::{PublishError, Published};
use crate::bus::Bus;

/// Events one batch request may carry.
pub const BATCH_EVENTS_MAX: usize = 10_000;
/// Bytes one batch request may carry: 10,000 events of 1.6 KiB; a batch of
/// larger events is split by the publisher.
pub const BATCH_BYTES_MAX: usize = 16 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// The line as publishers write it, `{"topic":"T","data":D}` with no escape or
/// control character in T and nothing between the keys, taken apart without
/// the general parser's field matching (a large share of its time on such
/// short lines); D is still parsed as the general parser parses it. `None` for
/// any other form, which the general parser then decides: whatever this
/// accepts, it accepts the same way (the tests below hold it to that).
fn usual_form(line: &str) -> Option<Line<'_>> {
    let rest = line.strip_prefix(r#"{"topic":""#)?;
    let end = rest.find('"')?;
    let (topic, rest) = rest.split_at(end);
    if topic.bytes().any(|b| b == b'\\' || b < 0x20) {
        return None;
    }
    let data = rest.strip_prefix(r#"","data":"#)?.strip_suffix('}')?;
    // JSON's whitespace only, as the general parser skips.
    let data = data.trim_matches([' ', '\t', '\n', '\r']);
    let data = serde_json::from_str::<&RawValue>(data).ok()?;
    Some(Line {
        topic: Cow::Borrowed(topic),
        data,
    })
}

/// A line as `Line`: by `usual_form` where it can, else by serde.
fn parse_line(line: &str) -> serde_json::Result<Line<'_>> {
    usual_form(line).map_or_else(|| serde_json::from_str(line), Ok)
}

/// A line parsed: its topic (if it had one) and its data, or why it is refused.
type Parsed<'a> = (Option<Cow<'a, str>>, Result<EventData<'a>, String>);

/// The events of `body`, in order; `Err` when the request itself is refused
/// (413 or 400, with the reason).
fn parse(body: &[u8], message_bytes_max: usize) -> Result<Vec<Parsed<'_>>, (u16, String)> {
    let text = std::str::from_utf8(body)
        .map_err(|_| (400, "the body must be UTF-8 JSON lines".to_string()))?;
    let lines = || text.split('\n').map(str::trim).filter(|l| !l.is_empty());
    let count = lines().count();
    if count == 0 {
        return Err((
            400,
            "no events: one {\"topic\":T,\"data\":D} per line".into(),
        ));
    }
    if count > BATCH_EVENTS_MAX {
        return Err((
            413,
            format!("more than {BATCH_EVENTS_MAX} events in one request: split the batch"),
        ));
    }
    let mut parsed = Vec::with_capacity(count);
    parsed.extend(lines().map(|line| match parse_line(line) {
        Err(e) => {
            // Name the topic in the answer when the line has one.
            let topic = serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|v| Some(Cow::Owned(v.get("topic")?.as_str()?.to_string())));
            (topic, Err(format!("not {{\"topic\":T,\"data\":D}}: {e}")))
        }
        Ok(Line { topic, data }) => {
            let data = data.get();
            let checked = if data.len() > message_bytes_max {
                Err(format!(
                    "the event is larger than --max-message-size ({message_bytes_max} bytes)"
                ))
            } else {
                EventData::json(data).map_err(str::to_string)
            };
            (Some(topic), checked)
        }
    }));
    Ok(parsed)
}

/// Publishes a batch; (status, JSON lines).
pub async fn publish(bus: &Bus, body: &[u8], message_bytes_max: usize) -> (u16, String) {
    let parsed = match parse(body, message_bytes_max) {
        Ok(parsed) => parsed,
        Err((status, why)) => {
            return (status, format!("{}\n", serde_json::json!({ "error": why })))
        }
    };
    let events: Vec<(&str, EventData<'_>)> = parsed
        .iter()
        .filter_map(|(topic, data)| Some((topic.as_deref()?, *data.as_ref().ok()?)))
        .collect();
    let mut answers = bus.publish_many(&events).await.into_iter();
    let mut out = Vec::with_capacity(parsed.len() * 64);
    let (mut accepted, mut refused_by_server) = (0, false);
    for (topic, data) in &parsed {
        let topic = topic.as_deref();
        match data {
            Ok(_) => match answers.next().expect("one answer per event") {
                Ok(Published { seq, epoch, .. }) => {
                    accepted += 1;
                    accepted_line(&mut out, topic, seq, &epoch);
                }
                Err(e) => {
                    refused_by_server |= !matches!(e, PublishError::BadTopic);
                    refused_line(&mut out, topic, &e.message());
                }
            },
            Err(why) => refused_line(&mut out, topic, why),
        }
    }
    assert!(answers.next().is_none(), "one answer per event");
    let out = String::from_utf8(out).expect("JSON lines are UTF-8");
    // A 2xx says events were queued: none was, none is answered.
    let status = match accepted {
        n if n == parsed.len() => 200,
        0 if refused_by_server => 503,
        0 => 400,
        _ => 207,
    };
    (status, out)
}

/// `{"topic":T,"seq":N,"epoch":E}` and a newline, written by hand: a batch
/// answers thousands of these, and a `serde_json::Value` per line cost more
/// than the publish itself.
fn accepted_line(out: &mut Vec<u8>, topic: Option<&str>, seq: u64, epoch: &str) {
    use std::io::Write;
    out.extend_from_slice(b"{\"topic\":");
    serde_json::to_writer(&mut *out, &topic).expect("writing to a Vec");
    write!(out, ",\"seq\":{seq},\"epoch\":").expect("writing to a Vec");
    serde_json::to_writer(&mut *out, epoch).expect("writing to a Vec");
    out.extend_from_slice(b"}\n");
}

/// `{"topic":T,"error":REASON}` (`"topic":null` when the line had none) and a newline.
fn refused_line(out: &mut Vec<u8>, topic: Option<&str>, why: &str) {
    out.extend_from_slice(b"{\"topic\":");
    serde_json::to_writer(&mut *out, &topic).expect("writing to a Vec");
    out.extend_from_slice(b",\"error\":");
    serde_json::to_writer(&mut *out, why).expect("writing to a Vec");
    out.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_one_by_one() {
        let body = b"{\"topic\":\"a\",\"data\":{\"x\":1}}\n\n  {\"topic\":\"b\",\"data\":\"hi\"}\nnonsense\n{\"topic\":\"c\",\"data\":1E400}\n{\"topic\":\"d\",\"data\":1,\"more\":2}\n{\"topic\":\"e\",\"data\":[1,2,3,4]}";
        let parsed = parse(body, 7).unwrap();
        let summary: Vec<(Option<&str>, Result<&str, bool>)> = parsed
            .iter()
            .map(|(t, d)| {
                let data = d.as_ref().map_err(|_| false).map(|d| match d {
                    EventData::Json(json) => *json,
                    EventData::Text(_) => unreachable!("batch data is JSON"),
                });
                (t.as_deref(), data)
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (Some("a"), Ok("{\"x\":1}")),
                (Some("b"), Ok("\"hi\"")),
                (None, Err(false)),
                (Some("c"), Err(false)),
                (Some("d"), Err(false)),
                (Some("e"), Err(false)),
            ],
            "the last is over the 7-byte limit"
        );
    }

    /// Whether `usual_form` took the line, having checked that it took it as
    /// the general parser does.
    fn split_as_parsed(line: &str) -> bool {
        let general = serde_json::from_str::<Line<'_>>(line)
            .ok()
            .map(|l| (l.topic.into_owned(), l.data.get().to_string()));
        let Some(Line { topic, data }) = usual_form(line) else {
            return false;
        };
        assert_eq!(
            general,
            Some((topic.to_string(), data.get().to_string())),
            "{line:?}"
        );
        true
    }

    #[test]
    fn lines_in_the_usual_form_parse_as_the_general_parser_would() {
        let lines = [
            r#"{"topic":"a","data":{"x":1}}"#,
            r#"{"topic":"user.42","data":"}"}"#,
            r#"{"topic":"a","data": [1, 2] }"#,
            "{\"topic\":\"a\",\"data\":\u{a0}1}",
            r#"{"topic":"caf\u00e9","data":1}"#,
            "{\"topic\":\"café\",\"data\":1}",
            "{\"topic\":\"tab\there\",\"data\":1}",
            r#"{"topic":"a\"b","data":1}"#,
            r#"{"topic":"a","data":1,"data":2}"#,
            r#"{"topic":"a","data":1,"more":2}"#,
            r#"{"topic":"a","data":{"x":1}"#,
            r#"{"topic":"a","data":}"#,
            r#"{"topic":"a","data":1}}"#,
            r#"{"topic":"a","data":"1"} "#,
            r#"{"topic":"a","data":[1E400]}"#,
            r#"{"topic":"a" ,"data":1}"#,
            r#"{"data":1,"topic":"a"}"#,
            r#"{"topic":"a","topic":"b","data":1}"#,
        ];
        let usual = lines.into_iter().filter(|l| split_as_parsed(l)).count();
        assert_eq!(
            usual, 5,
            "the forms left to the general parser are not taken"
        );
    }

    #[test]
    fn random_lines_in_the_usual_form_parse_as_the_general_parser_would() {
        // Lines near the usual form: its pieces, each sometimes swapped for
        // another fragment, joined.
        const FRAGMENTS: [&str; 16] = [
            "\"",
            "\\",
            ",",
            ":",
            "}",
            "{",
            "[",
            "]",
            " ",
            "\t",
            "1",
            "1E400",
            "é",
            "\"data\"",
            "\"topic\"",
            "\u{1}",
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let (mut usual, mut tried) = (0, 0);
        for _ in 0..20_000 {
            let pieces = [
                "{\"topic\":\"",
                "a",
                "b",
                "\",\"data\":",
                "[",
                "1",
                "]",
                "}",
            ];
            let mut line = String::new();
            for piece in pieces {
                match next(8) {
                    0 => line.push_str(FRAGMENTS[next(FRAGMENTS.len())]),
                    1 => {}
                    2 => {
                        line.push_str(piece);
                        line.push_str(FRAGMENTS[next(FRAGMENTS.len())]);
                    }
                    _ => line.push_str(piece),
                }
            }
            tried += 1;
            usual += usize::from(split_as_parsed(&line));
        }
        assert!(
            usual > tried / 20,
            "the usual form was tried: {usual} of {tried}"
        );
    }

    #[test]
    fn a_batch_is_bounded() {
        assert_eq!(parse(b"\n \n", 10).unwrap_err().0, 400);
        assert_eq!(parse(b"\xff", 10).unwrap_err().0, 400);
        let many = "{\"topic\":\"a\",\"data\":1}\n".repeat(BATCH_EVENTS_MAX + 1);
        assert_eq!(parse(many.as_bytes(), 10).unwrap_err().0, 413);
    }
}
