#!/usr/bin/env bash
# tests/guest/run-blk.sh SOCKET_PATH NUM_QUEUES
#
# Boots a real Linux guest (QEMU 7.2, TCG) whose only disk is a
# vhost-user-blk-pci device connected to the backend listening on SOCKET_PATH,
# runs tests/guest/blk-guest.sh inside it and judges the result.
#
# Prerequisites: tests/guest/setup.sh has run (assets in OUTBOARD_GUEST_DIR),
# and a vhost-user-blk backend is listening on SOCKET_PATH advertising at least
# NUM_QUEUES queues (QEMU exits otherwise).  The disk must be >= 128 MiB; its
# content is destroyed.
#
# Exit status: 0 if the guest reported RESULT PASS with no failed check and
# QEMU powered off cleanly; 1 on any failure (console tail printed); 2 on
# usage/setup errors.
#
# Environment knobs:
#   OUTBOARD_GUEST_DIR      asset dir (default /var/cache/outboard-guest)
#   OUTBOARD_GUEST_OUT      where to keep console.log/results.log/qemu.log
#                           (default: a fresh temp dir, kept and printed)
#   OUTBOARD_GUEST_TIMEOUT  seconds before QEMU is killed (default 180; a
#                           normal run takes ~20 s under TCG on 2 cores)
#   OUTBOARD_BACKEND_PID    pid of the backend process: if it exits while the
#                           guest runs, QEMU is stopped at once (fail fast
#                           instead of waiting for the timeout with guest I/O
#                           stuck)
#   OUTBOARD_GUEST_MEM      guest RAM in MiB (default 512)
#   OUTBOARD_GUEST_SMP      vCPUs (default 2)
#   OUTBOARD_GUEST_SCRIPT   guest script (default blk-guest.sh next to this)
#   OUTBOARD_GUEST_DISK_SIZE  expected disk size in bytes (checked in guest)
#   OUTBOARD_GUEST_QEMU_ARGS  extra QEMU arguments (word-split)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ASSET_DIR="${OUTBOARD_GUEST_DIR:-/var/cache/outboard-guest}"
TIMEOUT="${OUTBOARD_GUEST_TIMEOUT:-180}"
BACKEND_PID="${OUTBOARD_BACKEND_PID:-}"
MEM_MB="${OUTBOARD_GUEST_MEM:-512}"
SMP="${OUTBOARD_GUEST_SMP:-2}"
GUEST_SCRIPT="${OUTBOARD_GUEST_SCRIPT:-$HERE/blk-guest.sh}"

