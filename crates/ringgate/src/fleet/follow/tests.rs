use std::sync::Arc;
use std::time::{Duration, Instant};

use ringgate_shard::{topic_hash, Command, Recovery, ShardSender, Since, SubscribeRequest};
use serde_json::Value;

use super::*;

const EPOCH: &str = "0123456789";
const OTHER_EPOCH: &str = "abcdefghij";

fn epoch(text: &str) -> Epoch {
    Epoch::parse(text).unwrap()
}

fn follows(shards: usize, capacity: usize) -> (Follows, Vec<ShardSender>) {
    let senders: Vec<ShardSender> = (0..shards)
        .map(|id| ShardSender::detached(id, capacity).unwrap())
        .collect();
    (follows_of(&senders), senders)
}

/// Follows delivering to `shards`, linked up.
fn follows_of(shards: &[ShardSender]) -> Follows {
    let mut f = Follows::new(
        shards.to_vec(),
        100,
        Duration::from_secs(300),
        Duration::from_secs(60),
    );
    f.link_up();
    f
}

fn request(shard: usize, topic: &str, since: Option<(u64, &str)>) -> SubscribeRequest {
    SubscribeRequest {
        shard,
        key: 1,
        generation: 1,
        topic: Arc::from(topic),
        since: since.map(|(seq, e)| Since {
            seq,
            epoch: e.to_string(),
        }),
    }
}

/// Where a topic stands: `seq`, and the data of events `first..=seq` ("n").
fn standing(seq: u64, epoch_text: &str, first: u64) -> Standing {
    Standing {
        seq,
        epoch: epoch(epoch_text),
        now: 1000,
        entries: (first..=seq).map(|n| format!("999:{n}")).collect(),
    }
}

/// What a shard's inbox got: "event N", "gap N E", "answer S R".
fn inbox(shard: &ShardSender) -> Vec<String> {
    shard
        .take_all_for_tests()
        .into_iter()
        .map(|c| match c {
            Command::Deliver { frame, .. } => {
                let v: Value = serde_json::from_slice(&frame[2..]).unwrap();
                if v["op"] == "gap" {
                    format!("gap {} {}", v["seq"], v["epoch"].as_str().unwrap())
                } else {
                    assert_eq!(v["data"], v["seq"], "the data is the seq here");
                    format!("event {}", v["seq"])
                }
            }
            Command::Subscribed(a) => {
                format!("answer {} {:?} {}", a.seq, a.recovery, a.replay.len())
            }
        })
        .collect()
}

/// Confirms every SUBSCRIBE asked for; returns the topics.
fn confirm(f: &mut Follows) -> Vec<Arc<str>> {
    let asked = std::mem::take(&mut f.to_subscribe);
    f.subscribed(&asked);
    asked.into_iter().map(|(t, _)| t).collect()
}

/// Follows `topic` from shard 0 and syncs it at `seq` (epoch `EPOCH`).
fn live(f: &mut Follows, topic: &str, seq: u64) {
    f.presence(0, Arc::from(topic), true, Instant::now());
    let topic: Arc<str> = Arc::from(topic);
    assert_eq!(confirm(f), vec![topic]);
    let sync = f.to_sync.pop_front().unwrap();
    assert_eq!(sync.from, 0, "never synced: no history wanted");
    f.synced(&sync, Ok(standing(seq, EPOCH, seq + 1)));
}

#[test]
fn a_subscribe_waits_for_the_topic_to_be_live_and_is_answered_at_its_seq() {
    let (mut f, shards) = follows(2, 100);
    f.subscribe(request(1, "t", None));
    assert_eq!(f.to_subscribe.len(), 1);
    assert!(inbox(&shards[1]).is_empty(), "not live yet");
    confirm(&mut f);
    // Messages while syncing are held, then delivered past the standing.
    f.message("t", 7, epoch(EPOCH), "7");
    f.message("t", 8, epoch(EPOCH), "8");
    let sync = f.to_sync.pop_front().unwrap();
    f.synced(&sync, Ok(standing(7, EPOCH, 8)));
    assert_eq!(inbox(&shards[1]), ["event 8", "answer 8 NotAsked 0"]);
    assert_eq!(inbox(&shards[0]), ["event 8"]);
}

