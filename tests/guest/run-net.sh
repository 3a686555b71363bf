#!/usr/bin/env bash
# tests/guest/run-net.sh pair SOCKET_A SOCKET_B QUEUE_PAIRS
# tests/guest/run-net.sh tap  SOCKET NETNS HOST_IP GUEST_IP QUEUE_PAIRS
#
# Boots real Linux guests (QEMU 7.2, TCG) whose only NIC is a virtio-net-pci
# device on a vhost-user-net backend, runs tests/guest/net-guest.sh inside and
# judges the result.
#
#   pair  two guests at once, one on SOCKET_A and one on SOCKET_B: the two
#         ports of one `vhost-user-net --switch` (roles a = 10.0.0.1 and
#         b = 10.0.0.2).  Besides each guest's own checks, the host compares
#         the checksum each guest sent with the one the other received.
#   tap   one guest on `vhost-user-net --tap` whose TAP lives in the network
#         namespace NETNS with HOST_IP on it (the caller sets that up; the
#         backend must run in NETNS to open the TAP, QEMU connects from here).
#         The host side runs `busybox nc` listeners in NETNS: one takes the
#         guest's stream and answers with its sha256, one serves a file whose
#         sha256 the guest is told by fw_cfg.  The host compares both ends too.
#
# QUEUE_PAIRS becomes QEMU's `-netdev vhost-user,queues=N` (and mq=on when >1):
# the backend must offer at least that many pairs.  The devices use
# `vectors=0` (INTx): QEMU 7.2 under TCG segfaults in
# msix_set_vector_notifiers() with vhost-user-net and MSI-X.
#
# Exit status: 0 if every guest reported RESULT PASS with no failed check,
# every host-side check passed and QEMU powered off cleanly; 1 on any failure
# (console tails printed); 2 on usage/setup errors.
#
# Environment knobs:
#   OUTBOARD_GUEST_DIR      asset dir (default /var/cache/outboard-guest)
#   OUTBOARD_GUEST_OUT      where to keep the logs (default: a fresh temp dir)
#   OUTBOARD_GUEST_TIMEOUT  seconds before QEMU is killed (default 240)
#   OUTBOARD_BACKEND_PID    pid of the backend: if it exits, stop at once
#   OUTBOARD_GUEST_MEM      guest RAM in MiB (default 512: the initramfs needs
#                           ~130 MiB while it unpacks)
#   OUTBOARD_GUEST_SMP      vCPUs per guest (default 1)
#   OUTBOARD_NET_STREAM_MIB MiB per stream (default 64: pair mode sends one
#                           stream each way at once, tap mode one each way)
#   OUTBOARD_NET_MAC_A, OUTBOARD_NET_MAC_B  the MACs QEMU gives the guests
#                           (default 52:54:00:00:00:0a and :0b). QEMU keeps
#                           the config space, so they must be the backend's
#                           --mac addresses too.
#   OUTBOARD_NET_NEW_MAC    the address guest b switches to (52:54:00:00:00:5b)
#   OUTBOARD_GUEST_SCRIPT   guest script (default net-guest.sh next to this)
#   OUTBOARD_GUEST_QEMU_ARGS  extra QEMU arguments (word-split)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ASSET_DIR="${OUTBOARD_GUEST_DIR:-/var/cache/outboard-guest}"
TIMEOUT="${OUTBOARD_GUEST_TIMEOUT:-240}"
BACKEND_PID="${OUTBOARD_BACKEND_PID:-}"
MEM_MB="${OUTBOARD_GUEST_MEM:-512}"
SMP="${OUTBOARD_GUEST_SMP:-1}"
MIB="${OUTBOARD_NET_STREAM_MIB:-64}"
MAC_A="${OUTBOARD_NET_MAC_A:-52:54:00:00:00:0a}"
MAC_B="${OUTBOARD_NET_MAC_B:-52:54:00:00:00:0b}"
NEW_MAC="${OUTBOARD_NET_NEW_MAC:-52:54:00:00:00:5b}"
GUEST_SCRIPT="${OUTBOARD_GUEST_SCRIPT:-$HERE/net-guest.sh}"

