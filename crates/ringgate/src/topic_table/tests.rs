//! The topic table against its bounds, with a controlled clock.

use super::*;

fn limits(size: usize, memory: usize) -> HistoryLimits {
    HistoryLimits {
        size,
        ttl: Duration::from_secs(300),
        memory,
        topic_idle_ttl: Duration::from_secs(600),
    }
}

fn frame(seq: u64) -> Bytes {
    Bytes::from(format!("event {seq:04}"))
}

fn publish(t: &mut TopicTable, topic: &str, now: Instant) -> Numbered {
    t.publish(HashedTopic::new(topic), now, frame).unwrap()
}

fn since(seq: u64, epoch: &str) -> Since {
    Since {
        seq,
        epoch: epoch.to_string(),
    }
}

#[test]
fn recovery_outcomes() {
    let now = Instant::now();
    let mut t = TopicTable::new(limits(3, 1 << 20));
    let epoch = publish(&mut t, "a", now).epoch;
    for _ in 0..4 {
        publish(&mut t, "a", now);
    }
    // seq 5; the history holds 3, 4, 5.
    let s = t.subscribe("a", Some(&since(2, &epoch)), now).unwrap();
    assert_eq!((s.seq, s.recovery), (5, Recovery::Recovered));
    assert_eq!(s.replay, vec![frame(3), frame(4), frame(5)]);
    let s = t.subscribe("a", Some(&since(5, &epoch)), now).unwrap();
    assert_eq!((s.recovery, s.replay.len()), (Recovery::Recovered, 0));
    let s = t.subscribe("a", Some(&since(1, &epoch)), now).unwrap();
    assert_eq!(s.recovery, Recovery::TooOld);
    let s = t.subscribe("a", Some(&since(6, &epoch)), now).unwrap();
    assert_eq!(s.recovery, Recovery::Future);
    let s = t.subscribe("a", Some(&since(4, "other")), now).unwrap();
    assert_eq!(s.recovery, Recovery::EpochChanged);
    let s = t.subscribe("a", None, now).unwrap();
    assert_eq!(
        (s.seq, s.recovery, &s.epoch),
        (5, Recovery::NotAsked, &epoch)
    );
    // A topic never published: seq 0, a fresh epoch.
    let fresh = t.subscribe("new", None, now).unwrap();
    assert_eq!(fresh.seq, 0);
    assert_ne!(fresh.epoch, s.epoch);
    t.check();
    // History off: never recovered.
    let mut off = TopicTable::new(limits(0, 1 << 20));
    let epoch = publish(&mut off, "a", now).epoch;
    let s = off.subscribe("a", Some(&since(1, &epoch)), now).unwrap();
    assert_eq!(s.recovery, Recovery::HistoryOff);
    assert_eq!(off.history_bytes(), 0);
    off.check();
}

#[test]
fn history_expires_by_age() {
    let t0 = Instant::now();
    let mut t = TopicTable::new(limits(100, 1 << 20));
    let epoch = publish(&mut t, "a", t0).epoch;
    publish(&mut t, "a", t0 + Duration::from_secs(200));
    // At 400 s the first event (0 s) is past the 300 s TTL, the second is not.
    let later = t0 + Duration::from_secs(400);
    let s = t.subscribe("a", Some(&since(0, &epoch)), later).unwrap();
    assert_eq!(s.recovery, Recovery::TooOld);
    let s = t.subscribe("a", Some(&since(1, &epoch)), later).unwrap();
    assert_eq!(s.replay, vec![frame(2)]);
    t.check();
    // maintain() empties histories nobody published to for the TTL.
    t.maintain(t0 + Duration::from_secs(600));
    assert_eq!((t.history_events(), t.history_bytes()), (0, 0));
    t.check();
}

