#!/bin/sh
# tests/guest/net-guest.sh — runs INSIDE a test guest (busybox sh, as PID 1's
# child) whose only NIC, eth0, is a virtio-net-pci device served by
# vhost-user-net.  Delivered by QEMU as fw_cfg item opt/outboard/script (see
# run-net.sh); the initramfs /init built by setup.sh runs it and powers off.
#
# Roles (fw_cfg opt/outboard/role):
#   a, b  two guests on the two ports of one `vhost-user-net --switch`, running
#         at the same time.  They meet at barriers (one TCP connection to
#         a:6000 per barrier; b retries until a listens, and each side checks
#         the other is at the same one), so neither depends on the other's
#         boot time.  Checks: ping both ways; `ip link set eth0 promisc on`
#         (frames for a foreign unicast address reach the driver); a live MAC
#         change on b (the switch learns the new address and traffic follows
#         it); one TCP stream each way at once, with sha256 on both ends; and
#         with queues >= 2, `ethtool -L eth0 combined 1` then `combined N`,
#         with the per-queue receive counters proving which pairs the
#         backend delivers to.
#   tap   one guest on `vhost-user-net --tap`, the TAP's other end in a network
#         namespace of the host test at opt/outboard/peer_ip (run-net.sh runs
#         the peer's listeners there): ping it, push a stream to it (its
#         sha256 comes back on the same connection), and pull a stream from it
#         (checked against opt/outboard/expect_rx_sha256).
#
# Other fw_cfg strings: ip (this guest's IPv4, /24), peer_ip, queues (the
# device's queue pairs), stream_mib (MiB per stream), new_mac (role b: the
# address to switch to; role a: the address b switches to).
#
# Output protocol, on the second serial port (/dev/ttyS1, a file on the host),
# the same as blk-guest.sh:
#   INFO <key> <value...>           facts, never judged here
#   CHECK <name> PASS|FAIL <detail> one line per check
#   RESULT PASS|FAIL                always the last line
# The stream checksums are also reported as INFO stream_tx_sha256/
# stream_rx_sha256 so that the host compares both ends itself.
#
# Busybox sh prefers its applets over $PATH, so iproute2 and ethtool are
# called by absolute path.  Busybox nc exits when its peer half-closes, so a
# receiver runs `nc -l -e SCRIPT` (the script reads to EOF, then answers with
# the checksum on the same connection).

set -u
export PATH=/sbin:/usr/sbin:/bin:/usr/bin

IP=/usr/sbin/ip
ETHTOOL=/usr/sbin/ethtool
DEV=eth0
FWCFG=/sys/firmware/qemu_fw_cfg/by_name/opt/outboard
BARRIER_PORT=6000
STREAM_PORT=5001
PULL_PORT=5002
SINK_PORT=5003
# Frames sent to an unknown unicast address per probe.
NPROBE=200
BOGUS_IP_SUFFIX=99
BOGUS_MAC=52:54:00:99:99:99
T0=$(cut -d' ' -f1 /proc/uptime)

# --- result channel -----------------------------------------------------------
if [ -c /dev/ttyS1 ]; then
    stty -F /dev/ttyS1 raw -echo 2>/dev/null   # no \n -> \r\n translation
    exec 3>/dev/ttyS1
