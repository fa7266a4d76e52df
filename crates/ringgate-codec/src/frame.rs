//! Frame headers (RFC 6455 section 5.2): decoding with every header-level check,
//! and encoding.
//!
//! Owns the header only. The payload is the caller's: it unmasks it with
//! [`crate::apply_mask`] once the whole frame is at hand and hands it to
//! [`crate::MessageState`], which owns the rules that span frames.

use crate::error::ProtocolError;

/// The largest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub const HEADER_BYTES_MAX: usize = 14;
/// The largest header of an unmasked (server-to-client) frame.
pub const SERVER_HEADER_BYTES_MAX: usize = 10;
/// Control frames carry at most 125 bytes (5.5).
const CONTROL_PAYLOAD_MAX: u64 = 125;

/// A frame opcode that is not reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// 0x0: continues a fragmented message.
    Continuation,
    /// 0x1: starts a text message.
    Text,
    /// 0x2: starts a binary message.
    Binary,
    /// 0x8: close.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Result<Self, ProtocolError> {
        Ok(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            other => return Err(ProtocolError::ReservedOpcode(other)),
        })
    }

    /// The 4-bit wire value.
    pub fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// Which end of the connection is decoding: servers require masked frames,
/// clients require unmasked ones (5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Decoding frames sent by a client.
    Server,
    /// Decoding frames sent by a server.
    Client,
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// FIN: the last frame of a message.
    pub fin: bool,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key, when the mask bit is set.
    pub mask: Option<[u8; 4]>,
    /// The payload length in bytes.
    pub payload_len: u64,
}

/// The result of [`decode_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// Not enough bytes for the header: the header is at least this many bytes.
    NeedHeader(usize),
    /// A complete, valid header of `header_len` bytes.
    Header {
        /// The header.
        header: FrameHeader,
        /// Bytes the header takes; the payload follows.
        header_len: usize,
    },
}

impl Decoded {
    /// The total frame length (header + payload) once the header is known, else
    /// the header bytes still needed at least.
    pub fn frame_len_min(&self) -> u64 {
        match *self {
            Decoded::NeedHeader(n) => n as u64,
            Decoded::Header { header, header_len } => header_len as u64 + header.payload_len,
        }
    }
}

/// Decodes and checks a frame header at the start of `buf`.
///
/// Checks, in wire order, everything the header alone can violate: RSV bits
/// (no extension is ever negotiated), reserved opcodes, masking for `role`,
/// control frames that are fragmented or longer than 125 bytes, a 64-bit length
/// with the top bit set, a length not minimally encoded, and `payload_max`. It fails as soon as the bytes seen
/// prove a violation, even when the header is not complete yet.
pub fn decode_header(buf: &[u8], role: Role, payload_max: u64) -> Result<Decoded, ProtocolError> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        if let Some(&b0) = buf.first() {
            check_first_byte(b0)?;
        }
        return Ok(Decoded::NeedHeader(2));
    };
    let (fin, opcode) = check_first_byte(b0)?;
    let masked = b1 & 0x80 != 0;
    if masked != (role == Role::Server) {
        return Err(ProtocolError::BadMasking);
    }
    let len7 = u64::from(b1 & 0x7f);
    if opcode.is_control() && len7 > CONTROL_PAYLOAD_MAX {
        return Err(ProtocolError::ControlTooLong);
    }
    let len_bytes = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let header_len = 2 + len_bytes + if masked { 4 } else { 0 };
    // The length is checked as soon as its bytes are in, before the mask.
    if buf.len() < 2 + len_bytes {
        return Ok(Decoded::NeedHeader(header_len));
    }
    let payload_len = match len_bytes {
        0 => len7,
        2 => {
            let len = u64::from(u16::from_be_bytes([buf[2], buf[3]]));
            // 5.2: "the minimal number of bytes MUST be used to encode the length".
            if len <= 125 {
                return Err(ProtocolError::NonMinimalLength);
            }
            len
        }
        _ => {
            let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(ProtocolError::BadLength);
            }
            if len <= 0xffff {
                return Err(ProtocolError::NonMinimalLength);
            }
            len
        }
    };
    if payload_len > payload_max {
        return Err(ProtocolError::FrameTooLarge);
    }
    if buf.len() < header_len {
        return Ok(Decoded::NeedHeader(header_len));
    }
    let mask = masked.then(|| {
        let at = 2 + len_bytes;
        [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]
    });
    let header = FrameHeader {
        fin,
        opcode,
        mask,
        payload_len,
    };
    Ok(Decoded::Header { header, header_len })
}

fn check_first_byte(b0: u8) -> Result<(bool, OpCode), ProtocolError> {
    if b0 & 0x70 != 0 {
        return Err(ProtocolError::ReservedBits);
    }
    let opcode = OpCode::from_bits(b0 & 0x0f)?;
    let fin = b0 & 0x80 != 0;
    if opcode.is_control() && !fin {
        return Err(ProtocolError::FragmentedControl);
    }
    Ok((fin, opcode))
}

