//! Running cargo and a release ringgate from a task.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// Runs `cargo ARGS`, failing on a non-zero exit.
pub fn cargo(args: &[&str]) -> Result<(), String> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(args)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("cargo {} failed ({status})", args.join(" ")))
}

/// A release ringgate on free loopback ports, killed on drop.
pub struct Ringgate {
    pub child: Child,
    pub ws: SocketAddr,
    pub control: SocketAddr,
}

impl Ringgate {
    pub fn start(args: &[&str]) -> Result<Ringgate, String> {
        let binary = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/ringgate");
        let mut child = Command::new(binary)
            .args(["--listen", "127.0.0.1:0", "--control", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {binary}: {e}"))?;
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped");
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| format!("reading ringgate's ready line: {e}"))?;
        let field = |name: &str| -> Result<SocketAddr, String> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("ringgate did not start: {line:?}"))
        };
        let (ws, control) = (field("ws")?, field("control")?);
        Ok(Ringgate { child, ws, control })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Ringgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cargo ARGS` (a test run), echoing its output, and sums the counts of
/// every `test result:` line. Fails if cargo fails.
pub fn cargo_test(args: &[&str]) -> Result<(u64, u64), String> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.map_err(|e| e.to_string())?;
        println!("{line}");
        if let Some(counts) = line.strip_prefix("test result: ") {
            passed += count_before(counts, " passed");
            failed += count_before(counts, " failed");
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        println!("tests: {passed} passed, {failed} failed");
        return Err(format!("cargo {} failed ({status})", args.join(" ")));
    }
    Ok((passed, failed))
}

/// The number just before `label` in `text` ("ok. 5 passed; 0 failed" -> 5 for " passed").
fn count_before(text: &str, label: &str) -> u64 {
    text.find(label)
        .and_then(|end| text[..end].rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::count_before;

    #[test]
    fn counts_come_from_cargo_result_lines() {
        let line =
            "FAILED. 12 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(count_before(line, " passed"), 12);
        assert_eq!(count_before(line, " failed"), 3);
        assert_eq!(count_before("ok. 0 passed; 0 failed", " passed"), 0);
    }
}
