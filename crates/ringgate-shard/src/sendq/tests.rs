//! The send queue against a pretend kernel that reads through the same
//! pointers the real one gets.

use super::*;
use crate::limits::SEND_COPY_BUFFERS_MAX;

fn bytes_of(next: &NextSend) -> Vec<u8> {
    read_send(next)
}

fn drain_all(q: &mut SendQueue) -> Vec<u8> {
    let mut pool = SendPool::new(true);
    let mut out = Vec::new();
    while let Some(next) = q.next_send(0, &mut pool) {
        // Pretend the kernel takes 3 bytes at most, to exercise short sends.
        let bytes = bytes_of(&next);
        let sent = bytes.len().min(3);
        out.extend_from_slice(&bytes[..sent]);
        q.complete(sent, &mut pool, |_| {});
    }
    assert_eq!(pool.copies_lent(), 0);
    out
}

#[test]
fn short_copied_and_vectored_sends_deliver_every_byte_in_order() {
    let mut q = SendQueue::default();
    let mut expected = Vec::new();
    for i in 0..(SEND_FRAMES_MAX * 2 + 5) {
        // Mostly small frames (copied), every fifth one large (gathered).
        let len = if i % 5 == 4 {
            SEND_COPY_FRAME_MAX + i
        } else {
            i % 7 + 1
        };
        let frame: Vec<u8> = (0..len).map(|j| (i * 10 + j) as u8).collect();
        expected.extend_from_slice(&frame);
        q.push(Bytes::from(frame), STAMP_PLAIN);
    }
    assert_eq!(drain_all(&mut q), expected);
    assert!(q.is_empty());
    assert_eq!((q.cost(), q.bytes()), (0, 0));
}

/// A frame too large to be copied.
fn large(byte: u8) -> Bytes {
    Bytes::from(vec![byte; SEND_COPY_FRAME_MAX + 1])
}

#[test]
fn one_send_at_a_time_and_large_frames_are_gathered_by_reference() {
    let mut pool = SendPool::new(true);
    let mut q = SendQueue::default();
    for i in 0..SEND_FRAMES_MAX + 3 {
        q.push(large(i as u8), STAMP_PLAIN);
    }
    let next = q.next_send(0, &mut pool).unwrap();
    let NextSend::Many(msg) = next else {
        panic!("large frames go as one vectored send");
    };
    // SAFETY: the header and its iovecs live in the queue until `complete`.
    let first = unsafe { (*(*msg).msg_iov).iov_base } as *const u8;
    assert_eq!(first, q.frames[0].0.as_ptr(), "a reference, not a copy");
    assert_eq!(pool.copies_lent(), 0);
    assert!(
        q.next_send(0, &mut pool).is_none(),
        "one send in flight at a time"
    );
    let len = SEND_COPY_FRAME_MAX + 1;
    assert_eq!(
        q.complete(len * SEND_FRAMES_MAX, &mut pool, |_| {}),
        SEND_FRAMES_MAX
    );
    assert!(matches!(q.next_send(0, &mut pool), Some(NextSend::Many(_))));
    assert_eq!(q.complete(2 * len + 1, &mut pool, |_| {}), 2);
    assert!(matches!(q.next_send(0, &mut pool), Some(NextSend::One(_, n)) if n == len - 1));
}

#[test]
fn a_burst_of_small_frames_goes_as_one_copied_send_of_many() {
    let mut pool = SendPool::new(true);
    let mut q = SendQueue::default();
    // 72-byte frames (a 64-byte event): more than one copy buffer holds.
    let per = SEND_COPY_BYTES / 72;
    let mut expected = Vec::new();
    for i in 0..per + 10 {
        let frame = vec![i as u8; 72];
        expected.extend_from_slice(&frame);
        q.push(Bytes::from(frame), event_stamp(100 + i as u64));
    }
    let next = q.next_send(0, &mut pool).unwrap();
    let NextSend::One(_, len) = next else {
        panic!("small frames go as one copied send");
    };
    assert_eq!(len, per * 72, "as many whole frames as the buffer holds");
    assert_eq!(pool.copies_lent(), 1);
    let mut wire = read_send(&next);
    let mut sent = Vec::new();
    assert_eq!(q.complete(len, &mut pool, |ns| sent.push(ns)), per);
    assert_eq!(pool.copies_lent(), 0, "the buffer is back at completion");
    assert_eq!(sent.len(), per, "each event in the copy reports once");
    let next = q.next_send(0, &mut pool).unwrap();
    wire.extend(read_send(&next));
    q.complete(10 * 72, &mut pool, |_| {});
    assert_eq!(wire, expected);
    assert!(q.is_empty());
}

