#!/usr/bin/env bash
# Real QEMU live migration of virtio-net on vhost-user-net: two QEMU 7.2 instances on localhost
# (TCG), each with its own vhost-user-net backend on its own TAP; both TAPs are ports of a bridge
# in a network namespace that holds the peer address (the test creates the namespace, starts the
# backends in it and builds the bridge). The guest (tests/guest/migrate-net-guest.sh) keeps a
# ping and a TCP stream to the peer running while the VM migrates; pings lost during the
# switch-over are counted and bounded, and the stream must arrive whole (the host side counts
# its bytes).
#
# usage: run-migrate-net.sh SRC_SOCKET DST_SOCKET NETNS PEER_IP GUEST_IP MAC [QUEUE_PAIRS]
# (QUEUE_PAIRS, default 1: `-netdev vhost-user,queues=N` and `mq=on`; both backends need
# `--queue-pairs N`, and the guest uses min(N, vCPUs) of them.)
# Environment as run-migrate-blk.sh (OUTBOARD_GUEST_*, OUTBOARD_MIGRATE_*), plus
# OUTBOARD_MIGRATE_NET_DURATION (seconds of traffic, default 30) and
# OUTBOARD_MIGRATE_NET_MAX_LOST (pings, default 25 = 5 s).
# Control experiment (not used by the tests): OUTBOARD_MIGRATE_NET_NETDEV=tap runs the same guest
# and migration without vhost-user: SRC_SOCKET and DST_SOCKET then name two TAPs in NETNS
# (created by the caller with `ip tuntap add NAME mode tap multi_queue` and put on the bridge),
# and each QEMU runs inside NETNS with its own virtio-net on its TAP (`-netdev tap,vhost=off`).
# Diagnosis (not used by the tests): OUTBOARD_MIGRATE_NET_RAM_CHECK=1 starts the destination with
# -S, so that it stays paused after the load, and compares the guest RAM of both sides then
# (pmemsave into OUTBOARD_MIGRATE_NET_RAM_DIR, default /dev/shm; 2 x the guest's memory): no page
# may differ. Differing pages are listed with whether they hold a ring or a buffer a descriptor
# points to (from QEMU's view of the stopped source's rings); the destination then runs on.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ASSET_DIR="${OUTBOARD_GUEST_DIR:-/var/cache/outboard-guest}"
TIMEOUT="${OUTBOARD_GUEST_TIMEOUT:-200}"
SRC_BACKEND_PID="${OUTBOARD_SRC_BACKEND_PID:-}"
DST_BACKEND_PID="${OUTBOARD_DST_BACKEND_PID:-}"
MEM_MB="${OUTBOARD_GUEST_MEM:-512}"
SMP="${OUTBOARD_GUEST_SMP:-2}"
DELAY="${OUTBOARD_MIGRATE_DELAY:-5}"
STOP_CONT="${OUTBOARD_MIGRATE_STOP_CONT:-1}"
BANDWIDTH="${OUTBOARD_MIGRATE_BANDWIDTH:-1073741824}"
DOWNTIME_MS="${OUTBOARD_MIGRATE_DOWNTIME_MS:-300}"
MIGRATE_TIMEOUT="${OUTBOARD_MIGRATE_TIMEOUT:-90}"
GUEST_SCRIPT="${OUTBOARD_GUEST_SCRIPT:-$HERE/migrate-net-guest.sh}"
DURATION="${OUTBOARD_MIGRATE_NET_DURATION:-30}"
MAX_LOST="${OUTBOARD_MIGRATE_NET_MAX_LOST:-25}"
NETDEV_MODE="${OUTBOARD_MIGRATE_NET_NETDEV:-vhost-user}"
RAM_CHECK="${OUTBOARD_MIGRATE_NET_RAM_CHECK:-0}"
RAM_DIR="${OUTBOARD_MIGRATE_NET_RAM_DIR:-/dev/shm}"

