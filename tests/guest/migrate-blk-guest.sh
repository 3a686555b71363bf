#!/bin/sh
# tests/guest/migrate-blk-guest.sh — runs INSIDE the test guest (busybox sh)
# while the host live-migrates it (tests/guest/run-migrate-blk.sh).  The disk
# is a vhost-user-blk device (/dev/vda); source and destination backends serve
# the same image file.
#
# Delivered by QEMU as fw_cfg item opt/outboard/script; the initramfs /init
# built by setup.sh runs it and powers off afterwards.  Both QEMUs get the same
# fw_cfg items (identical command lines), so it does not matter which side the
# guest reads them on.
#
# Timeline:
#   1. write an 8 MiB random pattern at 64 MiB (O_DIRECT) and three more
#      for the page-cache probe at 72, 80, 88 MiB; keep their md5s
#   2. PHASE fio_running: fio 4k randwrite + crc32c verify over 0..32 MiB,
#      one job per hw queue, looping over its area with verify_backlog (every
#      block written is read back and checked while the run goes on), for
#      opt/outboard/fio_runtime seconds.  The host migrates during this phase.
#      A background ticker prints the disk's I/O counters every second, and
#      a page-cache probe checks the backend's dirty logging (see below).
#   3. PHASE fio_done: fio's verdict and the probe's, then (on the
#      destination by now) the pattern from step 1 read back from the disk,
#      fresh pattern I/O at 96 MiB, a second, size-based fio verify run, and a
#      kernel log scan.
#
# Disk layout (>= 128 MiB): fio 0-32 MiB (then 32-48 MiB), patterns at 64,
# 72, 80, 88 MiB, fresh pattern at 96 MiB.
#
# Output protocol, on the second serial port (/dev/ttyS1, a file on the host;
# after the switch-over the destination QEMU's file):
#   PHASE <name> t=<uptime>         progress markers the host waits for/judges
#   PROBE mismatch t=<uptime> ...   a page-cache probe round read wrong data
#   TICK t=<uptime> rd=<n> wr=<n>   completed reads/writes of vda so far
#   INFO <key> <value...>           facts, never judged
#   CHECK <name> PASS|FAIL <detail> one line per check
#   RESULT PASS|FAIL                always the last line
#
# fw_cfg inputs (strings): opt/outboard/num_queues, opt/outboard/fio_runtime
# (seconds, default 40).

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
    echo "migrate-blk-guest: no /dev/ttyS1, results go to the console only"
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
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# /sys/block/vda/stat: field 1 = reads completed, field 5 = writes completed.
iostat() { awk '{print "rd=" $1 " wr=" $5}' /sys/block/$DEV/stat; }

NUMQ=$(fwcfg num_queues 1)
RUNTIME=$(fwcfg fio_runtime 40)
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
pass device "$DISK size=${SIZE_MB}MiB hw_queues=$HWQ num_queues=$NUMQ"

# --- 1. a pattern written before the migration ------------------------------
dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
PAT=$(md5 /tmp/pat)
dd if=/tmp/pat of=$DISK bs=1M seek=64 oflag=direct conv=notrunc,fsync 2>/tmp/dd.err
rc=$?
check pattern_write $rc "8MiB at 64MiB md5=$PAT$([ $rc -ne 0 ] && echo " $(tail -n1 /tmp/dd.err)")"
# Three more for the page-cache probe (72, 80, 88 MiB).
PROBE_PATS=""
ok=0
for off in 72 80 88; do
    dd if=/dev/urandom of=/tmp/patx bs=1M count=8 2>/dev/null
    PROBE_PATS="$PROBE_PATS $(md5 /tmp/patx)"
    dd if=/tmp/patx of=$DISK bs=1M seek=$off oflag=direct conv=notrunc,fsync 2>/tmp/dd.err || ok=1
done
rm -f /tmp/patx
set -- $PROBE_PATS
PATB=$1 PATC=$2 PATD=$3
check probe_patterns_write $ok "8MiB each at 72, 80, 88MiB md5=$PATB,$PATC,$PATD"