usage() { echo "usage: $0 SOCKET_PATH NUM_QUEUES" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
SOCK="$1"
NUMQ="$2"
[[ $NUMQ =~ ^[1-9][0-9]*$ ]] || { echo "run-blk: NUM_QUEUES must be a positive integer" >&2; exit 2; }
[[ -S $SOCK ]] || { echo "run-blk: $SOCK is not a listening unix socket (start the backend first)" >&2; exit 2; }
[[ -f $GUEST_SCRIPT ]] || { echo "run-blk: guest script $GUEST_SCRIPT missing" >&2; exit 2; }
[[ -f $ASSET_DIR/env.sh ]] || { echo "run-blk: no $ASSET_DIR/env.sh: run tests/guest/setup.sh first" >&2; exit 2; }
# shellcheck source=/dev/null
. "$ASSET_DIR/env.sh"
for f in "$OUTBOARD_QEMU" "$OUTBOARD_KERNEL" "$OUTBOARD_INITRD" "$OUTBOARD_FIRMWARE_DIR/bios-256k.bin"; do
    [[ -e $f ]] || { echo "run-blk: missing asset $f: rerun tests/guest/setup.sh" >&2; exit 2; }
done

# Libraries may have been removed since setup ran (setup re-installs them).
if LD_LIBRARY_PATH="${OUTBOARD_QEMU_LD_PATH:-}" ldd "$OUTBOARD_QEMU" 2>/dev/null | grep -q 'not found'; then
    echo "run-blk: $OUTBOARD_QEMU misses shared libraries: rerun tests/guest/setup.sh" >&2
    exit 2
fi

OUT="${OUTBOARD_GUEST_OUT:-}"
if [[ -z $OUT ]]; then OUT="$(mktemp -d /tmp/outboard-guest-blk.XXXXXX)"; fi
mkdir -p "$OUT"
CONSOLE="$OUT/console.log"
RESULTS="$OUT/results.log"
QEMU_LOG="$OUT/qemu.log"
rm -f "$CONSOLE" "$RESULTS" "$QEMU_LOG"

# fw_cfg strings: the guest checks it got min(NUM_QUEUES, vCPUs) hw queues.
FWCFG=(-fw_cfg "name=opt/outboard/script,file=$GUEST_SCRIPT"
       -fw_cfg "name=opt/outboard/num_queues,string=$NUMQ")
if [[ -n ${OUTBOARD_GUEST_DISK_SIZE:-} ]]; then
    FWCFG+=(-fw_cfg "name=opt/outboard/disk_size,string=$OUTBOARD_GUEST_DISK_SIZE")
fi
# shellcheck disable=SC2206
EXTRA=(${OUTBOARD_GUEST_QEMU_ARGS:-})

# shellcheck disable=SC2054  # commas are QEMU option syntax
QEMU_CMD=(
    "$OUTBOARD_QEMU"
    -nodefaults -no-user-config -display none
    # TCG on purpose: /dev/kvm here is paravirtual and far slower than TCG.
    -accel tcg,thread=multi -cpu max -smp "$SMP"
    # vhost-user needs guest RAM the backend can mmap: shared memfd.
    -m "${MEM_MB}M"
    -object "memory-backend-memfd,id=mem,size=${MEM_MB}M,share=on"
    -machine q35,memory-backend=mem
    -L "$OUTBOARD_FIRMWARE_DIR"
    -kernel "$OUTBOARD_KERNEL" -initrd "$OUTBOARD_INITRD"
    -append "console=ttyS0 panic=-1 oops=panic"
    -no-reboot
    # ttyS0: kernel + init console; ttyS1: machine-readable results.
    -serial "file:$CONSOLE" -serial "file:$RESULTS"
    -chardev "socket,id=c0,path=$SOCK"
    -device "vhost-user-blk-pci,chardev=c0,num-queues=$NUMQ"
    "${FWCFG[@]}"
    "${EXTRA[@]}"
)

echo "run-blk: socket=$SOCK num-queues=$NUMQ smp=$SMP mem=${MEM_MB}M timeout=${TIMEOUT}s out=$OUT"
start=$SECONDS
backend_died=0
set +e
# Debian's QEMU 7.2 loads TCG as a module: point it at ours, not a system one.
# `timeout` bounds the run: a dead or stuck backend leaves guest I/O hung in D
# state forever, and QEMU may then also hang on SIGTERM (waiting for vhost-user
# replies), hence --kill-after.
env QEMU_MODULE_DIR="$OUTBOARD_QEMU_MODULE_DIR" \
    LD_LIBRARY_PATH="${OUTBOARD_QEMU_LD_PATH:-}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    timeout --kill-after=10 "$TIMEOUT" "${QEMU_CMD[@]}" </dev/null >"$QEMU_LOG" 2>&1 &
tpid=$!
# A backend the caller started in the background stays a zombie until the
# caller reaps it, and kill -0 succeeds on zombies: look at the state too.
backend_alive() {
    local st
    st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n $st && $st != Z && $st != X ]]
}
if [[ -n $BACKEND_PID ]]; then
    while kill -0 "$tpid" 2>/dev/null; do
        if ! backend_alive "$BACKEND_PID"; then
            backend_died=1
            echo "run-blk: backend pid $BACKEND_PID exited during the run: stopping QEMU"
            kill -TERM "$tpid" 2>/dev/null   # timeout forwards it to QEMU
            break
        fi
        sleep 0.5
    done
fi
wait "$tpid"
qrc=$?
set -e
elapsed=$((SECONDS - start))

# The guest puts the serial port in raw mode, but strip CRs in case it could not.
[[ -f $RESULTS ]] && sed -i 's/\r$//' "$RESULTS"
echo "run-blk: qemu exited with $qrc after ${elapsed}s"
echo "----- results ($RESULTS) -----"
if [[ -s $RESULTS ]]; then cat "$RESULTS"; else echo "(empty)"; fi
echo "-----"

verdict=PASS
reason=""
last="$(grep -v '^[[:space:]]*$' "$RESULTS" 2>/dev/null | tail -n1 || true)"
if [[ $backend_died -eq 1 ]]; then
    verdict=FAIL; reason="backend (pid $BACKEND_PID) exited during the run"
elif [[ $qrc -eq 124 || $qrc -eq 137 ]]; then
    verdict=FAIL; reason="timed out after ${TIMEOUT}s (backend hung? guest I/O stuck?)"
elif [[ $qrc -ne 0 ]]; then
    verdict=FAIL; reason="qemu exited with $qrc"
elif [[ $last != "RESULT PASS" ]]; then
    verdict=FAIL; reason="guest did not report RESULT PASS (last line: '${last:-none}')"
elif grep -q '^CHECK [^ ]* FAIL' "$RESULTS"; then
    verdict=FAIL; reason="a check failed"
elif ! grep -q '^CHECK [^ ]* PASS' "$RESULTS"; then
    verdict=FAIL; reason="no check ran"
fi

if [[ $verdict == PASS ]]; then
    echo "run-blk: PASS ($(grep -c '^CHECK .* PASS' "$RESULTS") checks, ${elapsed}s, logs in $OUT)"
    exit 0
fi
echo "run-blk: FAIL: $reason"
if [[ -s $QEMU_LOG ]]; then
    echo "----- qemu stderr ($QEMU_LOG) -----"
    tail -n 30 "$QEMU_LOG"
fi
echo "----- console tail ($CONSOLE) -----"
tail -n 80 "$CONSOLE" 2>/dev/null | sed 's/\r$//' || echo "(no console log)"
echo "-----"
exit 1