else
    echo "net-guest: no /dev/ttyS1, results go to the console only"
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
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v t0="$1" '{printf "%.1f", $1 - t0}' /proc/uptime; }
kernel_log_check() {
    # Driver complaints, stalls and splats the checks above may not surface.
    dmesg | grep -E 'virtio_net.*(error|fail|[Bb]roken)|NETDEV WATCHDOG|timed out|BUG:|WARNING:|Call Trace|Oops:|bad used|[Nn]o more buffers' >/tmp/kerr
    n=$(wc -l </tmp/kerr)
    [ "$n" -eq 0 ]
    check kernel_log $? "suspicious_lines=$n$([ "$n" -gt 0 ] && echo ": $(head -n3 /tmp/kerr | tr '\n' '|')")"
}
finish() {
    # Background listeners and probes must not outlive the report.
    for p in $BG_PIDS; do kill "$p" 2>/dev/null; done
    kernel_log_check
    info counters "$(awk -v d="$DEV:" '$1 == d {print "rx_packets=" $3 " rx_bytes=" $2 " rx_drop=" $5 " tx_packets=" $11 " tx_bytes=" $10 " tx_drop=" $13}' /proc/net/dev)"
    info elapsed_s "$(since "$T0")"
    info checks "passed=$PASSES failed=$FAILS"
    if [ "$FAILS" -eq 0 ] && [ "$PASSES" -gt 0 ]; then out "RESULT PASS"; else out "RESULT FAIL"; fi
    sync
    exit 0
}
fwcfg() { if [ -r "$FWCFG/$1/raw" ]; then cat "$FWCFG/$1/raw"; else echo "${2:-}"; fi; }
rxp() { cat /sys/class/net/$DEV/statistics/rx_packets; }
# Packets received on receive queue $1, from the driver's per-queue counters.
rxq() { $ETHTOOL -S $DEV | awk -v k="rx_queue_$1_packets:" '$1 == k {print $2; found=1} END {if (!found) print 0}'; }
channels() { # current|max -> the "Combined" value of that section of ethtool -l
    $ETHTOOL -l $DEV 2>/dev/null | awk -v want="$1" '
        /^Pre-set maximums/ {s = "max"} /^Current hardware settings/ {s = "current"}
        $1 == "Combined:" && s == want {print $2}'
}
BG_PIDS=""

ROLE=$(fwcfg role "")
MYIP=$(fwcfg ip "")
PEER=$(fwcfg peer_ip "")
QUEUES=$(fwcfg queues 1)
MIB=$(fwcfg stream_mib 64)
NEW_MAC=$(fwcfg new_mac "")
EXPECT_RX=$(fwcfg expect_rx_sha256 "")
NCPU=$(nproc)
info guest "kernel=$(uname -r) cpus=$NCPU mem_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo) role=$ROLE ip=$MYIP peer=$PEER queues=$QUEUES stream_mib=$MIB"
case "$ROLE" in a|b|tap) ;; *) fail setup "unknown role '$ROLE'"; finish;; esac
[ -n "$MYIP" ] && [ -n "$PEER" ] || { fail setup "fw_cfg ip/peer_ip missing"; finish; }
SUBNET=${MYIP%.*}

# --- 1. the device ---------------------------------------------------------------
i=0
while [ ! -e /sys/class/net/$DEV ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -e /sys/class/net/$DEV ]; then
    fail device "no $DEV after 10 s (virtio_net probe failed? see console)"
    finish
fi
DRIVER=$(basename "$(readlink -f /sys/class/net/$DEV/device/driver)")
VDEV=$(basename "$(readlink -f /sys/class/net/$DEV/device)")
MAC0=$(cat /sys/class/net/$DEV/address)
[ "$DRIVER" = virtio_net ]
check device $? "$DEV driver=$DRIVER $VDEV mac=$MAC0 mtu=$(cat /sys/class/net/$DEV/mtu) features=$(cat /sys/class/net/$DEV/device/features)"
info offloads "$($ETHTOOL -k $DEV 2>/dev/null | awk '/^(rx-checksumming|tx-checksumming|tcp-segmentation-offload|generic-receive-offload):/ {printf "%s%s ", $1, $2}')"

$IP link set lo up
$IP link set $DEV up
$IP addr add "$MYIP/24" dev $DEV
i=0
while [ "$(cat /sys/class/net/$DEV/carrier 2>/dev/null)" != 1 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ "$(cat /sys/class/net/$DEV/carrier 2>/dev/null)" = 1 ]
check link_up $? "operstate=$(cat /sys/class/net/$DEV/operstate) carrier=$(cat /sys/class/net/$DEV/carrier 2>/dev/null)"

# --- helpers for the streams -----------------------------------------------------
# The receiving end, run by nc -e with the connection as stdin/stdout: reads to
# EOF, keeps the checksum and answers with it.
cat >/tmp/recv.sh <<'EOF'
#!/bin/sh
sha256sum | cut -d' ' -f1 | tee "/tmp/recv-$NC_PORT.sum"
EOF
chmod +x /tmp/recv.sh
printf '#!/bin/sh\ncat >/dev/null\n' >/tmp/sink.sh
chmod +x /tmp/sink.sh

# listen_stream PORT TIMEOUT: one connection on PORT, its checksum in /tmp/recv-PORT.sum.
listen_stream() {
    rm -f "/tmp/recv-$1.sum"
    NC_PORT=$1 timeout "$2" nc -l -p "$1" -e /tmp/recv.sh >/dev/null 2>&1 &
    LISTEN_PID=$!
    BG_PIDS="$BG_PIDS $LISTEN_PID"
}

