#!/usr/bin/env bash
# tests/guest/selftest-qsd.sh [NUM_QUEUES...]   (default: 1 2)
#
# Validates the real-guest harness itself, independent of Outboard's own
# backends: for each queue count it starts qemu-storage-daemon (QEMU 10,
# preinstalled via qemu-utils) as the vhost-user-blk backend on a fresh
# 256 MiB raw image and runs run-blk.sh against it.  Runs setup.sh first
# (a no-op when the assets are up to date).
#
# Prints "N passed, N failed" at the end; exits 0 only if all passed.
# Environment: OUTBOARD_GUEST_DIR and the OUTBOARD_GUEST_* knobs of run-blk.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
QUEUES=("$@")
[[ ${#QUEUES[@]} -gt 0 ]] || QUEUES=(1 2)
command -v qemu-storage-daemon >/dev/null || { echo "selftest: qemu-storage-daemon not found (qemu-utils)" >&2; exit 2; }

"$HERE/setup.sh"

WORK="$(mktemp -d /tmp/outboard-selftest.XXXXXX)"
QSD_PID=""
cleanup() {
    if [[ -n $QSD_PID ]]; then kill "$QSD_PID" 2>/dev/null || true; wait "$QSD_PID" 2>/dev/null || true; fi
    rm -f "$WORK/disk.img"
}
trap cleanup EXIT

passed=0
failed=0
for nq in "${QUEUES[@]}"; do
    sock="$WORK/qsd-$nq.sock"
    rm -f "$WORK/disk.img" "$sock"
    truncate -s 256M "$WORK/disk.img"
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f0,filename=$WORK/disk.img" \
        --blockdev driver=raw,node-name=d0,file=f0 \
        --export "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$nq" \
        >"$WORK/qsd-$nq.log" 2>&1 &
    QSD_PID=$!
    for _ in $(seq 50); do [[ -S $sock ]] && break; sleep 0.1; done
    echo "=== selftest: qemu-storage-daemon num-queues=$nq (pid $QSD_PID) ==="
    if OUTBOARD_GUEST_OUT="$WORK/run-$nq" OUTBOARD_GUEST_DISK_SIZE=268435456 \
        "$HERE/run-blk.sh" "$sock" "$nq"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "--- qemu-storage-daemon log ---"; cat "$WORK/qsd-$nq.log"
    fi
    kill "$QSD_PID" 2>/dev/null || true
    wait "$QSD_PID" 2>/dev/null || true
    QSD_PID=""
done
echo "selftest logs: $WORK"
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
