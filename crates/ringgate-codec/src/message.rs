//! The rules that span frames (RFC 6455 sections 5.4, 5.5 and 8.1): message
//! fragmentation, interleaved control frames, the message size limit and
//! incremental UTF-8 validation of text messages.
//!
//! Owns no payload bytes: a caller that needs a fragmented message whole keeps
//! the fragments itself. The state is 24 bytes and lives only while the caller
//! has a message in progress.

use crate::close::{parse_close_payload, CloseFrame};
use crate::error::ProtocolError;
use crate::frame::{FrameHeader, OpCode};
use crate::utf8::Utf8Validator;

/// The kind of a data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    /// UTF-8 text.
    Text,
    /// Binary.
    Binary,
}

/// Size limits, checked before any payload is buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest frame payload accepted (close 1009 past it).
    pub frame_bytes_max: u64,
    /// The longest message accepted, summed over its fragments (close 1009 past it).
    pub message_bytes_max: u64,
}

/// What a frame means to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A data frame: the whole message when `first && fin`, else one fragment.
    Data {
        /// Text or binary (continuations carry the kind of their message).
        kind: DataKind,
        /// The frame starts a message.
        first: bool,
        /// The frame ends the message.
        fin: bool,
        /// The unmasked payload.
        payload: &'a [u8],
    },
    /// A ping: the caller MUST answer with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// An unsolicited or answering pong: nothing to do.
    Pong(&'a [u8]),
    /// A valid close frame: the caller SHOULD echo the code and stop sending data.
    Close(CloseFrame<'a>),
}

/// Per-connection state across frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageState {
    kind: Option<DataKind>,
    message_len: u64,
    utf8: Utf8Validator,
}

impl MessageState {
    /// State between messages.
    pub const fn new() -> Self {
        Self {
            kind: None,
            message_len: 0,
            utf8: Utf8Validator::new(),
        }
    }

    /// True while a fragmented message has started and not finished.
    pub fn in_message(&self) -> bool {
        self.kind.is_some()
    }

    /// Checks the first `validated + bytes.len()` payload bytes of a data frame
    /// that has not fully arrived yet, so an invalid text message fails before
    /// its frame ends. `validated` is how many payload bytes earlier calls for
    /// this frame already checked; pass the same count to [`Self::handle_frame`].
    ///
    /// Checks in the same order as [`Self::handle_frame`] (sequence, size, then
    /// UTF-8), so the error, and the close code, do not depend on how the
    /// bytes were split across reads.
    pub fn check_partial(
        &mut self,
        header: &FrameHeader,
        validated: u64,
        bytes: &[u8],
        limits: &Limits,
    ) -> Result<(), ProtocolError> {
        if header.opcode.is_control() {
            return Ok(());
        }
        let kind = self.frame_kind(header)?;
        let first = header.opcode != OpCode::Continuation;
        let before = if first { 0 } else { self.message_len };
        if before + header.payload_len > limits.message_bytes_max {
            return Err(ProtocolError::MessageTooLarge);
        }
        if validated == 0 && first {
            self.utf8 = Utf8Validator::new();
        }
        if kind == DataKind::Text {
            self.utf8
                .feed(bytes, false)
                .map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        Ok(())
    }

    /// Applies the cross-frame rules to one complete, unmasked frame.
    ///
    /// `validated` is the number of leading payload bytes already passed to
    /// [`Self::check_partial`] (0 when none were).
    pub fn handle_frame<'a>(
        &mut self,
        header: &FrameHeader,
        payload: &'a [u8],
        validated: u64,
        limits: &Limits,
    ) -> Result<Event<'a>, ProtocolError> {
        debug_assert_eq!(payload.len() as u64, header.payload_len);
        match header.opcode {
            OpCode::Ping => return Ok(Event::Ping(payload)),
            OpCode::Pong => return Ok(Event::Pong(payload)),
            OpCode::Close => return parse_close_payload(payload).map(Event::Close),
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {}
        }
        let kind = self.frame_kind(header)?;
        let first = header.opcode != OpCode::Continuation;
        if first {
            self.message_len = 0;
            if validated == 0 {
                self.utf8 = Utf8Validator::new();
            }
        }
        self.message_len += header.payload_len;
        if self.message_len > limits.message_bytes_max {
            return Err(ProtocolError::MessageTooLarge);
        }
        if kind == DataKind::Text {
            let rest = &payload[validated as usize..];
            self.utf8
                .feed(rest, header.fin)
                .map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        self.kind = if header.fin { None } else { Some(kind) };
        Ok(Event::Data {
            kind,
            first,
            fin: header.fin,
            payload,
        })
    }

