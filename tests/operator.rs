//! End to end: what an operator meets first. Logs carry no colour codes when
//! stderr is not a terminal and come as JSON lines with `--log-format json`;
//! the control plane's `/` lists its endpoints; `--shards 0` is an error.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

/// Starts ringgate with stderr piped (not a terminal) and returns its first
/// log lines up to the "ringgate ready" one.
fn first_log_lines(extra: &[&str]) -> Vec<String> {
    let mut child = Command::new(binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--no-pin",
        ])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut lines = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        let ready = line.contains("ringgate ready");
        lines.push(line);
        if ready || lines.len() > 50 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().any(|l| l.contains("ringgate ready")),
        "{lines:?}"
    );
    lines
}

#[test]
fn logs_have_no_colour_codes_off_a_terminal() {
    for line in first_log_lines(&[]) {
        assert!(!line.contains('\u{1b}'), "an escape code in {line:?}");
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    for line in first_log_lines(&["--log-format", "json"]) {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}

#[test]
fn the_control_plane_lists_its_endpoints() {
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let (status, body) = server.control_get("/");
    assert_eq!(status, 200);
    for endpoint in [
        "/publish/{topic}",
        "/stats",
        "/metrics",
        "/healthz",
        "/readyz",
    ] {
        assert!(body.contains(endpoint), "{endpoint} missing: {body}");
    }
    let (status, body) = http_get(server.metrics.unwrap(), "/");
    assert_eq!(status, 200);
    assert!(
        body.contains("/metrics") && !body.contains("/publish"),
        "{body}"
    );
}

#[test]
fn zero_shards_is_refused() {
    let out = Command::new(binary())
        .args(["--shards", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 1"), "{err}");
}
