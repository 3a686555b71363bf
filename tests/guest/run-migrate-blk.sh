#!/usr/bin/env bash
# tests/guest/run-migrate-blk.sh SRC_SOCKET DST_SOCKET NUM_QUEUES
#
# Live-migrates a running Linux guest (QEMU 7.2, TCG) between two QEMUs on
# this host while the guest runs fio --verify on a vhost-user-blk disk.
#
#   source       QEMU on SRC_SOCKET's backend, boots the guest, which runs
#                tests/guest/migrate-blk-guest.sh
#   destination  the same QEMU command line on DST_SOCKET's backend, plus
#                `-incoming defer`; `migrate-incoming tcp:127.0.0.1:0` picks a
#                free port, read back from the destination's query-migrate
#
# Both backends must serve the SAME disk image (shared storage), advertise at
# least NUM_QUEUES queues, and be listening before this starts.  QMP is driven
# over unix sockets by a small python3 client this script writes to its log dir.
#
# Sequence: wait until the guest reports `PHASE fio_running` on the source's
# results port; pause and resume the source VM once (QMP stop/cont: the same
# vhost-user stop/start sequence a migration ends with, without the migration);
# wait OUTBOARD_MIGRATE_DELAY s; migrate; poll the source's
# query-migrate until `completed`; check the destination runs; `quit` the
# source QEMU; SIGTERM the source backend if OUTBOARD_SRC_BACKEND_PID is set
# (the guest then runs on without it); wait for the guest to power off on the
# destination and judge its results.
#
# The guest's page-cache probe (see migrate-blk-guest.sh) is the dirty-log
# check: it keeps reading data into page-cache pages only the backend writes.
#
# QEMU 7.2's TCG live migration itself loses guest CPU writes when a migration
# of a memory-dirtying guest iterates for long (seen here with no vhost device
# at all: 16 MiB/s, or a 1 ms downtime limit, and a guest rewriting 32 MiB of
# tmpfs -> the destination kernel panics with a corrupted stack).  Hence the
# fast, short migration: 1 GiB/s and QEMU's default 300 ms downtime limit.
#
# Judged: migration status `completed`; the destination's results end with
# RESULT PASS and no failed check; fio was still running at the switch-over
# (the source's results have `PHASE fio_running` but not `PHASE fio_done`);
# the guest's disk counters (TICK lines) grew on the destination; both QEMUs
# exited cleanly.
#
# Output (stdout): progress lines, then `MIGRATION key value` lines (the source's
# final query-migrate: total-time-ms, downtime-ms, setup-time-ms, ram fields),
# the results files, and `run-migrate-blk: PASS|FAIL ...` last.
#
# Exit status: 0 pass, 1 failure (logs printed), 2 usage/setup problem.
#
# Environment knobs:
#   OUTBOARD_GUEST_DIR        asset dir (default /var/cache/outboard-guest)
#   OUTBOARD_GUEST_OUT        log dir (default: a fresh temp dir, kept)
#   OUTBOARD_GUEST_TIMEOUT    hard limit per QEMU in seconds (default 200)
#   OUTBOARD_SRC_BACKEND_PID  source backend: fail fast if it dies before the
#                             switch-over; SIGTERMed after the source QEMU quit
#   OUTBOARD_DST_BACKEND_PID  destination backend: fail fast if it dies
#   OUTBOARD_GUEST_MEM        guest RAM in MiB (default 512)
#   OUTBOARD_GUEST_SMP        vCPUs (default 2)
#   OUTBOARD_MIGRATE_FIO_RUNTIME  seconds of fio across the migration (default 40)
#   OUTBOARD_MIGRATE_DELAY    seconds of fio before migrating (default 5)
#   OUTBOARD_MIGRATE_STOP_CONT  =0 skips the stop/cont of the source (default 1)
#   OUTBOARD_MIGRATE_BANDWIDTH  max-bandwidth in bytes/s (default 1 GiB/s;
#                             QEMU 7.2's own default is 32 MiB/s)
#   OUTBOARD_MIGRATE_DOWNTIME_MS  downtime-limit (default 300, QEMU's default)
#   OUTBOARD_MIGRATE_TIMEOUT  seconds for the migration to complete (default 90)
#   OUTBOARD_GUEST_SCRIPT     guest script (default migrate-blk-guest.sh)
#   OUTBOARD_GUEST_QEMU_ARGS  extra QEMU arguments for both sides (word-split)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ASSET_DIR="${OUTBOARD_GUEST_DIR:-/var/cache/outboard-guest}"
TIMEOUT="${OUTBOARD_GUEST_TIMEOUT:-200}"
SRC_BACKEND_PID="${OUTBOARD_SRC_BACKEND_PID:-}"
DST_BACKEND_PID="${OUTBOARD_DST_BACKEND_PID:-}"
MEM_MB="${OUTBOARD_GUEST_MEM:-512}"
SMP="${OUTBOARD_GUEST_SMP:-2}"
FIO_RUNTIME="${OUTBOARD_MIGRATE_FIO_RUNTIME:-40}"
DELAY="${OUTBOARD_MIGRATE_DELAY:-5}"
STOP_CONT="${OUTBOARD_MIGRATE_STOP_CONT:-1}"
BANDWIDTH="${OUTBOARD_MIGRATE_BANDWIDTH:-1073741824}"
DOWNTIME_MS="${OUTBOARD_MIGRATE_DOWNTIME_MS:-300}"
MIGRATE_TIMEOUT="${OUTBOARD_MIGRATE_TIMEOUT:-90}"
GUEST_SCRIPT="${OUTBOARD_GUEST_SCRIPT:-$HERE/migrate-blk-guest.sh}"

