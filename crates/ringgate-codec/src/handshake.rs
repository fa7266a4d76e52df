//! The HTTP/1.1 upgrade (RFC 6455 section 4.2): parsing the client's request head
//! straight from a borrowed buffer with `httparse`, and writing the 101 answer
//! or a plain error response.
//!
//! Owns the checks of 4.2.1. Routing (which paths exist) and limits on time
//! belong to the caller; the request size limit is the caller's too, because only
//! it knows how many bytes it has buffered.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::error::HandshakeError;

/// Header lines accepted in a request head; more is answered 431. Proxies and
/// browsers add many (forwarding, tracing, cookies, client hints), so this is
/// generous; the head's byte limit still bounds the work.
pub const REQUEST_HEADERS_MAX: usize = 96;
/// The GUID of RFC 6455 section 1.3.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A parsed HTTP/1.1 request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The path of the request target, without the query.
    pub path: &'a str,
    /// The query string after `?`, if any (not percent-decoded).
    pub query: Option<&'a str>,
    /// The verdict on the upgrade: the `Sec-WebSocket-Key` (checked to be the
    /// base64 of 16 bytes) when every rule of 4.2.1 holds. Kept apart from the
    /// parse result so a caller can route by path first (404 before 400).
    pub upgrade: Result<[u8; 24], HandshakeError>,
    /// `Origin`, kept for origin checks by the caller.
    pub origin: Option<&'a str>,
    /// The subprotocol chosen: the client's first offer in `Sec-WebSocket-Protocol`
    /// that is one of the caller's `protocols`. The 101 MUST carry it
    /// (4.2.2 /subprotocol/); `None`: the header is left out.
    pub protocol: Option<&'static str>,
    /// The first offer in `Sec-WebSocket-Protocol` that `token_offer` accepts (a
    /// raw token a browser sends there, since it cannot set headers); the 101
    /// may answer it as the chosen subprotocol.
    pub token_offer: Option<&'a str>,
    /// `Authorization`, kept for token checks by the caller.
    pub authorization: Option<&'a str>,
    /// Bytes the request head takes; any bytes after it are frames.
    pub head_len: usize,
}

/// Parses a request head at the start of `buf`. `Err` means the bytes are not an
/// HTTP/1.1 request head at all; whether it is a valid upgrade is in
/// [`Request::upgrade`]. `protocols` are the subprotocols the caller speaks.
///
/// The request target may be in origin form (`/ws?x`) or absolute form
/// (`http://host/ws?x`, which RFC 7230 5.3.2 says a server MUST accept).
///
/// Returns `Ok(None)` while the head is incomplete: the caller MUST then answer
/// [`HandshakeError::TooLarge`] once it holds its size limit of bytes without a
/// complete head.
pub fn parse_request<'a>(
    buf: &'a [u8],
    protocols: &[&'static str],
) -> Result<Option<Request<'a>>, HandshakeError> {
    parse_request_with(buf, protocols, |_| false)
}

