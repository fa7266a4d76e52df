#!/usr/bin/env bash
# Runs every cargo-fuzz target of the project for SECONDS each (default 60):
# ringgate-codec: handshake, frames; ringgate-shard: input, ops, query.
# Needs a nightly toolchain and cargo-fuzz (installed here if missing).
# Seeds come from crates/*/fuzz/seeds/<target> (committed); what a run finds
# grows a scratch corpus under target/fuzz-corpus/<target>, which later runs
# reuse. A crash leaves its input in crates/*/fuzz/artifacts/<target>/ and
# makes this script fail.
set -euo pipefail
seconds="${1:-60}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: no nightly toolchain (rustup toolchain install nightly)" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz >/dev/null
fi
status=0
for spec in ringgate-codec:handshake ringgate-codec:frames \
            ringgate-shard:input ringgate-shard:ops ringgate-shard:query; do
  crate="${spec%%:*}"
  target="${spec##*:}"
  corpus="$root/target/fuzz-corpus/$target"
  mkdir -p "$corpus"
  echo "fuzz: $crate $target for ${seconds}s"
  if ! (cd "crates/$crate" && cargo +nightly fuzz run "$target" "$corpus" "fuzz/seeds/$target" \
          -- -max_total_time="$seconds" -print_final_stats=1 2>&1 \
        | grep -E '^(Done|stat::number_of_executed_units|==[0-9]+== ERROR|thread .* panicked)|SUMMARY' ); then
    :
  fi
  if ls "crates/$crate/fuzz/artifacts/$target"/crash-* >/dev/null 2>&1 \
     || ls "crates/$crate/fuzz/artifacts/$target"/oom-* >/dev/null 2>&1 \
     || ls "crates/$crate/fuzz/artifacts/$target"/timeout-* >/dev/null 2>&1; then
    echo "fuzz: $target FAILED; inputs in crates/$crate/fuzz/artifacts/$target/" >&2
    status=1
  fi
done
exit "$status"
