//! The batch publish API: `POST /publish` whose body is JSON lines, one event
//! per line, `{"topic":T,"data":D}` (D any JSON value). The answer is JSON
//! lines in the same order, `{"topic":T,"seq":N,"epoch":E}` per accepted event
//! or `{"topic":T,"error":REASON}` per refused one (`"topic":null` when the line
//! is not such an object); 200 when every event was accepted, 207 otherwise. A
//! bad line refuses that line only. Events of one topic are numbered in the
//! order of their lines. Blank lines are skipped.
//!
//! Bounds: at most [`BATCH_EVENTS_MAX`] events and [`BATCH_BYTES_MAX`] bytes
//! per request (413 past either), each event's data at most
//! `--max-message-size` (that line is refused).

use ringgate_shard::EventData;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

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
    topic: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// A line parsed: its topic (if it had one) and its data, or why it is refused.
type Parsed<'a> = (Option<String>, Result<&'a str, String>);

/// The events of `body`, in order; `Err` when the request itself is refused
/// (413 or 400, with the reason).
fn parse(body: &[u8], message_bytes_max: usize) -> Result<Vec<Parsed<'_>>, (u16, String)> {
    let text = std::str::from_utf8(body)
        .map_err(|_| (400, "the body must be UTF-8 JSON lines".to_string()))?;
    let lines: Vec<&str> = text
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return Err((
            400,
            "no events: one {\"topic\":T,\"data\":D} per line".into(),
        ));
    }
    if lines.len() > BATCH_EVENTS_MAX {
        return Err((
            413,
            format!("more than {BATCH_EVENTS_MAX} events in one request: split the batch"),
        ));
    }
    Ok(lines
        .into_iter()
        .map(|line| match serde_json::from_str::<Line<'_>>(line) {
            Err(e) => {
                // Name the topic in the answer when the line has one.
                let topic = serde_json::from_str::<Value>(line)
                    .ok()
                    .and_then(|v| Some(v.get("topic")?.as_str()?.to_string()));
                (topic, Err(format!("not {{\"topic\":T,\"data\":D}}: {e}")))
            }
            Ok(Line { topic, data }) => {
                let data = data.get();
                let checked = if data.len() > message_bytes_max {
                    Err(format!(
                        "the event is larger than --max-message-size ({message_bytes_max} bytes)"
                    ))
                } else {
                    match EventData::classify(data.as_bytes()) {
                        Ok(EventData::Json(json)) => Ok(json),
                        Ok(EventData::Text(_)) => unreachable!("RawValue holds valid JSON"),
                        Err(why) => Err(why.to_string()),
                    }
                };
                (Some(topic), checked)
            }
        })
        .collect())
}

/// Publishes a batch; (status, JSON lines).
pub async fn publish(bus: &Bus, body: &[u8], message_bytes_max: usize) -> (u16, String) {
    let parsed = match parse(body, message_bytes_max) {
        Ok(parsed) => parsed,
        Err((status, why)) => return (status, format!("{}\n", json!({ "error": why }))),
    };
    let events: Vec<(&str, EventData<'_>)> = parsed
        .iter()
        .filter_map(|(topic, data)| Some((topic.as_deref()?, EventData::Json(data.as_ref().ok()?))))
        .collect();
    let mut answers = bus.publish_many(&events).await.into_iter();
    let mut out = String::with_capacity(parsed.len() * 48);
    let mut all_accepted = true;
    for (topic, data) in &parsed {
        let line: Value = match (topic, data) {
            (Some(topic), Ok(_)) => match answers.next().expect("one answer per event") {
                Ok(Published { seq, epoch, .. }) => {
                    json!({ "topic": topic, "seq": seq, "epoch": &*epoch })
                }
                Err(e) => {
                    all_accepted = false;
                    json!({ "topic": topic, "error": reason(&e) })
                }
            },
            (topic, Err(why)) => {
                all_accepted = false;
                json!({ "topic": topic, "error": why })
            }
            (None, Ok(_)) => unreachable!("a line with data has a topic"),
        };
        out.push_str(&line.to_string());
        out.push('\n');
    }
    assert!(answers.next().is_none(), "one answer per event");
    (if all_accepted { 200 } else { 207 }, out)
}

fn reason(e: &PublishError) -> String {
    e.message()
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
            .map(|(t, d)| (t.as_deref(), d.as_ref().map(|d| *d).map_err(|_| false)))
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

    #[test]
    fn a_batch_is_bounded() {
        assert_eq!(parse(b"\n \n", 10).unwrap_err().0, 400);
        assert_eq!(parse(b"\xff", 10).unwrap_err().0, 400);
        let many = "{\"topic\":\"a\",\"data\":1}\n".repeat(BATCH_EVENTS_MAX + 1);
        assert_eq!(parse(many.as_bytes(), 10).unwrap_err().0, 413);
    }
}