#[test]
fn a_subscribe_waiting_past_the_limit_is_refused_and_a_later_one_still_waits() {
    let (mut f, shards) = follows(1, 100);
    f.subscribe(request(0, "t", None));
    let first = Instant::now();
    std::thread::sleep(Duration::from_millis(5));
    f.subscribe(request(0, "t", None));
    f.tick(first + SUBSCRIBE_WAIT + Duration::from_millis(1));
    let answers = shards[0].take_all_for_tests();
    assert_eq!(answers.len(), 1, "the first only");
    match &answers[0] {
        Command::Subscribed(a) => assert!(a.refused.unwrap().contains("in time")),
        Command::Deliver { .. } => panic!("an answer expected"),
    }
    // The second is answered once the topic is live.
    confirm(&mut f);
    let sync = f.to_sync.pop_front().unwrap();
    f.synced(&sync, Ok(standing(4, EPOCH, 5)));
    assert_eq!(inbox(&shards[0]), ["answer 4 NotAsked 0"]);
}

#[test]
fn live_messages_are_delivered_once_in_order_and_a_gap_is_repaired_from_history() {
    let (mut f, shards) = follows(1, 100);
    live(&mut f, "t", 2);
    f.message("t", 3, epoch(EPOCH), "3");
    f.message("t", 3, epoch(EPOCH), "3");
    f.message("t", 6, epoch(EPOCH), "6");
    f.message("t", 7, epoch(EPOCH), "7");
    let sync = f.to_sync.pop_front().unwrap();
    assert_eq!(sync.from, 4, "from the event after the last delivered");
    f.synced(&sync, Ok(standing(6, EPOCH, 4)));
    assert_eq!(
        inbox(&shards[0]),
        ["event 3", "event 4", "event 5", "event 6", "event 7"]
    );
    assert_eq!(f.gaps.detected, 1);
    assert_eq!(f.gaps.repaired, 1);
    assert_eq!(f.gaps.replayed, 3);
}

#[test]
fn a_gap_the_history_cannot_close_and_a_new_numbering_send_notices() {
    let (mut f, shards) = follows(1, 100);
    live(&mut f, "t", 2);
    f.message("t", 9, epoch(EPOCH), "9");
    let sync = f.to_sync.pop_front().unwrap();
    f.synced(&sync, Ok(standing(9, EPOCH, 8)));
    assert_eq!(inbox(&shards[0]), [format!("gap 9 {EPOCH}")]);
    // Redis lost the topic: a message of another numbering.
    f.message("t", 1, epoch(OTHER_EPOCH), "1");
    let sync = f.to_sync.pop_front().unwrap();
    f.synced(&sync, Ok(standing(1, OTHER_EPOCH, 1)));
    assert_eq!(
        inbox(&shards[0]),
        [format!("gap 1 {OTHER_EPOCH}")],
        "event 1 of the new numbering is covered by the notice"
    );
    f.message("t", 2, epoch(OTHER_EPOCH), "2");
    assert_eq!(inbox(&shards[0]), ["event 2"]);
    assert_eq!(f.gaps.notified, 2);
}

#[test]
fn a_full_inbox_stalls_the_topic_until_the_history_delivers_it() {
    let (mut f, shards) = follows(2, 2);
    live(&mut f, "t", 0);
    f.message("t", 1, epoch(EPOCH), "1");
    f.message("t", 2, epoch(EPOCH), "2");
    f.message("t", 3, epoch(EPOCH), "3");
    assert_eq!(inbox(&shards[0]), ["event 1", "event 2"]);
    assert_eq!(inbox(&shards[1]), ["event 1", "event 2"]);
    assert!(f.to_sync.is_empty(), "a stalled topic waits for a tick");
    f.tick(Instant::now());
    let sync = f.to_sync.pop_front().unwrap();
    assert_eq!(sync.from, 3);
    f.message("t", 4, epoch(EPOCH), "4");
    f.synced(&sync, Ok(standing(3, EPOCH, 3)));
    assert_eq!(inbox(&shards[0]), ["event 3", "event 4"]);
    assert_eq!(inbox(&shards[1]), ["event 3", "event 4"]);
    f.check();
}

#[test]
fn events_go_only_to_shards_that_may_hold_the_topic() {
    let (a, mut routes_a) = ShardSender::detached_routed(0, 100).unwrap();
    let (b, mut routes_b) = ShardSender::detached_routed(1, 2).unwrap();
    let shards = vec![a, b];
    let mut f = follows_of(&shards);
    routes_a.add(topic_hash("t"));
    live(&mut f, "t", 0);
    for n in 1..=3 {
        f.message("t", n, epoch(EPOCH), &n.to_string());
    }
    assert_eq!(inbox(&shards[0]), ["event 1", "event 2", "event 3"]);
    assert!(
        inbox(&shards[1]).is_empty(),
        "nothing for a shard without the topic, and its small inbox stalls nothing"
    );
    // Shard 1 subscribes: counted before asking, as a shard does.
    routes_b.add(topic_hash("t"));
    f.subscribe(request(1, "t", None));
    f.message("t", 4, epoch(EPOCH), "4");
    assert_eq!(inbox(&shards[1]), ["answer 3 NotAsked 0", "event 4"]);
    assert_eq!(inbox(&shards[0]), ["event 4"]);
    f.check();
}

