//! The shard's input state machine (upgrade request, frames, messages) fed in
//! arbitrary splits, checked against the reference decoder: `/echo` sends back
//! exactly the messages the reference finds, answers pings with pongs of their
//! payloads, and ends with the reference's close code; `/ws` hands up exactly
//! its messages. The harness asserts the unfinished-input accounting and the
//! send-queue bound after every read.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use ringgate_codec_fuzz::{cuts, decode, server_frames, End, Event, Limits};
use ringgate_shard::fuzzing::{Endpoint, Handed, InputHarness};

#[derive(Debug, Arbitrary)]
struct Input {
    ws: bool,
    small: bool,
    cuts: Vec<u16>,
    stream: Vec<u8>,
}

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PONG: u8 = 0xA;

fuzz_target!(|input: Input| {
    let endpoint = if input.ws {
        Endpoint::PubSub
    } else {
        Endpoint::Echo
    };
    let path = if input.ws { "/ws" } else { "/echo" };
    let mut h = InputHarness::new(input.small);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: f\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    h.feed(request.as_bytes());
    assert!(h.is_open());
    let head_len = h.sent().len();
    let cuts = cuts(&input.cuts, input.stream.len());
    let mut from = 0;
    for cut in cuts {
        h.feed(&input.stream[from..cut]);
        from = cut;
    }
    let (frame_max, message_max) = h.limits(endpoint);
    let (events, end) = decode(
        &input.stream,
        Limits {
            frame_max,
            message_max,
        },
    );
    let frames = server_frames(&h.sent()[head_len..]);
    // Pongs answer pings in order; one may answer several (RFC 6455 5.5.3).
    let pings: Vec<&Vec<u8>> = events
        .iter()
        .filter_map(|e| match e {
            Event::Ping(p) => Some(p),
            _ => None,
        })
        .collect();
    let pongs: Vec<&Vec<u8>> = frames
        .iter()
        .filter(|f| f.0 & 0x0f == PONG)
        .map(|f| &f.1)
        .collect();
    let mut next = 0;
    for pong in &pongs {
        let at = pings[next..].iter().position(|p| p == pong);
        next += at.expect("a pong that answers no later ping") + 1;
    }
    // However many were coalesced, the last ping is answered.
    assert_eq!(pongs.last(), pings.last(), "the last ping went unanswered");
    let rest: Vec<(u8, Vec<u8>)> = frames.into_iter().filter(|f| f.0 & 0x0f != PONG).collect();
    let mut expected = Vec::new();
    for e in &events {
        match (e, endpoint) {
            (Event::Message { text, data }, Endpoint::Echo) => {
                expected.push((0x80 | if *text { TEXT } else { BINARY }, data.clone()))
            }
            (Event::Close(code), _) => {
                let payload = code.map_or(Vec::new(), |c| c.to_be_bytes().to_vec());
                expected.push((0x80 | CLOSE, payload));
            }
            _ => {}
        }
    }
    if let End::Fail(code) = end {
        let close = rest.last().expect("a failure sends a close");
        assert_eq!(close.0, 0x80 | CLOSE);
        assert_eq!(
            u16::from_be_bytes([close.1[0], close.1[1]]),
            code,
            "{events:?}"
        );
        assert_eq!(&rest[..rest.len() - 1], &expected[..]);
    } else {
        assert_eq!(rest, expected);
    }
    if endpoint == Endpoint::PubSub {
        let messages: Vec<Handed> = events
            .iter()
            .filter_map(|e| match e {
                Event::Message { text: true, data } => Some(Handed::Text(data.clone())),
                Event::Message { text: false, .. } => Some(Handed::Binary),
                _ => None,
            })
            .collect();
        assert_eq!(h.handed(), &messages[..]);
    }
});
