#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine or a developer's: installs what the tests
# need (idempotent), builds every binary, then runs every test. This is the command the README
# gives and the one .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -eq 0 ]]; then
    bash tests/guest/setup.sh
else
    echo "test.sh: not root: skipping package installation (tests/guest/setup.sh)" >&2
fi

cargo build --workspace --bins --release
cargo test --workspace --release -- --test-threads="${OUTBOARD_TEST_THREADS:-2}"