#[test]
fn recoveries_read_the_history_and_answer_at_the_hosts_seq() {
    let (mut f, shards) = follows(1, 100);
    live(&mut f, "t", 5);
    f.subscribe(request(0, "t", Some((5, EPOCH))));
    f.subscribe(request(0, "t", Some((1, OTHER_EPOCH))));
    assert_eq!(
        inbox(&shards[0]),
        ["answer 5 Recovered 0", "answer 5 EpochChanged 0"]
    );
    f.subscribe(request(0, "t", Some((2, EPOCH))));
    let read = f.to_read.pop().unwrap();
    assert_eq!(read.from, 3);
    // Redis answered at 5, but this host delivered 6 meanwhile: read again.
    f.message("t", 6, epoch(EPOCH), "6");
    f.recovery_read(read, Ok(standing(5, EPOCH, 3)));
    let read = f.to_read.pop().unwrap();
    assert_eq!(read.attempt, 2);
    f.recovery_read(read, Ok(standing(7, EPOCH, 3)));
    assert_eq!(inbox(&shards[0]), ["event 6", "answer 6 Recovered 4"]);
    // A history that no longer reaches `since + 1`.
    f.subscribe(request(0, "t", Some((2, EPOCH))));
    let read = f.to_read.pop().unwrap();
    f.recovery_read(read, Ok(standing(6, EPOCH, 5)));
    assert_eq!(inbox(&shards[0]), ["answer 6 TooOld 0"]);
    let _ = Recovery::NotAsked;
}

#[test]
fn an_unused_topic_is_unsubscribed_after_the_grace_and_continues_if_it_returns() {
    let (mut f, shards) = follows(1, 100);
    let start = Instant::now();
    live(&mut f, "t", 4);
    f.presence(0, Arc::from("t"), false, start);
    f.tick(start + UNSUBSCRIBE_GRACE / 2);
    assert!(f.to_unsubscribe.is_empty(), "within the grace");
    f.tick(start + UNSUBSCRIBE_GRACE);
    assert_eq!(f.to_unsubscribe, vec![Arc::<str>::from("t")]);
    assert_eq!(f.len(), 0);
    // Back within REMEMBER_FOR: the sync starts after the last delivered.
    f.presence(0, Arc::from("t"), true, start + UNSUBSCRIBE_GRACE);
    confirm(&mut f);
    let sync = f.to_sync.pop_front().unwrap();
    assert_eq!(sync.from, 5);
    f.synced(&sync, Ok(standing(6, EPOCH, 5)));
    assert_eq!(inbox(&shards[0]), ["event 5", "event 6"]);
    // Gone for longer, it is forgotten.
    let later = start + UNSUBSCRIBE_GRACE * 3;
    f.presence(0, Arc::from("t"), false, later);
    f.tick(later + UNSUBSCRIBE_GRACE);
    f.tick(later + UNSUBSCRIBE_GRACE + REMEMBER_FOR);
    f.presence(0, Arc::from("t"), true, later + REMEMBER_FOR * 2);
    confirm(&mut f);
    assert_eq!(f.to_sync.pop_back().unwrap().from, 0);
}

#[test]
fn a_lost_link_resubscribes_and_resyncs_every_topic_and_drops_stale_answers() {
    let (mut f, shards) = follows(1, 100);
    live(&mut f, "a", 1);
    live(&mut f, "b", 1);
    f.message("a", 2, epoch(EPOCH), "2");
    assert_eq!(f.live(), 2);
    f.link_down();
    assert_eq!(f.live(), 0);
    f.message("a", 3, epoch(EPOCH), "3");
    f.link_up();
    let mut again = confirm(&mut f);
    again.sort();
    assert_eq!(again, vec![Arc::<str>::from("a"), Arc::from("b")]);
    let syncs: Vec<_> = f.to_sync.drain(..).collect();
    let a = syncs.iter().find(|s| &*s.topic == "a").unwrap();
    assert_eq!(a.from, 3);
    // An answer to an older sync is not taken.
    let stale = Sync { id: 0, ..a.clone() };
    f.synced(&stale, Ok(standing(3, EPOCH, 3)));
    assert_eq!(inbox(&shards[0]), ["event 2"]);
    f.synced(a, Ok(standing(3, EPOCH, 3)));
    assert_eq!(inbox(&shards[0]), ["event 3"]);
    assert_eq!(f.live(), 1, "b is still syncing");
    f.check();
}

