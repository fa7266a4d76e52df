//! What a fleet keeps in Redis and how it reads it: key and channel names, the
//! two Lua scripts, and the wire forms of a published message and a history
//! entry. No I/O here; `link.rs` runs the scripts.
//!
//! Per topic T (the `{T}` hash tag keeps a topic's keys on one Redis Cluster
//! slot):
//! - `ringgate:{T}:meta`, a hash: `seq` (the latest number given) and `epoch`
//!   (the numbering's name). It expires after `--topic-idle-ttl` without a
//!   publish or a subscribe; a topic made again gets a new epoch and its old
//!   history is dropped with it.
//! - `ringgate:{T}:history`, a list of `SECS:DATA`, oldest first, the last
//!   `--history-size` events (SECS: Redis' clock when it was published). The
//!   list's last entry is always event `seq`, so the events after N are its
//!   last `seq - N` entries. It expires `--history-ttl` after the last publish;
//!   older entries inside it are not replayed.
//! - channel `ringgate:{T}:events`: `SEQ:EPOCH:DATA` per event.
//!
//! DATA is the event's JSON text (a text body is JSON-escaped first), so every
//! host builds the same frame.

use std::borrow::Cow;

use ringgate_shard::EventData;

use crate::topic_table::Epoch;

const PREFIX: &str = "ringgate:{";

pub fn meta_key(topic: &str) -> String {
    format!("{PREFIX}{topic}}}:meta")
}

pub fn history_key(topic: &str) -> String {
    format!("{PREFIX}{topic}}}:history")
}

pub fn channel(topic: &str) -> String {
    format!("{PREFIX}{topic}}}:events")
}

/// A key the link's write probe expires and nobody sets; in the keys'
/// namespace (`ringgate:{*`), so a Redis ACL limited to it allows the probe.
pub const WRITE_PROBE: &str = "ringgate:{probe}:write";

/// The topic a channel name carries, if it is one of ours.
pub fn topic_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix(PREFIX)?.strip_suffix("}:events")
}

/// Lua both scripts start with: whether a `seq` read back is a count as
/// HINCRBY takes it (no sign, no leading zero, below 2^63). A numbering with
/// anything else is not of ringgate's making.
macro_rules! is_count_lua {
    () => {
        r"local function is_count(s)
  return s == '0' or (#s <= 18 and string.match(s, '^[1-9]%d*$') ~= nil)
end
"
    };
}

/// Numbers, keeps and publishes events, atomically and in order (one event, or
/// a chunk of a batch). The history's last entry is always event `seq`: a host
/// that keeps none (`--history-size 0`) empties it, so a fleet of mixed
/// settings loses history, never misnumbers it.
/// KEYS: meta and history of each event's topic, in turn. ARGV: history size,
/// history TTL (s), meta TTL (s), then for each event its channel, its data
/// and a fresh epoch (used if the topic has no state).
/// Returns {seq, epoch, hosts that received it} per event.
pub const PUBLISH: &str = concat!(
    "redis.replicate_commands()\n",
    is_count_lua!(),
    r"local size = tonumber(ARGV[1])
local now = redis.call('TIME')[1]
local answers = {}
for i = 1, #KEYS / 2 do
  local meta, history = KEYS[2 * i - 1], KEYS[2 * i]
  local channel, data, fresh = ARGV[3 * i + 1], ARGV[3 * i + 2], ARGV[3 * i + 3]
  -- A numbering not of our making (a seq that is no count, an epoch not ten
  -- of [0-9a-z]) is no numbering: the topic starts a new one.
  local count, epoch = unpack(redis.call('HMGET', meta, 'seq', 'epoch'))
  if (count and not is_count(count))
    or (epoch and not string.match(epoch, '^[0-9a-z]+$'))
    or (epoch and #epoch ~= 10) then
    redis.call('HDEL', meta, 'seq', 'epoch')
    epoch = nil
  end
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  if not epoch then
    epoch = fresh
    redis.call('HSET', meta, 'epoch', epoch)
    redis.call('DEL', history)
  end
  redis.call('EXPIRE', meta, ARGV[3])
  if size > 0 then
    redis.call('RPUSH', history, now .. ':' .. data)
    redis.call('LTRIM', history, -size, -1)
    redis.call('EXPIRE', history, ARGV[2])
  else
    redis.call('DEL', history)
  end
  local hosts = redis.call('PUBLISH', channel, seq .. ':' .. epoch .. ':' .. data)
  answers[i] = {seq, epoch, hosts}
end
return answers
"
);

/// Where a topic stands, made if unknown (seq 0, the fresh epoch), and the
/// history from a given `seq` on. A host that delivered further under the same
/// epoch than Redis' `seq` (Redis restored from an old snapshot, a lagging
/// replica promoted) means that numbering is broken: the topic starts a new one,
/// so no `(seq, epoch)` names two events and every host sends a gap notice.
/// KEYS: meta, history. ARGV: a fresh epoch, meta TTL (s), the first `seq`
/// wanted (0: none), the asking host's epoch ("" if none) and last delivered `seq`.
/// Returns {seq, epoch, Redis' clock (s), {entries from the first wanted}};
/// fewer entries than `seq - first + 1` means the history no longer reaches it.
pub const STANDING: &str = concat!(
    "redis.replicate_commands()\n",
    is_count_lua!(),
    r"local count, epoch = unpack(redis.call('HMGET', KEYS[1], 'seq', 'epoch'))
local seq = count and is_count(count) and tonumber(count)
-- An epoch not of our making (ten of [0-9a-z]) is no epoch.
if epoch and (#epoch ~= 10 or not string.match(epoch, '^[0-9a-z]+$')) then
  epoch = nil
end
if epoch and seq and epoch == ARGV[4] and seq < tonumber(ARGV[5]) then
  epoch = nil
end
if not epoch or not seq then
  seq = 0
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'seq', 0, 'epoch', epoch)
  redis.call('DEL', KEYS[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
local from = tonumber(ARGV[3])
local entries = {}
if from > 0 and from <= seq then
  entries = redis.call('LRANGE', KEYS[2], from - seq - 1, -1)
end
return {seq, epoch, redis.call('TIME')[1], entries}
"
);

/// The event data as it travels the bus: JSON text.
pub fn data_json<'a>(data: &EventData<'a>) -> Cow<'a, str> {
    match *data {
        EventData::Json(json) => Cow::Borrowed(json),
        EventData::Text(text) => {
            Cow::Owned(serde_json::to_string(text).expect("a string serialises"))
        }
    }
}

/// One message of a topic's channel.
#[derive(Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub seq: u64,
    pub epoch: Epoch,
    pub data: &'a str,
}

/// `SEQ:EPOCH:DATA`; `None` if it is not that (not ours, or corrupt).
pub fn parse_message(payload: &[u8]) -> Option<Message<'_>> {
    let text = std::str::from_utf8(payload).ok()?;
    let (seq, rest) = text.split_once(':')?;
    let (epoch, data) = rest.split_once(':')?;
    Some(Message {
        seq: seq.parse().ok().filter(|&s| s > 0)?,
        epoch: Epoch::parse(epoch)?,
        data,
    })
}

