//! `cargo xtask`: ringgate's developer tasks.
//!
//! - `test`: the whole suite as CI runs it (fmt check, clippy -D warnings, every
//!   test, and each fuzz target briefly when a nightly toolchain is installed).
//! - `autobahn`: the Autobahn TestSuite server cases against a release `--echo`.
//! - `density`: server memory per idle WebSocket connection, user space and kernel.
//! - `history-memory`: server memory per known topic and per held history event.
//! - `loadgen`: drive load at a running server (connect, fanout, echo, churn, soak,
//!   reconnect).
//! - `bench`: the standard scenarios against ringgate and the baseline server.
//! - `floor`: the kernel's own cost per delivery (or, `--echo`, per echo) on this machine, with no gateway.

mod bench;
mod bench_notify;
mod density;
mod fleet_bench;
mod floor;
mod floor_echo;
mod floor_slab;
mod floor_wide;
mod history_memory;
mod loadgen;
mod process;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ringgate developer tasks")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run everything CI runs: cargo fmt --check, clippy -D warnings, all tests, brief fuzzing.
    Test,
    /// Run the Autobahn server cases (../shared/conformance) against a release `ringgate --echo`.
    Autobahn {
        /// Case patterns, e.g. '1.*,2.*' (default: all but 12.* and 13.*).
        #[arg(default_value = "*")]
        cases: String,
        /// Path to the conformance runner.
        #[arg(long, default_value = "../shared/conformance/run.sh")]
        runner: String,
    },
    /// Measure server RSS and kernel slab growth per idle connection.
    Density(density::Args),
    /// RSS per known topic and per held history event, against what --history-memory charges.
    HistoryMemory(history_memory::Args),
    /// Standard scenarios against ringgate and the baseline server, one table with ratios.
    Bench(bench::Args),
    /// One host alone against two hosts over a real redis-server: fanout, publish rate, Redis restart.
    FleetBench(fleet_bench::Args),
    /// The kernel's cost of one small write to a sleeping reader's socket, with no server.
    Floor(floor::Args),
    /// (internal) The reader side of `floor`.
    #[command(hide = true)]
    FloorReader {
        addr: String,
        conns: usize,
        expected: u64,
        mode: String,
        /// Connect from this loopback address.
        #[arg(long)]
        source: Option<String>,
    },
    /// (internal) The client side of `floor --echo`.
    #[command(hide = true)]
    FloorEchoClient {
        addr: String,
        conns: usize,
        size: usize,
        seconds: f64,
    },
    /// (internal) The plainest epoll server of `floor --slab`.
    #[command(hide = true)]
    FloorIdleServer { conns: usize },
    /// Drive load at a running ringgate: connect | fanout | echo | churn | soak | reconnect | publish (see --help).
    Loadgen(Box<loadgen::Args>),
    /// Overlay the latency distributions of loadgen runs (their --json files) in one SVG.
    Plot {
        /// loadgen --json files.
        files: Vec<std::path::PathBuf>,
        /// The SVG to write.
        #[arg(short, long, default_value = "plot.svg")]
        output: std::path::PathBuf,
    },
    /// (internal) One load generator worker process.
    #[command(hide = true)]
    LoadgenWorker { job: String },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Task::Autobahn { runner, .. } = &args.task {
        if !std::path::Path::new(runner).is_file() {
            eprintln!(
                "xtask: the Autobahn runner {runner} is missing. It is the conformance kit that sits next to \
                 this checkout (../shared/conformance/run.sh on the development machines); pass \
                 --runner PATH to a run.sh that takes a ws:// URL and case patterns."
            );
            return ExitCode::from(AUTOBAHN_RUNNER_MISSING);
        }
    }
    let result = match args.task {
        Task::Test => test(),
        Task::Autobahn { cases, runner } => autobahn(&cases, &runner),
        Task::Density(a) => density::run(&a),
        Task::HistoryMemory(a) => history_memory::run(&a),
        Task::Loadgen(a) => loadgen::main(&a),
        Task::Plot { files, output } => loadgen::report::plot_files(&files, &output),
        Task::Bench(a) => bench::run(&a),
        Task::FleetBench(a) => fleet_bench::run(&a),
        Task::Floor(a) => floor::run(&a),
        Task::FloorReader {
            addr,
            conns,
            expected,
            mode,
            source,
        } => floor::reader(&addr, conns, expected, mode == "spin", source.as_deref()),
        Task::FloorEchoClient {
            addr,
            conns,
            size,
            seconds,
        } => floor_echo::client(&addr, conns, size, seconds),
        Task::FloorIdleServer { conns } => floor_slab::idle_server(conns),
        Task::LoadgenWorker { job } => serde_json::from_str(&job)
            .map_err(|e| format!("bad worker job: {e}"))
            .and_then(loadgen::worker::run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            if e.starts_with(loadgen::thresholds::CROSSED) {
                ExitCode::from(loadgen::thresholds::EXIT_THRESHOLDS_CROSSED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn test() -> Result<(), String> {
    process::cargo(&["fmt", "--all", "--check"])?;
    process::cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    let (passed, failed) = process::cargo_test(&["test", "--workspace", "--no-fail-fast"])?;
    // One closing line over every test binary (cargo's last line is a doc-test
    // binary's, which says nothing about the rest).
    println!("tests: {passed} passed, {failed} failed");
    if failed > 0 || passed == 0 {
        return Err(format!("{failed} tests failed, {passed} passed"));
    }
    fuzz_briefly()
}

/// Seconds each fuzz target runs in the suite: enough to replay the seeds and
/// explore a little; long runs are `scripts/fuzz.sh SECONDS`.
const SUITE_FUZZ_SECONDS: &str = "15";

/// Runs every fuzz target briefly when a nightly toolchain is installed (the
/// project itself builds on stable; fuzzing needs nightly).
fn fuzz_briefly() -> Result<(), String> {
    let nightly = std::process::Command::new("cargo")
        .args(["+nightly", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly {
        println!("fuzz: skipped (no nightly toolchain; scripts/fuzz.sh needs one)");
        return Ok(());
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/fuzz.sh");
    let status = std::process::Command::new("bash")
        .args([script, SUITE_FUZZ_SECONDS])
        // cargo-fuzz and the nightly toolchain pick their own settings.
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    if status.success() {
        println!("fuzz: every target ran {SUITE_FUZZ_SECONDS} s without a crash");
        Ok(())
    } else {
        Err("a fuzz target crashed (see crates/*/fuzz/artifacts)".into())
    }
}

/// `cargo xtask autobahn`'s exit status when its runner is not there (1 means
/// cases failed).
const AUTOBAHN_RUNNER_MISSING: u8 = 3;

fn autobahn(cases: &str, runner: &str) -> Result<(), String> {
    process::cargo(&["build", "--release", "-p", "ringgate"])?;
    let server = process::Ringgate::start(&[
        "--echo",
        "--max-frame-size",
        "16MiB",
        "--max-message-size",
        "16MiB",
    ])?;
    let url = format!("ws://{}/echo", server.ws);
    let status = std::process::Command::new("bash")
        .args([runner, &url, cases, "--exclude", "12.*,13.*"])
        .status()
        .map_err(|e| format!("cannot run {runner}: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| "conformance cases failed".into())
}
