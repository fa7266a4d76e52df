//! The codec's error types: peer faults only, each with exactly one mapping to
//! the answer the peer gets (an HTTP status for the handshake, a close code for
//! frames). API misuse by the caller is a bug and asserts instead.

use std::fmt;

use crate::close_code;

/// A violation of RFC 6455 by the peer, found while decoding frames.
///
/// Every variant maps to exactly one close code through [`ProtocolError::close_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// RSV1-3 set without a negotiated extension (5.2).
    ReservedBits,
    /// Opcode 0x3-0x7 or 0xB-0xF (5.2).
    ReservedOpcode(u8),
    /// A client frame without the mask bit (5.1), or a server frame with it.
    BadMasking,
    /// A control frame with FIN clear (5.5).
    FragmentedControl,
    /// A control frame with more than 125 bytes of payload (5.5).
    ControlTooLong,
    /// A 64-bit payload length with its most significant bit set (5.2).
    BadLength,
    /// A payload length not in the minimal number of bytes (5.2: "the minimal
    /// number of bytes MUST be used to encode the length").
    NonMinimalLength,
    /// A frame longer than the configured frame limit.
    FrameTooLarge,
    /// A message longer than the configured message limit.
    MessageTooLarge,
    /// A text message (or close reason) that is not UTF-8 (8.1).
    InvalidUtf8,
    /// A continuation frame with no message in progress (5.4).
    UnexpectedContinuation,
    /// A new text/binary frame while a fragmented message is in progress (5.4).
    ExpectedContinuation,
    /// A close frame with a one-byte payload (5.5.1).
    BadCloseLength,
    /// A close frame with a status code that may not be sent on the wire (7.4).
    BadCloseCode(u16),
}

impl ProtocolError {
    /// The close code to send when failing the connection for this error.
    pub fn close_code(self) -> u16 {
        match self {
            Self::InvalidUtf8 => close_code::INVALID_PAYLOAD,
            Self::FrameTooLarge | Self::MessageTooLarge => close_code::MESSAGE_TOO_BIG,
            Self::ReservedBits
            | Self::ReservedOpcode(_)
            | Self::BadMasking
            | Self::FragmentedControl
            | Self::ControlTooLong
            | Self::BadLength
            | Self::NonMinimalLength
            | Self::UnexpectedContinuation
            | Self::ExpectedContinuation
            | Self::BadCloseLength
            | Self::BadCloseCode(_) => close_code::PROTOCOL_ERROR,
        }
    }

    /// A short reason for the close frame and the logs (at most 123 bytes, ASCII).
    pub fn reason(self) -> &'static str {
        match self {
            Self::ReservedBits => "reserved bits set",
            Self::ReservedOpcode(_) => "reserved opcode",
            Self::BadMasking => "client frames must be masked",
            Self::FragmentedControl => "fragmented control frame",
            Self::ControlTooLong => "control frame payload over 125 bytes",
            Self::BadLength => "invalid payload length",
            Self::NonMinimalLength => "payload length not minimally encoded",
            Self::FrameTooLarge => "frame too large",
            Self::MessageTooLarge => "message too large",
            Self::InvalidUtf8 => "invalid UTF-8 in text",
            Self::UnexpectedContinuation => "continuation frame without a message",
            Self::ExpectedContinuation => "expected a continuation frame",
            Self::BadCloseLength => "close payload of one byte",
            Self::BadCloseCode(_) => "invalid close code",
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ReservedOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            Self::BadCloseCode(code) => write!(f, "invalid close code {code}"),
            other => f.write_str(other.reason()),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// A request head that cannot be upgraded, with the HTTP status it is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Not parseable as HTTP/1.x.
    Malformed,
    /// HTTP/1.0 or older (RFC 6455 4.1 requires HTTP/1.1 or higher).
    OldHttpVersion,
    /// A method other than GET.
    MethodNotAllowed,
    /// No Host header (4.2.1 item 2).
    MissingHost,
    /// No `Upgrade: websocket` or no `Connection: Upgrade` (4.2.1 items 3 and 4).
    NotUpgrade,
    /// `Sec-WebSocket-Key` missing, repeated, or not 16 bytes of base64 (4.2.1 item 5).
    BadKey,
    /// `Sec-WebSocket-Version` missing or not 13 (4.2.1 item 6, 4.2.2).
    UnsupportedVersion,
    /// The request head is over the size or header-count limit.
    TooLarge,
}

impl HandshakeError {
    /// The HTTP status code to answer with.
    pub fn status(self) -> u16 {
        match self {
            Self::Malformed
            | Self::OldHttpVersion
            | Self::MissingHost
            | Self::NotUpgrade
            | Self::BadKey => 400,
            Self::MethodNotAllowed => 405,
            Self::UnsupportedVersion => 426,
            Self::TooLarge => 431,
        }
    }

    /// A one-line reason for the response body and the logs.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed => "malformed HTTP request",
            Self::OldHttpVersion => "WebSocket needs HTTP/1.1",
            Self::MethodNotAllowed => "only GET can be upgraded to a WebSocket",
            Self::MissingHost => "missing Host header",
            Self::NotUpgrade => {
                "not a WebSocket upgrade request (needs Upgrade: websocket and Connection: Upgrade)"
            }
            Self::BadKey => "missing or malformed Sec-WebSocket-Key",
            Self::UnsupportedVersion => "unsupported Sec-WebSocket-Version (this server speaks 13)",
            Self::TooLarge => "request head too large",
        }
    }

    /// Extra response header lines (each ending in CRLF) the status calls for.
    pub fn extra_headers(self) -> &'static str {
        match self {
            Self::UnsupportedVersion => "Sec-WebSocket-Version: 13\r\n",
            Self::MethodNotAllowed => "Allow: GET\r\n",
            _ => "",
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason(), self.status())
    }
}

impl std::error::Error for HandshakeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_follow_the_rfc() {
        assert_eq!(ProtocolError::InvalidUtf8.close_code(), 1007);
        assert_eq!(ProtocolError::FrameTooLarge.close_code(), 1009);
        assert_eq!(ProtocolError::MessageTooLarge.close_code(), 1009);
        assert_eq!(ProtocolError::ReservedBits.close_code(), 1002);
        assert_eq!(ProtocolError::BadMasking.close_code(), 1002);
    }

    #[test]
    fn reasons_fit_in_a_close_frame() {
        let all = [
            ProtocolError::ReservedBits,
            ProtocolError::ReservedOpcode(3),
            ProtocolError::BadMasking,
            ProtocolError::FragmentedControl,
            ProtocolError::ControlTooLong,
            ProtocolError::BadLength,
            ProtocolError::NonMinimalLength,
            ProtocolError::FrameTooLarge,
            ProtocolError::MessageTooLarge,
            ProtocolError::InvalidUtf8,
            ProtocolError::UnexpectedContinuation,
            ProtocolError::ExpectedContinuation,
            ProtocolError::BadCloseLength,
            ProtocolError::BadCloseCode(5),
        ];
        for e in all {
            assert!(e.reason().len() <= 123 && e.reason().is_ascii(), "{e:?}");
        }
    }

    #[test]
    fn handshake_statuses() {
        assert_eq!(HandshakeError::UnsupportedVersion.status(), 426);
        assert!(HandshakeError::UnsupportedVersion
            .extra_headers()
            .contains("Sec-WebSocket-Version: 13"));
        assert_eq!(HandshakeError::TooLarge.status(), 431);
        assert_eq!(HandshakeError::BadKey.status(), 400);
    }
}
