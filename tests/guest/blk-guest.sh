#!/bin/sh
# tests/guest/blk-guest.sh — runs INSIDE the test guest (busybox sh, as PID 1's
# child) against the vhost-user-blk disk, which the guest sees as /dev/vda.
#
# Delivered by QEMU as fw_cfg item opt/outboard/script (see run-blk.sh); the
# initramfs /init built by setup.sh runs it and powers off afterwards.
#
# Output protocol, on the second serial port (/dev/ttyS1, a file on the host):
#   INFO <key> <value...>           facts, never judged
#   CHECK <name> PASS|FAIL <detail> one line per check
#   RESULT PASS|FAIL                always the last line
# Everything is echoed to the console (ttyS0) as well.
#
# Optional fw_cfg inputs (strings):
#   opt/outboard/num_queues   num-queues QEMU was given: the guest must then
#                             use min(num_queues, cpus) hardware queues
#   opt/outboard/disk_size    expected disk size in bytes
#
# The disk's content is destroyed.  Busybox sh prefers its applets over $PATH,
# so the real tools are called by absolute path.  Keep the whole run well
# inside 2-3 minutes under TCG.

set -u
export PATH=/sbin:/usr/sbin:/bin:/usr/bin

DEV=vda
DISK=/dev/$DEV
FIO=/usr/bin/fio
MKFS=/sbin/mkfs.ext4
E2FSCK=/sbin/e2fsck
BLKDISCARD=/sbin/blkdiscard
FWCFG=/sys/firmware/qemu_fw_cfg/by_name/opt/outboard
T0=$(cut -d' ' -f1 /proc/uptime)

# --- result channel ---------------------------------------------------------
if [ -c /dev/ttyS1 ]; then
    stty -F /dev/ttyS1 raw -echo 2>/dev/null   # no \n -> \r\n translation
    exec 3>/dev/ttyS1
else
    echo "blk-guest: no /dev/ttyS1, results go to the console only"
    exec 3>/dev/null
fi

