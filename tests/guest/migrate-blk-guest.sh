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
#   1. write an 8 MiB random pattern at 64 MiB (O_DIRECT), keep its md5
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
# Disk layout (>= 256 MiB): fio 0-32 MiB (then 32-48 MiB), pattern 64 MiB,
# fresh pattern 96 MiB, host<->guest handshake blocks at 200 MiB (4 KiB blocks
# MARK and MARK+1).
#
# Output protocol, on the second serial port (/dev/ttyS1, a file on the host;
# after the switch-over the destination QEMU's file):
#   PHASE <name> t=<uptime>         progress markers the host waits for/judges
#   PROBE <what> t=<uptime>         page-cache probe progress
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
# 4 KiB block of the host's probe handshake word (200 MiB); MARK+1 takes the
# guest's answers.
MARK=51200
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
if [ "$SIZE_MB" -lt 256 ]; then
    fail device "$DISK is ${SIZE_MB} MiB: the test needs at least 256 MiB"
    finish
fi
pass device "$DISK size=${SIZE_MB}MiB hw_queues=$HWQ num_queues=$NUMQ"

# --- 1. a pattern written before the migration ------------------------------
dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
PAT=$(md5 /tmp/pat)
dd if=/tmp/pat of=$DISK bs=1M seek=64 oflag=direct conv=notrunc,fsync 2>/tmp/dd.err
rc=$?
check pattern_write $rc "8MiB at 64MiB md5=$PAT$([ $rc -ne 0 ] && echo " $(tail -n1 /tmp/dd.err)")"

# --- 2. fio across the migration ----------------------------------------------
JOBS=$HWQ
PER=$((32 / JOBS))
( while :; do out "TICK t=$(now) $(iostat)"; sleep 1; done ) &
TICKER=$!
# Page-cache probe: the dirty-log check.  A buffered read puts page-cache pages
# under the backend's writes (DMA); the guest CPU never writes them (the host
# boots the guest with init_on_alloc=0), so QEMU learns that they changed only
# from the backend's dirty log.  A handshake through two 4 KiB blocks of the
# shared image (host writes block MARK, the guest answers in MARK+1):
#   host DIRTY    -> the guest starts rewriting a 32 MiB tmpfs file in a loop
#                    (so QEMU keeps iterating: it cannot converge), DIRTYING
#   host migrates; after QEMU's first pass over RAM: FILL
#   host FILL     -> the guest drops the page cache, reads the step-1 pattern
#                    through it (md5 a), FILLED, and stops dirtying; the host
#                    lets the migration converge
# After fio (on the destination) the pattern is read from the cache again
# (md5 b): the pages were filled after QEMU had sent them once, so they come
# out stale unless the backend logged its writes.  (fio alone hardly notices
# missing dirty logging: the CPU rewrites its buffers too often.)
mark_is() { [ "$(dd if=$DISK bs=4096 skip=$MARK count=1 iflag=direct 2>/dev/null | head -n1)" = "$1" ]; }
wait_mark() {
    while [ ! -e /tmp/probe.stop ]; do mark_is "$1" && return 0; sleep 0.3; done
    return 1
}
answer() {
    dd if=/dev/zero of=/tmp/ack bs=4096 count=1 2>/dev/null
    echo "$1" | dd of=/tmp/ack conv=notrunc 2>/dev/null
    dd if=/tmp/ack of=$DISK bs=4096 seek=$((MARK + 1)) oflag=direct conv=notrunc 2>/dev/null
}
( st=nosync a=none b=none ta=0 tw=0
  if wait_mark DIRTY; then
      ( while [ ! -e /tmp/dirty.stop ]; do
            dd if=/dev/zero of=/tmp/dirt bs=1M count=32 conv=notrunc 2>/dev/null
        done; rm -f /tmp/dirt ) &
      answer DIRTYING
      out "PROBE dirtying memory t=$(now)"
      if wait_mark FILL; then
          echo 1 >/proc/sys/vm/drop_caches
          ta=$(now)
          a=$(dd if=$DISK bs=1M skip=64 count=8 2>/dev/null | md5sum | cut -d' ' -f1)
          tw=$(now)
          st=sync
          answer FILLED
          out "PROBE filled the page cache t=$ta-$tw"
      fi
      touch /tmp/dirty.stop
      wait
  fi
  while [ ! -e /tmp/probe.stop ]; do sleep 0.5; done
  if [ $st = sync ]; then
      b=$(dd if=$DISK bs=1M skip=64 count=8 2>/dev/null | md5sum | cut -d' ' -f1)
  fi
  echo "$st $a $b $ta $tw" >/tmp/probe.result ) &
PROBE=$!
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
wait $PROBE 2>/dev/null
phase fio_done
cat /tmp/fio1.log
# fio's own report: written and verified (read) volume.  The read line is the
# backlog verification; without it nothing was checked.
wr=$(grep -o 'WRITE: bw=[^,]*, [^,]*, io=[^ ]*' /tmp/fio1.log | sed 's/.*io=//')
rd=$(grep -o 'READ: bw=[^,]*, [^,]*, io=[^ ]*' /tmp/fio1.log | sed 's/.*io=//')
errs=$(grep -c 'verify:\|bad magic\|verify failed\|err= *[1-9]' /tmp/fio1.log)
[ $rc -eq 0 ] && [ -n "$rd" ] && [ "$errs" -eq 0 ]
check fio_verify_across_migration $? "rc=$rc jobs=$JOBS 32MiB bs=4k iodepth=16 crc32c backlog=256 written=${wr:-none} verified=${rd:-none} elapsed=$(awk -v a="$T0" -v b="$T1" 'BEGIN {printf "%.1f", b - a}')s write_$(grep -o 'write: IOPS=[^,]*' /tmp/fio1.log | sed 's/write: //')"

read -r pst pa pb pta ptw </tmp/probe.result 2>/dev/null || pst=none
if [ "$pst" = sync ]; then
    [ "$pa" = "$PAT" ] && [ "$pb" = "$PAT" ]
    check page_cache_probe $? "8MiB at 64MiB read into the page cache at t=$pta-$ptw during the migration: want=$PAT fresh=$pa cached_after=$pb"
else
    info page_cache_probe "skipped: no handshake with the host ($pst)"
fi

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
