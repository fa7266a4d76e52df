//! What the fuzz targets share: a reference decoder of client frames, written
//! plainly and apart from the codec, that says what a server must make of a
//! byte stream (RFC 6455 sections 5 and 8.1, in ringgate's documented order of
//! checks); and a small reader of the server's own frames.
//!
//! Order of checks, per frame, as soon as the bytes that prove a fault are in:
//! first byte (RSV bits, reserved opcode, fragmented control), second byte
//! (mask, control length), the extended length (top bit, minimal encoding,
//! the frame size limit: before the masking key arrives); then, with payload
//! bytes (even a prefix): the
//! fragmentation sequence, the message size limit, UTF-8 of text so far; and,
//! for a whole close frame, its payload.

/// Size limits, as the server is configured.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub frame_max: u64,
    pub message_max: u64,
}

/// What the server must see in a client's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete data message.
    Message {
        text: bool,
        data: Vec<u8>,
    },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// A valid close frame with its code (the stream ends here).
    Close(Option<u16>),
}

/// How the stream ends for the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// All bytes are used and nothing is wrong (perhaps mid-frame).
    Open,
    /// A valid close frame was read.
    Closed,
    /// The connection must fail with this close code.
    Fail(u16),
}

/// Decodes a client's byte stream the plain way.
pub fn decode(s: &[u8], limits: Limits) -> (Vec<Event>, End) {
    let mut events = Vec::new();
    let mut pos = 0;
    // The message in progress: (text?, bytes so far).
    let mut message: Option<(bool, Vec<u8>)> = None;
    loop {
        let Some(&b0) = s.get(pos) else {
            return (events, End::Open);
        };
        if b0 & 0x70 != 0 {
            return (events, End::Fail(1002));
        }
        let opcode = b0 & 0x0f;
        if !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) {
            return (events, End::Fail(1002));
        }
        let fin = b0 & 0x80 != 0;
        let control = opcode >= 8;
        if control && !fin {
            return (events, End::Fail(1002));
        }
        let Some(&b1) = s.get(pos + 1) else {
            return (events, End::Open);
        };
        if b1 & 0x80 == 0 {
            return (events, End::Fail(1002));
        }
        let len7 = u64::from(b1 & 0x7f);
        if control && len7 > 125 {
            return (events, End::Fail(1002));
        }
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let Some(ext_bytes) = s.get(pos + 2..pos + 2 + ext) else {
            return (events, End::Open);
        };
        let len = match ext {
            0 => len7,
            _ => ext_bytes
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        };
        if ext == 8 && len >> 63 != 0 {
            return (events, End::Fail(1002));
        }
        if (ext == 2 && len < 126) || (ext == 8 && len < 0x1_0000) {
            return (events, End::Fail(1002));
        }
        if len > limits.frame_max {
            return (events, End::Fail(1009));
        }
        let Some(mask) = s.get(pos + 2 + ext..pos + 6 + ext) else {
            return (events, End::Open);
        };
        let start = pos + 6 + ext;
        let available = (s.len() - start).min(len as usize);
        let payload: Vec<u8> = s[start..start + available]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        let whole = available as u64 == len;
        if !control {
            // Sequence, size, then UTF-8 so far: also for a frame still arriving,
            // once at least one payload byte (or the whole, empty, frame) is in.
            if !whole && available == 0 {
                return (events, End::Open);
            }
            let continuation = opcode == 0;
            let (text, mut so_far) = match (&message, continuation) {
                (None, true) | (Some(_), false) => return (events, End::Fail(1002)),
                (None, false) => (opcode == 1, Vec::new()),
                (Some((text, data)), true) => (*text, data.clone()),
            };
            if so_far.len() as u64 + len > limits.message_max {
                return (events, End::Fail(1009));
            }
            so_far.extend_from_slice(&payload);
            if text {
                match std::str::from_utf8(&so_far) {
                    Ok(_) => {}
                    // Complete at the end of the message: any shortfall is a fault.
                    Err(_) if whole && fin => return (events, End::Fail(1007)),
                    Err(e) if e.error_len().is_some() => return (events, End::Fail(1007)),
                    Err(_) => {}
                }
            }
            if !whole {
                return (events, End::Open);
            }
            if fin {
                events.push(Event::Message { text, data: so_far });
                message = None;
            } else {
                message = Some((text, so_far));
            }
        } else {
            if !whole {
                return (events, End::Open);
            }
            match opcode {
                9 => events.push(Event::Ping(payload)),
                10 => events.push(Event::Pong(payload)),
                _ => {
                    return match close(&payload) {
                        Ok(code) => {
                            events.push(Event::Close(code));
                            (events, End::Closed)
                        }
                        Err(code) => (events, End::Fail(code)),
                    }
                }
            }
        }
        pos = start + len as usize;
    }
}