/// [`parse_request`], also finding the first `Sec-WebSocket-Protocol` offer
/// that `token_offer` takes for a token ([`Request::token_offer`]).
pub fn parse_request_with<'a>(
    buf: &'a [u8],
    protocols: &[&'static str],
    token_offer: fn(&str) -> bool,
) -> Result<Option<Request<'a>>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; REQUEST_HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooLarge),
        Err(_) => return Err(HandshakeError::Malformed),
    };
    let (path, query) = split_target(req.path.ok_or(HandshakeError::Malformed)?)?;
    let mut host = false;
    let mut upgrade = false;
    let mut connection_upgrade = false;
    let mut key = None;
    let mut key_count = 0;
    let mut version = None;
    let mut origin = None;
    let mut protocol: Option<(usize, &'static str)> = None;
    let mut offered = 0;
    let mut token = None;
    let mut authorization = None;
    for header in req.headers.iter() {
        let value = header.value;
        let name = header.name;
        if name.eq_ignore_ascii_case("host") {
            host = true;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            key_count += 1;
            key = Some(trim(value));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version = Some(trim(value));
        } else if name.eq_ignore_ascii_case("origin") {
            origin = std::str::from_utf8(trim(value)).ok();
        } else if name.eq_ignore_ascii_case("authorization") {
            authorization = std::str::from_utf8(trim(value)).ok();
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            // Offers may span several header lines; the client's order is its
            // preference, and the first offer we speak wins.
            for offer in value.split(|&b| b == b',').map(trim) {
                let ours = protocols.iter().find(|p| p.as_bytes() == offer);
                if let (Some(&p), None) = (ours, protocol) {
                    protocol = Some((offered, p));
                }
                if token.is_none() {
                    token = std::str::from_utf8(offer).ok().filter(|o| token_offer(o));
                }
                offered += 1;
            }
        }
    }
    let verdict = if req.method != Some("GET") {
        Err(HandshakeError::MethodNotAllowed)
    } else if req.version != Some(1) {
        Err(HandshakeError::OldHttpVersion)
    } else if !host {
        Err(HandshakeError::MissingHost)
    } else if !upgrade || !connection_upgrade {
        Err(HandshakeError::NotUpgrade)
    } else if version != Some(b"13".as_slice()) {
        Err(HandshakeError::UnsupportedVersion)
    } else {
        match key {
            Some(key) if key_count == 1 => check_key(key),
            _ => Err(HandshakeError::BadKey),
        }
    };
    Ok(Some(Request {
        path,
        query,
        upgrade: verdict,
        origin,
        protocol: protocol.map(|(_, p)| p),
        token_offer: token,
        authorization,
        head_len,
    }))
}

/// The path and query of a request target in origin form (`/path?query`) or
/// absolute form (`http://host/path?query`; an empty path is `/`).
fn split_target(target: &str) -> Result<(&str, Option<&str>), HandshakeError> {
    let origin_form = if target.starts_with('/') {
        target
    } else {
        let scheme_end = target.find("://").ok_or(HandshakeError::Malformed)?;
        let scheme = &target[..scheme_end];
        let known = ["http", "https", "ws", "wss"];
        if !known.iter().any(|k| k.eq_ignore_ascii_case(scheme)) {
            return Err(HandshakeError::Malformed);
        }
        let rest = &target[scheme_end + 3..];
        match rest.find(['/', '?']) {
            Some(at) if rest.as_bytes()[at] == b'/' => &rest[at..],
            Some(at) => return Ok(("/", Some(&rest[at + 1..]))),
            None => "/",
        }
    };
    Ok(match origin_form.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (origin_form, None),
    })
}

fn check_key(key: &[u8]) -> Result<[u8; 24], HandshakeError> {
    let key: [u8; 24] = key.try_into().map_err(|_| HandshakeError::BadKey)?;
    let mut decoded = [0u8; 18];
    match BASE64.decode_slice(key, &mut decoded) {
        Ok(16) => Ok(key),
        _ => Err(HandshakeError::BadKey),
    }
}

/// Whether a comma-separated header value holds `token` (ASCII case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| trim(t).eq_ignore_ascii_case(token.as_bytes()))
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

/// Computes `Sec-WebSocket-Accept` for `key` (4.2.2 item 5.4).
fn accept_key(key: &[u8; 24]) -> [u8; 28] {
    let mut sha1 = sha1_smol::Sha1::new();
    sha1.update(key);
    sha1.update(ACCEPT_GUID);
    let mut out = [0u8; 28];
    let n = BASE64
        .encode_slice(sha1.digest().bytes(), &mut out)
        .expect("20 bytes encode to 28");
    debug_assert_eq!(n, 28);
    out
}

