#!/usr/bin/env bash
# The main job, on a fresh Debian 12 machine (as root): install the guest assets, build
# vhost-user-blk, and boot a real Linux guest on it with 1 and then 2 queues. In the guest:
# a pattern written and read back with checksums, fio --verify, mkfs.ext4 + e2fsck.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

bash tests/guest/setup.sh
cargo build --release -p vhost-user-blk
BIN="$ROOT/target/release/vhost-user-blk"

WORK="$(mktemp -d /tmp/outboard-demo.XXXXXX)"
BACKEND_PID=""
cleanup() {
    [[ -n $BACKEND_PID ]] && kill -TERM "$BACKEND_PID" 2>/dev/null && wait "$BACKEND_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

for queues in 1 2; do
    disk="$WORK/disk-$queues.img"
    sock="$WORK/blk-$queues.sock"
    truncate -s 256M "$disk"
    "$BIN" --socket-path "$sock" --blk-file "$disk" --num-queues "$queues" \
        --serial "outboard-demo-$queues" 2>"$WORK/backend-$queues.log" &
    BACKEND_PID=$!
    for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
    echo "== guest on vhost-user-blk, $queues queue(s) =="
    if ! OUTBOARD_BACKEND_PID=$BACKEND_PID OUTBOARD_GUEST_OUT="$WORK/guest-$queues" \
        bash tests/guest/run-blk.sh "$sock" "$queues"; then
        echo "--- backend log ---"; cat "$WORK/backend-$queues.log"
        exit 1
    fi
    kill -TERM "$BACKEND_PID"
    wait "$BACKEND_PID" || { echo "vhost-user-blk did not exit cleanly on SIGTERM"; exit 1; }
    BACKEND_PID=""
done
echo "guest-demo: PASS"
