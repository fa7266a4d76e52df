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

/// Runs tune-host.sh against a made-up /proc under `root`.
fn tune(root: &Path, args: &[&str]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tune-host.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .env("TUNE_HOST_ROOT", root)
        .env("TUNE_HOST_CONF", root.join("90-ringgate.conf"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn host_tuning_never_lowers_a_limit_sizes_tcp_mem_and_reserves_the_listen_ports() {
    let root = std::env::temp_dir().join(format!("ringgate-tune-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let host = [
        ("fs/nr_open", "1048576"),
        ("fs/file-max", "9223372036854775807"),
        ("net/core/somaxconn", "100000"),
        ("net/ipv4/tcp_max_syn_backlog", "512"),
        ("net/core/netdev_max_backlog", "1000"),
        ("net/ipv4/ip_local_port_range", "32768\t60999"),
        ("net/ipv4/ip_local_reserved_ports", ""),
        ("net/ipv4/tcp_rmem", "4096\t131072\t8388608"),
        ("net/ipv4/tcp_wmem", "4096\t16384\t4194304"),
        ("net/ipv4/tcp_mem", "100\t200\t300"),
        ("net/ipv4/tcp_migrate_req", "0"),
    ];
    for (name, value) in host {
        let path = root.join("proc/sys").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, format!("{value}\n")).unwrap();
    }
    // 16 GiB: 4,194,304 pages of 4 KiB.
    std::fs::write(root.join("proc/meminfo"), "MemTotal:       16777216 kB\n").unwrap();
    let (ok, text) = tune(&root, &["--ports", "8080,9090"]);
    assert!(ok, "{text}");
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_string()
    };
    // Higher limits the host has are kept, lower ones raised.
    assert!(line("net.core.somaxconn").contains("ok (100000)"), "{text}");
    assert!(
        line("fs.file-max").contains("ok (9223372036854775807)"),
        "{text}"
    );
    assert!(
        line("net.ipv4.tcp_max_syn_backlog").contains("would set 512 -> 65535"),
        "{text}"
    );
    // tcp_rmem: the small default is the point; the host's larger maximum stays.
    assert!(
        line("net.ipv4.tcp_rmem").contains("-> 4096 16384 8388608"),
        "{text}"
    );
    // tcp_mem from memory: 1/24, 1/16, 1/8 of the pages.
    assert!(
        line("net.ipv4.tcp_mem").contains("-> 174762 262144 524288"),
        "{text}"
    );
    // A wider ephemeral range reserves the listen ports inside it.
    assert!(
        line("net.ipv4.ip_local_port_range").contains("-> 1024 65535"),
        "{text}"
    );
    let reserved = line("net.ipv4.ip_local_reserved_ports");
    assert!(reserved.contains("would set  -> 8080,9090"), "{text}");
    // Nothing changed without --apply.
    let read = |name: &str| std::fs::read_to_string(root.join("proc/sys").join(name)).unwrap();
    assert_eq!(read("net/ipv4/tcp_max_syn_backlog"), "512\n");
    // --apply writes every value and the sysctl.d file; a second look finds nothing to do.
    let (ok, text) = tune(&root, &["--ports", "8080,9090", "--apply"]);
    assert!(ok, "{text}");
    assert_eq!(read("net/ipv4/tcp_rmem").trim(), "4096 16384 8388608");
    assert_eq!(read("net/ipv4/ip_local_reserved_ports").trim(), "8080,9090");
    let conf = std::fs::read_to_string(root.join("90-ringgate.conf")).unwrap();
    assert!(
        conf.contains("net.ipv4.tcp_mem = 174762 262144 524288"),
        "{conf}"
    );
    let (ok, text) = tune(&root, &["--ports", "8080,9090"]);
    assert!(ok && text.contains("0 setting(s) would change"), "{text}");
    let (ok, text) = tune(&root, &["--ports", "80x"]);
    assert!(!ok && text.contains("--ports"), "{text}");
    let _ = std::fs::remove_dir_all(&root);
}
