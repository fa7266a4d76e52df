//! Input handling against byte slices: every split point, every state.

use super::*;
use crate::config::test_config;
use crate::sendq::SendPool;
use ringgate_codec::{encode_header, HEADER_BYTES_MAX};

const REQUEST: &[u8] = b"GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A masked client frame.
fn client_frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let header = FrameHeader {
        fin,
        opcode,
        mask: Some(mask),
        payload_len: payload.len() as u64,
    };
    let mut head = [0; HEADER_BYTES_MAX];
    let n = encode_header(&header, &mut head);
    let mut out = head[..n].to_vec();
    let mut body = payload.to_vec();
    apply_mask(&mut body, mask, 0);
    out.extend_from_slice(&body);
    out
}

struct Harness {
    cfg: ShardConfig,
    stats: ShardStats,
    conn: Conn,
    upcalls: Vec<Upcall>,
    pool: SendPool,
    unfinished: usize,
    now: u32,
}

impl Harness {
    fn new() -> Self {
        Harness {
            cfg: test_config(),
            stats: ShardStats::default(),
            conn: Conn::new(0, 0, 0),
            upcalls: Vec::new(),
            pool: SendPool::new(true),
            unfinished: 0,
            now: 1,
        }
    }

    fn open() -> Self {
        let mut h = Self::new();
        h.feed(REQUEST);
        assert_eq!(h.conn.state, State::Open);
        h.sent(); // the 101
        h
    }

    fn feed(&mut self, bytes: &[u8]) {
        let mut copy = bytes.to_vec();
        let mut env = Env {
            cfg: &self.cfg,
            stats: &self.stats,
            now: self.now,
            upcalls: &mut self.upcalls,
            pool: &mut self.pool,
            unfinished: &mut self.unfinished,
        };
        on_recv(&mut self.conn, &mut copy, &mut env);
        // The shard's running count agrees with what the record holds.
        let held = self.conn.partial.as_ref().map_or(0, |p| p.held_bytes());
        assert_eq!(self.unfinished, held, "unfinished-input accounting");
    }

    /// Everything queued for sending, as one byte string; empties the queue.
    fn sent(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(mut q) = self.conn.sendq.take() {
            while let Some(head) = q.head() {
                let n = head.len();
                out.extend_from_slice(head);
                let _ = q.next_send(0, &mut self.pool);
                q.complete(n, &mut self.pool, |_| {});
            }
        }
        out
    }
}

fn server_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    frame(opcode, payload).to_vec()
}

#[test]
fn request_split_anywhere_upgrades_and_frees_the_tail() {
    for cut in 0..REQUEST.len() {
        let mut h = Harness::new();
        h.feed(&REQUEST[..cut]);
        assert_eq!(h.conn.state, State::Handshake, "cut {cut}");
        h.feed(&REQUEST[cut..]);
        assert_eq!(h.conn.state, State::Open, "cut {cut}");
        assert_eq!(h.conn.route(), Route::Echo);
        assert!(
            h.conn.partial.is_none(),
            "cut {cut}: tail kept after the upgrade"
        );
        let response = String::from_utf8(h.sent()).unwrap();
        assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
    }
}

#[test]
fn frames_after_the_request_in_the_same_buffer_are_handled() {
    let mut h = Harness::new();
    let mut bytes = REQUEST.to_vec();
    bytes.extend(client_frame(true, OpCode::Text, b"early"));
    h.feed(&bytes);
    let sent = h.sent();
    assert!(sent.ends_with(&server_frame(OpCode::Text, b"early")));
}

#[test]
fn a_frame_split_at_every_byte_is_echoed_once_and_the_tail_freed() {
    let payload: Vec<u8> = "κόσμε-".repeat(50).into_bytes();
    let wire = client_frame(true, OpCode::Text, &payload);
    for cut in 0..=wire.len() {
        let mut h = Harness::open();
        h.feed(&wire[..cut]);
        h.feed(&wire[cut..]);
        assert_eq!(h.sent(), server_frame(OpCode::Text, &payload), "cut {cut}");
        assert!(h.conn.partial.is_none(), "cut {cut}");
    }
}