setup_error() { echo "run-migrate-blk: $*" >&2; exit 2; }
[[ $# -eq 3 ]] || { echo "usage: $0 SRC_SOCKET DST_SOCKET NUM_QUEUES" >&2; exit 2; }
SRC_SOCK="$1"
DST_SOCK="$2"
NUMQ="$3"
[[ $NUMQ =~ ^[1-9][0-9]*$ ]] || setup_error "NUM_QUEUES must be a positive integer"
for s in "$SRC_SOCK" "$DST_SOCK"; do
    [[ -S $s ]] || setup_error "$s is not a listening unix socket (start the backends first)"
done
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
if [[ -z $OUT ]]; then OUT="$(mktemp -d /tmp/outboard-migrate-blk.XXXXXX)"; fi
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
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
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
jget() { python3 "$JGET_PY" "$1"; }

# --- the two QEMUs --------------------------------------------------------------
# shellcheck disable=SC2206
EXTRA=(${OUTBOARD_GUEST_QEMU_ARGS:-})
# qemu_cmd SIDE SOCKET: the command line, identical for both sides but for
# the log files, QMP socket and backend socket (and -incoming, added below).
qemu_cmd() {
    local side="$1" sock="$2"
    # shellcheck disable=SC2054  # commas are QEMU option syntax
    QEMU_CMD=(
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
        # to fill, or the CPU's writes would hide missing dirty logging (see the
        # page-cache probe in migrate-blk-guest.sh).
        -append "console=ttyS0 panic=-1 oops=panic init_on_alloc=0"
        -no-reboot
        -serial "file:$OUT/$side-console.log" -serial "file:$OUT/$side-results.log"
        -qmp "unix:$OUT/$side.qmp,server=on,wait=off"
        -chardev "socket,id=c0,path=$sock"
        -device "vhost-user-blk-pci,id=blk0,chardev=c0,num-queues=$NUMQ"
        -fw_cfg "name=opt/outboard/script,file=$GUEST_SCRIPT"
        -fw_cfg "name=opt/outboard/num_queues,string=$NUMQ"
        -fw_cfg "name=opt/outboard/fio_runtime,string=$FIO_RUNTIME"
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
cleanup() {
    local p
    for p in $SRC_PID $DST_PID; do kill -TERM "$p" 2>/dev/null || true; done
    for p in $SRC_PID $DST_PID; do wait "$p" 2>/dev/null || true; done
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
failure() { VERDICT=FAIL; REASONS+=("$*"); echo "run-migrate-blk: FAIL: $*"; }

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
echo "run-migrate-blk: src=$SRC_SOCK dst=$DST_SOCK num-queues=$NUMQ smp=$SMP mem=${MEM_MB}M fio=${FIO_RUNTIME}s delay=${DELAY}s out=$OUT"
start_qemu src "$SRC_SOCK"
start_qemu dst "$DST_SOCK" -incoming defer

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

    # 2. the guest is in its fio phase (on the source)
    deadline=$((SECONDS + 120))
    until grep -q '^PHASE fio_running' "$OUT/src-results.log" 2>/dev/null; do
        watch_ok 1 || return
        grep -q '^RESULT' "$OUT/src-results.log" 2>/dev/null \
            && { failure "guest finished before fio started"; return; }
        (( SECONDS < deadline )) || { failure "guest did not start fio within 120 s"; return; }
        sleep 0.5
    done
    if [[ $STOP_CONT == 1 ]]; then
        # The guest's rings stop (GET_VRING_BASE) and restart (SET_VRING_BASE)
        # where they stood; a backend that lost the position would replay or
        # skip requests, which fio's verify sees.
        sleep 1
        qmp "$OUT/src.qmp" 'stop' >/dev/null || { failure "QMP stop failed"; return; }
        qmp "$OUT/src.qmp" 'query-status' | grep -q '"paused"' || { failure "source not paused after stop"; return; }
        sleep 1
        qmp "$OUT/src.qmp" 'cont' >/dev/null || { failure "QMP cont failed"; return; }
        echo "run-migrate-blk: [$(elapsed)s] source paused for 1 s and resumed (stop/cont)"
    fi
    echo "run-migrate-blk: [$(elapsed)s] guest runs fio on the source; migrating in ${DELAY}s"
    sleep "$DELAY"
    watch_ok 1 || return
    grep -q '^PHASE fio_done' "$OUT/src-results.log" \
        && { failure "fio ended before the migration started (raise OUTBOARD_MIGRATE_FIO_RUNTIME)"; return; }

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
    echo "run-migrate-blk: [$(elapsed)s] migrating to tcp:127.0.0.1:$port (max-bandwidth $BANDWIDTH, downtime-limit $DOWNTIME_MS ms)"
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
    echo "run-migrate-blk: [$(elapsed)s] migration completed after $((SECONDS - t_mig))s"
    echo "$info" >"$OUT/query-migrate.json"
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
    echo "run-migrate-blk: [$(elapsed)s] source QEMU quit (rc $src_rc)"
    if [[ -n $SRC_BACKEND_PID ]]; then
        kill -TERM "$SRC_BACKEND_PID" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do alive "$SRC_BACKEND_PID" || break; sleep 0.1; done
        if alive "$SRC_BACKEND_PID"; then
            failure "source backend (pid $SRC_BACKEND_PID) ignored SIGTERM"
        else
            echo "run-migrate-blk: [$(elapsed)s] source backend terminated"
        fi
    fi

    # 5. the guest finishes on the destination
    while alive "$DST_PID"; do
        watch_ok 0 || return
        sleep 0.5
    done
    wait "$DST_PID"
    local dst_rc=$?
    DST_PID=""
    echo "run-migrate-blk: [$(elapsed)s] destination QEMU exited (rc $dst_rc)"
    if [[ $dst_rc -eq 124 || $dst_rc -eq 137 ]]; then
        failure "destination QEMU timed out after ${TIMEOUT}s (guest I/O stuck?)"
    elif [[ $dst_rc -ne 0 ]]; then
        failure "destination QEMU exited with $dst_rc"
    fi
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
    grep -q '^CHECK fio_verify_across_migration PASS' "$DST_RES" \
        || failure "no fio verify verdict on the destination"
    grep -q '^CHECK page_cache_probe ' "$DST_RES" || failure "no page-cache probe verdict on the destination"
    # fio spanned the switch-over: started on the source, ended on the destination.
    grep -q '^PHASE fio_done' "$SRC_RES" && failure "fio ended on the source: the migration did not happen during fio"
    grep -q '^PHASE fio_done' "$DST_RES" || failure "no end of fio on the destination"
    # I/O went on on the destination: the write counter grew between TICKs there.
    wr_first="$(awk '/^TICK/ {sub("wr=", "", $4); print $4; exit}' "$DST_RES")"
    wr_last="$(awk '/^TICK/ {sub("wr=", "", $4); v = $4} END {print v}' "$DST_RES")"
    ticks="$(grep -c '^TICK' "$DST_RES" || true)"
    echo "MIGRATION destination-ticks $ticks"
    echo "MIGRATION destination-writes-during-fio $(( ${wr_last:-0} - ${wr_first:-0} ))"
    if [[ -z $wr_first || $ticks -lt 2 || ${wr_last:-0} -le ${wr_first:-0} ]]; then
        failure "no guest writes seen on the destination while fio ran (ticks=$ticks first=${wr_first:-none} last=${wr_last:-none})"
    fi
    echo "MIGRATION source-ticks $(grep -c '^TICK' "$SRC_RES" || true)"
fi

show_results() {
    if [[ -s $1 ]]; then grep -v '^TICK' "$1" || echo "(TICK lines only)"; else echo "(empty)"; fi
}
echo "----- source results ($SRC_RES), TICK lines omitted -----"
show_results "$SRC_RES"
echo "----- destination results ($DST_RES), TICK lines omitted -----"
show_results "$DST_RES"
echo "-----"
if [[ $VERDICT == PASS ]]; then
    echo "run-migrate-blk: PASS ($(grep -c '^CHECK .* PASS' "$SRC_RES" "$DST_RES" | awk -F: '{s += $2} END {print s}') checks, $(elapsed)s, logs in $OUT)"
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
echo "run-migrate-blk: FAIL: ${REASONS[*]} (logs in $OUT)"
exit 1
