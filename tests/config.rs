//! End to end: configuration from a TOML file, RINGGATE_* variables and flags,
//! with flag > environment > file > default; errors that name the key and line;
//! `--print-config` round-tripping through `check-config`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn temp_file(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("ringgate-e2e-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn ringgate(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringgate"))
        .args(args)
        // The harness's own variable (another build to test) is no setting.
        .env_remove("RINGGATE_BIN")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// The error of a start with `args` (on free ports), which must fail.
fn refused_start(args: &[&str]) -> String {
    let mut all = vec!["--listen", "127.0.0.1:0", "--control", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let out = ringgate(&all, &[]);
    assert!(!out.status.success(), "{args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn flag_beats_environment_beats_file_beats_default() {
    let file = temp_file(
        "layers.toml",
        "max-subscriptions = 11\nsend-queue-limit = \"1MiB\"\nping-interval = 7\necho = true\n",
    );
    let path = file.to_str().unwrap();
    let server = Server::start_with_env(
        &["--config", path, "--max-subscriptions", "33"],
        &[
            ("RINGGATE_MAX_SUBSCRIPTIONS", "22"),
            ("RINGGATE_SEND_QUEUE_LIMIT", "512KiB"),
        ],
    );
    let settings = &server.stats()["settings"];
    assert_eq!(settings["max-subscriptions"], 33, "the flag wins");
    assert_eq!(
        settings["send-queue-limit"], "512KiB",
        "the environment beats the file"
    );
    assert_eq!(settings["ping-interval"], 7, "the file beats the default");
    assert_eq!(settings["idle-timeout"], "150s", "the default");
    assert_eq!(settings["echo"], true);
    // And it is in force, not just reported: /echo is served.
    let _ws = ws_connect(&server, "/echo");
    let _ = std::fs::remove_file(file);
}

#[test]
fn config_errors_name_the_key_and_the_line() {
    let file = temp_file("bad.toml", "# comment\necho = true\nmax-conections = 5\n");
    let out = ringgate(&["check-config", file.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":3: unknown key `max-conections`"), "{err}");
    // Starting with it fails the same way, before binding anything.
    let out = ringgate(&["--config", file.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key `max-conections`"));
    let bad_value = temp_file("bad-value.toml", "buffers = 1000\n");
    let out = ringgate(&["check-config", bad_value.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
    let bad_broker = temp_file("bad-broker.toml", "broker = \"rediss://:pw@h/\"\n");
    let out = ringgate(&["check-config", bad_broker.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("only redis://") && !err.contains("pw"),
        "{err}"
    );
    let long_wait = temp_file("long-wait.toml", "publish-wait = \"60s\"\n");
    let out = ringgate(&["check-config", long_wait.to_str().unwrap()], &[]);
    assert!(!out.status.success(), "a start would refuse it");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--publish-wait must be at most 30s"), "{err}");
    // Found in review: a control timeout of 0 passed, and timed out every
    // request that needed a second read.
    let no_time = temp_file("no-time.toml", "control-timeout = \"0s\"\n");
    let out = ringgate(&["check-config", no_time.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--control-timeout must be at least 100ms"),
        "{err}"
    );
    let _ = std::fs::remove_file(no_time);
    let broker = temp_file("broker.toml", "broker = \"redis://127.0.0.1:1/\"\n");
    let out = ringgate(&["check-config", broker.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "a fleet member's file checks without Redis"
    );
    for f in [file, bad_value, bad_broker, long_wait, broker] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn print_config_round_trips_through_check_config() {
    let out = ringgate(
        &["--print-config", "--echo", "--max-connections", "1234"],
        &[("RINGGATE_PING_INTERVAL", "9s")],
    );
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(
        printed.contains("max-connections = 1234") && printed.contains("ping-interval = \"9s\""),
        "{printed}"
    );
    let file = temp_file("printed.toml", &printed);
    let out = ringgate(&["check-config", file.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Printing again from that file gives the same configuration.
    let again = ringgate(&["--config", file.to_str().unwrap(), "--print-config"], &[]);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), printed);
    let _ = std::fs::remove_file(file);
}

#[test]
fn every_flag_has_a_variable_and_booleans_take_the_usual_spellings() {
    let printed = |env: &[(&str, &str)]| {
        let out = ringgate(&["--print-config"], env);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (value, expected) in [
        ("1", true),
        ("yes", true),
        ("true", true),
        ("0", false),
        ("no", false),
    ] {
        let text = printed(&[("RINGGATE_ECHO", value)]);
        assert!(
            text.contains(&format!("echo = {expected}")),
            "{value}: {text}"
        );
    }
    assert!(printed(&[("RINGGATE_VERBOSE", "2")]).contains("verbose = 2"));
    let out = ringgate(&["--print-config"], &[("RINGGATE_ECHO", "maybe")]);
    assert!(!out.status.success(), "a bad boolean is an error");
}

#[test]
fn a_client_publish_pattern_that_cannot_match_is_refused() {
    let err = refused_start(&["--client-publish", "a*b"]);
    assert!(
        err.contains("--client-publish") && err.contains("prefix"),
        "{err}"
    );
}

#[test]
fn an_unknown_variable_is_reported() {
    let file = temp_file("ok.toml", "echo = true\n");
    let out = ringgate(
        &["check-config", file.to_str().unwrap()],
        &[("RINGGATE_MAX_CONECTIONS", "10")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RINGGATE_MAX_CONECTIONS"), "{err}");
    let out = ringgate(&["check-config", file.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn file_errors_give_the_line_and_what_is_allowed() {
    let cases = [
        (
            "echo = true\nslow-consumer = \"slow\"\n",
            ":2:",
            "allowed: close, drop",
        ),
        ("[server]\nlisten = \"1\"\n", ":1:", "is a table"),
        ("echo = true\nlisten = \n", ":2:", "not valid TOML"),
        ("max-connections = \"lots\"\n", ":1:", "invalid digit"),
    ];
    for (i, (text, line, reason)) in cases.into_iter().enumerate() {
        let file = temp_file(&format!("bad{i}.toml"), text);
        let out = ringgate(&["check-config", file.to_str().unwrap()], &[]);
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(line) && err.contains(reason),
            "{text:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}

/// Found in review: `--help` showed every RINGGATE_* variable's value, secrets
/// included, to anyone running it in the service's environment.
#[test]
fn help_does_not_show_secrets_from_the_environment() {
    let out = ringgate(
        &["--help"],
        &[
            ("RINGGATE_CONTROL_TOKEN", "token-0123456789abcdef"),
            (
                "RINGGATE_AUTH_HS256_SECRET",
                "secret-0123456789abcdef0123456789",
            ),
            ("RINGGATE_BROKER", "redis://u:hunter2hunter2@h:1/"),
        ],
    );
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("RINGGATE_CONTROL_TOKEN"), "{help}");
    for secret in ["token-0123", "secret-0123", "hunter2"] {
        assert!(!help.contains(secret), "{secret} shown in --help");
    }
}

/// Found in review: a file key was passed on as a flag whenever its own
/// setting came from no higher layer, so a flag conflicting with it (the
/// token given, the file naming a token file) was refused as a conflict, and
/// clap's first pass, before the file is read, refused a flag that needs a
/// setting the file gives (`--allow-missing-origin` with the file's
/// `allowed-origins`).
#[test]
fn a_flag_wins_over_a_conflicting_file_key_and_may_lean_on_the_file() {
    let file = temp_file(
        "conflicts.toml",
        "control-token-file = \"/nonexistent/token\"\nallowed-origins = \"https://app.example\"\n",
    );
    let path = file.to_str().unwrap();
    let server = Server::start(&[
        "--config",
        path,
        "--control-token",
        "a-token-of-16-bytes-or-more",
        "--allow-missing-origin",
    ]);
    let settings = &server.stats()["settings"];
    assert_eq!(settings["allowed-origins"], "https://app.example");
    assert_eq!(settings["allow-missing-origin"], true);
    let err = refused_start(&["--allow-missing-origin"]);
    assert!(
        err.contains("--allow-missing-origin needs --allowed-origins"),
        "{err}"
    );
    let _ = std::fs::remove_file(file);
}
