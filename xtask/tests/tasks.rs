//! The dev tasks' own failure modes: a missing prerequisite is named, with how
//! to get it, and a status of its own.

use std::process::Command;

#[test]
fn autobahn_without_its_runner_says_what_is_missing() {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["autobahn", "--runner", "/nonexistent/run.sh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "a status of its own");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/run.sh") && err.contains("--runner"),
        "{err}"
    );
    assert!(!err.contains("conformance cases failed"), "{err}");
}
