#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine or a developer's: installs what the tests
# need (idempotent), builds every binary, then runs every test (all of them, even after a
# failure, so one run shows every failure). This is the command the README gives and the one
# .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

# qemu-storage-daemon (the vhost-user-blk peer of tests and benchmarks) is in qemu-utils;
# dpdk-testpmd (the vhost-user-net peer) is in dpdk-dev; iproute2 and ethtool serve the network
# tests; tests/guest/setup.sh builds the guests (QEMU 7.2, a Debian kernel, an initramfs).
PACKAGES=(qemu-utils fio dpdk dpdk-dev iproute2 ethtool busybox-static)
if [[ $(id -u) -eq 0 ]]; then
    missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if ((${#missing[@]})); then
        apt-get update -q
        apt-get install -y -q --no-upgrade "${missing[@]}"
    fi
    bash tests/guest/setup.sh
else
    echo "test.sh: not root: skipping package installation; tests that need them say so" >&2
fi

cargo build --workspace --bins --release
cargo test --workspace --release --no-fail-fast -- --test-threads="${OUTBOARD_TEST_THREADS:-2}"