#[test]
fn the_memory_budget_drops_the_least_recently_published_first() {
    let now = Instant::now();
    // Room for about six events of ~10 bytes each with their overhead.
    let one = History::cost(&frame(1));
    let mut t = TopicTable::new(limits(100, 6 * one));
    let a = publish(&mut t, "a", now).epoch;
    for _ in 0..2 {
        publish(&mut t, "a", now);
    }
    let b = publish(&mut t, "b", now).epoch;
    for _ in 0..2 {
        publish(&mut t, "b", now);
    }
    assert_eq!(t.history_events(), 6);
    publish(&mut t, "b", now); // a is the least recently published
    assert_eq!(t.history_events(), 6);
    assert!(t.history_bytes() <= 6 * one);
    assert_eq!(t.evicted, 1);
    let s = t.subscribe("a", Some(&since(0, &a)), now).unwrap();
    assert_eq!(s.recovery, Recovery::TooOld, "a's oldest went");
    let s = t.subscribe("b", Some(&since(0, &b)), now).unwrap();
    assert_eq!(s.replay.len(), 4, "b kept everything");
    t.check();
}

#[test]
fn a_busy_topic_keeps_its_history_under_the_memory_bound() {
    // Room for six events; three topics published in turn, all in one second.
    let now = Instant::now();
    let one = History::cost(&frame(1));
    let mut t = TopicTable::new(limits(100, 6 * one));
    let topics = ["a", "b", "c"];
    let epochs: Vec<Epoch> = topics
        .iter()
        .map(|&n| publish(&mut t, n, now).epoch)
        .collect();
    for round in 0..10 {
        for n in topics {
            publish(&mut t, n, now);
        }
        if round > 0 {
            // Each publish evicts from the topic published longest ago, the
            // next in turn: every topic keeps its last two events.
            for (n, epoch) in topics.iter().zip(&epochs) {
                let last = round + 2;
                let s = t.subscribe(n, Some(&since(last - 2, epoch)), now).unwrap();
                assert_eq!(s.recovery, Recovery::Recovered, "{n} after round {round}");
                assert_eq!(s.replay.len(), 2);
            }
        }
    }
    assert_eq!(t.history_events(), 6);
    t.check();
}

#[test]
fn idle_topics_are_forgotten_and_come_back_with_a_new_epoch() {
    let t0 = Instant::now();
    let mut t = TopicTable::new(limits(10, 1 << 20));
    let old = publish(&mut t, "a", t0).epoch;
    publish(&mut t, "kept", t0);
    t.presence("kept", true, t0);
    t.maintain(t0 + Duration::from_secs(599));
    assert_eq!(t.len(), 2, "not idle long enough");
    t.maintain(t0 + Duration::from_secs(601));
    assert_eq!(t.len(), 1, "a is forgotten; kept has a subscriber");
    assert_eq!(t.forgotten, 1);
    let back = publish(&mut t, "a", t0 + Duration::from_secs(602));
    assert_eq!(back.seq, 1, "numbering restarts");
    assert_ne!(back.epoch, old, "with a new epoch");
    let s = t
        .subscribe("a", Some(&since(1, &old)), t0 + Duration::from_secs(602))
        .unwrap();
    assert_eq!(s.recovery, Recovery::EpochChanged);
    // When its last subscriber leaves, "kept" starts to idle then.
    t.presence("kept", false, t0 + Duration::from_secs(700));
    t.maintain(t0 + Duration::from_secs(1299));
    assert!(
        t.subscribe("kept", None, t0 + Duration::from_secs(1299))
            .unwrap()
            .seq
            == 1
    );
    t.maintain(t0 + Duration::from_secs(1301));
    t.check();
}

#[test]
fn a_subscribe_keeps_a_quiet_topic_for_another_idle_ttl() {
    // The shard's presence follows the answer by a moment: the topic must not
    // be forgotten (and renumbered) in between.
    let t0 = Instant::now();
    let mut t = TopicTable::new(limits(10, 1 << 20));
    let first = publish(&mut t, "a", t0).epoch;
    let s = t
        .subscribe("a", None, t0 + Duration::from_secs(599))
        .unwrap();
    assert_eq!(s.epoch, first);
    t.maintain(t0 + Duration::from_secs(601));
    assert_eq!(t.len(), 1, "the subscribe counted as use");
    t.maintain(t0 + Duration::from_secs(1200));
    assert_eq!(t.len(), 0, "no presence followed: forgotten in the end");
    t.check();
}

