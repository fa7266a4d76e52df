//! `cargo xtask floor` runs end to end at small scale: every byte written is
//! read by the reader processes, and the figures are printed; past one
//! process's open files too.

use std::process::{Command, Output};

fn floor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("floor")
        .args(args)
        .output()
        .unwrap()
}

/// `cargo xtask floor ARGS`'s stdout, once it has succeeded. A floor run
/// fails unless every reader got every byte written to it (every echo).
fn floor_ok(args: &[&str]) -> String {
    let out = floor(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn floor_measures_both_ways_of_writing_and_checks_every_byte() {
    for spin in [false, true] {
        let mut args = vec!["--conns", "200", "--events", "3", "--rate", "50"];
        if spin {
            args.push("--spin");
        }
        let stdout = floor_ok(&args);
        for way in ["plain send()", "io_uring Send"] {
            let line = stdout.lines().find(|l| l.contains(way)).expect(way);
            let us: f64 = line
                .split_whitespace()
                .find_map(|w| w.parse().ok())
                .expect("a figure");
            assert!(us > 0.0 && us < 10_000.0, "{line}");
        }
    }
}

#[test]
fn echo_floor_counts_the_same_echoes_on_both_sides() {
    let stdout = floor_ok(&["--echo", "--conns", "10", "--seconds", "1"]);
    let line = stdout
        .lines()
        .find(|l| l.contains("per echo"))
        .expect("a figure");
    assert!(line.contains("echoes/s"), "{line}");
}

#[test]
fn past_one_process_the_floor_holds_direct_descriptors_and_checks_every_byte() {
    // 20,000 sockets: past one process's open files, so two rings and two
    // reader processes; the notifications' pattern, scattered over both.
    let stdout = floor_ok(&[
        "--conns",
        "20000",
        "--events",
        "20",
        "--rate",
        "100",
        "--spread",
        "100",
        "--scatter",
    ]);
    assert!(
        stdout.contains("100 sockets per event scattered"),
        "{stdout}"
    );
    let line = stdout
        .lines()
        .find(|l| l.contains("io_uring Send"))
        .expect("a figure");
    assert!(line.contains("(2 rings"), "{line}");
    assert!(
        !stdout.contains("plain send()"),
        "no fd per socket: {stdout}"
    );
}

#[test]
fn floor_refuses_more_than_it_can_hold() {
    let out = floor(&["--conns", "500000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--conns must be from 1 to 400000"));
}