# --- 2. fio across the migration ----------------------------------------------
JOBS=$HWQ
PER=$((32 / JOBS))
( while :; do out "TICK t=$(now) $(iostat)"; sleep 1; done ) &
TICKER=$!
# Page-cache probe: the dirty-log check.  Buffered reads put page-cache pages
# under the backend's writes (DMA); the guest CPU never writes them (the host
# boots the guest with init_on_alloc=0), so QEMU learns that they changed only
# from the backend's dirty log.  Two loops, rounds without pause: drop the page
# cache, read one of two patterns through it (md5 a, copied as the pages
# arrive), read it again from the cache (md5 b).  Each loop alternates between
# its two patterns, so the recycled pages change content each round.  A round
# the switch-over falls into reads, on the destination, pages the backend
# filled on the source after QEMU had sent them (QEMU's first pass over RAM had
# gone past them, or they were read in flight that the backend completed when
# QEMU stopped the rings): they hold old data there unless the backend logged
# its writes.  Whether a round's pages lie behind QEMU's first pass is luck
# (they come in physically clustered runs), hence two loops.  (fio alone hardly
# notices missing dirty logging: the CPU rewrites its buffers too often.)
echo 8192 >/sys/block/$DEV/queue/read_ahead_kb   # whole 8 MiB reads in flight at once
probe_loop() { # ID OFFSET_A WANT_A OFFSET_B WANT_B
    id=$1 n=0 bad=0
    while [ ! -e /tmp/probe.stop ]; do
        if [ $((n % 2)) -eq 0 ]; then off=$2; want=$3; else off=$4; want=$5; fi
        echo 1 >/proc/sys/vm/drop_caches
        a=$(dd if=$DISK bs=1M skip=$off count=8 2>/dev/null | md5sum | cut -d' ' -f1)
        b=$(dd if=$DISK bs=1M skip=$off count=8 2>/dev/null | md5sum | cut -d' ' -f1)
        n=$((n + 1))
        if [ "$a" != "$want" ] || [ "$b" != "$want" ]; then
            bad=$((bad + 1))
            out "PROBE mismatch t=$(now) loop=$id round=$n at=${off}MiB fresh=$a cached=$b want=$want"
        fi
    done
    echo "$n $bad" >/tmp/probe.$id
}
probe_loop 1 64 "$PAT" 72 "$PATB" &
PROBE1=$!
probe_loop 2 80 "$PATC" 88 "$PATD" &
PROBE2=$!
phase fio_running
T0=$(now)
$FIO --name=migrate --filename=$DISK --direct=1 --ioengine=libaio \
    --rw=randwrite --bs=4k --size=${PER}M --numjobs="$JOBS" --offset_increment=${PER}M \
    --cpus_allowed=0-$((NCPU - 1)) --cpus_allowed_policy=split --iodepth=16 \
    --verify=crc32c --verify_backlog=256 --verify_fatal=1 --exitall_on_error=1 \
    --loops=100000 --runtime="$RUNTIME" --group_reporting >/tmp/fio1.log 2>&1
rc=$?
T1=$(now)
kill $TICKER 2>/dev/null
wait $TICKER 2>/dev/null
touch /tmp/probe.stop
wait $PROBE1 $PROBE2 2>/dev/null
phase fio_done
cat /tmp/fio1.log
# fio's own report: written and verified (read) volume.  The read line is the
# backlog verification; without it nothing was checked.
wr=$(grep -o 'WRITE: bw=[^,]*, [^,]*, io=[^ ]*' /tmp/fio1.log | sed 's/.*io=//')
rd=$(grep -o 'READ: bw=[^,]*, [^,]*, io=[^ ]*' /tmp/fio1.log | sed 's/.*io=//')
errs=$(grep -c 'verify:\|bad magic\|verify failed\|err= *[1-9]' /tmp/fio1.log)
[ $rc -eq 0 ] && [ -n "$rd" ] && [ "$errs" -eq 0 ]
check fio_verify_across_migration $? "rc=$rc jobs=$JOBS 32MiB bs=4k iodepth=16 crc32c backlog=256 written=${wr:-none} verified=${rd:-none} elapsed=$(awk -v a="$T0" -v b="$T1" 'BEGIN {printf "%.1f", b - a}')s write_$(grep -o 'write: IOPS=[^,]*' /tmp/fio1.log | sed 's/write: //')"

read -r pn1 pbad1 </tmp/probe.1 2>/dev/null || { pn1=0; pbad1=0; }
read -r pn2 pbad2 </tmp/probe.2 2>/dev/null || { pn2=0; pbad2=0; }
[ "$pn1" -gt 0 ] && [ "$pn2" -gt 0 ] && [ $((pbad1 + pbad2)) -eq 0 ]
check page_cache_probe $? "rounds=$((pn1 + pn2)) mismatching=$((pbad1 + pbad2)) (8MiB reads through the page cache at 64-96MiB)"

# --- 3. after the migration ----------------------------------------------------
drop_caches
got=$(dd if=$DISK bs=1M skip=64 count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$PAT" ]
check pattern_readback $? "8MiB at 64MiB written before the migration: want=$PAT got=$got"

dd if=/dev/urandom of=/tmp/pat2 bs=1M count=8 2>/dev/null
PAT2=$(md5 /tmp/pat2)
ok=0
dd if=/tmp/pat2 of=$DISK bs=1M seek=96 oflag=direct conv=notrunc,fsync 2>/dev/null || ok=1
drop_caches
got=$(dd if=$DISK bs=1M skip=96 count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ $ok -eq 0 ] && [ "$got" = "$PAT2" ]
check pattern_after $? "8MiB at 96MiB written and read after fio: want=$PAT2 got=$got"

$FIO --name=after --filename=$DISK --direct=1 --ioengine=libaio --rw=randwrite \
    --bs=4k --offset=32M --size=16M --iodepth=16 --verify=crc32c --verify_fatal=1 \
    --group_reporting >/tmp/fio2.log 2>&1
rc=$?
cat /tmp/fio2.log
check fio_verify_after $rc "rc=$rc 16MiB@32MiB bs=4k iodepth=16 crc32c write_$(grep -o 'write: IOPS=[^,]*' /tmp/fio2.log | sed 's/write: //')"
info iostat "$(iostat)"

dmesg | grep -E 'I/O error|blk_update_request|virtio.*(broken|error)|is not a head|out of range|[Nn]o more buffers|BUG:|WARNING:|Call Trace|Oops:|blocked for more than' \
    >/tmp/kerr
n=$(wc -l </tmp/kerr)
[ "$n" -eq 0 ]
check kernel_log $? "suspicious_lines=$n$([ "$n" -gt 0 ] && echo ": $(head -n3 /tmp/kerr | tr '\n' '|')")"

phase end
finish