# send_stream HOST PORT MIB: MIB MiB of random data to HOST:PORT, whose
# listener answers with the checksum of what it got.  Sets TX_LOCAL,
# TX_PEER, TX_SECS.  Retries a refused connection (listener not up yet).
send_stream() {
    TX_LOCAL=""; TX_PEER=""
    t=$(now)
    attempt=0
    while [ $attempt -lt 20 ]; do
        attempt=$((attempt + 1))
        rm -f /tmp/tx.fifo /tmp/tx.local /tmp/tx.peer
        mkfifo /tmp/tx.fifo
        sha256sum </tmp/tx.fifo | cut -d' ' -f1 >/tmp/tx.local &
        sumpid=$!
        dd if=/dev/urandom bs=64k count=$(($3 * 16)) 2>/dev/null | tee /tmp/tx.fifo |
            timeout 150 nc "$1" "$2" >/tmp/tx.peer 2>/tmp/tx.err
        wait $sumpid
        TX_LOCAL=$(cat /tmp/tx.local)
        TX_PEER=$(cat /tmp/tx.peer 2>/dev/null)
        [ -n "$TX_PEER" ] && break
        grep -q 'refused' /tmp/tx.err || break
        sleep 0.5
    done
    TX_SECS=$(since "$t")
}

rate() { awk -v m="$1" -v s="$2" 'BEGIN {if (s > 0) printf "%.2f", m / s; else print "inf"}'; }

# --- barriers (roles a and b) -------------------------------------------------------
# barrier NAME [TIMEOUT]: returns when both guests reached NAME.  a listens and
# says NAME; b connects (retrying until a listens) and says NAME; each checks
# what the other said.  A failed barrier ends the run: the two are out of step.
barrier() {
    name=$1
    limit=${2:-150}
    got=""
    if [ "$ROLE" = a ]; then
        got=$(echo "$name" | timeout "$limit" nc -l -p $BARRIER_PORT 2>/dev/null)
        rc=$?
        # b's word may be lost if its nc saw our EOF first; b checks ours strictly.
        if [ $rc -eq 0 ] && { [ "$got" = "$name" ] || [ -z "$got" ]; }; then return 0; fi
    else
        t=$(now)
        while :; do
            got=$(echo "$name" | timeout 10 nc "$PEER" $BARRIER_PORT 2>/dev/null)
            [ -n "$got" ] && break
            [ "$(since "$t" | cut -d. -f1)" -ge "$limit" ] && break
            sleep 0.2
        done
        [ "$got" = "$name" ] && return 0
    fi
    fail "barrier_$name" "peer said '${got}' (timeout ${limit}s)"
    finish
}

# probe NAME SENDER_ROLE DST_MAC: SENDER_ROLE sends NPROBE pings to a made-up
# address whose neighbour entry is DST_MAC; both count what they receive in
# between (RXD).  The barriers' own packets add a few.
probe() {
    barrier "$1-start"
    r0=$(rxp)
    if [ "$ROLE" = "$2" ]; then
        $IP neigh replace "$SUBNET.$BOGUS_IP_SUFFIX" lladdr "$3" dev $DEV nud permanent
        ping -q -c $NPROBE -i 0.01 -W 1 "$SUBNET.$BOGUS_IP_SUFFIX" >/dev/null 2>&1
        $IP neigh del "$SUBNET.$BOGUS_IP_SUFFIX" dev $DEV 2>/dev/null
    fi
    barrier "$1-end"
    RXD=$(($(rxp) - r0))
}

# ping_check NAME HOST: 5 echo requests, all answered.
ping_check() {
    ping -c 5 -i 0.2 -W 2 "$2" >/tmp/ping.out 2>&1
    recv=$(awk '/packets received/ {print $4}' /tmp/ping.out)
    [ "${recv:-0}" -eq 5 ]
    check "$1" $? "$2: ${recv:-0}/5 replies $(grep -o 'round-trip.*' /tmp/ping.out)"
}

# wait_reachable HOST SECONDS: until HOST answers a ping (the peer may still be booting).
wait_reachable() {
    t=$(now)
    while ! ping -c 1 -W 1 "$1" >/dev/null 2>&1; do
        [ "$(since "$t" | cut -d. -f1)" -ge "$2" ] && return 1
    done
    info reachable "$1 after $(since "$t") s"
    return 0
}