usage() {
    echo "usage: $0 pair SOCKET_A SOCKET_B QUEUE_PAIRS" >&2
    echo "       $0 tap SOCKET NETNS HOST_IP GUEST_IP QUEUE_PAIRS" >&2
    exit 2
}
setup_error() { echo "run-net: $*" >&2; exit 2; }

MODE="${1:-}"
case "$MODE" in
    pair)
        [[ $# -eq 4 ]] || usage
        SOCKS=("$2" "$3"); NUMQ="$4";;
    tap)
        [[ $# -eq 6 ]] || usage
        SOCKS=("$2"); NETNS="$3"; HOST_IP="$4"; GUEST_IP="$5"; NUMQ="$6"
        ip netns list | awk '{print $1}' | grep -qx "$NETNS" || setup_error "no network namespace $NETNS"
        BUSYBOX="$(command -v busybox)" || setup_error "busybox not found (tests/guest/setup.sh installs busybox-static)";;
    *) usage;;
esac
[[ $NUMQ =~ ^[1-9][0-9]*$ ]] || setup_error "QUEUE_PAIRS must be a positive integer"
[[ $MIB =~ ^[1-9][0-9]*$ ]] || setup_error "OUTBOARD_NET_STREAM_MIB must be a positive integer"
for s in "${SOCKS[@]}"; do
    [[ -S $s ]] || setup_error "$s is not a listening unix socket (start the backend first)"
done
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
zcat "$OUTBOARD_INITRD" | cpio -t --quiet 2>/dev/null | grep -q '^usr/sbin/ethtool$' ||
    setup_error "the initramfs has no ethtool/ip (built by an older setup.sh): rerun tests/guest/setup.sh"

OUT="${OUTBOARD_GUEST_OUT:-}"
if [[ -z $OUT ]]; then OUT="$(mktemp -d /tmp/outboard-guest-net.XXXXXX)"; fi
mkdir -p "$OUT"
HOST_CHECKS="$OUT/host-checks.log"
: >"$HOST_CHECKS"
# shellcheck disable=SC2206
EXTRA=(${OUTBOARD_GUEST_QEMU_ARGS:-})

# boot NAME SOCKET MAC FWCFG_STRING...: starts QEMU in the background (pid in
# QPIDS[NAME]); logs go to OUT/NAME-{console,results,qemu}.log.
declare -A QPIDS=()
boot() {
    local name="$1" sock="$2" mac="$3"; shift 3
    local fw=(-fw_cfg "name=opt/outboard/script,file=$GUEST_SCRIPT") kv
    for kv in "$@"; do fw+=(-fw_cfg "name=opt/outboard/${kv%%=*},string=${kv#*=}"); done
    local mq=""
    [[ $NUMQ -gt 1 ]] && mq=",mq=on"
    rm -f "$OUT/$name-console.log" "$OUT/$name-results.log" "$OUT/$name-qemu.log"
    # shellcheck disable=SC2054  # commas are QEMU option syntax
    local cmd=(
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
        -serial "file:$OUT/$name-console.log" -serial "file:$OUT/$name-results.log"
        -chardev "socket,id=c0,path=$sock"
        -netdev "vhost-user,chardev=c0,id=n0,queues=$NUMQ"
        # vectors=0: INTx (see the header).
        -device "virtio-net-pci,netdev=n0,mac=$mac,vectors=0$mq"
        "${fw[@]}"
        "${EXTRA[@]}"
    )
    env QEMU_MODULE_DIR="$OUTBOARD_QEMU_MODULE_DIR" \
        LD_LIBRARY_PATH="${OUTBOARD_QEMU_LD_PATH:-}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        timeout --kill-after=10 "$TIMEOUT" "${cmd[@]}" </dev/null >"$OUT/$name-qemu.log" 2>&1 &
    QPIDS[$name]=$!
}

HOST_PIDS=()
cleanup() {
    local p
    for p in "${HOST_PIDS[@]}" "${QPIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

host_check() { # NAME OK(0/1) DETAIL
    local v=PASS
    [[ $2 -eq 0 ]] || v=FAIL
    echo "CHECK $1 $v $3" >>"$HOST_CHECKS"
}
# guest_info NAME KEY: the value of "INFO KEY value" in NAME's results.
guest_info() { awk -v k="$2" '$1 == "INFO" && $2 == k {print $3; exit}' "$OUT/$1-results.log" 2>/dev/null; }

if [[ $MODE == pair ]]; then
    NAMES=(a b)
    echo "run-net: pair a=${SOCKS[0]} b=${SOCKS[1]} queues=$NUMQ smp=$SMP mem=${MEM_MB}M stream=${MIB}MiB each way timeout=${TIMEOUT}s out=$OUT"
    boot a "${SOCKS[0]}" "$MAC_A" role=a ip=10.0.0.1 peer_ip=10.0.0.2 queues="$NUMQ" \
        stream_mib="$MIB" new_mac="$NEW_MAC"
    boot b "${SOCKS[1]}" "$MAC_B" role=b ip=10.0.0.2 peer_ip=10.0.0.1 queues="$NUMQ" \
        stream_mib="$MIB" new_mac="$NEW_MAC"
else
    NAMES=(tap)
    echo "run-net: tap socket=${SOCKS[0]} netns=$NETNS host=$HOST_IP guest=$GUEST_IP queues=$NUMQ smp=$SMP mem=${MEM_MB}M stream=${MIB}MiB each way timeout=${TIMEOUT}s out=$OUT"
    # The host's end of both streams, in the namespace.
    dd if=/dev/urandom of="$OUT/host-data" bs=1M count="$MIB" status=none
    HOST_DATA_SUM="$(sha256sum "$OUT/host-data" | cut -d' ' -f1)"
    printf '#!/bin/sh\nsha256sum | cut -d" " -f1 | tee %q\n' "$OUT/host-recv.sum" >"$OUT/host-recv.sh"
    printf '#!/bin/sh\nexec cat %q\n' "$OUT/host-data" >"$OUT/host-send.sh"
    chmod +x "$OUT/host-recv.sh" "$OUT/host-send.sh"
    rm -f "$OUT/host-recv.sum"
    ip netns exec "$NETNS" timeout "$TIMEOUT" "$BUSYBOX" nc -l -p 5001 -e "$OUT/host-recv.sh" \
        >/dev/null 2>"$OUT/host-nc-recv.log" &
    HOST_PIDS+=($!)
    ip netns exec "$NETNS" timeout "$TIMEOUT" "$BUSYBOX" nc -l -p 5002 -e "$OUT/host-send.sh" \
        >/dev/null 2>"$OUT/host-nc-send.log" &
    HOST_PIDS+=($!)
    boot tap "${SOCKS[0]}" "$MAC_A" role=tap ip="$GUEST_IP" peer_ip="$HOST_IP" queues="$NUMQ" \
        stream_mib="$MIB" expect_rx_sha256="$HOST_DATA_SUM"
fi

start=$SECONDS
backend_died=0
backend_alive() {
    local st
    st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n $st && $st != Z && $st != X ]]
}
any_qemu_running() {
    local p
    for p in "${QPIDS[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done
    return 1
}
if [[ -n $BACKEND_PID ]]; then
    while any_qemu_running; do
        if ! backend_alive "$BACKEND_PID"; then
            backend_died=1
            echo "run-net: backend pid $BACKEND_PID exited during the run: stopping QEMU"
            for p in "${QPIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
            break
        fi
        sleep 0.5
    done
fi
declare -A QRC=()
set +e
for n in "${NAMES[@]}"; do
    wait "${QPIDS[$n]}"
    QRC[$n]=$?
done
set -e
elapsed=$((SECONDS - start))

verdict=PASS
reasons=()
for n in "${NAMES[@]}"; do
    res="$OUT/$n-results.log"
    [[ -f $res ]] && sed -i 's/\r$//' "$res"
    echo "run-net: guest $n: qemu exited with ${QRC[$n]} after ${elapsed}s"
    echo "----- guest $n results ($res) -----"
    if [[ -s $res ]]; then cat "$res"; else echo "(empty)"; fi
    echo "-----"
    last="$(grep -v '^[[:space:]]*$' "$res" 2>/dev/null | tail -n1 || true)"
    if [[ ${QRC[$n]} -eq 124 || ${QRC[$n]} -eq 137 ]]; then
        reasons+=("guest $n timed out after ${TIMEOUT}s")
    elif [[ ${QRC[$n]} -ne 0 ]]; then
        reasons+=("guest $n: qemu exited with ${QRC[$n]}")
    elif [[ $last != "RESULT PASS" ]]; then
        reasons+=("guest $n did not report RESULT PASS (last line: '${last:-none}')")
    elif grep -q '^CHECK [^ ]* FAIL' "$res"; then
        reasons+=("guest $n: a check failed")
    elif ! grep -q '^CHECK [^ ]* PASS' "$res"; then
        reasons+=("guest $n: no check ran")
    fi
done
[[ $backend_died -eq 1 ]] && reasons+=("backend (pid $BACKEND_PID) exited during the run")

# The host's own comparison of both ends of every stream.
if [[ $MODE == pair ]]; then
    for pair in "a b" "b a"; do
        read -r from to <<<"$pair"
        sent="$(guest_info "$from" stream_tx_sha256)"
        got="$(guest_info "$to" stream_rx_sha256)"
        [[ -n $sent && $sent == "$got" ]]
        host_check "host_stream_${from}_to_${to}" $? "${MIB}MiB $from sent=${sent:-none} $to received=${got:-none}"
    done
else
    sent="$(guest_info tap stream_tx_sha256)"
    got="$(cat "$OUT/host-recv.sum" 2>/dev/null || true)"
    [[ -n $sent && $sent == "$got" ]]
    host_check host_stream_guest_to_host $? "${MIB}MiB guest sent=${sent:-none} host received=${got:-none}"
    got="$(guest_info tap stream_rx_sha256)"
    [[ $got == "$HOST_DATA_SUM" ]]
    host_check host_stream_host_to_guest $? "${MIB}MiB host sent=$HOST_DATA_SUM guest received=${got:-none}"
fi
echo "----- host checks -----"
cat "$HOST_CHECKS"
echo "-----"
grep -q '^CHECK [^ ]* FAIL' "$HOST_CHECKS" && reasons+=("a host-side check failed")

if [[ ${#reasons[@]} -eq 0 ]]; then
    n=0
    for g in "${NAMES[@]}"; do n=$((n + $(grep -c '^CHECK .* PASS' "$OUT/$g-results.log"))); done
    n=$((n + $(grep -c '^CHECK .* PASS' "$HOST_CHECKS")))
    echo "run-net: PASS ($n checks, ${elapsed}s, logs in $OUT)"
    exit 0
fi
printf 'run-net: FAIL: %s\n' "${reasons[@]}"
for n in "${NAMES[@]}"; do
    if [[ -s $OUT/$n-qemu.log ]]; then
        echo "----- guest $n qemu stderr -----"
        tail -n 30 "$OUT/$n-qemu.log"
    fi
    echo "----- guest $n console tail -----"
    tail -n 60 "$OUT/$n-console.log" 2>/dev/null | sed 's/\r$//' || echo "(no console log)"
done
echo "-----"
exit 1