#[test]
fn followed_topics_are_kept_from_expiring_until_left() {
    let (mut f, _) = follows(1, 100);
    let start = Instant::now();
    live(&mut f, "t", 0);
    f.tick(start + Duration::from_secs(30));
    assert!(f.to_touch.is_empty());
    f.tick(start + Duration::from_secs(61));
    assert_eq!(f.to_touch, vec![Arc::<str>::from("t")]);
    f.to_touch.clear();
    f.tick(start + Duration::from_secs(100));
    assert!(f.to_touch.is_empty(), "touched at 61 s");
    f.presence(0, Arc::from("t"), false, start + Duration::from_secs(100));
    f.tick(start + Duration::from_secs(130));
    assert!(f.to_touch.is_empty(), "no longer followed");
}

#[test]
#[should_panic(expected = "a departure follows an announcement")]
fn a_departure_without_an_announcement_is_a_bug() {
    let (mut f, _) = follows(1, 100);
    f.presence(0, Arc::from("x"), true, Instant::now());
    f.presence(0, Arc::from("x"), false, Instant::now());
    f.presence(0, Arc::from("x"), false, Instant::now());
}

#[test]
fn a_recovery_from_a_host_ahead_waits_for_this_one_then_says_future() {
    let (mut f, shards) = follows(1, 100);
    let start = Instant::now();
    live(&mut f, "t", 5);
    f.subscribe(request(0, "t", Some((6, EPOCH))));
    f.subscribe(request(0, "t", Some((9, EPOCH))));
    assert!(inbox(&shards[0]).is_empty(), "both wait");
    f.message("t", 6, epoch(EPOCH), "6");
    assert_eq!(inbox(&shards[0]), ["event 6", "answer 6 Recovered 0"]);
    f.tick(start + AHEAD_WAIT * 2);
    assert_eq!(inbox(&shards[0]), ["answer 6 Future 0"]);
    f.tick(start + AHEAD_WAIT * 3);
    assert_eq!(f.len(), 1, "still followed: shard 0 holds it");
}

#[test]
fn redis_going_back_under_the_same_epoch_is_found_and_renumbered() {
    let (mut f, shards) = follows(1, 100);
    live(&mut f, "t", 10);
    // A late copy of an event the sync already covered is a plain duplicate.
    f.message("t", 9, epoch(EPOCH), "9");
    assert!(f.to_sync.is_empty());
    f.message("t", 11, epoch(EPOCH), "11");
    f.message("t", 12, epoch(EPOCH), "12");
    assert_eq!(inbox(&shards[0]), ["event 11", "event 12"]);
    // Redis restored from a snapshot at 10 numbers a new event 11 again.
    f.message("t", 11, epoch(EPOCH), "11");
    let sync = f.to_sync.pop_front().expect("a sync");
    assert_eq!(sync.host, Some((epoch(EPOCH), 12)), "the script renumbers");
    f.synced(&sync, Ok(standing(0, OTHER_EPOCH, 1)));
    assert_eq!(inbox(&shards[0]), [format!("gap 0 {OTHER_EPOCH}")]);
    f.message("t", 1, epoch(OTHER_EPOCH), "1");
    assert_eq!(inbox(&shards[0]), ["event 1"]);
}

#[test]
fn held_messages_redis_does_not_know_are_dropped_not_chased() {
    let (mut f, shards) = follows(1, 100);
    live(&mut f, "t", 2);
    f.message("t", 5, epoch(EPOCH), "5");
    // Meanwhile Redis lost the topic: the sync finds a new numbering, and the
    // held message of the old one must not start another sync.
    let sync = f.to_sync.pop_front().unwrap();
    f.synced(&sync, Ok(standing(0, OTHER_EPOCH, 1)));
    assert!(f.to_sync.is_empty(), "no endless resync");
    f.check();
    assert_eq!(inbox(&shards[0]), [format!("gap 0 {OTHER_EPOCH}")]);
    assert_eq!(f.live(), 1);
}

#[test]
fn messages_dropped_at_the_cap_are_fetched_by_another_sync() {
    let (mut f, shards) = follows(1, 10_000);
    live(&mut f, "t", 0);
    f.link_down();
    f.link_up();
    confirm(&mut f);
    let sync = f.to_sync.pop_front().unwrap();
    let total = PENDING_MAX as u64 + 5;
    for seq in 1..=total {
        f.message("t", seq, epoch(EPOCH), &seq.to_string());
    }
    // The read was sent before any of them was published.
    f.synced(&sync, Ok(standing(0, EPOCH, 1)));
    let again = f.to_sync.pop_front().expect("a sync for what was dropped");
    assert_eq!(again.from, PENDING_MAX as u64 + 1);
    f.synced(&again, Ok(standing(total, EPOCH, again.from)));
    let got = inbox(&shards[0]);
    f.check();
    assert_eq!(got.len() as u64, total);
    assert_eq!(got.last().unwrap(), &format!("event {total}"));
}

