//! What the load generator says on the wire: the upgrade request, client frames
//! (masked, with a zero key: valid, and free for the client), server frame
//! parsing, and a minimal keep-alive HTTP/1.1 client for the control plane.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A WebSocket upgrade request for `path` (the RFC 6455 sample key).
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: loadgen\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A masked client frame with FIN set and a zero masking key.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
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
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
    out
}

/// Calls `each(opcode, payload)` for every complete server frame at the start of
/// `buf`, removes them, and returns how many there were.
pub fn parse_frames(buf: &mut Vec<u8>, mut each: impl FnMut(u8, &[u8])) -> usize {
    let mut at = 0;
    let mut count = 0;
    loop {
        let rest = &buf[at..];
        if rest.len() < 2 {
            break;
        }
        let (len, head) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 if rest.len() >= 10 => (
                u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if rest.len() < head + len {
            break;
        }
        each(rest[0] & 0x0f, &rest[head..head + len]);
        count += 1;
        at += head + len;
    }
    buf.drain(..at);
    count
}

/// The number after `key` in `haystack`.
pub fn number_after(haystack: &[u8], key: &[u8]) -> Option<u64> {
    let at = haystack.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = haystack[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&haystack[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// The string value after `key` (`"key":"value"`).
pub fn string_after<'a>(haystack: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let at = haystack.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = haystack[at..].strip_prefix(b"\"")?;
    let end = rest.iter().position(|&b| b == b'"')?;
    Some(&rest[..end])
}

/// A keep-alive HTTP/1.1 connection to the control plane.
pub struct Http {
    addr: SocketAddr,
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    pub fn connect(addr: SocketAddr) -> Result<Http, String> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("control plane {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        Ok(Http {
            addr,
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends a request and reads the answer: (status, body).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), String> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: loadgen\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.stream
            .write_all(head.as_bytes())
            .map_err(|e| e.to_string())?;
        self.stream.write_all(body).map_err(|e| e.to_string())?;
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or("bad status line")?;
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + length {
                    let body = self.buf[end + 4..end + 4 + length].to_vec();
                    self.buf.drain(..end + 4 + length);
                    return Ok((status, body));
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(|e| format!("control plane: {e}"))?;
            if n == 0 {
                return Err("the control plane closed the connection".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// `GET /stats`, parsed.
    ///
    /// A connection left idle through a long run may have been closed by the
    /// server's idle timeout: a GET is safe to send again on a new one.
    pub fn stats(&mut self) -> Result<serde_json::Value, String> {
        let (status, body) = match self.request("GET", "/stats", b"") {
            Ok(answer) => answer,
            Err(_) => {
                *self = Http::connect(self.addr)?;
                self.request("GET", "/stats", b"")?
            }
        };
        if status != 200 {
            return Err(format!("/stats answered {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("/stats: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_the_parser() {
        let mut buf = Vec::new();
        for len in [0, 125, 126, 70_000] {
            let mut f = client_frame(0x2, &vec![7; len]);
            // Server frames are unmasked: drop the mask bit and key.
            f[1] &= 0x7f;
            let at = match len {
                0..=125 => 2,
                126..=0xffff => 4,
                _ => 10,
            };
            f.drain(at..at + 4);
            buf.extend(f);
        }
        buf.push(0x81); // an incomplete frame stays
        let mut lens = Vec::new();
        assert_eq!(parse_frames(&mut buf, |op, p| lens.push((op, p.len()))), 4);
        assert_eq!(lens, vec![(2, 0), (2, 125), (2, 126), (2, 70_000)]);
        assert_eq!(buf, vec![0x81]);
    }

    #[test]
    fn fields_are_found() {
        let event = br#"{"topic":"t7","seq":42,"data":{"t":1234,"p":"xx"}}"#;
        assert_eq!(number_after(event, b"\"seq\":"), Some(42));
        assert_eq!(number_after(event, b"\"t\":"), Some(1234));
        assert_eq!(string_after(event, b"\"topic\":"), Some(&b"t7"[..]));
    }
}