/// Encodes `header` into `out` with the minimal length encoding; returns the
/// number of bytes written.
pub fn encode_header(header: &FrameHeader, out: &mut [u8; HEADER_BYTES_MAX]) -> usize {
    assert!(header.payload_len >> 63 == 0, "payload length over 2^63");
    assert!(
        !header.opcode.is_control() || (header.fin && header.payload_len <= CONTROL_PAYLOAD_MAX),
        "invalid control frame"
    );
    out[0] = (u8::from(header.fin) << 7) | header.opcode.bits();
    let mask_bit = if header.mask.is_some() { 0x80 } else { 0 };
    let mut at = match header.payload_len {
        len @ 0..=125 => {
            out[1] = mask_bit | len as u8;
            2
        }
        len @ 126..=0xffff => {
            out[1] = mask_bit | 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        len => {
            out[1] = mask_bit | 127;
            out[2..10].copy_from_slice(&len.to_be_bytes());
            10
        }
    };
    if let Some(mask) = header.mask {
        out[at..at + 4].copy_from_slice(&mask);
        at += 4;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1 << 20;

    fn header(fin: bool, opcode: OpCode, mask: Option<[u8; 4]>, len: u64) -> FrameHeader {
        FrameHeader {
            fin,
            opcode,
            mask,
            payload_len: len,
        }
    }

    #[test]
    fn encode_then_decode_round_trips_at_length_boundaries() {
        for len in [0, 1, 125, 126, 127, 0xffff, 0x10000, MAX] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let h = header(len % 2 == 0, OpCode::Binary, mask, len);
                let mut out = [0; HEADER_BYTES_MAX];
                let n = encode_header(&h, &mut out);
                let role = if mask.is_some() {
                    Role::Server
                } else {
                    Role::Client
                };
                let expected = Decoded::Header {
                    header: h,
                    header_len: n,
                };
                assert_eq!(decode_header(&out[..n], role, MAX), Ok(expected));
                // Every strict prefix asks for more, never errs.
                for cut in 0..n {
                    match decode_header(&out[..cut], role, MAX) {
                        Ok(Decoded::NeedHeader(need)) => assert!(need > cut && need <= n),
                        other => panic!("prefix {cut} of {len}: {other:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn minimal_length_encoding() {
        let mut out = [0; HEADER_BYTES_MAX];
        assert_eq!(
            encode_header(&header(true, OpCode::Text, None, 125), &mut out),
            2
        );
        assert_eq!(
            encode_header(&header(true, OpCode::Text, None, 126), &mut out),
            4
        );
        assert_eq!(
            encode_header(&header(true, OpCode::Text, None, 65535), &mut out),
            4
        );
        assert_eq!(
            encode_header(&header(true, OpCode::Text, None, 65536), &mut out),
            10
        );
    }

    #[test]
    fn header_violations_map_to_errors() {
        let cases: &[(&[u8], ProtocolError)] = &[
            (&[0x81 | 0x40, 0x80], ProtocolError::ReservedBits),
            (&[0x81 | 0x10], ProtocolError::ReservedBits),
            (&[0x83, 0x80], ProtocolError::ReservedOpcode(3)),
            (&[0x8b], ProtocolError::ReservedOpcode(0xb)),
            (&[0x81, 0x00], ProtocolError::BadMasking),
            (&[0x09, 0x80], ProtocolError::FragmentedControl),
            (&[0x89, 0xfe], ProtocolError::ControlTooLong),
            (
                &[0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4],
                ProtocolError::BadLength,
            ),
            (
                &[0x82, 0xff, 0, 0, 0, 0, 0, 0x20, 0, 0, 1, 2, 3, 4],
                ProtocolError::FrameTooLarge,
            ),
        ];
        for (bytes, err) in cases {
            assert_eq!(
                decode_header(bytes, Role::Server, MAX),
                Err(*err),
                "{bytes:x?}"
            );
        }
        // A client refuses masked frames from a server.
        assert_eq!(
            decode_header(&[0x81, 0x80, 1, 2, 3, 4], Role::Client, MAX),
            Err(ProtocolError::BadMasking)
        );
    }

    #[test]
    fn lengths_must_be_minimally_encoded() {
        let m = [1, 2, 3, 4];
        // 125 in the 16-bit form, 65535 in the 64-bit form: 1002 (RFC 6455 5.2).
        let short16 = [&[0x82, 0xfe, 0x00, 125][..], &m].concat();
        let short64 = [&[0x82, 0xff, 0, 0, 0, 0, 0, 0, 0xff, 0xff][..], &m].concat();
        for bytes in [short16, short64] {
            let e = decode_header(&bytes, Role::Server, MAX).unwrap_err();
            assert_eq!(e, ProtocolError::NonMinimalLength, "{bytes:x?}");
            assert_eq!(e.close_code(), 1002);
        }
        // The smallest length of each form decodes.
        let ok16 = [&[0x82, 0xfe, 0x00, 126][..], &m].concat();
        let ok64 = [&[0x82, 0xff, 0, 0, 0, 0, 0, 1, 0, 0][..], &m].concat();
        assert!(decode_header(&ok16, Role::Server, MAX).is_ok());
        assert!(decode_header(&ok64, Role::Server, MAX).is_ok());
    }

    #[test]
    fn a_bad_length_fails_before_the_mask_arrives() {
        // Top bit set, too large, and not minimal: each proven by the length
        // bytes alone, with the mask still to come.
        let cases: &[(&[u8], ProtocolError)] = &[
            (
                &[0x82, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0],
                ProtocolError::BadLength,
            ),
            (
                &[0x82, 0xff, 0, 0, 0, 0, 0, 0x20, 0, 0],
                ProtocolError::FrameTooLarge,
            ),
            (&[0x82, 0xfe, 0x00, 0x05], ProtocolError::NonMinimalLength),
        ];
        for (bytes, err) in cases {
            assert_eq!(
                decode_header(bytes, Role::Server, MAX),
                Err(*err),
                "{bytes:x?}"
            );
        }
    }

    #[test]
    fn frame_len_min_counts_header_and_payload() {
        let d = decode_header(&[0x82, 0xfe, 0x01, 0x00, 1, 2, 3, 4], Role::Server, MAX).unwrap();
        assert_eq!(d.frame_len_min(), 8 + 256);
    }
}