/// Where a topic stands in Redis, as [`STANDING`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub seq: u64,
    pub epoch: Epoch,
    /// Redis' clock, seconds.
    pub now: u64,
    /// `SECS:DATA` entries from the first `seq` asked for to `seq`, or fewer.
    pub entries: Vec<String>,
}

impl Standing {
    pub fn from_reply(reply: (u64, String, u64, Vec<String>)) -> Result<Standing, String> {
        let (seq, epoch, now, entries) = reply;
        let epoch = Epoch::parse(&epoch).ok_or_else(|| format!("a corrupt epoch {epoch:?}"))?;
        Ok(Standing {
            seq,
            epoch,
            now,
            entries,
        })
    }

    /// The data of events `from..=seq`, if the history holds every one of them
    /// and none is older than `ttl_secs`.
    pub fn events_from(&self, from: u64, ttl_secs: u64) -> Option<Vec<&str>> {
        if from > self.seq {
            return Some(Vec::new());
        }
        let wanted = usize::try_from(self.seq - from + 1).ok()?;
        if self.entries.len() < wanted {
            return None;
        }
        let entries = &self.entries[self.entries.len() - wanted..];
        let mut events = Vec::with_capacity(wanted);
        for entry in entries {
            let (secs, data) = entry.split_once(':')?;
            let secs: u64 = secs.parse().ok()?;
            if secs.saturating_add(ttl_secs) < self.now {
                return None;
            }
            events.push(data);
        }
        Some(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_topic_in_a_hash_tag() {
        assert_eq!(meta_key("user.42"), "ringgate:{user.42}:meta");
        assert_eq!(history_key("a/b"), "ringgate:{a/b}:history");
        assert_eq!(channel("x:y"), "ringgate:{x:y}:events");
        assert_eq!(topic_of_channel(&channel("x:y")), Some("x:y"));
        assert_eq!(topic_of_channel("other"), None);
    }

    #[test]
    fn messages_parse_or_are_refused() {
        let m = parse_message(b"7:abcdefghij:{\"a\":1}").unwrap();
        assert_eq!((m.seq, &*m.epoch, m.data), (7, "abcdefghij", "{\"a\":1}"));
        assert_eq!(parse_message(b"7:abcdefghij:a:b").unwrap().data, "a:b");
        for bad in [
            &b"0:abcdefghij:1"[..],
            b"x:abcdefghij:1",
            b"7:ABCDEFGHIJ:1",
            b"7:short:1",
            b"7",
            b"\xff:abcdefghij:1",
        ] {
            assert_eq!(parse_message(bad), None, "{bad:?}");
        }
    }

    fn standing(seq: u64, entries: &[&str]) -> Standing {
        Standing {
            seq,
            epoch: Epoch::parse("0123456789").unwrap(),
            now: 1000,
            entries: entries.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn history_covers_a_range_only_whole_and_young_enough() {
        let s = standing(5, &["990:3", "995:4", "999:5"]);
        assert_eq!(s.events_from(3, 60), Some(vec!["3", "4", "5"]));
        assert_eq!(s.events_from(5, 60), Some(vec!["5"]));
        assert_eq!(s.events_from(6, 60), Some(vec![]), "nothing is missing");
        assert_eq!(s.events_from(2, 60), None, "event 2 is gone");
        assert_eq!(s.events_from(3, 5), None, "event 3 is older than the TTL");
        assert_eq!(s.events_from(4, 5), Some(vec!["4", "5"]));
        assert_eq!(standing(5, &["nonsense"]).events_from(5, 60), None);
    }

    #[test]
    fn text_travels_as_a_json_string() {
        assert_eq!(data_json(&EventData::Json("{\"a\":1}")), "{\"a\":1}");
        assert_eq!(
            data_json(&EventData::Text("say \"hi\"")),
            "\"say \\\"hi\\\"\""
        );
    }
}