# =====================================================================================
if [ "$ROLE" = tap ]; then
    # --- TAP: the peer is the host kernel in the test's network namespace ---------------
    wait_reachable "$PEER" 60
    ping_check ping_host "$PEER"

    send_stream "$PEER" $STREAM_PORT "$MIB"
    info stream_tx_sha256 "$TX_LOCAL"
    [ -n "$TX_LOCAL" ] && [ "$TX_LOCAL" = "$TX_PEER" ]
    check stream_to_host $? "${MIB}MiB in ${TX_SECS}s ($(rate "$MIB" "$TX_SECS") MiB/s) sent=$TX_LOCAL host_got=${TX_PEER:-none}"

    t=$(now)
    timeout 150 nc "$PEER" $PULL_PORT </dev/null 2>/tmp/pull.err | sha256sum | cut -d' ' -f1 >/tmp/pull.sum
    got=$(cat /tmp/pull.sum)
    secs=$(since "$t")
    info stream_rx_sha256 "$got"
    [ -n "$EXPECT_RX" ] && [ "$got" = "$EXPECT_RX" ]
    check stream_from_host $? "${MIB}MiB in ${secs}s ($(rate "$MIB" "$secs") MiB/s) got=$got expected=${EXPECT_RX:-none} $(head -c 200 /tmp/pull.err)"
    ping_check ping_host_after "$PEER"
    finish
fi

# =====================================================================================
# --- roles a and b: two guests on one switch ------------------------------------------------
# The persistent sink takes the many short connections of the queue checks.
timeout 600 nc -ll -p $SINK_PORT -e /tmp/sink.sh >/dev/null 2>&1 &
BG_PIDS="$BG_PIDS $!"

if ! wait_reachable "$PEER" 90; then
    fail ping_peer "$PEER never answered within 90 s"
    finish
fi
barrier hello
ping_check ping_peer "$PEER"
PEER_MAC0=$($IP neigh show "$PEER" dev $DEV | awk '{for (i = 1; i < NF; i++) if ($i == "lladdr") print $(i + 1)}')
info peer_mac "$PEER_MAC0"

# --- 2. promiscuous mode -----------------------------------------------------------
# QEMU keeps the control queue to itself, so the backend device never gets the
# receive filter (it receives what a plain switch port would, by design): what
# reaches the driver without promisc is reported, not judged.  With promisc on,
# frames for a foreign unicast address must reach the driver.
probe foreign_off b $BOGUS_MAC
[ "$ROLE" = a ] && info foreign_unicast_without_promisc "$RXD frames arrived of $NPROBE sent to $BOGUS_MAC"
if [ "$ROLE" = a ]; then
    $IP link set $DEV promisc on
    $IP link show $DEV | grep -q PROMISC
    check promisc_flag $? "$($IP link show $DEV | head -n1)"
fi
probe foreign_on b $BOGUS_MAC
if [ "$ROLE" = a ]; then
    [ "$RXD" -ge $NPROBE ]
    check promisc_receives_foreign_unicast $? "$RXD frames arrived of $NPROBE sent to $BOGUS_MAC"
    $IP link set $DEV promisc off
    ! $IP link show $DEV | grep -q PROMISC
    check promisc_off_flag $? "$($IP link show $DEV | head -n1)"
fi

# --- 3. a live MAC change on b ------------------------------------------------------
barrier mac-start
if [ "$ROLE" = b ]; then
    $IP link set $DEV address "$NEW_MAC" 2>/tmp/mac.err
    rc=$?
    now_mac=$(cat /sys/class/net/$DEV/address)
    [ $rc -eq 0 ] && [ "$now_mac" = "$NEW_MAC" ]
    check mac_change $? "$MAC0 -> $now_mac (wanted $NEW_MAC) $(cat /tmp/mac.err)"
    # Tell the neighbours (and the switch) about the new address.
    arping -U -c 2 -I $DEV -s "$MYIP" "$MYIP" >/dev/null 2>&1
fi
barrier mac-done
if [ "$ROLE" = a ]; then
    # Forget b's old address: the next packets ARP for it afresh.
    $IP neigh flush dev $DEV
    ping_check ping_peer_new_mac "$PEER"
    lladdr=$($IP neigh show "$PEER" dev $DEV | awk '{for (i = 1; i < NF; i++) if ($i == "lladdr") print $(i + 1)}')
    [ "$lladdr" = "$NEW_MAC" ]
    check peer_new_mac_learned $? "neighbour $PEER lladdr=$lladdr expected=$NEW_MAC"