setup_error() { echo "run-migrate-net: $*" >&2; exit 2; }
[[ $# -eq 6 || $# -eq 7 ]] || { echo "usage: $0 SRC_SOCKET DST_SOCKET NETNS PEER_IP GUEST_IP MAC [QUEUE_PAIRS]" >&2; exit 2; }
PAIRS="${7:-1}"
[[ $PAIRS =~ ^[1-9][0-9]*$ ]] || setup_error "QUEUE_PAIRS must be a positive integer"
MQ=""
[[ $PAIRS -gt 1 ]] && MQ=",mq=on"
SRC_SOCK="$1"
DST_SOCK="$2"
NETNS="$3"
PEER_IP="$4"
GUEST_IP="$5"
MAC="$6"
ip netns list | awk '{print $1}' | grep -qx "$NETNS" || setup_error "no network namespace $NETNS"
case "$NETDEV_MODE" in
    vhost-user)
        for s in "$SRC_SOCK" "$DST_SOCK"; do
            [[ -S $s ]] || setup_error "$s is not a listening unix socket (start the backends first)"
        done;;
    tap)
        for s in "$SRC_SOCK" "$DST_SOCK"; do
            ip -n "$NETNS" link show "$s" >/dev/null 2>&1 || setup_error "no TAP $s in $NETNS"
        done;;
    *) setup_error "OUTBOARD_MIGRATE_NET_NETDEV must be vhost-user or tap";;
esac
[[ $SRC_SOCK != "$DST_SOCK" ]] || setup_error "source and destination need a backend each"
[[ -f $GUEST_SCRIPT ]] || setup_error "guest script $GUEST_SCRIPT missing"
command -v python3 >/dev/null || setup_error "python3 is needed for the QMP client"
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
if [[ -z $OUT ]]; then OUT="$(mktemp -d /tmp/outboard-migrate-net.XXXXXX)"; fi
mkdir -p "$OUT"
for side in src dst; do
    rm -f "$OUT/$side-console.log" "$OUT/$side-results.log" "$OUT/$side-qemu.log" "$OUT/$side.qmp"
done

# --- QMP client -----------------------------------------------------------------
# qmp.py SOCKET 'command {json args}'... : runs the commands in order on one
# connection, prints each `return` as one JSON line; exits 1 on a QMP error.
# jget.py PATH : prints the value at PATH (dot-separated keys / list indexes)
# of the JSON on stdin, empty if absent.
QMP_PY="$OUT/qmp.py"
cat >"$QMP_PY" <<'PY'
import json, os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(float(os.environ.get("QMP_TIMEOUT", "10")))
sock.connect(sys.argv[1])
f = sock.makefile("rwb")
def read():
    while True:
        line = f.readline()
        if not line:
            sys.exit("qmp: connection closed")
        msg = json.loads(line)
        if "event" not in msg:
            return msg
def execute(name, args=None):
    req = {"execute": name}
    if args is not None:
        req["arguments"] = args
    f.write(json.dumps(req).encode() + b"\n")
    f.flush()
    return read()
read()  # greeting
execute("qmp_capabilities")
for cmd in sys.argv[2:]:
    name, _, args = cmd.partition(" ")
    reply = execute(name, json.loads(args) if args else None)
    if "error" in reply:
        print("qmp: %s: %s" % (name, json.dumps(reply["error"])), file=sys.stderr)
        sys.exit(1)
    print(json.dumps(reply.get("return")))
PY
JGET_PY="$OUT/jget.py"
cat >"$JGET_PY" <<'PY'
import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    try:
        v = v[int(k)] if isinstance(v, list) else v[k]
    except (KeyError, IndexError, ValueError, TypeError):
        v = ""
        break