#[test]
fn byte_by_byte_delivery_of_many_frames() {
    let mut wire = Vec::new();
    for i in 0..5u8 {
        wire.extend(client_frame(
            true,
            OpCode::Binary,
            &vec![i; 130 * i as usize],
        ));
    }
    let mut h = Harness::open();
    for b in &wire {
        h.feed(&[*b]);
    }
    let mut expected = Vec::new();
    for i in 0..5u8 {
        expected.extend(server_frame(OpCode::Binary, &vec![i; 130 * i as usize]));
    }
    assert_eq!(h.sent(), expected);
    assert!(h.conn.partial.is_none());
}

#[test]
fn fragments_with_interleaved_pings_echo_as_one_message() {
    let mut wire = client_frame(false, OpCode::Text, b"frag");
    wire.extend(client_frame(true, OpCode::Ping, b"p1"));
    wire.extend(client_frame(false, OpCode::Continuation, b"ment"));
    wire.extend(client_frame(true, OpCode::Ping, b"p2"));
    wire.extend(client_frame(true, OpCode::Continuation, b"ed"));
    let mut h = Harness::open();
    h.feed(&wire[..10]);
    assert!(h.conn.partial.is_some(), "a message is in progress");
    h.feed(&wire[10..]);
    let mut expected = server_frame(OpCode::Pong, b"p1");
    expected.extend(server_frame(OpCode::Pong, b"p2"));
    expected.extend(server_frame(OpCode::Text, b"fragmented"));
    assert_eq!(h.sent(), expected);
    assert!(h.conn.partial.is_none());
}

fn close_code_of(sent: &[u8]) -> u16 {
    assert_eq!(sent[0], 0x88, "not a close frame: {sent:x?}");
    u16::from_be_bytes([sent[2], sent[3]])
}

#[test]
fn invalid_utf8_fails_before_the_frame_ends() {
    let mut payload = b"valid prefix ".to_vec();
    payload.extend_from_slice(&[0xf4, 0x90, 0x80, 0x80]); // above U+10FFFF
    payload.extend(vec![b'a'; 1000]);
    let wire = client_frame(true, OpCode::Text, &payload);
    let mut h = Harness::open();
    h.feed(&wire[..30]); // the frame is far from complete
    assert_eq!(h.conn.state, State::Draining);
    assert_eq!(close_code_of(&h.sent()), 1007);
    assert!(h.conn.partial.is_none());
}

#[test]
fn invalid_utf8_split_across_fragments_closes_1007() {
    let mut wire = client_frame(false, OpCode::Text, b"ok\xed");
    wire.extend(client_frame(true, OpCode::Continuation, b"\xa0\x80"));
    let mut h = Harness::open();
    h.feed(&wire);
    assert_eq!(close_code_of(&h.sent()), 1007);
}

#[test]
fn an_oversized_frame_is_refused_from_its_header_without_buffering() {
    let mut h = Harness::open();
    let header = client_frame(true, OpCode::Binary, &vec![0; 70_000]);
    h.feed(&header[..14]);
    assert_eq!(close_code_of(&h.sent()), 1009);
    assert!(h.conn.partial.is_none());
}

#[test]
fn protocol_errors_close_1002_and_discard_the_rest() {
    for bad in [
        vec![0x81, 0x00],             // unmasked
        vec![0xc1, 0x80, 0, 0, 0, 0], // RSV1
        vec![0x83, 0x80, 0, 0, 0, 0], // reserved opcode
        client_frame(true, OpCode::Continuation, b"x"),
        vec![0x09, 0x80, 0, 0, 0, 0], // fragmented ping
    ] {
        let mut h = Harness::open();
        let mut wire = bad.clone();
        wire.extend(client_frame(true, OpCode::Text, b"after"));
        h.feed(&wire);
        let sent = h.sent();
        assert_eq!(close_code_of(&sent), 1002, "{bad:x?}");
        assert_eq!(
            sent.len(),
            4 + sent[1] as usize - 2,
            "nothing after the close: {bad:x?}"
        );
        assert_eq!(h.conn.state, State::Draining);
    }
}

#[test]
fn a_peer_close_is_echoed_and_drains() {
    let mut h = Harness::open();
    h.feed(&client_frame(true, OpCode::Close, b"\x0f\xa0bye"));
    assert_eq!(close_code_of(&h.sent()), 4000);
    assert_eq!(h.conn.state, State::Flushing);
    let mut h = Harness::open();
    h.feed(&client_frame(true, OpCode::Close, b""));
    assert_eq!(h.sent(), vec![0x88, 0x00]);
}