fi
barrier mac-pinged
[ "$ROLE" = b ] && ping_check ping_peer_after_mac_change "$PEER"
probe old_mac a "${PEER_MAC0:-$BOGUS_MAC}"
[ "$ROLE" = b ] && info frames_to_old_mac "$RXD arrived of $NPROBE sent to the old address $MAC0"

# --- 4. one TCP stream each way at once, sha256 at both ends --------------------------
listen_stream $STREAM_PORT 170
barrier stream
send_stream "$PEER" $STREAM_PORT "$MIB"
wait "$LISTEN_PID"
RX_SUM=$(cat /tmp/recv-$STREAM_PORT.sum 2>/dev/null)
info stream_tx_sha256 "$TX_LOCAL"
info stream_rx_sha256 "${RX_SUM:-none}"
[ -n "$TX_LOCAL" ] && [ "$TX_LOCAL" = "$TX_PEER" ]
check stream_tx $? "${MIB}MiB to $PEER in ${TX_SECS}s ($(rate "$MIB" "$TX_SECS") MiB/s, the other way at the same time) sent=$TX_LOCAL peer_got=${TX_PEER:-none}"
[ -n "$RX_SUM" ]
check stream_rx $? "received sha256=${RX_SUM:-none} (compared with the sender's by the sender and by the host)"

# --- 5. queue pairs: ethtool -L ------------------------------------------------------------
# mq_round NAME: 16 short TCP connections to the peer's sink (16 flows), then
# the deltas of this guest's per-queue receive counters in RXQ_DELTAS and the
# number of queues that received in RXQ_USED.
mq_round() {
    barrier "$1-start"
    before=""
    q=0
    while [ $q -lt "$QUEUES" ]; do before="$before $(rxq $q)"; q=$((q + 1)); done
    ok=0
    c=0
    while [ $c -lt 16 ]; do
        dd if=/dev/zero bs=16k count=4 2>/dev/null | timeout 20 nc "$PEER" $SINK_PORT >/dev/null 2>&1 && ok=$((ok + 1))
        c=$((c + 1))
    done
    CONNS_OK=$ok
    barrier "$1-end"
    RXQ_DELTAS=""
    RXQ_USED=0
    q=0
    for b in $before; do
        d=$(($(rxq $q) - b))
        RXQ_DELTAS="$RXQ_DELTAS rx$q=$d"
        [ "$d" -gt 0 ] && RXQ_USED=$((RXQ_USED + 1))
        eval "RXQ_$q=$d"
        q=$((q + 1))
    done
}

if [ "$QUEUES" -ge 2 ]; then
    max=$(channels max)
    cur=$(channels current)
    [ "$max" = "$QUEUES" ]
    check channels_max $? "ethtool -l: max combined=$max current=$cur (device has $QUEUES pairs, $NCPU cpus)"

    $ETHTOOL -L $DEV combined 1 2>/tmp/eth.err
    rc=$?
    cur=$(channels current)
    [ $rc -eq 0 ] && [ "$cur" = 1 ]
    check ethtool_combined_1 $? "rc=$rc current=$cur $(cat /tmp/eth.err)"
    mq_round mq1
    [ "$CONNS_OK" -eq 16 ] && [ "$RXQ_0" -gt 0 ] && [ "$RXQ_1" -eq 0 ]
    check mq_one_pair_receives $? "16 connections each way: ${CONNS_OK} completed; receive counters:$RXQ_DELTAS"

    $ETHTOOL -L $DEV combined "$QUEUES" 2>/tmp/eth.err
    rc=$?
    cur=$(channels current)
    [ $rc -eq 0 ] && [ "$cur" = "$QUEUES" ]
    check ethtool_combined_all $? "rc=$rc current=$cur $(cat /tmp/eth.err)"
    mq_round mqall
    [ "$CONNS_OK" -eq 16 ] && [ "$RXQ_USED" -eq "$QUEUES" ]
    check mq_all_pairs_receive $? "16 connections each way: ${CONNS_OK} completed; receive counters:$RXQ_DELTAS"
fi

barrier done
ping_check ping_peer_final "$PEER"
finish
