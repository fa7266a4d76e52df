//! The frame decoder and message assembly fed in arbitrary splits, checked
//! against the reference decoder: the same messages, pings, pongs and close,
//! and the same close code on a fault, whatever the splits.
//!
//! The assembler here is the plainest user of the codec's API: it keeps the
//! unfinished frame's bytes, checks a partly arrived data frame with
//! `check_partial` (as the shard does, so faults show before the frame ends),
//! and hands whole frames to `handle_frame`.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use ringgate_codec::{apply_mask, decode_header, Decoded, Event as Ev, Limits, MessageState, Role};
use ringgate_codec_fuzz::{cuts, decode, End, Event, Limits as RefLimits};

#[derive(Debug, Arbitrary)]
struct Input {
    /// Where the stream is cut into reads (as offsets, modulo its length).
    cuts: Vec<u16>,
    /// Small limits sometimes, so the size checks are reached.
    small: bool,
    stream: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let limits = if input.small {
        Limits {
            frame_bytes_max: 200,
            message_bytes_max: 300,
        }
    } else {
        Limits {
            frame_bytes_max: 1 << 16,
            message_bytes_max: 1 << 17,
        }
    };
    let reference = decode(
        &input.stream,
        RefLimits {
            frame_max: limits.frame_bytes_max,
            message_max: limits.message_bytes_max,
        },
    );
    let cuts = cuts(&input.cuts, input.stream.len());
    let mut asm = Assembler::new(limits);
    let mut from = 0;
    for cut in cuts {
        if asm.end != End::Open {
            break;
        }
        asm.feed(&input.stream[from..cut]);
        from = cut;
    }
    assert_eq!((asm.events, asm.end), reference);
});

struct Assembler {
    limits: Limits,
    state: MessageState,
    /// The unfinished frame, from its first byte.
    tail: Vec<u8>,
    /// Payload bytes of the tail already unmasked and checked.
    checked: u64,
    message: Vec<u8>,
    events: Vec<Event>,
    end: End,
}

impl Assembler {
    fn new(limits: Limits) -> Self {
        Assembler {
            limits,
            state: MessageState::new(),
            tail: Vec::new(),
            checked: 0,
            message: Vec::new(),
            events: Vec::new(),
            end: End::Open,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.tail.extend_from_slice(bytes);
        while self.end == End::Open {
            let header = match decode_header(&self.tail, Role::Server, self.limits.frame_bytes_max)
            {
                Ok(Decoded::Header { header, header_len }) => (header, header_len),
                Ok(Decoded::NeedHeader(_)) => return,
                Err(e) => return self.end = End::Fail(e.close_code()),
            };
            let (header, header_len) = header;
            let frame_len = header_len + header.payload_len as usize;
            let mask = header.mask.expect("server role");
            if self.tail.len() < frame_len {
                // Check what arrived of a data frame, as the shard does.
                let fresh = &mut self.tail[header_len + self.checked as usize..];
                if !header.opcode.is_control() && !fresh.is_empty() {
                    apply_mask(fresh, mask, self.checked as usize);
                    let n = fresh.len() as u64;
                    if let Err(e) =
                        self.state
                            .check_partial(&header, self.checked, fresh, &self.limits)
                    {
                        return self.end = End::Fail(e.close_code());
                    }
                    self.checked += n;
                }
                return;
            }
            let mut frame: Vec<u8> = self.tail.drain(..frame_len).collect();
            let checked = std::mem::replace(&mut self.checked, 0);
            let payload = &mut frame[header_len..];
            apply_mask(&mut payload[checked as usize..], mask, checked as usize);
            match self
                .state
                .handle_frame(&header, payload, checked, &self.limits)
            {
                Err(e) => self.end = End::Fail(e.close_code()),
                Ok(Ev::Data {
                    kind, fin, payload, ..
                }) => {
                    self.message.extend_from_slice(payload);
                    if fin {
                        let text = kind == ringgate_codec::DataKind::Text;
                        let data = std::mem::take(&mut self.message);
                        self.events.push(Event::Message { text, data });
                    }
                }
                Ok(Ev::Ping(p)) => self.events.push(Event::Ping(p.to_vec())),
                Ok(Ev::Pong(p)) => self.events.push(Event::Pong(p.to_vec())),
                Ok(Ev::Close(c)) => {
                    self.events.push(Event::Close(c.code));
                    self.end = End::Closed;
                }
            }
        }
    }
}