/// A close payload's code, or the close code its fault calls for.
fn close(payload: &[u8]) -> Result<Option<u16>, u16> {
    match payload {
        [] => Ok(None),
        [_] => Err(1002),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                return Err(1002);
            }
            std::str::from_utf8(reason).map_err(|_| 1007u16)?;
            Ok(Some(code))
        }
    }
}

/// Read boundaries for a stream of `len` bytes from a fuzzer's cut points:
/// sorted offsets, ending with `len`.
pub fn cuts(points: &[u16], len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = points.iter().map(|&c| usize::from(c) % (len + 1)).collect();
    cuts.push(len);
    cuts.sort_unstable();
    cuts
}

/// A frame as a server sends it (unmasked): (first byte, payload).
pub type ServerFrame = (u8, Vec<u8>);

/// Splits a server's output into frames; panics on anything malformed (a
/// server frame must be well formed) and on a trailing partial frame.
pub fn server_frames(mut s: &[u8]) -> Vec<ServerFrame> {
    let mut frames = Vec::new();
    while !s.is_empty() {
        assert!(s.len() >= 2, "a truncated server frame");
        let (b0, b1) = (s[0], s[1]);
        assert_eq!(b0 & 0x70, 0, "the server set RSV bits");
        assert_eq!(b1 & 0x80, 0, "the server masked a frame");
        let (len, at) = match b1 & 0x7f {
            126 => (u64::from(u16::from_be_bytes([s[2], s[3]])), 4),
            127 => (u64::from_be_bytes(s[2..10].try_into().unwrap()), 10),
            n => (u64::from(n), 2),
        };
        let end = at + len as usize;
        assert!(s.len() >= end, "a truncated server frame");
        frames.push((b0, s[at..end].to_vec()));
        s = &s[end..];
    }
    frames
}

/// Masks `payload` into a client frame with `first_byte` (FIN, RSV, opcode).
pub fn client_frame(first_byte: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![first_byte];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        frame_max: 1000,
        message_max: 2000,
    };

    #[test]
    fn the_reference_decoder_agrees_with_the_rfc_on_simple_streams() {
        let m = [1, 2, 3, 4];
        let mut s = client_frame(0x01, b"he", m);
        s.extend(client_frame(0x89, b"p", m));
        s.extend(client_frame(0x80, b"llo", m));
        s.extend(client_frame(0x88, &[0x03, 0xe8], m));
        let (events, end) = decode(&s, L);
        assert_eq!(
            events,
            vec![
                Event::Ping(b"p".to_vec()),
                Event::Message {
                    text: true,
                    data: b"hello".to_vec()
                },
                Event::Close(Some(1000)),
            ]
        );
        assert_eq!(end, End::Closed);
        assert_eq!(decode(&[0x81, 0x00], L).1, End::Fail(1002));
        assert_eq!(
            decode(&client_frame(0x81, &[0xff], m), L).1,
            End::Fail(1007)
        );
        assert_eq!(
            decode(&client_frame(0x82, &[0; 1001], m), L).1,
            End::Fail(1009)
        );
        assert_eq!(decode(&client_frame(0x81, b"ok", m)[..5], L).1, End::Open);
    }
}
