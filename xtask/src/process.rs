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
