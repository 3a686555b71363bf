#!/usr/bin/env bash
# Builds every fuzz target and runs each for FUZZ_SECONDS (default 20) from the committed seed
# corpus; fails if any target finds a crash, a hang, a leak or an out-of-memory.
#
#   bash fuzz/run.sh                    all targets, 20 s each
#   FUZZ_SECONDS=300 bash fuzz/run.sh blk_chain net_parse
#
# The machine has a stable toolchain only: cargo-fuzz's -Z flags (-Zsanitizer=address) are
# allowed with RUSTC_BOOTSTRAP=1. New inputs the fuzzer finds go to a scratch directory, not to
# the committed corpus; a crashing input is kept under fuzz/artifacts/<target>/ and the command
# that replays it is printed.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never
seconds="${FUZZ_SECONDS:-20}"
cargo_fuzz_version=0.13.2

if ! cargo fuzz --version 2>/dev/null | grep -q "$cargo_fuzz_version"; then
    echo "fuzz: installing cargo-fuzz $cargo_fuzz_version"
    cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi

cargo fmt --manifest-path Cargo.toml -- --check
cargo clippy --manifest-path Cargo.toml --all-targets -- -D warnings

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

cargo fuzz build
bin=target/x86_64-unknown-linux-gnu/release
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

passed=0
failed=0
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "artifacts/$t"
    log="$scratch/$t.log"
    # -timeout: one input running longer than this is a hang; the session target's own
    # deadline (5 s) is below it.
    if "$bin/$t" "$scratch/$t" "corpus/$t" \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" >"$log" 2>&1; then
        passed=$((passed + 1))
        status=ok
    else
        failed=$((failed + 1))
        status=FAILED
        tail -n 60 "$log"
        for a in "artifacts/$t"/*; do
            [ -e "$a" ] && echo "fuzz: replay with: RUSTC_BOOTSTRAP=1 cargo fuzz run $t fuzz/$a"
        done
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)
    echo "fuzz: $t $status: ${runs:-?} runs in ${seconds}s, ${rate:-?} exec/s, ${cov:-cov: ?}"
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
