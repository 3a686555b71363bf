#!/bin/sh
# tests/guest/crash-blk-guest.sh — runs INSIDE the test guest (busybox sh)
# while the host kills its vhost-user-blk backend with SIGKILL and restarts it
# on the same socket path (and live-upgrades it once), see
# tests/guest/run-crash-blk.sh and tests/qemu_crash.rs.  The disk is /dev/vda.
#
# Delivered by QEMU as fw_cfg item opt/outboard/script; the initramfs /init
# built by setup.sh runs it and powers off afterwards.
#
# Timeline:
#   1. an 8 MiB random pattern written at 96 MiB (O_DIRECT, fsync); md5 kept
#   2. PHASE fio_running: fio randwrite, bs 4k-64k, iodepth 16, direct, one job
#      per hw queue over 0..64 MiB, crc32c verify with verify_backlog (every
#      block written is read back and checked while the run goes on), looping
#      for opt/outboard/fio_runtime seconds.  The host kills and restarts the
#      backend during this phase.  fio logs, per 100 ms window and job, the
#      longest completion latency of the window (write_lat_log, log_max_value):
#      a restart shows up as windows whose slowest request waited the whole
#      outage.
#   3. PHASE fio_done: fio's verdict, the windows' maxima (LATMAX lines), the
#      pattern from step 1 read back, a second, size-based fio verify run over
#      64..80 MiB, a kernel log scan.
#
# Output protocol, on the second serial port (/dev/ttyS1, a file on the host):
#   PHASE <name> t=<uptime>           progress markers the host waits for
#   TICK t=<uptime> rd=<n> wr=<n>     completed reads/writes of vda so far
#   LATMAX <job> <ms> <dir> <max_ns>  a 100 ms window's slowest request
#                                     (only windows slower than latmax_floor_ms)
#   INFO <key> <value...>             facts, never judged
#   CHECK <name> PASS|FAIL <detail>   one line per check
#   RESULT PASS|FAIL                  always the last line
#
# fw_cfg inputs (strings): opt/outboard/fio_runtime (seconds, default 60),
# opt/outboard/latmax_floor_ms (default 20).

set -u
export PATH=/sbin:/usr/sbin:/bin:/usr/bin

DEV=vda
DISK=/dev/$DEV
FIO=/usr/bin/fio
FWCFG=/sys/firmware/qemu_fw_cfg/by_name/opt/outboard

if [ -c /dev/ttyS1 ]; then
    stty -F /dev/ttyS1 raw -echo 2>/dev/null
    exec 3>/dev/ttyS1
else
    echo "crash-blk-guest: no /dev/ttyS1, results go to the console only"
    exec 3>/dev/null
fi

FAILS=0
PASSES=0
now() { cut -d' ' -f1 /proc/uptime; }
out()  { echo "$*"; echo "$*" >&3; }
info() { out "INFO $*"; }
phase() { out "PHASE $1 t=$(now)"; }
pass() { PASSES=$((PASSES + 1)); out "CHECK $1 PASS ${2:-}"; }
fail() { FAILS=$((FAILS + 1)); out "CHECK $1 FAIL ${2:-}"; }
check() { if [ "$2" -eq 0 ]; then pass "$1" "$3"; else fail "$1" "$3"; fi; }
finish() {
    info checks "passed=$PASSES failed=$FAILS"
    if [ "$FAILS" -eq 0 ] && [ "$PASSES" -gt 0 ]; then out "RESULT PASS"; else out "RESULT FAIL"; fi
    sync
    exit 0
}
fwcfg() { if [ -r "$FWCFG/$1/raw" ]; then cat "$FWCFG/$1/raw"; else echo "${2:-}"; fi; }
md5() { md5sum "$1" | cut -d' ' -f1; }
# /sys/block/vda/stat: field 1 = reads completed, field 5 = writes completed.
iostat() { awk '{print "rd=" $1 " wr=" $5}' /sys/block/$DEV/stat; }

RUNTIME=$(fwcfg fio_runtime 60)
FLOOR_MS=$(fwcfg latmax_floor_ms 20)
NCPU=$(nproc)
info guest "kernel=$(uname -r) cpus=$NCPU runtime=${RUNTIME}s"

i=0
while [ ! -e /sys/block/$DEV ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b $DISK ]; then
    fail device "no $DISK after 10 s (virtio_blk probe failed? see console)"
    finish
fi
SIZE_MB=$(($(cat /sys/block/$DEV/size) / 2048))
HWQ=$(ls /sys/block/$DEV/mq | wc -l)
if [ "$SIZE_MB" -lt 128 ]; then
    fail device "$DISK is ${SIZE_MB} MiB: the test needs at least 128 MiB"
    finish
fi
pass device "$DISK size=${SIZE_MB}MiB hw_queues=$HWQ"

