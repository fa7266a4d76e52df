//! Sans-I/O RFC 6455 WebSocket codec for ringgate.
//!
//! This crate owns the wire rules and nothing else: it performs no I/O, reads no
//! clock, spawns no thread and keeps no buffer of its own. Bytes come in as
//! borrowed slices (unmasked in place); output goes into buffers the caller owns.
//! The shard runtime (`ringgate-shard`) is the only adapter between this crate and
//! the kernel.
//!
//! ```text
//!            bytes from the socket (a provided buffer, or a partial-frame tail)
//!                                   |
//!   handshake::parse_request --------+------> Request (path, key, origin) or HandshakeError -> HTTP status
//!                                   |
//!   frame::decode_header ------------+------> FrameHeader + header length, or "need N more bytes"
//!   mask::apply_mask (payload, in place)
//!   message::MessageState::handle_frame ----> Event: Data / Ping / Pong / Close, or ProtocolError -> close code
//!                                   |
//!   frame::encode_header, close::encode_close_payload: what goes back out
//! ```
//!
//! The loop a caller runs per connection:
//! 1. Until the upgrade is done, feed the request head to [`parse_request`]; answer
//!    with [`write_switching_protocols`] or [`write_error_response`].
//! 2. Then, for each complete frame: [`decode_header`], [`apply_mask`] the payload,
//!    [`MessageState::handle_frame`], act on the [`Event`].
//! 3. On a [`ProtocolError`], send a Close frame with [`ProtocolError::close_code`]
//!    and stop reading frames.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod close;
mod error;
mod frame;
mod handshake;
mod mask;
mod message;
mod utf8;

pub use close::{encode_close_payload, is_valid_close_code, parse_close_payload, CloseFrame};
pub use error::{HandshakeError, ProtocolError};
pub use frame::{
    decode_header, encode_header, Decoded, FrameHeader, OpCode, Role, HEADER_BYTES_MAX,
    SERVER_HEADER_BYTES_MAX,
};
pub use handshake::{
    parse_request, parse_request_with, write_error_response, write_switching_protocols, Request,
    REQUEST_HEADERS_MAX,
};
pub use mask::apply_mask;
pub use message::{DataKind, Event, Limits, MessageState};
pub use utf8::Utf8Validator;

/// Close status codes used by ringgate (RFC 6455 section 7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The endpoint is going away (server shutdown, idle client).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A data type the endpoint cannot accept.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A text message with invalid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message that violates the endpoint's policy.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame or message too big to process.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// An unexpected condition in the server.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The server is overloaded: try again later (IANA registry).
    pub const TRY_AGAIN_LATER: u16 = 1013;
}
