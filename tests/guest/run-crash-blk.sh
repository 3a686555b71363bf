#!/usr/bin/env bash
# tests/guest/run-crash-blk.sh SOCKET_PATH NUM_QUEUES
#
# Boots a real Linux guest (QEMU 7.2, TCG) whose disk is a vhost-user-blk-pci
# device on `-chardev socket,path=SOCKET_PATH,reconnect=1`, runs
# tests/guest/crash-blk-guest.sh inside it (fio --verify while the backend is
# killed and restarted) and judges the result.
#
# This script only runs the guest: whoever calls it (tests/qemu_crash.rs)
# kills the backend with SIGKILL and restarts it on the same socket path while
# the guest's results show `PHASE fio_running` and not yet `PHASE fio_done`.
# QEMU reconnects by itself (reconnect=1: one attempt per second).  The
# backend dying is therefore never a failure here; what QEMU says about the
# device is: a vring or index error means the guest's I/O is broken.
#
# Judged: RESULT PASS with no failed check, QEMU powered off cleanly (exit
# 0), no device error in QEMU's stderr.
#
# Output (stdout): progress lines, the results file without TICK/LATMAX lines,
# QEMU's stderr (what it said at each disconnect), `run-crash-blk: PASS|FAIL`
# last.  The full results stay in $OUT/results.log.
#
# Exit status: 0 pass, 1 failure, 2 usage/setup problem.
#
# Environment knobs:
#   OUTBOARD_GUEST_DIR      asset dir (default /var/cache/outboard-guest)
#   OUTBOARD_GUEST_OUT      log dir: console.log, results.log, qemu.log
#                           (default: a fresh temp dir, kept)
#   OUTBOARD_GUEST_TIMEOUT  hard limit for QEMU in seconds (default 200)
#   OUTBOARD_GUEST_MEM      guest RAM in MiB (default 512)
#   OUTBOARD_GUEST_SMP      vCPUs (default 2)
#   OUTBOARD_CRASH_FIO_RUNTIME  seconds of fio under crashes (default 60)
#   OUTBOARD_GUEST_SCRIPT   guest script (default crash-blk-guest.sh)
#   OUTBOARD_GUEST_QEMU_ARGS  extra QEMU arguments (word-split)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ASSET_DIR="${OUTBOARD_GUEST_DIR:-/var/cache/outboard-guest}"
TIMEOUT="${OUTBOARD_GUEST_TIMEOUT:-200}"
MEM_MB="${OUTBOARD_GUEST_MEM:-512}"
SMP="${OUTBOARD_GUEST_SMP:-2}"
FIO_RUNTIME="${OUTBOARD_CRASH_FIO_RUNTIME:-60}"
GUEST_SCRIPT="${OUTBOARD_GUEST_SCRIPT:-$HERE/crash-blk-guest.sh}"