#[test]
fn a_late_confirmation_for_an_earlier_follow_is_not_taken() {
    let (mut f, _) = follows(1, 100);
    let start = Instant::now();
    f.presence(0, Arc::from("t"), true, start);
    let first = std::mem::take(&mut f.to_subscribe);
    f.presence(0, Arc::from("t"), false, start);
    f.tick(start + UNSUBSCRIBE_GRACE);
    f.presence(0, Arc::from("t"), true, start + UNSUBSCRIBE_GRACE);
    f.subscribed(&first);
    assert!(f.to_sync.is_empty(), "the old SUBSCRIBE's answer");
    confirm(&mut f);
    assert_eq!(f.to_sync.len(), 1);
}

/// Random runs against a model of Redis: publishes (lost while the link is
/// down), subscribers coming and going, the link dropping, syncs answered late.
/// Every shard sees each topic's events in strictly rising `seq` order, never
/// twice; once the link is up and every sync answered, a followed topic has
/// delivered everything Redis numbered; the running totals stay true.
#[test]
fn random_runs_deliver_in_order_once_and_catch_up() {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for _run in 0..200 {
        let (mut f, shards) = follows(1, 1_000_000);
        let topic: Arc<str> = Arc::from("t");
        let mut redis_seq = 0u64;
        let mut present = false;
        let mut up = true;
        let mut now = Instant::now();
        let mut last_seen = 0u64;
        let mut unanswered: Vec<Sync> = Vec::new();
        for _step in 0..300 {
            match next(10) {
                0..=3 => {
                    // Redis pub/sub loses messages only with the connection.
                    redis_seq += 1;
                    if up {
                        f.message("t", redis_seq, epoch(EPOCH), &redis_seq.to_string());
                    }
                }
                4 => {
                    present = !present;
                    f.presence(0, topic.clone(), present, now);
                }
                5 if up => {
                    up = false;
                    f.link_down();
                    unanswered.clear();
                }
                5 => {
                    up = true;
                    f.link_up();
                }
                6 => {
                    now += Duration::from_millis(300);
                    f.tick(now);
                }
                _ => {}
            }
            if up {
                confirm(&mut f);
                unanswered.extend(f.to_sync.drain(..));
                f.to_unsubscribe.clear();
                f.to_touch.clear();
                // Answer some syncs, maybe late (after more publishes).
                while !unanswered.is_empty() && next(3) == 0 {
                    let sync = unanswered.remove(0);
                    let first = sync.from.max(1).max(redis_seq.saturating_sub(99));
                    f.synced(&sync, Ok(standing(redis_seq, EPOCH, first)));
                }
            }
            for command in shards[0].take_all_for_tests() {
                if let Command::Deliver { frame, .. } = command {
                    let v: Value = serde_json::from_slice(&frame[2..]).unwrap();
                    let seq = v["seq"].as_u64().unwrap();
                    if v["op"] == "gap" {
                        assert!(seq >= last_seen, "a gap notice never goes back");
                    } else {
                        assert!(seq > last_seen, "{seq} after {last_seen}: order, once");
                    }
                    last_seen = seq;
                }
            }
            f.check();
        }
        // Settle: link up, every sync answered, the topic held.
        if !up {
            f.link_up();
        }
        if !present {
            f.presence(0, topic.clone(), true, now);
        }
        for _ in 0..10 {
            confirm(&mut f);
            now += Duration::from_millis(300);
            f.tick(now);
            unanswered.extend(f.to_sync.drain(..));
            for sync in std::mem::take(&mut unanswered) {
                let first = sync.from.max(1).max(redis_seq.saturating_sub(99));
                f.synced(&sync, Ok(standing(redis_seq, EPOCH, first)));
            }
        }
        for command in shards[0].take_all_for_tests() {
            if let Command::Deliver { frame, .. } = command {
                let v: Value = serde_json::from_slice(&frame[2..]).unwrap();
                let seq = v["seq"].as_u64().unwrap();
                assert!(seq >= last_seen);
                last_seen = seq;
            }
        }
        assert_eq!(f.live(), 1, "live again");
        if redis_seq > 0 {
            assert_eq!(last_seen, redis_seq, "caught up with Redis");
        }
        f.check();
    }
}