print(v if not isinstance(v, (dict, list)) else json.dumps(v))
PY
qmp() { timeout 20 python3 "$QMP_PY" "$@"; }
qmp_slow() { QMP_TIMEOUT=120 timeout 130 python3 "$QMP_PY" "$@"; }
# ramdiff.py SRC DST [QUEUE_STATUS_JSON...]: the 4 KiB pages that differ between two RAM dumps,
# each with the rings and descriptor buffers (of the queues given) it holds.
RAMDIFF_PY="$OUT/ramdiff.py"
cat >"$RAMDIFF_PY" <<'PY'
import json, struct, sys
PG = 4096
def pages(addr, length):
    return range(addr // PG, (addr + max(length, 1) - 1) // PG + 1)
with open(sys.argv[1], "rb") as f:
    src = f.read()
with open(sys.argv[2], "rb") as f:
    dst = f.read()
tags = {}
for q in (json.loads(a) for a in sys.argv[3:]):
    n, i = q["vring-num"], q["queue-index"]
    for name, addr, size in (("desc", q["vring-desc"], 16 * n), ("avail", q["vring-avail"], 6 + 2 * n),
                             ("used", q["vring-used"], 6 + 8 * n)):
        for p in pages(addr, size):
            tags.setdefault(p, set()).add("%s%d" % (name, i))
    for d in range(n):
        addr, length, _, _ = struct.unpack_from("<QIHH", src, q["vring-desc"] + 16 * d)
        if length and addr + length <= len(src):
            for p in pages(addr, length):
                tags.setdefault(p, set()).add("buffer%d" % i)
diff = []
for p in range(min(len(src), len(dst)) // PG):
    a, b = src[p * PG:(p + 1) * PG], dst[p * PG:(p + 1) * PG]
    if a != b:
        diff.append((p, sum(x != y for x, y in zip(a, b))))
print("MIGRATION ram-pages-differing %d" % len(diff))
for p, n in diff[:40]:
    print("MIGRATION ram-differs gpa %#x bytes %d holds [%s]" % (p * PG, n, ",".join(sorted(tags.get(p, ())))))
PY
jget() { python3 "$JGET_PY" "$1"; }

# --- the two QEMUs --------------------------------------------------------------
# shellcheck disable=SC2206
EXTRA=(${OUTBOARD_GUEST_QEMU_ARGS:-})
# qemu_cmd SIDE SOCKET: the command line, identical for both sides but for
# the log files, QMP socket and backend socket (and -incoming, added below).
qemu_cmd() {
    local side="$1" sock="$2"
    local netdev=(-chardev "socket,id=c0,path=$sock" -netdev "vhost-user,chardev=c0,id=n0,queues=$PAIRS")
    local prefix=()
    if [[ $NETDEV_MODE == tap ]]; then
        netdev=(-netdev "tap,id=n0,ifname=$sock,script=no,downscript=no,vhost=off,queues=$PAIRS")
        prefix=(ip netns exec "$NETNS")
    fi
    # shellcheck disable=SC2054  # commas are QEMU option syntax
    QEMU_CMD=(
        "${prefix[@]}"
        "$OUTBOARD_QEMU"
        -name "outboard-$side"
        -nodefaults -no-user-config -display none
        -accel tcg,thread=multi -cpu max -smp "$SMP"
        -m "${MEM_MB}M"
        -object "memory-backend-memfd,id=mem,size=${MEM_MB}M,share=on"
        -machine q35,memory-backend=mem
        -L "$OUTBOARD_FIRMWARE_DIR"
        -kernel "$OUTBOARD_KERNEL" -initrd "$OUTBOARD_INITRD"
        # init_on_alloc=0: the guest kernel must not zero pages the backend is about
        # to fill (receive buffers), or the CPU's writes would hide missing dirty logging.
        -append "console=ttyS0 panic=-1 oops=panic init_on_alloc=0"
        -no-reboot
        -serial "file:$OUT/$side-console.log" -serial "file:$OUT/$side-results.log"
        -qmp "unix:$OUT/$side.qmp,server=on,wait=off"
        "${netdev[@]}"
        -device "virtio-net-pci,netdev=n0,mac=$MAC,vectors=0$MQ"
        -fw_cfg "name=opt/outboard/script,file=$GUEST_SCRIPT"
        -fw_cfg "name=opt/outboard/ip,string=$GUEST_IP"
        -fw_cfg "name=opt/outboard/peer_ip,string=$PEER_IP"
        -fw_cfg "name=opt/outboard/duration,string=$DURATION"
        -fw_cfg "name=opt/outboard/max_lost,string=$MAX_LOST"
        "${EXTRA[@]}"
    )
}
start_qemu() { # SIDE SOCKET [EXTRA ARGS...]; sets <SIDE>_PID (the `timeout` process)
    local side="$1" sock="$2"
    shift 2
    qemu_cmd "$side" "$sock"
    env QEMU_MODULE_DIR="$OUTBOARD_QEMU_MODULE_DIR" \
        LD_LIBRARY_PATH="${OUTBOARD_QEMU_LD_PATH:-}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        timeout --kill-after=10 "$TIMEOUT" "${QEMU_CMD[@]}" "$@" </dev/null >"$OUT/$side-qemu.log" 2>&1 &
    printf -v "${side^^}_PID" '%s' "$!"
}

SRC_PID=""
DST_PID=""
NC_PID=""
SEND_PID=""
cleanup() {
    local p
    for p in $SRC_PID $DST_PID $NC_PID $SEND_PID; do kill -TERM "$p" 2>/dev/null || true; done
    for p in $SRC_PID $DST_PID $NC_PID $SEND_PID; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
# A caller's watchdog stops us with SIGTERM: take the QEMUs along.
trap 'exit 143' TERM INT

alive() { # PID: running and not a zombie
    local st
    st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

VERDICT=PASS
REASONS=()
failure() { VERDICT=FAIL; REASONS+=("$*"); echo "run-migrate-net: FAIL: $*"; }

# QEMU's complaints about the device: the guest's I/O is stuck from then on,
# so fail now instead of at the timeout.
QEMU_DEVICE_ERRORS='vring error|inconsistent with Host index|virtio: |vhost.*failed|Failed to'
device_errors() { grep -hE "$QEMU_DEVICE_ERRORS" "$OUT/src-qemu.log" "$OUT/dst-qemu.log" 2>/dev/null | head -n3; }

# The things that may die while we wait: both QEMUs, and the backends given.
# Returns 1 (and records why) if one did; $1 says whether the source side counts.
watch_ok() {
    local with_src="$1" errs
    errs="$(device_errors)"
    if [[ -n $errs ]]; then failure "QEMU reported device errors: $(tr '\n' '|' <<<"$errs")"; return 1; fi
    if [[ $with_src == 1 ]]; then
        alive "$SRC_PID" || { failure "source QEMU exited early"; return 1; }
        if [[ -n $SRC_BACKEND_PID ]] && ! alive "$SRC_BACKEND_PID"; then
            failure "source backend (pid $SRC_BACKEND_PID) died"; return 1
        fi
    fi
    alive "$DST_PID" || { failure "destination QEMU exited early"; return 1; }
    if [[ -n $DST_BACKEND_PID ]] && ! alive "$DST_BACKEND_PID"; then
        failure "destination backend (pid $DST_BACKEND_PID) died"; return 1
    fi
    return 0
}

T_START=$SECONDS
elapsed() { echo $((SECONDS - T_START)); }
echo "run-migrate-net: src=$SRC_SOCK dst=$DST_SOCK netns=$NETNS peer=$PEER_IP guest=$GUEST_IP queue-pairs=$PAIRS smp=$SMP mem=${MEM_MB}M traffic=${DURATION}s delay=${DELAY}s out=$OUT"
# The stream's receiving end, in the namespace: counts what arrives and the longest silence.
RECV_PY="$OUT/recv.py"
cat >"$RECV_PY" <<'PY'
import socket, sys, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(1)
conn, _ = srv.accept()
total, gap, last = 0, 0.0, time.monotonic()
while True:
    data = conn.recv(65536)
    now = time.monotonic()
    if not data:
        break
    gap = max(gap, now - last)
    last = now
    total += len(data)
conn.close()
with open(sys.argv[2], "w") as f:
    f.write("%d %d\n" % (total, gap * 1000))
PY
# The other stream's sending end: 8 KiB every 20 ms for the traffic's duration, then its byte
# count and SHA-256.
SEND_PY="$OUT/send.py"
cat >"$SEND_PY" <<'PY'
import hashlib, socket, sys, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(1)
conn, _ = srv.accept()
h, total, i = hashlib.sha256(), 0, 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    block = hashlib.sha256(str(i).encode()).digest() * 256
    conn.sendall(block)
    h.update(block)
    total += len(block)
    i += 1
    time.sleep(0.02)
conn.close()
with open(sys.argv[3], "w") as f:
    f.write("%d %s\n" % (total, h.hexdigest()))
PY
rm -f "$OUT/host-stream.txt" "$OUT/host-sent.txt"
ip netns exec "$NETNS" timeout "$TIMEOUT" python3 "$SEND_PY" 5002 "$DURATION" "$OUT/host-sent.txt" 2>"$OUT/host-send.log" &
SEND_PID=$!
ip netns exec "$NETNS" timeout "$TIMEOUT" python3 "$RECV_PY" 5001 "$OUT/host-stream.txt" 2>"$OUT/host-recv.log" &
NC_PID=$!
start_qemu src "$SRC_SOCK"
if [[ $RAM_CHECK == 1 ]]; then
    start_qemu dst "$DST_SOCK" -incoming defer -S
else
    start_qemu dst "$DST_SOCK" -incoming defer
fi

# run_phases: everything up to the guest's end; returns early on failure.
run_phases() {
    local deadline i
    # 1. both QMP sockets up
    deadline=$((SECONDS + 30))
    until [[ -S $OUT/src.qmp && -S $OUT/dst.qmp ]]; do
        watch_ok 1 || return
        (( SECONDS < deadline )) || { failure "QMP sockets did not appear within 30 s"; return; }
        sleep 0.2
    done
    qmp "$OUT/dst.qmp" 'query-status' | grep -q '"inmigrate"' \
        || { failure "destination is not waiting for a migration"; return; }

    # 2. the guest's traffic runs (on the source)
    deadline=$((SECONDS + 120))
    until grep -q '^PHASE traffic_running' "$OUT/src-results.log" 2>/dev/null; do
        watch_ok 1 || return
        grep -q '^RESULT' "$OUT/src-results.log" 2>/dev/null \
            && { failure "guest finished before the traffic started"; return; }
        (( SECONDS < deadline )) || { failure "guest did not start its traffic within 120 s"; return; }
        sleep 0.5
    done
    if [[ $STOP_CONT == 1 ]]; then
        # The guest's rings stop (GET_VRING_BASE) and restart (SET_VRING_BASE)
        # where they stood; a backend that lost the position would replay or
        # skip frames, which the streams see.
        sleep 1
        qmp "$OUT/src.qmp" 'stop' >/dev/null || { failure "QMP stop failed"; return; }
        qmp "$OUT/src.qmp" 'query-status' | grep -q '"paused"' || { failure "source not paused after stop"; return; }
        sleep 1
        qmp "$OUT/src.qmp" 'cont' >/dev/null || { failure "QMP cont failed"; return; }
        echo "run-migrate-net: [$(elapsed)s] source paused for 1 s and resumed (stop/cont)"
    fi
    echo "run-migrate-net: [$(elapsed)s] guest pings and streams on the source; migrating in ${DELAY}s"
    sleep "$DELAY"
    watch_ok 1 || return
    grep -q '^PHASE traffic_done' "$OUT/src-results.log" \
        && { failure "the traffic ended before the migration started (raise OUTBOARD_MIGRATE_NET_DURATION)"; return; }

    # 3. migrate
    local ret port status info
    qmp "$OUT/dst.qmp" 'migrate-incoming {"uri": "tcp:127.0.0.1:0"}' >/dev/null \
        || { failure "migrate-incoming failed"; return; }
    ret="$(qmp "$OUT/dst.qmp" 'query-migrate')" || { failure "query-migrate on the destination failed"; return; }
    port="$(jget socket-address.0.port <<<"$ret")"
    [[ $port =~ ^[0-9]+$ ]] || { failure "no listening port in the destination's query-migrate: $ret"; return; }
    qmp "$OUT/src.qmp" \
        "migrate-set-parameters {\"max-bandwidth\": $BANDWIDTH, \"downtime-limit\": $DOWNTIME_MS}" \
        "migrate {\"uri\": \"tcp:127.0.0.1:$port\"}" >/dev/null \
        || { failure "migrate command failed"; return; }
    local t_mig=$SECONDS
    echo "run-migrate-net: [$(elapsed)s] migrating to tcp:127.0.0.1:$port (max-bandwidth $BANDWIDTH, downtime-limit $DOWNTIME_MS ms)"
    deadline=$((SECONDS + MIGRATE_TIMEOUT))
    while :; do
        info="$(qmp "$OUT/src.qmp" 'query-migrate')" || { failure "query-migrate on the source failed"; return; }
        status="$(jget status <<<"$info")"
        case "$status" in
            completed) break;;
            failed|cancelled)
                failure "migration $status: $(jget error-desc <<<"$info")"; return;;
        esac
        watch_ok 1 || return
        (( SECONDS < deadline )) || {
            failure "migration not completed within ${MIGRATE_TIMEOUT}s (status $status: $(jget ram <<<"$info"))"
            return
        }
        sleep 0.3
    done
    echo "run-migrate-net: [$(elapsed)s] migration completed after $((SECONDS - t_mig))s"
    echo "$info" >"$OUT/query-migrate.json"
    if [[ $RAM_CHECK == 1 ]]; then
        ram_check || return
    fi
    local k
    for k in total-time downtime setup-time; do
        echo "MIGRATION $k-ms $(jget "$k" <<<"$info")"
    done
    for k in transferred total remaining duplicate normal normal-bytes dirty-sync-count mbps pages-per-second; do
        echo "MIGRATION ram-$k $(jget "ram.$k" <<<"$info")"
    done

    # 4. destination runs; source goes away
    deadline=$((SECONDS + 20))
    until qmp "$OUT/dst.qmp" 'query-status' | grep -q '"running"'; do
        # A guest that already powered off is judged by its results below.
        alive "$DST_PID" || break
        watch_ok 0 || return
        (( SECONDS < deadline )) || { failure "destination not running 20 s after the migration"; return; }
        sleep 0.2
    done
    echo "MIGRATION destination-status $(qmp "$OUT/dst.qmp" 'query-migrate' 2>/dev/null | jget status 2>/dev/null)"
    echo "MIGRATION source-status $(qmp "$OUT/src.qmp" 'query-status' | jget status)"
    qmp "$OUT/src.qmp" 'quit' >/dev/null || true
    for ((i = 0; i < 100; i++)); do alive "$SRC_PID" || break; sleep 0.1; done
    if alive "$SRC_PID"; then
        failure "source QEMU did not quit"
        kill -TERM "$SRC_PID" 2>/dev/null || true
    fi
    wait "$SRC_PID"
    local src_rc=$?
    SRC_PID=""
    [[ $src_rc -eq 0 ]] || failure "source QEMU exited with $src_rc after quit"
    echo "run-migrate-net: [$(elapsed)s] source QEMU quit (rc $src_rc)"
    if [[ -n $SRC_BACKEND_PID ]]; then
        kill -TERM "$SRC_BACKEND_PID" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do alive "$SRC_BACKEND_PID" || break; sleep 0.1; done
        if alive "$SRC_BACKEND_PID"; then
            failure "source backend (pid $SRC_BACKEND_PID) ignored SIGTERM"
        else
            echo "run-migrate-net: [$(elapsed)s] source backend terminated"
        fi
    fi

    # 5. the guest finishes on the destination
    # Until the guest powers off: its exit is the expected end here, not a failure.
    local errs
    while alive "$DST_PID"; do
        errs="$(device_errors)"
        [[ -z $errs ]] || { failure "QEMU reported device errors: $(tr '\n' '|' <<<"$errs")"; return; }
        if [[ -n $DST_BACKEND_PID ]] && ! alive "$DST_BACKEND_PID"; then
            failure "destination backend (pid $DST_BACKEND_PID) died"; return
        fi
        sleep 0.5
    done
    wait "$DST_PID"
    local dst_rc=$?
    DST_PID=""
    echo "run-migrate-net: [$(elapsed)s] destination QEMU exited (rc $dst_rc)"
    if [[ $dst_rc -eq 124 || $dst_rc -eq 137 ]]; then
        failure "destination QEMU timed out after ${TIMEOUT}s (guest network stuck?)"
    elif [[ $dst_rc -ne 0 ]]; then
        failure "destination QEMU exited with $dst_rc"
    fi
}
# ram_check: with the destination paused after the load (-S) and the source stopped, nothing
# writes guest RAM on either side: compare them, then let the destination run.
ram_check() {
    local dumps="$RAM_DIR/outboard-ramcheck-$$" vpath q side statuses=() deadline n
    deadline=$((SECONDS + 30))
    until [[ $(qmp "$OUT/dst.qmp" 'query-migrate' | jget status) == completed ]]; do
        (( SECONDS < deadline )) || { failure "destination did not complete the load within 30 s"; return 1; }
        sleep 0.2
    done
    vpath="$(qmp "$OUT/src.qmp" 'x-query-virtio' \
        | python3 -c 'import json, sys; print(next(d["path"] for d in json.load(sys.stdin) if d["name"] == "virtio-net"))')"
    for ((q = 0; q <= 2 * PAIRS; q++)); do
        statuses+=("$(qmp "$OUT/src.qmp" "x-query-virtio-queue-status {\"path\": \"$vpath\", \"queue\": $q}")")
    done
    mkdir -p "$dumps"
    for side in src dst; do
        qmp_slow "$OUT/$side.qmp" \
            "pmemsave {\"val\": 0, \"size\": $((MEM_MB * 1048576)), \"filename\": \"$dumps/$side.bin\"}" >/dev/null \
            || { failure "pmemsave on the $side failed"; rm -rf "$dumps"; return 1; }
    done
    python3 "$RAMDIFF_PY" "$dumps/src.bin" "$dumps/dst.bin" "${statuses[@]}" | tee "$OUT/ram-check.txt"
    rm -rf "$dumps"
    n="$(awk '$2 == "ram-pages-differing" {print $3}' "$OUT/ram-check.txt")"
    [[ $n == 0 ]] || failure "guest RAM differs between source and destination after the migration (${n:-?} pages)"
    qmp "$OUT/dst.qmp" 'cont' >/dev/null || { failure "QMP cont on the destination failed"; return 1; }
}
set +e
run_phases
set -e
cleanup
SRC_PID=""
DST_PID=""

for side in src dst; do [[ -f $OUT/$side-results.log ]] && sed -i 's/\r$//' "$OUT/$side-results.log"; done
SRC_RES="$OUT/src-results.log"
DST_RES="$OUT/dst-results.log"
if [[ $VERDICT == PASS ]]; then
    last="$(grep -v '^[[:space:]]*$' "$DST_RES" 2>/dev/null | tail -n1 || true)"
    if [[ $last != "RESULT PASS" ]]; then
        failure "the guest did not report RESULT PASS on the destination (last line: '${last:-none}')"
    fi
    if grep -q '^CHECK [^ ]* FAIL' "$SRC_RES" "$DST_RES"; then failure "a guest check failed"; fi
    grep -q '^CHECK ping_across_migration PASS' "$DST_RES" || failure "no passing ping verdict on the destination"
    grep -q '^CHECK stream_across_migration PASS' "$DST_RES" || failure "no passing stream verdict on the destination"
    grep -q '^PHASE traffic_done' "$SRC_RES" && failure "the traffic ended on the source: the migration did not happen during it"
    for ((i = 0; i < 50; i++)); do alive "$NC_PID" || alive "$SEND_PID" || break; sleep 0.1; done
    want="$(awk '$1 == "INFO" && $2 == "stream_bytes" {print $3}' "$DST_RES")"
    read -r got gap_ms <"$OUT/host-stream.txt" 2>/dev/null || { got=0; gap_ms=none; }
    echo "MIGRATION stream-bytes-sent ${want:-none} received $got longest-silence-ms $gap_ms"
    grep '^INFO ping' "$DST_RES" | sed 's/^INFO /MIGRATION /' || echo "MIGRATION ping none"
    grep '^INFO rx_queues' "$DST_RES" | sed 's/^INFO /MIGRATION /' || echo "MIGRATION rx_queues none"
    [[ -n $want && $got -eq $want ]] || failure "the peer received $got stream bytes of ${want:-?}: the stream broke"
    grep -q '^CHECK pull_across_migration PASS' "$DST_RES" || failure "no passing verdict for the stream from the peer"
    read -r sent sent_sum <"$OUT/host-sent.txt" 2>/dev/null || { sent=0; sent_sum=none; }
    read -r _ _ pulled pulled_sum < <(grep '^INFO pull ' "$DST_RES" || echo "INFO pull 0 none")
    echo "MIGRATION pull-bytes-sent $sent received $pulled sha256-match $([[ $sent_sum == "$pulled_sum" ]] && echo yes || echo no)"
    [[ $sent -gt 0 && $pulled -eq $sent && $sent_sum == "$pulled_sum" ]] \
        || failure "the guest received $pulled bytes (sha256 $pulled_sum) of the $sent the peer sent (sha256 $sent_sum)"
fi

show_results() {
    if [[ -s $1 ]]; then cat "$1"; else echo "(empty)"; fi
}
echo "----- source results ($SRC_RES),  -----"
show_results "$SRC_RES"
echo "----- destination results ($DST_RES),  -----"
show_results "$DST_RES"
echo "-----"
if [[ $VERDICT == PASS ]]; then
    echo "run-migrate-net: PASS ($(grep -c '^CHECK .* PASS' "$SRC_RES" "$DST_RES" | awk -F: '{s += $2} END {print s}') checks, $(elapsed)s, logs in $OUT)"
    exit 0
fi
for side in src dst; do
    if [[ -s $OUT/$side-qemu.log ]]; then
        echo "----- $side qemu stderr -----"
        tail -n 30 "$OUT/$side-qemu.log"
    fi
    echo "----- $side console tail -----"
    tail -n 40 "$OUT/$side-console.log" 2>/dev/null | sed 's/\r$//' || echo "(none)"
done
echo "-----"
echo "run-migrate-net: FAIL: ${REASONS[*]} (logs in $OUT)"
exit 1