#[test]
fn after_our_close_only_the_peer_close_matters() {
    let mut h = Harness::open();
    start_close(&mut h.conn, 1001, "bye", 1, &mut h.pool);
    assert_eq!(close_code_of(&h.sent()), 1001);
    let mut wire = client_frame(true, OpCode::Text, b"late");
    wire.extend(client_frame(true, OpCode::Ping, b""));
    h.feed(&wire);
    assert!(h.sent().is_empty(), "no data or pong after our close");
    assert_eq!(h.conn.state, State::Closing);
    h.feed(&client_frame(true, OpCode::Close, b"\x03\xe9"));
    assert_eq!(h.conn.state, State::Flushing);
    assert!(
        h.sent().is_empty(),
        "the close handshake is complete: no second close"
    );
}

fn status_of(h: &mut Harness) -> String {
    let response = String::from_utf8(h.sent()).unwrap();
    response.lines().next().unwrap().to_string()
}

#[test]
fn handshake_errors_answer_http_and_drain() {
    let cases: &[(&[u8], &str)] = &[
        (
            b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n",
            "HTTP/1.1 404 Not Found",
        ),
        (
            b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
        ),
        (b"hello\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    ];
    for (request, status) in cases {
        let mut h = Harness::new();
        h.feed(request);
        assert_eq!(status_of(&mut h), *status);
        assert_eq!(h.conn.state, State::Draining);
    }
    let mut h = Harness::new();
    let v8 = String::from_utf8(REQUEST.to_vec())
        .unwrap()
        .replace("Version: 13", "Version: 8");
    h.feed(v8.as_bytes());
    let response = String::from_utf8(h.sent()).unwrap();
    assert!(response.starts_with("HTTP/1.1 426 "));
    assert!(response.contains("Sec-WebSocket-Version: 13\r\n"));
}

#[test]
fn an_oversized_request_head_is_431_and_bounded() {
    let mut h = Harness::new();
    h.feed(b"GET /echo HTTP/1.1\r\n");
    let filler = format!("X-Filler: {}\r\n", "a".repeat(1000));
    for _ in 0..20 {
        if h.conn.state != State::Handshake {
            break;
        }
        h.feed(filler.as_bytes());
        let held = h.conn.partial.as_ref().map_or(0, |p| p.tail.len());
        assert!(held <= h.cfg.request_bytes_max + filler.len());
    }
    assert_eq!(
        status_of(&mut h),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
}

#[test]
fn the_echo_endpoint_is_off_unless_enabled() {
    let mut h = Harness::new();
    h.cfg.echo = false;
    h.feed(REQUEST);
    assert_eq!(status_of(&mut h), "HTTP/1.1 404 Not Found");
}

#[test]
fn message_limit_counts_fragments() {
    let mut h = Harness::open();
    h.cfg.limits.message_bytes_max = 100;
    let mut wire = client_frame(false, OpCode::Binary, &[0; 60]);
    wire.extend(client_frame(true, OpCode::Continuation, &[0; 60]));
    h.feed(&wire);
    assert_eq!(close_code_of(&h.sent()), 1009);
}

#[test]
fn receiving_resets_the_idle_clock_and_the_ping_flag() {
    let mut h = Harness::open();
    h.conn.since = 0;
    h.conn.set(crate::conn::flag::PING_SENT);
    h.feed(&client_frame(true, OpCode::Pong, b""));
    assert_eq!(h.conn.since, 1);
    assert!(!h.conn.has(crate::conn::flag::PING_SENT));
}

fn ws_request(target: &str) -> Vec<u8> {
    String::from_utf8(REQUEST.to_vec())
        .unwrap()
        .replace("GET /echo", &format!("GET {target}"))
        .into_bytes()
}

#[test]
fn topics_in_the_query_become_one_subscribe_upcall() {
    let mut h = Harness::new();
    h.feed(&ws_request("/ws?topics=a,user%3A42"));
    assert_eq!(h.conn.state, State::Open);
    assert_eq!(
        h.upcalls,
        vec![Upcall::Subscribe(vec!["a".into(), "user:42".into()])]
    );
    let response = String::from_utf8(h.sent()).unwrap();
    assert!(
        !response.contains("Sec-WebSocket-Protocol"),
        "no subprotocol was offered: {response}"
    );
}

#[test]
fn bad_or_too_many_query_topics_are_400() {
    let mut h = Harness::new();
    h.feed(&ws_request("/ws?topics=bad%20name"));
    assert_eq!(status_of(&mut h), "HTTP/1.1 400 Bad Request");
    let mut h = Harness::new();
    h.cfg.subscriptions_max = 2;
    h.feed(&ws_request("/ws?topics=a,b,c"));
    assert_eq!(status_of(&mut h), "HTTP/1.1 400 Bad Request");
    assert!(h.upcalls.is_empty());
}

#[test]
fn ws_messages_are_handed_to_the_shard_whole() {
    let mut h = Harness::new();
    h.feed(&ws_request("/ws"));
    h.sent();
    let mut wire = client_frame(false, OpCode::Text, br#"{"op":"sub","#);
    wire.extend(client_frame(true, OpCode::Continuation, br#""topic":"a"}"#));
    wire.extend(client_frame(
        true,
        OpCode::Text,
        br#"{"op":"unsub","topic":"a"}"#,
    ));
    wire.extend(client_frame(true, OpCode::Binary, &[1, 2, 3]));
    h.feed(&wire);
    assert_eq!(
        h.upcalls,
        vec![
            Upcall::Text(br#"{"op":"sub","topic":"a"}"#.to_vec().into()),
            Upcall::Text(br#"{"op":"unsub","topic":"a"}"#.to_vec().into()),
            Upcall::Binary,
        ]
    );
    assert!(h.sent().is_empty(), "the shard answers, not input handling");
}

#[test]
fn ws_answers_its_subprotocol_when_offered_and_echo_none() {
    let offered = "Sec-WebSocket-Protocol: chat, ringgate.v1\r\n\r\n";
    let ws = String::from_utf8(ws_request("/ws")).unwrap();
    let mut h = Harness::new();
    h.feed(ws.replace("\r\n\r\n", &format!("\r\n{offered}")).as_bytes());
    let response = String::from_utf8(h.sent()).unwrap();
    assert!(
        response.contains("\r\nSec-WebSocket-Protocol: ringgate.v1\r\n"),
        "{response}"
    );
    let echo = String::from_utf8(REQUEST.to_vec()).unwrap();
    let mut h = Harness::new();
    h.feed(
        echo.replace("\r\n\r\n", &format!("\r\n{offered}"))
            .as_bytes(),
    );
    let response = String::from_utf8(h.sent()).unwrap();
    assert!(response.starts_with("HTTP/1.1 101 "));
    assert!(!response.contains("Sec-WebSocket-Protocol"), "{response}");
}

#[test]
fn ws_messages_have_their_own_small_limit() {
    let mut h = Harness::new();
    h.cfg.op_bytes_max = 200;
    h.feed(&ws_request("/ws"));
    h.sent();
    // Fragments that add up past --max-op-size: 1009, with nothing buffered
    // beyond the limit (the echo route would take 1 MiB).
    let mut wire = client_frame(false, OpCode::Text, &[b'a'; 150]);
    wire.extend(client_frame(true, OpCode::Continuation, &[b'a'; 100]));
    h.feed(&wire);
    assert_eq!(close_code_of(&h.sent()), 1009);
    // One frame over it is refused from its header alone.
    let mut h = Harness::new();
    h.cfg.op_bytes_max = 200;
    h.feed(&ws_request("/ws"));
    h.sent();
    h.feed(&client_frame(true, OpCode::Text, &[b'a'; 201])[..8]);
    assert_eq!(close_code_of(&h.sent()), 1009);
    assert!(h.conn.partial.is_none());
}

#[test]
fn the_close_code_does_not_depend_on_segmentation() {
    // A text message over the limit whose first bytes are bad UTF-8: 1009 in
    // one piece and in any two pieces (the issue saw 1007 for two writes).
    let mut payload = vec![0xffu8];
    payload.extend(vec![b'a'; 299]);
    let wire = client_frame(true, OpCode::Text, &payload);
    for cut in 1..wire.len() {
        let mut h = Harness::open();
        h.cfg.limits.message_bytes_max = 200;
        h.cfg.limits.frame_bytes_max = 1000;
        h.feed(&wire[..cut]);
        h.feed(&wire[cut..]);
        assert_eq!(close_code_of(&h.sent()), 1009, "cut {cut}");
    }
}

#[test]
fn unfinished_input_over_the_shard_budget_closes_1013() {
    let mut h = Harness::open();
    h.cfg.unfinished_bytes_max = 4096;
    // A frame of 10,000 bytes arriving in pieces: its tail would pass the budget.
    let wire = client_frame(true, OpCode::Binary, &[7; 10_000]);
    h.feed(&wire[..100]);
    assert_eq!(close_code_of(&h.sent()), 1013);
    assert!(h.conn.partial.is_none(), "the input is dropped");
    assert_eq!(h.stats.unfinished_refused.get(), 1);
    // During the upgrade: 503.
    let mut h = Harness::new();
    h.cfg.unfinished_bytes_max = 100;
    h.feed(&REQUEST[..REQUEST.len() - 10]);
    assert!(status_of(&mut h).starts_with("HTTP/1.1 503 "));
}

#[test]
fn a_flood_of_pings_queues_a_few_pongs() {
    let mut h = Harness::open();
    let mut wire = Vec::new();
    for i in 0..1000u32 {
        wire.extend(client_frame(true, OpCode::Ping, &i.to_be_bytes()));
    }
    h.feed(&wire);
    let queued = h.conn.sendq.as_ref().unwrap();
    assert!(
        queued.cost() <= usize::from(crate::limits::PONGS_QUEUED_MAX) * 100,
        "1,000 pings queued {} bytes",
        queued.cost()
    );
    // The last pong answers the last ping.
    let sent = h.sent();
    assert_eq!(&sent[sent.len() - 4..], &999u32.to_be_bytes());
}

#[test]
fn a_tail_records_when_it_started_and_fragments_do_not_move_it() {
    let mut h = Harness::open();
    h.now = 5;
    h.feed(&client_frame(false, OpCode::Binary, b"one"));
    assert_eq!(h.conn.partial.as_ref().unwrap().started, 5);
    h.now = 9;
    h.feed(&client_frame(false, OpCode::Continuation, b"two"));
    assert_eq!(h.conn.partial.as_ref().unwrap().started, 5);
    h.feed(&client_frame(true, OpCode::Continuation, b"end"));
    assert!(h.conn.partial.is_none());
}

#[test]
fn a_client_streaming_whole_messages_never_ages_its_input() {
    // Found in review: a read ending inside a frame kept the Partial, and its
    // `started` from the first such read, across every message completed
    // after it; a client streaming without pause was cut by the timeout.
    let mut h = Harness::open();
    let message = client_frame(true, OpCode::Binary, b"0123456789");
    for now in [5, 20, 40, 60] {
        h.now = now;
        // The previous message's end, a whole one, and the next one's start.
        let mut read = message[4..].to_vec();
        read.extend_from_slice(&message);
        read.extend_from_slice(&message[..4]);
        if now == 5 {
            read = message[..4].to_vec();
        }
        h.feed(&read);
        assert_eq!(h.conn.partial.as_ref().unwrap().started, now);
    }
}

#[test]
fn absolute_form_and_many_headers_are_served() {
    let mut request = String::from_utf8(ws_request("http://example.com/ws?topics=a")).unwrap();
    let extra: String = (0..50).map(|i| format!("X-Proxy-{i}: 1\r\n")).collect();
    request = request.replace("Host: t\r\n", &format!("Host: t\r\n{extra}"));
    let mut h = Harness::new();
    h.feed(request.as_bytes());
    assert_eq!(h.conn.state, State::Open);
    assert_eq!(h.upcalls, vec![Upcall::Subscribe(vec!["a".into()])]);
}

#[test]
fn a_bad_length_fails_as_soon_as_it_arrives_whatever_the_split() {
    // Found by the input fuzz target: a 64-bit length with its top bit set,
    // arriving a few bytes at a time with the mask never sent.
    let wire = [0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    for cut in 1..wire.len() {
        let mut h = Harness::open();
        h.feed(&wire[..cut]);
        h.feed(&wire[cut..]);
        assert_eq!(close_code_of(&h.sent()), 1002, "cut {cut}");
        assert!(h.conn.partial.is_none());
    }
}

#[test]
fn split_continuations_do_not_move_the_message_deadline() {
    // Found in review: a continuation whose first read is incomplete reset
    // `started`, so a client could keep a message open forever.
    let mut h = Harness::open();
    h.now = 5;
    h.feed(&client_frame(false, OpCode::Binary, b"one"));
    for now in [20, 40, 60] {
        h.now = now;
        let next = client_frame(false, OpCode::Continuation, b"more");
        h.feed(&next[..3]);
        h.feed(&next[3..]);
        assert_eq!(h.conn.partial.as_ref().unwrap().started, 5, "at {now}");
    }
}