    /// The message kind of a data frame, checking the fragmentation sequence.
    fn frame_kind(&self, header: &FrameHeader) -> Result<DataKind, ProtocolError> {
        match (header.opcode, self.kind) {
            (OpCode::Continuation, Some(kind)) => Ok(kind),
            (OpCode::Continuation, None) => Err(ProtocolError::UnexpectedContinuation),
            (_, Some(_)) => Err(ProtocolError::ExpectedContinuation),
            (OpCode::Text, None) => Ok(DataKind::Text),
            (OpCode::Binary, None) => Ok(DataKind::Binary),
            (op, None) => unreachable!("control opcode {op:?} handled by the caller"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        frame_bytes_max: 1000,
        message_bytes_max: 2000,
    };

    fn h(fin: bool, opcode: OpCode, len: usize) -> FrameHeader {
        FrameHeader {
            fin,
            opcode,
            mask: Some([0; 4]),
            payload_len: len as u64,
        }
    }

    fn feed(
        state: &mut MessageState,
        fin: bool,
        op: OpCode,
        payload: &[u8],
    ) -> Result<Event<'static>, ProtocolError> {
        let owned: &'static [u8] = Box::leak(payload.to_vec().into_boxed_slice());
        state.handle_frame(&h(fin, op, payload.len()), owned, 0, &LIMITS)
    }

    #[test]
    fn single_frame_messages() {
        let mut s = MessageState::new();
        let e = feed(&mut s, true, OpCode::Text, b"hi").unwrap();
        assert_eq!(
            e,
            Event::Data {
                kind: DataKind::Text,
                first: true,
                fin: true,
                payload: b"hi"
            }
        );
        assert!(!s.in_message());
        assert!(matches!(
            feed(&mut s, true, OpCode::Binary, &[0xff]),
            Ok(Event::Data {
                kind: DataKind::Binary,
                ..
            })
        ));
    }

    #[test]
    fn fragments_with_interleaved_control_frames() {
        let mut s = MessageState::new();
        assert!(matches!(
            feed(&mut s, false, OpCode::Text, b"he"),
            Ok(Event::Data {
                first: true,
                fin: false,
                ..
            })
        ));
        assert!(s.in_message());
        assert_eq!(
            feed(&mut s, true, OpCode::Ping, b"p"),
            Ok(Event::Ping(b"p"))
        );
        assert_eq!(feed(&mut s, true, OpCode::Pong, b""), Ok(Event::Pong(b"")));
        assert!(matches!(
            feed(&mut s, false, OpCode::Continuation, b"ll"),
            Ok(Event::Data {
                kind: DataKind::Text,
                first: false,
                fin: false,
                ..
            })
        ));
        assert!(matches!(
            feed(&mut s, true, OpCode::Continuation, b"o"),
            Ok(Event::Data { fin: true, .. })
        ));
        assert!(!s.in_message());
    }

    #[test]
    fn sequence_violations() {
        let mut s = MessageState::new();
        assert_eq!(
            feed(&mut s, true, OpCode::Continuation, b"x"),
            Err(ProtocolError::UnexpectedContinuation)
        );
        let mut s = MessageState::new();
        feed(&mut s, false, OpCode::Binary, b"x").unwrap();
        assert_eq!(
            feed(&mut s, true, OpCode::Text, b"x"),
            Err(ProtocolError::ExpectedContinuation)
        );
    }

    #[test]
    fn utf8_split_across_fragments_is_checked_as_one_message() {
        let euro = "€".as_bytes(); // e2 82 ac
        let mut s = MessageState::new();
        feed(&mut s, false, OpCode::Text, &euro[..1]).unwrap();
        feed(&mut s, false, OpCode::Continuation, &euro[1..2]).unwrap();
        assert!(feed(&mut s, true, OpCode::Continuation, &euro[2..]).is_ok());
        // Invalid across fragments fails at the fragment that proves it.
        let mut s = MessageState::new();
        feed(&mut s, false, OpCode::Text, b"ok\xed").unwrap();
        assert_eq!(
            feed(&mut s, false, OpCode::Continuation, b"\xa0\x80"),
            Err(ProtocolError::InvalidUtf8)
        );
        // Unfinished code point at the end of the message.
        let mut s = MessageState::new();
        assert_eq!(
            feed(&mut s, true, OpCode::Text, &euro[..2]),
            Err(ProtocolError::InvalidUtf8)
        );
        // Binary is never checked.
        let mut s = MessageState::new();
        assert!(feed(&mut s, true, OpCode::Binary, &[0xff, 0xfe]).is_ok());
    }

    #[test]
    fn partial_frame_checks_fail_fast_and_are_not_repeated() {
        let text = "κόσμε".as_bytes();
        let header = h(true, OpCode::Text, text.len());
        let mut s = MessageState::new();
        s.check_partial(&header, 0, &text[..3], &LIMITS).unwrap();
        s.check_partial(&header, 3, &text[3..5], &LIMITS).unwrap();
        assert!(s.handle_frame(&header, text, 5, &LIMITS).is_ok());
        let mut s = MessageState::new();
        let bad = h(true, OpCode::Text, 10);
        assert_eq!(
            s.check_partial(&bad, 0, b"ab\xff", &LIMITS),
            Err(ProtocolError::InvalidUtf8)
        );
    }

    #[test]
    fn an_oversized_message_fails_as_too_big_however_its_bytes_arrive() {
        // A text frame over the message limit whose first bytes are bad UTF-8:
        // whole or in pieces, the answer is 1009, never 1007.
        let header = h(true, OpCode::Text, 2500);
        let mut payload = vec![b'a'; 2500];
        payload[0] = 0xff;
        let whole = MessageState::new().handle_frame(&header, &payload, 0, &LIMITS);
        assert_eq!(whole, Err(ProtocolError::MessageTooLarge));
        let piece = MessageState::new().check_partial(&header, 0, &payload[..10], &LIMITS);
        assert_eq!(piece, Err(ProtocolError::MessageTooLarge));
        // A continuation that takes the message over the limit, likewise.
        let mut s = MessageState::new();
        feed(&mut s, false, OpCode::Text, &[b'a'; 1500]).unwrap();
        let cont = h(true, OpCode::Continuation, 600);
        assert_eq!(
            s.check_partial(&cont, 0, b"\xff", &LIMITS),
            Err(ProtocolError::MessageTooLarge)
        );
    }

    #[test]
    fn message_limit_sums_fragments() {
        let mut s = MessageState::new();
        let big = vec![0u8; 1000];
        feed(&mut s, false, OpCode::Binary, &big).unwrap();
        feed(&mut s, false, OpCode::Continuation, &big).unwrap();
        assert_eq!(
            feed(&mut s, true, OpCode::Continuation, b"x"),
            Err(ProtocolError::MessageTooLarge)
        );
    }

    #[test]
    fn close_payloads_are_checked() {
        let mut s = MessageState::new();
        assert_eq!(
            feed(&mut s, true, OpCode::Close, &[1]),
            Err(ProtocolError::BadCloseLength)
        );
        assert_eq!(
            feed(&mut s, true, OpCode::Close, &[0x03, 0xee]),
            Err(ProtocolError::BadCloseCode(1006))
        );
        assert!(matches!(
            feed(&mut s, true, OpCode::Close, b"\x03\xe8"),
            Ok(Event::Close(CloseFrame {
                code: Some(1000),
                ..
            }))
        ));
    }
}