#[test]
fn a_full_table_forgets_the_longest_quiet_topic_but_never_one_with_subscribers() {
    let start = Instant::now();
    let mut t = TopicTable::with_topics_max(limits(10, 1 << 20), 3);
    for topic in ["a", "b", "c"] {
        publish(&mut t, topic, start);
    }
    t.presence("a", true, start);
    // Quiet a moment only: an announcement may still be on its way.
    assert_eq!(
        t.publish(HashedTopic::new("d"), start + Duration::from_secs(5), frame)
            .err(),
        Some(TooManyTopics)
    );
    let now = start + Duration::from_secs(u64::from(QUIET_BEFORE_FORGOTTEN_SECS));
    publish(&mut t, "d", now); // b has been quiet longest
    assert_eq!(t.len(), 3);
    assert_eq!(t.subscribe("a", None, now).unwrap().seq, 1, "a kept");
    t.presence("c", true, now);
    t.presence("d", true, now);
    assert_eq!(
        t.publish(HashedTopic::new("e"), now, frame).err(),
        Some(TooManyTopics),
        "every topic has subscribers"
    );
    t.check();
}

#[test]
fn epochs_are_short_distinct_and_alphanumeric() {
    let mut t = TopicTable::new(limits(1, 1 << 20));
    let mut seen = std::collections::HashSet::new();
    for i in 0..10_000 {
        let e = t
            .subscribe(&format!("t{i}"), None, Instant::now())
            .unwrap()
            .epoch;
        assert!(e.len() == 10 && e.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert!(seen.insert(e), "a repeated epoch");
    }
    let other = TopicTable::new(limits(1, 1 << 20)).new_epoch_for_test();
    assert!(!seen.contains(&other), "another process's epochs differ");
}

#[test]
fn an_announcement_is_counted_even_past_the_topic_cap() {
    let now = Instant::now();
    let mut t = TopicTable::with_topics_max(limits(10, 1 << 20), 1);
    t.presence("a", true, now);
    t.presence("b", true, now); // past the cap, but subscribers hold b
    t.presence("b", true, now); // a second shard
    assert_eq!(t.len(), 2);
    assert_eq!(
        t.publish(HashedTopic::new("c"), now, frame).err(),
        Some(TooManyTopics)
    );
    t.presence("b", false, now);
    t.presence("a", false, now);
    t.maintain(now + Duration::from_secs(601));
    assert_eq!(t.len(), 1, "a left and idled out; b still has a shard");
    t.check();
}

#[test]
#[should_panic(expected = "never announced")]
fn a_departure_without_an_announcement_is_a_bug() {
    let mut t = TopicTable::new(limits(10, 1 << 20));
    t.presence("a", false, Instant::now());
}

#[test]
fn random_operations_keep_every_index_and_list_in_order() {
    // A small xorshift: the same sequence every run.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let t0 = Instant::now();
    let one = History::cost(&frame(1));
    let mut t = TopicTable::with_topics_max(limits(5, 40 * one), 30);
    let mut present = std::collections::HashMap::<String, u32>::new();
    for step in 0..20_000u64 {
        let now = t0 + Duration::from_secs(step / 20);
        let topic = format!("t{}", next(40));
        match next(10) {
            0..=4 => {
                let _ = t.publish(HashedTopic::new(&topic), now, frame);
            }
            5 | 6 => {
                let _ = t.subscribe(&topic, None, now);
            }
            7 => {
                t.presence(&topic, true, now);
                *present.entry(topic).or_default() += 1;
            }
            8 => {
                if let Some(n) = present.get_mut(&topic).filter(|n| **n > 0) {
                    *n -= 1;
                    t.presence(&topic, false, now);
                }
            }
            _ => t.maintain(now),
        }
        if step % 97 == 0 {
            t.check();
        }
        assert!(t.history_bytes() <= 40 * one);
        // Announced topics may pass the cap; the others never do.
        assert!(t.len() <= 30 + present.values().filter(|&&n| n > 0).count());
    }
    t.check();
    assert!(t.forgotten > 0 && t.evicted > 0);
}
