//! End to end: what running under systemd on an edge host relies on: sd_notify
//! readiness, the watchdog and the stop notice; a unit file systemd accepts; a
//! host tuning script that changes nothing unless asked.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn recv(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("a notification before the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn readiness_watchdog_and_stopping_reach_systemd() {
    let path = std::env::temp_dir().join(format!("ringgate-notify-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut server = Server::start_with_env(
        &[],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "4000000"),
        ],
    );
    let ready = recv(&socket);
    assert!(
        ready.starts_with("READY=1\nSTATUS=serving WebSockets on"),
        "{ready}"
    );
    // Fed once a second while the shards' loops turn.
    for _ in 0..2 {
        assert_eq!(recv(&socket), "WATCHDOG=1");
    }
    server.signal(libc::SIGTERM);
    loop {
        let message = recv(&socket);
        if message.starts_with("STOPPING=1") {
            break;
        }
        assert_eq!(message, "WATCHDOG=1");
    }
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    let _ = std::fs::remove_file(&path);
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/ringgate.service"
    ))
    .unwrap();
    assert!(
        unit.contains("Type=notify")
            && unit.contains("WatchdogSec=")
            && unit.contains("LimitNOFILE=")
    );
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        // .ci/run installs systemd; a developer machine may lack it.
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ringgate-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ringgate.service");
    // verify checks that ExecStart exists: point it at the binary under test.
    std::fs::write(
        &file,
        unit.replace("/usr/local/bin/ringgate", env!("CARGO_BIN_EXE_ringgate")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_tuning_script_changes_nothing_without_apply() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tune-host.sh");
    let snapshot = || std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap();
    let before = snapshot();
    let out = Command::new("bash").arg(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("net.core.somaxconn"), "{text}");
    assert!(
        text.contains("would change") || !text.contains("would set"),
        "{text}"
    );
    assert_eq!(snapshot(), before);
    let bad = Command::new("bash")
        .arg(&script)
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