FAILS=0
PASSES=0
out()  { echo "$*"; echo "$*" >&3; }
info() { out "INFO $*"; }
pass() { PASSES=$((PASSES + 1)); out "CHECK $1 PASS ${2:-}"; }
fail() { FAILS=$((FAILS + 1)); out "CHECK $1 FAIL ${2:-}"; }
# check NAME CONDITION_RC DETAIL
check() { if [ "$2" -eq 0 ]; then pass "$1" "$3"; else fail "$1" "$3"; fi; }
finish() {
    info elapsed_s "$(awk -v t0="$T0" '{printf "%.1f", $1 - t0}' /proc/uptime)"
    info checks "passed=$PASSES failed=$FAILS"
    if [ "$FAILS" -eq 0 ] && [ "$PASSES" -gt 0 ]; then out "RESULT PASS"; else out "RESULT FAIL"; fi
    sync
    exit 0
}
fwcfg() { if [ -r "$FWCFG/$1/raw" ]; then cat "$FWCFG/$1/raw"; else echo "${2:-}"; fi; }
md5() { md5sum "$1" | cut -d' ' -f1; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# Sum of the interrupt counts (all CPUs) of the IRQ line named $1 (e.g.
# virtio0-req.1), empty if there is no such line.
irq_count() {
    awk -v n="$1" '$NF == n { s = 0; for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; else break; print s }' /proc/interrupts
}
# The virtio device index backing vda (virtioN), for its IRQ names.
vdev_name() { basename "$(readlink -f /sys/block/$DEV/device)"; }

NUMQ=$(fwcfg num_queues "")
EXPECT_SIZE=$(fwcfg disk_size "")
NCPU=$(nproc)
info guest "kernel=$(uname -r) cpus=$NCPU mem_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"

# --- 1. the device appears ----------------------------------------------------
i=0
while [ ! -e /sys/block/$DEV ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b $DISK ]; then
    fail device "no $DISK after 10 s (virtio_blk probe failed? see console)"
    finish
fi
SECTORS=$(cat /sys/block/$DEV/size)
SIZE=$((SECTORS * 512))
SIZE_MB=$((SIZE / 1048576))
VDEV=$(vdev_name)
if [ -n "$EXPECT_SIZE" ] && [ "$EXPECT_SIZE" != "$SIZE" ]; then
    fail device "$DISK size=$SIZE expected=$EXPECT_SIZE"
elif [ "$SIZE_MB" -lt 128 ]; then
    fail device "$DISK size=$SIZE: the test needs at least 128 MiB"
    finish
else
    pass device "$DISK size=$SIZE virtio=$VDEV"
fi
Q=/sys/block/$DEV/queue
info queue "lbs=$(cat $Q/logical_block_size) pbs=$(cat $Q/physical_block_size)" \
    "max_hw_kb=$(cat $Q/max_hw_sectors_kb) max_segments=$(cat $Q/max_segments)" \
    "max_seg_size=$(cat $Q/max_segment_size) write_cache=\"$(cat $Q/write_cache)\"" \
    "discard_max=$(cat $Q/discard_max_bytes) write_zeroes_max=$(cat $Q/write_zeroes_max_bytes)" \
    "ro=$(cat /sys/block/$DEV/ro)"

# --- 2. hardware queues -------------------------------------------------------
HWQ=$(ls /sys/block/$DEV/mq | wc -l)
if [ -n "$NUMQ" ]; then
    WANT=$NUMQ; [ "$NCPU" -lt "$WANT" ] && WANT=$NCPU
    [ "$HWQ" -eq "$WANT" ]
    check mq_queues $? "hw_queues=$HWQ expected=$WANT (num_queues=$NUMQ cpus=$NCPU)"
else
    [ "$HWQ" -ge 1 ]
    check mq_queues $? "hw_queues=$HWQ (num_queues not given)"
fi

# --- 3. raw pattern I/O with O_DIRECT, head and tail of the disk --------------
dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
PAT=$(md5 /tmp/pat)
pattern_check() { # NAME OFFSET_MiB
    rm -f /tmp/back
    if ! dd if=/tmp/pat of=$DISK bs=1M seek="$2" oflag=direct conv=notrunc,fsync 2>/tmp/dd.err; then
        fail "$1" "write at ${2}MiB: $(head -n1 /tmp/dd.err)"; return
    fi
    if ! dd if=$DISK of=/tmp/back bs=1M skip="$2" count=8 iflag=direct 2>/tmp/dd.err; then
        fail "$1" "read at ${2}MiB: $(head -n1 /tmp/dd.err)"; return
    fi
    got=$(md5 /tmp/back)
    # Same range again through the page cache (readahead = larger requests).
    drop_caches
    cached=$(dd if=$DISK bs=1M skip="$2" count=8 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$got" = "$PAT" ] && [ "$cached" = "$PAT" ]
    check "$1" $? "8MiB at ${2}MiB md5 want=$PAT direct=$got buffered=$cached"
}
pattern_check pattern_head 0
pattern_check pattern_tail $((SIZE_MB - 8))   # ends exactly at the last sector

# 512-byte O_DIRECT writes at odd sectors (sub-4k requests, single segment).
dd if=/dev/urandom of=/tmp/s512 bs=512 count=1 2>/dev/null
ok=0
for s in 1 7 4097; do
    dd if=/tmp/s512 of=$DISK bs=512 seek=$s count=1 oflag=direct conv=notrunc 2>/dev/null || ok=1
    r=$(dd if=$DISK bs=512 skip=$s count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$r" = "$(md5 /tmp/s512)" ] || ok=1
done
check sector_512 $ok "512B direct writes at sectors 1,7,4097"

# Reading at the end of the disk returns nothing (no error, no data).
n=$(dd if=$DISK bs=512 skip="$SECTORS" count=1 iflag=direct 2>/dev/null | wc -c)
[ "$n" -eq 0 ]
check read_past_end $? "bytes=$n"

# --- 4. fio verify: 4k random writes, one job per CPU (one per hw queue) ------
# Interrupt counts per virtqueue before/after show every queue was served.
irq_before=""
q=0
while [ $q -lt "$HWQ" ]; do irq_before="$irq_before $(irq_count "$VDEV-req.$q")"; q=$((q + 1)); done
JOBS=$HWQ
fio_run() { # NAME LOG ARGS...
    name=$1; log=$2; shift 2
    $FIO --name="$name" --filename=$DISK --direct=1 --ioengine=libaio \
        --verify_fatal=1 --exitall_on_error=1 --group_reporting "$@" >"$log" 2>&1
    rc=$?
    cat "$log"
    return $rc
}
fio_run verify /tmp/fio1.log --rw=randwrite --bs=4k --size=$((32 / JOBS))M \
    --numjobs="$JOBS" --offset_increment=$((32 / JOBS))M \
    --cpus_allowed=0-$((NCPU - 1)) --cpus_allowed_policy=split \
    --iodepth=16 --verify=crc32c
rc=$?
check fio_randwrite_verify $rc "rc=$rc jobs=$JOBS 32MiB bs=4k iodepth=16 crc32c $(grep -o 'IOPS=[^,]*' /tmp/fio1.log | tr '\n' ' ')"

if grep -q "$VDEV-req.0\$" /proc/interrupts; then
    q=0; idle=""; counts=""
    for b in $irq_before; do
        a=$(irq_count "$VDEV-req.$q")
        counts="$counts req.$q=$((a - b))"
        [ $((a - b)) -gt 0 ] || idle="$idle $q"
        q=$((q + 1))
    done
    [ -z "$idle" ]
    check mq_all_queues_used $? "irqs during fio:$counts${idle:+ idle:$idle}"
else
    info mq_all_queues_used "skipped: no per-virtqueue MSI-X vectors ($(grep "$VDEV" /proc/interrupts | awk '{print $NF}' | tr '\n' ' '))"
fi

# Larger, variable-size requests (multi-segment) with periodic flushes.
fio_run bigbs /tmp/fio2.log --rw=randwrite --bsrange=4k-1m --offset=64M --size=32M \
    --iodepth=4 --fsync=16 --verify=md5
rc=$?
check fio_bigbs_verify $rc "rc=$rc 32MiB@64MiB bs=4k-1m iodepth=4 fsync=16 md5"

# --- 5. discard / write-zeroes (only if the device offers them) ---------------
if [ "$(cat $Q/discard_max_bytes)" -gt 0 ]; then
    $BLKDISCARD -f -o $((96 * 1048576)) -l $((16 * 1048576)) $DISK 2>/tmp/bd.err
    rc=$?
    check discard $rc "rc=$rc 16MiB@96MiB$([ $rc -ne 0 ] && echo " $(tail -n1 /tmp/bd.err)")"
else
    info discard "skipped: not advertised"
fi
# BLKZEROOUT works either way (WRITE_ZEROES if advertised, else plain writes
# of zeroes); the range must read back as zeroes in both cases.
dd if=/tmp/pat of=$DISK bs=1M seek=112 oflag=direct conv=notrunc 2>/dev/null
$BLKDISCARD -f -z -o $((112 * 1048576)) -l $((8 * 1048576)) $DISK 2>/tmp/bd.err
rc=$?
z=$(dd if=$DISK bs=1M skip=112 count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
zero=$(dd if=/dev/zero bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1)
[ $rc -eq 0 ] && [ "$z" = "$zero" ]
check write_zeroes $? "rc=$rc 8MiB@112MiB reads back zero: $([ "$z" = "$zero" ] && echo yes || echo no)$([ $rc -ne 0 ] && echo " $(tail -n1 /tmp/bd.err)")"

# --- 6. ext4: mkfs, files, remount, verify, fsck -------------------------------
$MKFS -F -q $DISK >/tmp/mkfs.log 2>&1
rc=$?
check mkfs_ext4 $rc "rc=$rc $(tail -1 /tmp/mkfs.log)"
if [ $rc -eq 0 ] && mount -t ext4 $DISK /mnt 2>/tmp/mount.err; then
    ok=0
    cp /tmp/pat /mnt/pattern || ok=1
    mkdir -p /mnt/small || ok=1
    i=0
    while [ $i -lt 200 ]; do echo "outboard file $i $(cat /proc/sys/kernel/random/uuid)" >/mnt/small/f$i || ok=1; i=$((i + 1)); done
    dd if=/dev/urandom of=/mnt/big bs=1M count=24 2>/dev/null || ok=1
    (cd /mnt && md5sum pattern big small/* >/tmp/sums) || ok=1
    sync
    umount /mnt || ok=1
    check ext4_write $ok "pattern(8MiB) big(24MiB) 200 small files"
    drop_caches
    if mount -t ext4 -o ro $DISK /mnt 2>/tmp/mount.err; then
        (cd /mnt && md5sum -c /tmp/sums >/tmp/sums.out 2>&1)
        rc=$?
        check ext4_readback $rc "rc=$rc $(grep -vc ': OK$' /tmp/sums.out) mismatching of $(wc -l </tmp/sums)"
        umount /mnt
    else
        fail ext4_readback "remount failed: $(cat /tmp/mount.err)"
    fi
else
    fail ext4_write "mount failed: $(cat /tmp/mount.err 2>/dev/null)"
fi
$E2FSCK -fn $DISK >/tmp/fsck.log 2>&1
rc=$?
cat /tmp/fsck.log
check e2fsck $rc "rc=$rc $(tail -1 /tmp/fsck.log)"

# --- 7. kernel log: errors the checks above may not surface -------------------
# (read-ahead failures, virtio_ring complaints about bad used entries, splats)
dmesg | grep -E 'I/O error|critical medium|blk_update_request|EXT4-fs error|JBD2: |virtio.*(broken|error)|is not a head|out of range|[Nn]o more buffers|BUG:|WARNING:|Call Trace|Oops:|blocked for more than' \
    | grep -v 'drop_caches' >/tmp/kerr
n=$(wc -l </tmp/kerr)
[ "$n" -eq 0 ]
check kernel_log $? "suspicious_lines=$n$([ "$n" -gt 0 ] && echo ": $(head -n3 /tmp/kerr | tr '\n' '|')")"

finish
