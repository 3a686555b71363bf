#!/bin/sh
# Guest side of tests/guest/run-migrate-net.sh (passed with -fw_cfg opt/outboard/script):
# brings eth0 up (virtio-net on vhost-user-net, a TAP on a bridge in the test's network
# namespace), waits until the peer answers, then keeps a ping (every 0.2 s) and a TCP stream
# to the peer (4 KiB every 50 ms) and one from the peer (8 KiB every 20 ms, which lands in
# receive buffers the device fills while QEMU copies guest RAM: a write missing from the dirty
# log would leave stale bytes on the destination) running for `duration` seconds while the host
# migrates the VM to another QEMU with its own vhost-user-net. Results on ttyS1: PHASE lines for
# the host, CHECK and INFO lines, and RESULT PASS|FAIL. Pings lost during the switch-over are
# counted and must stay within `max_lost`; both streams must complete (the host compares byte
# counts and the SHA-256 of what it sent).
set -u
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
IP=/usr/sbin/ip
DEV=eth0
FWCFG=/sys/firmware/qemu_fw_cfg/by_name/opt/outboard
STREAM_PORT=5001
PULL_PORT=5002

if [ -c /dev/ttyS1 ]; then
    stty -F /dev/ttyS1 raw -echo 2>/dev/null
    exec 3>/dev/ttyS1
else
    exec 3>/dev/null
fi
FAILS=0
PASSES=0
out()  { echo "$*"; echo "$*" >&3; }
pass() { PASSES=$((PASSES + 1)); out "CHECK $1 PASS ${2:-}"; }
fail() { FAILS=$((FAILS + 1)); out "CHECK $1 FAIL ${2:-}"; }
fwcfg() { if [ -r "$FWCFG/$1/raw" ]; then cat "$FWCFG/$1/raw"; else echo "${2:-}"; fi; }
finish() {
    n=$(dmesg | grep -cE 'virtio_net.*(error|fail|[Bb]roken)|NETDEV WATCHDOG|BUG:|WARNING:|Call Trace|Oops:|bad used')
    if [ "$n" -eq 0 ]; then pass kernel_log "clean"; else fail kernel_log "suspicious_lines=$n"; fi
    if [ "$FAILS" -eq 0 ] && [ "$PASSES" -gt 0 ]; then out "RESULT PASS"; else out "RESULT FAIL"; fi
    sync
    poweroff -f
}

MYIP=$(fwcfg ip "")
PEER=$(fwcfg peer_ip "")
DURATION=$(fwcfg duration 40)
MAX_LOST=$(fwcfg max_lost 25)
[ -n "$MYIP" ] && [ -n "$PEER" ] || { fail setup "fw_cfg ip/peer_ip missing"; finish; }

i=0
while [ ! -e /sys/class/net/$DEV ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /sys/class/net/$DEV ] || { fail device "no $DEV after 10 s"; finish; }
$IP link set lo up
$IP link set $DEV up
$IP addr add "$MYIP/24" dev $DEV
i=0
while ! ping -c 1 -W 1 "$PEER" >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -lt 60 ] || { fail reach "$PEER never answered"; finish; }
done
pass reach "$PEER answers after $i tries"
out "INFO channels $(/usr/sbin/ethtool -l $DEV 2>/dev/null | awk '$1 == "Combined:" {printf "%s ", $2}')"

COUNT=$((DURATION * 5))
END=$(( $(cut -d. -f1 /proc/uptime) + DURATION ))
ping -i 0.2 -c $COUNT -W 2 "$PEER" >/tmp/ping.out 2>&1 &
PING_PID=$!
(
    n=0
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$END" ]; do
        head -c 4096 /dev/zero
        sleep 0.05
        n=$((n + 1))
    done
    echo $n >/tmp/chunks
) | nc "$PEER" $STREAM_PORT >/dev/null 2>/tmp/nc.err &
NC_PID=$!
# The peer closes after `duration` seconds; nc exits at the peer's EOF. Its stdin must stay
# open meanwhile (busybox nc stops at its own stdin's EOF): a fifo a sleeping writer holds
# (not a pipeline, which `wait` would wait for as a whole).
mkfifo /tmp/hold
sleep $((DURATION + 120)) >/tmp/hold &
HOLD_PID=$!
nc "$PEER" $PULL_PORT </tmp/hold >/tmp/pull.bin 2>/tmp/pull.err &
PULL_PID=$!
out "PHASE traffic_running"
wait $NC_PID
NC_RC=$?
wait $PULL_PID
PULL_RC=$?
kill $HOLD_PID 2>/dev/null
wait $PING_PID
SENT=$(awk '/packets transmitted/ {print $1}' /tmp/ping.out)
RECV=$(awk '/packets transmitted/ {print $4}' /tmp/ping.out)
LOST=$(( ${SENT:-0} - ${RECV:-0} ))
out "PHASE traffic_done"
# The sequence numbers that got no reply, as ranges (where in the run the loss was).
GAPS=$(awk -v n=$COUNT '/seq=/ {sub(/.*seq=/, ""); sub(/ .*/, ""); got[$1] = 1}
    END {s = -1; out = ""
        for (i = 0; i <= n; i++) {
            if (i < n && !(i in got)) { if (s < 0) s = i; continue }
            if (s >= 0) { out = out (out == "" ? "" : ",") (s == i - 1 ? s : s "-" (i - 1)); s = -1 }
        }
        print (out == "" ? "none" : out)}' /tmp/ping.out)
out "INFO ping_lost_seqs $GAPS"
out "INFO ping sent=${SENT:-0} received=${RECV:-0} lost=$LOST"
STREAM_BYTES=$(( $(cat /tmp/chunks 2>/dev/null || echo 0) * 4096 ))
out "INFO stream_bytes $STREAM_BYTES"
# Per receive queue, from the driver's counters (with several pairs: which ones carried traffic).
out "INFO rx_queues $(/usr/sbin/ethtool -S $DEV 2>/dev/null | awk '$1 ~ /^rx_queue_[0-9]+_packets:$/ {sub(/:$/, "", $1); printf "%s=%s ", $1, $2}')"
if [ "${SENT:-0}" -eq "$COUNT" ] && [ "$LOST" -le "$MAX_LOST" ]; then
    pass ping_across_migration "lost $LOST of $SENT (at most $MAX_LOST)"
else
    fail ping_across_migration "lost $LOST of ${SENT:-0} (at most $MAX_LOST): $(tail -n 2 /tmp/ping.out | tr '\n' '|')"
fi
out "INFO pull $(stat -c %s /tmp/pull.bin) $(sha256sum </tmp/pull.bin | cut -d' ' -f1)"
if [ "$PULL_RC" -eq 0 ] && [ -s /tmp/pull.bin ]; then
    pass pull_across_migration "$(stat -c %s /tmp/pull.bin) bytes received"
else
    fail pull_across_migration "nc rc $PULL_RC: $(head -c 200 /tmp/pull.err)"
fi
if [ "$NC_RC" -eq 0 ]; then
    pass stream_across_migration "nc rc 0 after $STREAM_BYTES bytes"
else
    fail stream_across_migration "nc rc $NC_RC: $(head -c 200 /tmp/nc.err)"
fi
finish