/// Appends the `101 Switching Protocols` response for `key` to `out`, naming
/// `protocol` (the one [`Request::protocol`] chose) when there is one.
pub fn write_switching_protocols(key: &[u8; 24], protocol: Option<&str>, out: &mut Vec<u8>) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(&accept_key(key));
    if let Some(protocol) = protocol {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(protocol.as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// Appends a plain-text error response that closes the connection to `out`.
/// `extra_headers` are complete header lines, each ending in CRLF.
pub fn write_error_response(status: u16, reason: &str, extra_headers: &str, out: &mut Vec<u8>) {
    use std::io::Write as _;
    let text = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n{reason}\n",
        reason.len() + 1
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /ws?topics=a,b HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://example.com\r\n\r\n";

    fn with(replace: &str, by: &str) -> String {
        assert!(GOOD.contains(replace), "{replace}");
        GOOD.replace(replace, by)
    }

    #[test]
    fn parses_a_valid_request_and_answers_with_the_rfc_sample_key() {
        let mut buf = GOOD.as_bytes().to_vec();
        buf.extend_from_slice(b"\x81\x80"); // frame bytes after the head
        let req = parse_request(&buf, &[]).unwrap().unwrap();
        assert_eq!(req.path, "/ws");
        assert_eq!(req.query, Some("topics=a,b"));
        assert_eq!(req.origin, Some("http://example.com"));
        assert_eq!(req.head_len, GOOD.len());
        let mut out = Vec::new();
        write_switching_protocols(&req.upgrade.unwrap(), None, &mut out);
        let text = String::from_utf8(out).unwrap();
        // The example from RFC 6455 section 1.3.
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn every_prefix_is_incomplete() {
        for cut in 0..GOOD.len() {
            assert_eq!(
                parse_request(&GOOD.as_bytes()[..cut], &[]),
                Ok(None),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn header_checks_map_to_statuses() {
        let cases = [
            (with("GET", "POST"), HandshakeError::MethodNotAllowed),
            (with("HTTP/1.1", "HTTP/1.0"), HandshakeError::OldHttpVersion),
            (with("Host: x\r\n", ""), HandshakeError::MissingHost),
            (
                with("Upgrade: websocket\r\n", ""),
                HandshakeError::NotUpgrade,
            ),
            (
                with("Upgrade: websocket", "Upgrade: h2c"),
                HandshakeError::NotUpgrade,
            ),
            (
                with("keep-alive, Upgrade", "keep-alive"),
                HandshakeError::NotUpgrade,
            ),
            (
                with("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
                HandshakeError::UnsupportedVersion,
            ),
            (
                with("Sec-WebSocket-Version: 13\r\n", ""),
                HandshakeError::UnsupportedVersion,
            ),
            (
                with("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZQ=="),
                HandshakeError::BadKey,
            ),
            (
                with("dGhlIHNhbXBsZSBub25jZQ==", "!!!!!!!!!!!!!!!!!!!!!!=="),
                HandshakeError::BadKey,
            ),
            (
                with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
                HandshakeError::BadKey,
            ),
            (
                with(
                    "Origin",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin",
                ),
                HandshakeError::BadKey,
            ),
            (with("GET /ws", "GET ws"), HandshakeError::Malformed),
            (
                "\x16\x03\x01\x00garbage\r\n\r\n".to_string(),
                HandshakeError::Malformed,
            ),
        ];
        for (request, expected) in cases {
            let verdict = parse_request(request.as_bytes(), &[]).and_then(|r| r.unwrap().upgrade);
            assert_eq!(verdict, Err(expected), "{request:?}");
        }
    }

    #[test]
    fn tokens_are_case_insensitive() {
        let req = with("Upgrade: websocket", "upgrade: WebSocket")
            .replace("keep-alive, Upgrade", "UPGRADE");
        assert!(parse_request(req.as_bytes(), &[])
            .unwrap()
            .unwrap()
            .upgrade
            .is_ok());
    }

    #[test]
    fn the_path_is_known_even_when_the_upgrade_is_invalid() {
        let req = parse_request(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", &[])
            .unwrap()
            .unwrap();
        assert_eq!(req.path, "/nope");
        assert_eq!(req.upgrade, Err(HandshakeError::NotUpgrade));
    }

    #[test]
    fn too_many_headers_is_431() {
        let extra: String = (0..REQUEST_HEADERS_MAX)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect();
        let req = with("Host: x\r\n", &format!("Host: x\r\n{extra}"));
        assert_eq!(
            parse_request(req.as_bytes(), &[]),
            Err(HandshakeError::TooLarge)
        );
    }

    #[test]
    fn many_headers_as_proxies_send_are_served() {
        let extra: String = (0..60).map(|i| format!("X-Forwarded-{i}: y\r\n")).collect();
        let req = with("Host: x\r\n", &format!("Host: x\r\n{extra}"));
        let parsed = parse_request(req.as_bytes(), &[]).unwrap().unwrap();
        assert!(parsed.upgrade.is_ok());
    }

    #[test]
    fn absolute_form_targets_are_served() {
        for (target, path, query) in [
            ("http://example.com/ws?topics=a", "/ws", Some("topics=a")),
            ("HTTPS://example.com:8443/ws", "/ws", None),
            ("ws://h/echo", "/echo", None),
            ("http://example.com", "/", None),
            ("http://example.com?x=1", "/", Some("x=1")),
        ] {
            let req = with("GET /ws?topics=a,b ", &format!("GET {target} "));
            let parsed = parse_request(req.as_bytes(), &[]).unwrap().unwrap();
            assert_eq!((parsed.path, parsed.query), (path, query), "{target}");
            assert!(parsed.upgrade.is_ok());
        }
        let req = with("GET /ws?topics=a,b ", "GET ftp://h/ws ");
        assert_eq!(
            parse_request(req.as_bytes(), &[]),
            Err(HandshakeError::Malformed)
        );
    }

    #[test]
    fn a_token_offer_and_the_authorization_header_are_kept() {
        let req = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ringgate.v1, a.b.c\r\nAuthorization: Bearer t0k\r\n\r\n";
        let parsed = parse_request_with(req.as_bytes(), &["ringgate.v1"], |o| o == "a.b.c")
            .unwrap()
            .unwrap();
        assert_eq!(parsed.protocol, Some("ringgate.v1"));
        assert_eq!(parsed.token_offer, Some("a.b.c"));
        assert_eq!(parsed.authorization, Some("Bearer t0k"));
        let parsed = parse_request(req.as_bytes(), &[]).unwrap().unwrap();
        assert_eq!(parsed.token_offer, None, "no token taken by default");
    }

    #[test]
    fn the_first_offered_subprotocol_we_speak_is_chosen_and_answered() {
        let ours = ["ringgate.v1", "echo"];
        let offer = |lines: &str| {
            let req = with("Origin", &format!("{lines}Origin"));
            parse_request(req.as_bytes(), &ours)
                .unwrap()
                .unwrap()
                .protocol
        };
        assert_eq!(offer(""), None);
        assert_eq!(offer("Sec-WebSocket-Protocol: chat, superchat\r\n"), None);
        assert_eq!(
            offer("Sec-WebSocket-Protocol: chat, echo , ringgate.v1\r\n"),
            Some("echo"),
            "the client's order decides"
        );
        assert_eq!(
            offer("Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: ringgate.v1\r\n"),
            Some("ringgate.v1"),
            "offers on several lines count"
        );
        let mut out = Vec::new();
        write_switching_protocols(b"dGhlIHNhbXBsZSBub25jZQ==", Some("echo"), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("\r\nSec-WebSocket-Protocol: echo\r\n"),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn error_response_is_well_formed() {
        let mut out = Vec::new();
        let e = HandshakeError::UnsupportedVersion;
        write_error_response(e.status(), e.reason(), e.extra_headers(), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
}