#[test]
fn a_copied_run_stops_at_a_large_frame_and_a_short_send_resumes_mid_frame() {
    let mut pool = SendPool::new(true);
    let mut q = SendQueue::default();
    let mut expected = Vec::new();
    for frame in [
        Bytes::from_static(b"abc"),
        Bytes::from_static(b"de"),
        large(7),
    ]
    .into_iter()
    .chain([Bytes::from_static(b"fg"), Bytes::from_static(b"hi")])
    {
        expected.extend_from_slice(&frame);
        q.push(frame, STAMP_PLAIN);
    }
    let next = q.next_send(0, &mut pool).unwrap();
    assert!(matches!(next, NextSend::One(_, 5)), "abc and de, copied");
    let mut wire = read_send(&next)[..4].to_vec();
    q.complete(4, &mut pool, |_| {}); // short: "e" is left of the second frame
    assert!(q.refused(0));
    // "e", then the large frame: the head is small but the next is not, so
    // the rest goes gathered.
    while let Some(next) = q.next_send(0, &mut pool) {
        let bytes = read_send(&next);
        q.complete(bytes.len(), &mut pool, |_| {});
        wire.extend(bytes);
    }
    assert_eq!(wire, expected);
    assert_eq!(pool.copies_lent(), 0);
}

#[test]
fn past_the_lent_copy_buffers_small_frames_are_gathered() {
    let mut pool = SendPool::new(true);
    let mut queues: Vec<SendQueue> = (0..SEND_COPY_BUFFERS_MAX + 1)
        .map(|_| {
            let mut q = SendQueue::default();
            q.push(Bytes::from_static(b"ab"), STAMP_PLAIN);
            q.push(Bytes::from_static(b"cd"), STAMP_PLAIN);
            q
        })
        .collect();
    let (last, lent) = queues.split_last_mut().unwrap();
    for q in lent.iter_mut() {
        assert!(matches!(
            q.next_send(0, &mut pool),
            Some(NextSend::One(_, 4))
        ));
    }
    assert_eq!(pool.copies_lent(), SEND_COPY_BUFFERS_MAX);
    let next = last.next_send(0, &mut pool).unwrap();
    assert!(
        matches!(next, NextSend::Many(_)),
        "no buffer left: gathered"
    );
    assert_eq!(read_send(&next), b"abcd");
    // A failed send gives its buffer back like a completed one.
    lent[0].abandon_in_flight(&mut pool);
    assert_eq!(pool.copies_lent(), SEND_COPY_BUFFERS_MAX - 1);
    for q in lent[1..].iter_mut() {
        q.complete(4, &mut pool, |_| {});
    }
    assert_eq!(pool.copies_lent(), 0);
}

#[test]
fn cost_counts_every_frame_and_its_slot() {
    let mut pool = SendPool::new(true);
    let mut q = SendQueue::default();
    q.push(Bytes::from_static(b"abcd"), STAMP_PLAIN);
    q.push(Bytes::from_static(b"ef"), STAMP_PLAIN);
    assert_eq!(q.cost(), 6 + 2 * FRAME_OVERHEAD_BYTES);
    assert_eq!(q.bytes(), 6);
    let _ = q.next_send(0, &mut pool);
    q.complete(1, &mut pool, |_| {});
    assert_eq!(q.cost(), 5 + 2 * FRAME_OVERHEAD_BYTES);
    let _ = q.next_send(0, &mut pool);
    q.complete(5, &mut pool, |_| {});
    assert_eq!(q.cost(), 0);
}

#[test]
fn refusal_is_a_short_send_or_a_send_held_past_a_submit() {
    let mut pool = SendPool::new(true);
    let mut q = SendQueue::default();
    q.push(Bytes::from_static(b"abcdef"), STAMP_PLAIN);
    assert!(!q.refused(7), "nothing was offered yet");
    let _ = q.next_send(7, &mut pool);
    assert!(!q.refused(7), "staged this epoch: not yet offered");
    assert!(q.refused(8), "offered at a submit and still in flight");
    q.complete(2, &mut pool, |_| {});
    assert!(q.refused(8), "a short send: the socket is full");
    let _ = q.next_send(8, &mut pool);
    q.complete(4, &mut pool, |_| {});
    assert!(!q.refused(8), "the kernel took all it was offered");
}

#[test]
fn discarding_keeps_the_frames_in_flight() {
    let mut pool = SendPool::new(true);
    let mut q = SendQueue::default();
    for (i, f) in [&b"abcd"[..], b"ef", b"gh"].into_iter().enumerate() {
        q.push(Bytes::copy_from_slice(f), event_stamp(i as u64 + 10));
    }
    let _ = q.next_send(0, &mut pool);
    let mut events = Vec::new();
    q.complete(1, &mut pool, |ns| events.push(ns));
    assert!(events.is_empty(), "a partly sent event is not done");
    let _ = q.next_send(0, &mut pool); // covers all three frames
    q.push(Bytes::from_static(b"ij"), event_stamp(19));
    q.discard_unsent();
    assert_eq!(q.bytes(), 3 + 2 + 2, "only the new frame was dropped");
    q.complete(7, &mut pool, |ns| events.push(ns));
    assert_eq!(events, vec![10, 11, 12], "each sent event reports once");
    assert!(q.is_empty());
    q.push(Bytes::from_static(b"kl"), STAMP_PLAIN);
    q.discard_unsent();
    assert!(q.is_empty());
    assert_eq!(q.cost(), 0);
}

