//! `cargo xtask floor` runs end to end at small scale: every byte written is
//! read by the reader process, and both figures are printed.

use std::process::Command;

#[test]
fn floor_measures_both_ways_of_writing_and_checks_every_byte() {
    for spin in [false, true] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
        cmd.args(["floor", "--conns", "200", "--events", "3", "--rate", "50"]);
        if spin {
            cmd.arg("--spin");
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
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
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["floor", "--echo", "--conns", "10", "--seconds", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The run fails unless the server echoed exactly what the clients counted.
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.contains("per echo"))
        .expect("a figure");
    assert!(line.contains("echoes/s"), "{line}");
}

#[test]
fn floor_refuses_what_one_process_cannot_hold() {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["floor", "--conns", "50000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--conns"));
}
