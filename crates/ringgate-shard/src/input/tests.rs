//! Input handling against byte slices: every split point, every state.

use super::*;
use crate::config::test_config;
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
}

impl Harness {
    fn new() -> Self {
        Harness {
            cfg: test_config(),
            stats: ShardStats::default(),
            conn: Conn::new(0, 0, 0),
            upcalls: Vec::new(),
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
            now: 1,
            upcalls: &mut self.upcalls,
        };
        on_recv(&mut self.conn, &mut copy, &mut env);
    }

    /// Everything queued for sending, as one byte string; empties the queue.
    fn sent(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(mut q) = self.conn.sendq.take() {
            while let Some(head) = q.head() {
                let n = head.len();
                out.extend_from_slice(head);
                let _ = q.next_send();
                q.complete(n, |_| {});
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
    start_close(&mut h.conn, 1001, "bye", 1);
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