setup_error() { echo "run-crash-blk: $*" >&2; exit 2; }
[[ $# -eq 2 ]] || { echo "usage: $0 SOCKET_PATH NUM_QUEUES" >&2; exit 2; }
SOCK="$1"
NUMQ="$2"
[[ $NUMQ =~ ^[1-9][0-9]*$ ]] || setup_error "NUM_QUEUES must be a positive integer"
[[ -S $SOCK ]] || setup_error "$SOCK is not a listening unix socket (start the backend first)"
[[ -f $GUEST_SCRIPT ]] || setup_error "guest script $GUEST_SCRIPT missing"
[[ -f $ASSET_DIR/env.sh ]] || setup_error "no $ASSET_DIR/env.sh: run tests/guest/setup.sh first"
# shellcheck source=/dev/null
. "$ASSET_DIR/env.sh"
for f in "$OUTBOARD_QEMU" "$OUTBOARD_KERNEL" "$OUTBOARD_INITRD" "$OUTBOARD_FIRMWARE_DIR/bios-256k.bin"; do
    [[ -e $f ]] || setup_error "missing asset $f: rerun tests/guest/setup.sh"
done
if LD_LIBRARY_PATH="${OUTBOARD_QEMU_LD_PATH:-}" ldd "$OUTBOARD_QEMU" 2>/dev/null | grep -q 'not found'; then
    setup_error "$OUTBOARD_QEMU misses shared libraries: rerun tests/guest/setup.sh"
fi

OUT="${OUTBOARD_GUEST_OUT:-}"
if [[ -z $OUT ]]; then OUT="$(mktemp -d /tmp/outboard-crash-blk.XXXXXX)"; fi
mkdir -p "$OUT"
CONSOLE="$OUT/console.log"
RESULTS="$OUT/results.log"
QEMU_LOG="$OUT/qemu.log"
rm -f "$CONSOLE" "$RESULTS" "$QEMU_LOG"

# shellcheck disable=SC2206
EXTRA=(${OUTBOARD_GUEST_QEMU_ARGS:-})
# shellcheck disable=SC2054  # commas are QEMU option syntax
QEMU_CMD=(
    "$OUTBOARD_QEMU"
    -name outboard-crash
    -nodefaults -no-user-config -display none
    -accel tcg,thread=multi -cpu max -smp "$SMP"
    -m "${MEM_MB}M"
    -object "memory-backend-memfd,id=mem,size=${MEM_MB}M,share=on"
    -machine q35,memory-backend=mem
    -L "$OUTBOARD_FIRMWARE_DIR"
    -kernel "$OUTBOARD_KERNEL" -initrd "$OUTBOARD_INITRD"
    -append "console=ttyS0 panic=-1 oops=panic"
    -no-reboot
    -serial "file:$CONSOLE" -serial "file:$RESULTS"
    # reconnect=1: when the backend goes away QEMU stops the device and tries
    # the socket again every second; the guest's requests wait in the rings.
    -chardev "socket,id=c0,path=$SOCK,reconnect=1"
    -device "vhost-user-blk-pci,id=blk0,chardev=c0,num-queues=$NUMQ"
    -fw_cfg "name=opt/outboard/script,file=$GUEST_SCRIPT"
    -fw_cfg "name=opt/outboard/fio_runtime,string=$FIO_RUNTIME"
    "${EXTRA[@]}"
)

QEMU_PID=""
cleanup() {
    if [[ -n $QEMU_PID ]]; then
        kill -TERM "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
# A caller's watchdog stops us with SIGTERM: take QEMU along.
trap 'exit 143' TERM INT

VERDICT=PASS
REASONS=()
failure() { VERDICT=FAIL; REASONS+=("$*"); echo "run-crash-blk: FAIL: $*"; }

# What QEMU says when the guest's I/O is broken for good (a disconnect itself
# makes QEMU 7.2 print "Failed to read msg header", "vhost_set_vring_call
# failed" and the like, which are expected here).
QEMU_DEVICE_ERRORS='vring error|inconsistent with Host index|Guest moved used index|virtio: |Error starting vhost|Error connecting|vhost_user_blk'
device_errors() { grep -hiE "$QEMU_DEVICE_ERRORS" "$QEMU_LOG" 2>/dev/null | head -n3 || true; }

T_START=$SECONDS
elapsed() { echo $((SECONDS - T_START)); }
echo "run-crash-blk: socket=$SOCK num-queues=$NUMQ smp=$SMP mem=${MEM_MB}M fio=${FIO_RUNTIME}s out=$OUT"
env QEMU_MODULE_DIR="$OUTBOARD_QEMU_MODULE_DIR" \
    LD_LIBRARY_PATH="${OUTBOARD_QEMU_LD_PATH:-}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    timeout --kill-after=10 "$TIMEOUT" "${QEMU_CMD[@]}" </dev/null >"$QEMU_LOG" 2>&1 &
QEMU_PID=$!

alive() { # PID: running and not a zombie
    local st
    st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

reported=""
while alive "$QEMU_PID"; do
    errs="$(device_errors)"
    if [[ -n $errs ]]; then
        failure "QEMU reported device errors: $(tr '\n' '|' <<<"$errs")"
        break
    fi
    for p in fio_running fio_done; do
        if [[ $reported != *"$p"* ]] && grep -q "^PHASE $p" "$RESULTS" 2>/dev/null; then
            echo "run-crash-blk: [$(elapsed)s] guest: $p"
            reported="$reported $p"
        fi
    done
    sleep 0.5
done
set +e
if [[ $VERDICT == PASS ]]; then
    wait "$QEMU_PID"
    rc=$?
    QEMU_PID=""
    echo "run-crash-blk: [$(elapsed)s] QEMU exited (rc $rc)"
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        failure "QEMU timed out after ${TIMEOUT}s (guest I/O stuck?)"
    elif [[ $rc -ne 0 ]]; then
        failure "QEMU exited with $rc"
    fi
fi
cleanup
QEMU_PID=""
set -e

[[ -f $RESULTS ]] && sed -i 's/\r$//' "$RESULTS"
if [[ $VERDICT == PASS ]]; then
    last="$(grep -v '^[[:space:]]*$' "$RESULTS" 2>/dev/null | tail -n1 || true)"
    [[ $last == "RESULT PASS" ]] || failure "the guest did not report RESULT PASS (last line: '${last:-none}')"
    if grep -q '^CHECK [^ ]* FAIL' "$RESULTS"; then failure "a guest check failed"; fi
    grep -q '^CHECK fio_verify_across_crashes PASS' "$RESULTS" || failure "no fio verify verdict"
fi

echo "----- results ($RESULTS), TICK and LATMAX lines omitted -----"
if [[ -s $RESULTS ]]; then grep -vE '^(TICK|LATMAX) ' "$RESULTS" || true; else echo "(empty)"; fi
echo "----- qemu stderr -----"
if [[ -s $QEMU_LOG ]]; then tail -n 60 "$QEMU_LOG"; else echo "(empty)"; fi
if [[ $VERDICT != PASS ]]; then
    echo "----- console tail -----"
    tail -n 40 "$CONSOLE" 2>/dev/null | sed 's/\r$//' || echo "(none)"
fi
echo "-----"
if [[ $VERDICT == PASS ]]; then
    echo "run-crash-blk: PASS ($(grep -c '^CHECK .* PASS' "$RESULTS") checks, $(elapsed)s, logs in $OUT)"
    exit 0
fi
echo "run-crash-blk: FAIL: ${REASONS[*]} (logs in $OUT)"
exit 1