# --- 1. a pattern written before the crashes -----------------------------------
dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
PAT=$(md5 /tmp/pat)
dd if=/tmp/pat of=$DISK bs=1M seek=96 oflag=direct conv=notrunc,fsync 2>/tmp/dd.err
rc=$?
check pattern_write $rc "8MiB at 96MiB md5=$PAT$([ $rc -ne 0 ] && echo " $(tail -n1 /tmp/dd.err)")"

# --- 2. fio while the backend is killed and restarted ---------------------------
JOBS=$HWQ
PER=$((64 / JOBS))
( while :; do out "TICK t=$(now) $(iostat)"; sleep 1; done ) &
TICKER=$!
phase fio_running
T0=$(now)
$FIO --name=crash --filename=$DISK --direct=1 --ioengine=libaio \
    --rw=randwrite --bsrange=4k-64k --size=${PER}M --numjobs="$JOBS" --offset_increment=${PER}M \
    --cpus_allowed=0-$((NCPU - 1)) --cpus_allowed_policy=split --iodepth=16 \
    --verify=crc32c --verify_backlog=64 --verify_fatal=1 --exitall_on_error=1 \
    --loops=100000 --runtime="$RUNTIME" \
    --write_lat_log=/tmp/crash --log_avg_msec=100 --log_max_value=1 \
    --group_reporting >/tmp/fio1.log 2>&1
rc=$?
T1=$(now)
kill $TICKER 2>/dev/null
wait $TICKER 2>/dev/null
phase fio_done
cat /tmp/fio1.log
# fio's own report: written and verified (read) volume.  The read line is the
# backlog verification; without it nothing was checked.
wr=$(grep -o 'WRITE: bw=[^,]*, [^,]*, io=[^ ]*' /tmp/fio1.log | sed 's/.*io=//')
rd=$(grep -o 'READ: bw=[^,]*, [^,]*, io=[^ ]*' /tmp/fio1.log | sed 's/.*io=//')
errs=$(grep -c 'verify:\|bad magic\|verify failed\|err= *[1-9]' /tmp/fio1.log)
[ $rc -eq 0 ] && [ -n "$rd" ] && [ "$errs" -eq 0 ]
check fio_verify_across_crashes $? "rc=$rc jobs=$JOBS 64MiB bs=4k-64k iodepth=16 crc32c backlog=64 written=${wr:-none} verified=${rd:-none} elapsed=$(awk -v a="$T0" -v b="$T1" 'BEGIN {printf "%.1f", b - a}')s write_$(grep -o 'write: IOPS=[^,]*' /tmp/fio1.log | sed 's/write: //')"
# fio's latency maxima per 100 ms window (total latency, nanoseconds; columns:
# time ms, value, direction 0=read 1=write, ...).  Only the slow windows go out.
n=0
for f in /tmp/crash_lat.*.log; do
    [ -e "$f" ] || continue
    n=$((n + 1))
    job=${f#/tmp/crash_lat.}
    job=${job%.log}
    awk -v job="$job" -v floor="$FLOOR_MS" -F', *' \
        '$2 > floor * 1000000 {print "LATMAX " job " " $1 " " $3 " " $2}' "$f" >/tmp/latmax
    cat /tmp/latmax >&3
    info latlog "job=$job windows=$(wc -l <"$f") slow=$(wc -l </tmp/latmax) max_ns=$(awk -F', *' 'BEGIN {m = 0} $2 > m {m = $2} END {print m}' "$f")"
done
[ "$n" -gt 0 ]
check latency_log $? "files=$n"

# --- 3. after the crashes ------------------------------------------------------
sync
echo 3 >/proc/sys/vm/drop_caches
got=$(dd if=$DISK bs=1M skip=96 count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$PAT" ]
check pattern_readback $? "8MiB at 96MiB written before the crashes: want=$PAT got=$got"

$FIO --name=after --filename=$DISK --direct=1 --ioengine=libaio --rw=randwrite \
    --bs=4k --offset=64M --size=16M --iodepth=16 --verify=crc32c --verify_fatal=1 \
    --group_reporting >/tmp/fio2.log 2>&1
rc=$?
cat /tmp/fio2.log
check fio_verify_after $rc "rc=$rc 16MiB@64MiB bs=4k iodepth=16 crc32c write_$(grep -o 'write: IOPS=[^,]*' /tmp/fio2.log | sed 's/write: //')"
info iostat "$(iostat)"

dmesg | grep -E 'I/O error|blk_update_request|virtio.*(broken|error)|is not a head|out of range|[Nn]o more buffers|BUG:|WARNING:|Call Trace|Oops:|blocked for more than' \
    >/tmp/kerr
n=$(wc -l </tmp/kerr)
[ "$n" -eq 0 ]
check kernel_log $? "suspicious_lines=$n$([ "$n" -gt 0 ] && echo ": $(head -n3 /tmp/kerr | tr '\n' '|')")"

phase end
finish