#[test]
fn pongs_beyond_the_cap_replace_the_newest_unsent_one() {
    let mut pool = SendPool::new(true);
    let pong = |n: u8| Bytes::from(vec![0x8a, 1, n]);
    let mut q = SendQueue::default();
    for n in 0..PONGS_QUEUED_MAX {
        assert!(q.push_pong(pong(n)));
    }
    let cost = q.cost();
    for n in 100..200 {
        assert!(!q.push_pong(pong(n)), "coalesced");
    }
    assert_eq!(q.cost(), cost, "a flood of pings costs nothing more");
    let mut wire = Vec::new();
    while let Some(next) = q.next_send(0, &mut pool) {
        let bytes = bytes_of(&next);
        q.complete(bytes.len(), &mut pool, |_| {});
        wire.extend(bytes);
    }
    let last: Vec<u8> = wire.chunks(3).map(|c| c[2]).collect();
    let mut expected: Vec<u8> = (0..PONGS_QUEUED_MAX - 1).collect();
    expected.push(199);
    assert_eq!(last, expected, "the newest pong answers the last ping");
    // Sent pongs no longer count: new ones queue again.
    assert!(q.push_pong(pong(7)));
}

#[test]
fn a_pong_offered_to_the_kernel_is_never_replaced() {
    let mut pool = SendPool::new(true);
    let mut q = SendQueue::default();
    for n in 0..PONGS_QUEUED_MAX {
        q.push_pong(Bytes::from(vec![0x8a, 1, n]));
    }
    let next = q.next_send(0, &mut pool).unwrap();
    let offered = bytes_of(&next);
    assert!(
        q.push_pong(Bytes::from(vec![0x8a, 1, 9])),
        "all are in flight: queue it"
    );
    assert_eq!(bytes_of(&next), offered);
}

#[test]
fn the_pool_recycles_empty_queues_up_to_its_cap() {
    let mut pool = SendPool::new(true);
    let mut q = pool.take();
    q.push(Bytes::from_static(b"x"), STAMP_PLAIN);
    let _ = q.next_send(0, &mut pool);
    q.complete(1, &mut pool, |_| {});
    let addr = &*q as *const SendQueue;
    pool.put(q);
    assert_eq!(pool.len(), 1);
    let q = pool.take();
    assert_eq!(&*q as *const SendQueue, addr, "the same box came back");
    assert_eq!(q.cost(), 0);
    let mut off = SendPool::new(false);
    off.put(q);
    assert_eq!(off.len(), 0);
}

#[test]
#[should_panic(expected = "only an empty queue")]
fn recycling_a_queue_in_flight_is_a_bug() {
    let mut pool = SendPool::new(true);
    let mut q = Box::<SendQueue>::default();
    q.push(Bytes::from_static(b"x"), STAMP_PLAIN);
    let _ = q.next_send(0, &mut pool);
    SendPool::new(true).put(q);
}

#[test]
fn a_partly_sent_head_is_never_cut_and_its_cost_is_what_is_left() {
    let mut pool = SendPool::new(true);
    let mut q = SendQueue::default();
    q.push(Bytes::from_static(b"abcdef"), STAMP_PLAIN);
    q.push(Bytes::from_static(b"gh"), STAMP_PLAIN);
    let _ = q.next_send(0, &mut pool);
    q.complete(4, &mut pool, |_| {}); // a short send: "ef" of the head is still to go
    assert_eq!(q.cost(), 2 + 2 + 2 * FRAME_OVERHEAD_BYTES);
    q.discard_unsent();
    assert_eq!(q.cost(), 2 + FRAME_OVERHEAD_BYTES, "the head's rest stays");
    assert_eq!(q.head(), Some(&b"ef"[..]));
    q.push(Bytes::from_static(b"CLOSE"), STAMP_PLAIN);
    let mut wire = Vec::new();
    while let Some(next) = q.next_send(0, &mut pool) {
        let bytes = read_send(&next);
        q.complete(bytes.len(), &mut pool, |_| {});
        wire.extend(bytes);
    }
    assert_eq!(wire, b"efCLOSE", "the close follows a whole frame");
    // A queue that is gone is cleared whole, head included, without underflow.
    let mut q = SendQueue::default();
    q.push(Bytes::from_static(b"abcdef"), STAMP_PLAIN);
    let _ = q.next_send(0, &mut pool);
    q.complete(3, &mut pool, |_| {});
    q.clear();
    assert!(q.is_empty());
    assert_eq!(q.cost(), 0);
}
