//! Close frame payloads (RFC 6455 sections 5.5.1 and 7.4): status codes and
//! UTF-8 reasons, parsed and encoded.

use crate::error::ProtocolError;

/// A parsed close frame payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseFrame<'a> {
    /// The status code; `None` for an empty payload (which means 1005 to the application).
    pub code: Option<u16>,
    /// The UTF-8 reason (may be empty).
    pub reason: &'a str,
}

/// Whether `code` may appear in a close frame on the wire (7.4.1, 7.4.2 and the
/// IANA registry): 1000-1003, 1007-1014, and 3000-4999. 1004 is reserved; 1005,
/// 1006 and 1015 are for local use only and must never be sent.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Parses and checks a close frame payload (already unmasked).
pub fn parse_close_payload(payload: &[u8]) -> Result<CloseFrame<'_>, ProtocolError> {
    match payload {
        [] => Ok(CloseFrame {
            code: None,
            reason: "",
        }),
        [_] => Err(ProtocolError::BadCloseLength),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(ProtocolError::BadCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(CloseFrame {
                code: Some(code),
                reason,
            })
        }
    }
}

/// Writes a close payload (code, then the reason cut to fit 125 bytes on a
/// character boundary) into `out`; returns the length written.
pub fn encode_close_payload(code: u16, reason: &str, out: &mut [u8; 125]) -> usize {
    assert!(
        is_valid_close_code(code),
        "close code {code} may not be sent"
    );
    out[..2].copy_from_slice(&code.to_be_bytes());
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    out[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
    2 + cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_ranges() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ] {
            assert!(is_valid_close_code(code), "{code}");
        }
        for code in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!is_valid_close_code(code), "{code}");
        }
    }

    #[test]
    fn parse_rules() {
        assert_eq!(parse_close_payload(&[]).unwrap().code, None);
        assert_eq!(
            parse_close_payload(&[3]),
            Err(ProtocolError::BadCloseLength)
        );
        assert_eq!(
            parse_close_payload(&[0x03, 0xed]),
            Err(ProtocolError::BadCloseCode(1005))
        );
        let ok = parse_close_payload(b"\x03\xe8bye").unwrap();
        assert_eq!((ok.code, ok.reason), (Some(1000), "bye"));
        assert_eq!(
            parse_close_payload(b"\x03\xe8\xce\xba\xe1"),
            Err(ProtocolError::InvalidUtf8)
        );
    }

    #[test]
    fn encode_round_trips_and_cuts_on_a_char_boundary() {
        let mut out = [0; 125];
        let n = encode_close_payload(1001, "going away", &mut out);
        let parsed = parse_close_payload(&out[..n]).unwrap();
        assert_eq!((parsed.code, parsed.reason), (Some(1001), "going away"));
        let long = "é".repeat(100); // 200 bytes
        let n = encode_close_payload(1000, &long, &mut out);
        assert!(n <= 125);
        assert!(parse_close_payload(&out[..n]).is_ok());
    }
}
