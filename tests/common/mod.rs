//! Shared harness for the end-to-end tests: starts the real `ringgate` binary on
//! free loopback ports and talks to it as independent clients do (tungstenite for
//! well-formed traffic, raw TCP for everything a library would refuse to send).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// An echo server with one shard and a 4 x 512 B buffer ring: a few busy
/// clients exhaust it (ENOBUFS), which tests of back-pressure need.
pub const STARVED_RING: &[&str] = &[
    "--echo",
    "--shards",
    "1",
    "--buffers",
    "4",
    "--buffer-size",
    "512",
];

/// The binary under test: the one cargo built, or `RINGGATE_BIN` (to run a
/// test against another build, e.g. to show it fails before a fix).
pub fn binary() -> std::ffi::OsString {
    std::env::var_os("RINGGATE_BIN")
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_ringgate").into())
}

/// A running ringgate, killed when dropped.
pub struct Server {
    pub child: Child,
    pub ws: SocketAddr,
    pub control: SocketAddr,
    /// `--metrics`, when given.
    pub metrics: Option<SocketAddr>,
}

impl Server {
    /// Starts ringgate on port 0 with `args` added, and waits for its ready line.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    /// Like [`Server::start`], with environment variables set.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        // Port 0 unless the test names an address.
        let listen: &[&str] = if args.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let control: &[&str] = if args.contains(&"--control") {
            &[]
        } else {
            &["--control", "127.0.0.1:0"]
        };
        let mut child = Command::new(binary())
            .args(listen)
            .args(control)
            .arg("--no-pin")
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ringgate");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the ready line");
        let field = |name: &str| -> Option<SocketAddr> {
            let start = line.find(&format!(" {name}="))? + name.len() + 2;
            line[start..].split_whitespace().next()?.parse().ok()
        };
        let (Some(ws), Some(control)) = (field("ws"), field("control")) else {
            panic!("not a ready line: {line:?}");
        };
        let metrics = field("metrics");
        Server {
            child,
            ws,
            control,
            metrics,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.ws, path)
    }

    /// GET on the control plane; returns (status, body).
    pub fn control_get(&self, path: &str) -> (u16, String) {
        http_get(self.control, path)
    }

    /// The parsed `/stats` document.
    pub fn stats(&self) -> Value {
        let (status, body) = self.control_get("/stats");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// A total from `/stats`.
    /// A `/stats` figure of each shard, in shard order.
    pub fn per_shard(&self, name: &str) -> Vec<u64> {
        self.stats()["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s[name].as_u64().unwrap())
            .collect()
    }

    pub fn total(&self, name: &str) -> u64 {
        self.stats()["totals"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no total {name}"))
    }

    /// Waits until `f` holds, or panics after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Server) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; stats: {}",
                self.stats()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal to the server.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill with a pid we spawned and a valid signal number.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0);
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "ringgate did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's resident set size in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    parse_response(&response)
}

/// A loopback port free now (bound, then released): for a server started
/// later on it, or for an address nothing listens on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A keep-alive HTTP/1.1 connection to the control plane, for what must be
/// asked on a connection opened earlier (the control plane takes no new
/// connections once it drains).
pub struct KeepAlive(TcpStream);

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> KeepAlive {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        KeepAlive(s)
    }

    /// One request; returns (status, body, whether the answer closes the
    /// connection). The body is read by its Content-Length.
    pub fn request(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, String, bool) {
        write!(
            self.0,
            "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        self.0.write_all(body).unwrap();
        let head = read_head(&mut self.0);
        let (status, _) = parse_response(&head);
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let length: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
        let mut answer = vec![0; length];
        self.0.read_exact(&mut answer).unwrap();
        let closes = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        (status, String::from_utf8(answer).unwrap(), closes)
    }
}

/// (status, body) of an HTTP response.
pub fn parse_response(response: &str) -> (u16, String) {
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

pub type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

/// A tungstenite client; limits raised so the server's limits are what is tested.
pub fn ws_connect(server: &Server, path: &str) -> Ws {
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (ws, response) =
        tungstenite::client::connect_with_config(server.url(path), Some(config), 3)
            .expect("upgrade");
    assert_eq!(response.status(), 101);
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    ws
}

pub const REQUEST_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// An upgrade request head for `path` with `extra` header lines.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {REQUEST_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A raw TCP client that has completed the upgrade.
pub fn raw_upgrade(server: &Server, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(server.ws).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(upgrade_request(path, "").as_bytes()).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    s
}

/// Reads an HTTP response head byte by byte (so no frame byte is consumed).
pub fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A masked client frame; `first_byte` carries FIN, RSV and the opcode.
pub fn frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0xa1, 0x5e, 0x07, 0xc3];
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

pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;
pub const FIN: u8 = 0x80;

/// Reads one server frame: (first byte, payload). `None` on EOF.
pub fn read_frame(s: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    if s.read_exact(&mut head).is_err() {
        return None;
    }
    assert_eq!(head[1] & 0x80, 0, "server frames are never masked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    Some((head[0], payload))
}

/// Reads frames until a close frame; returns its code. Other frames are skipped.
pub fn read_close_code(s: &mut impl Read) -> u16 {
    loop {
        let (b0, payload) = read_frame(s).expect("a close frame before EOF");
        if b0 & 0x0f == CLOSE {
            assert!(payload.len() >= 2, "close without a code");
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

/// Whether the server closes the TCP connection (EOF) within the read timeout.
pub fn reaches_eof(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// POSTs `body` to the control plane; returns (status, body).
pub fn post(addr: SocketAddr, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut response = Vec::new();
    let _ = s.read_to_end(&mut response);
    parse_response(&String::from_utf8_lossy(&response))
}

impl Server {
    /// Publishes `body` to `topic` through the API; returns the parsed answer.
    pub fn publish(&self, topic: &str, body: &str) -> Value {
        let (status, answer) = post(self.control, &format!("/publish/{topic}"), body.as_bytes());
        assert_eq!(status, 200, "publish to {topic}: {answer}");
        serde_json::from_str(&answer).unwrap()
    }
}

/// Reads the next text frame and parses it as JSON (pings are skipped).
pub fn read_json(s: &mut impl Read) -> Value {
    loop {
        let (b0, payload) = read_frame(s).expect("a frame, not EOF");
        match b0 & 0x0f {
            TEXT => return serde_json::from_slice(&payload).expect("JSON text"),
            PING => continue,
            other => panic!("expected a text frame, got opcode {other:#x}: {payload:?}"),
        }
    }
}

/// Sends a masked text frame.
pub fn send_text(s: &mut TcpStream, text: &str) {
    s.write_all(&frame(FIN | TEXT, text.as_bytes())).unwrap();
}

/// Subscribes with `{"op":"sub"}` (recovering from `since` = (seq, epoch) if
/// given) and returns the reply.
pub fn sub(s: &mut TcpStream, topic: &str, since: Option<(u64, &str)>) -> Value {
    let op = match since {
        None => serde_json::json!({"op": "sub", "topic": topic}),
        Some((seq, epoch)) => {
            serde_json::json!({"op": "sub", "topic": topic, "since": seq, "epoch": epoch})
        }
    };
    send_text(s, &op.to_string());
    read_json(s)
}
