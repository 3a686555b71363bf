#!/usr/bin/env bash
# tests/guest/setup.sh — prepare everything the real-guest tests need.
#
# Idempotent: every stage leaves a stamp file in the asset dir and is skipped
# when its stamp matches, so a second run takes well under a second and does
# not touch the network.  Needs root (apt-get) on Debian 12 (bookworm).
#
# What it produces in the asset dir (default /var/cache/outboard-guest,
# override with OUTBOARD_GUEST_DIR):
#   qemu/                  dpkg -x of qemu-system-x86 7.2 + friends (bookworm)
#   firmware/              flat folder for `qemu -L` (bios-256k.bin, ROMs, ...)
#   kernel/                dpkg -x of linux-image-6.1.0-*-amd64
#   vmlinuz                the guest kernel
#   initramfs.cpio.gz      busybox + fio + e2fsprogs + ip + ethtool + virtio/fw_cfg/ext4 modules
#   env.sh                 shell snippet with the paths above, sourced by run-*.sh
#
# Why not `apt-get install qemu-system-x86`: this machine ships qemu-utils 10
# (qemu-img, qemu-storage-daemon) from bookworm-backports, which
# `Breaks: qemu-system-common (<< 8.0)`; installing bookworm's QEMU 7.2 would
# remove it.  So the QEMU debs are downloaded and unpacked into our own folder,
# and only the plain runtime libraries it links against are apt-installed.
#
# Environment knobs:
#   OUTBOARD_GUEST_DIR      asset dir (default /var/cache/outboard-guest)
#   OUTBOARD_GUEST_REFRESH  =1 to redo every stage (re-download, rebuild)
#   OUTBOARD_GUEST_NO_APT_LIBS =1 never apt-install QEMU's runtime libs; unpack
#                           them into the asset dir instead (LD_LIBRARY_PATH)
set -euo pipefail

ASSET_DIR="${OUTBOARD_GUEST_DIR:-/var/cache/outboard-guest}"
REFRESH="${OUTBOARD_GUEST_REFRESH:-0}"
NO_APT_LIBS="${OUTBOARD_GUEST_NO_APT_LIBS:-0}"
SCRIPT_PATH="$(readlink -f "${BASH_SOURCE[0]}")"

export DEBIAN_FRONTEND=noninteractive
# apt-get download as root into a root-owned dir otherwise warns about _apt.
APT_OPTS=(-q -o APT::Sandbox::User=root)

log() { printf '[setup %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (apt-get, dpkg)"
command -v apt-get >/dev/null || die "apt-get not found: Debian 12 expected"

mkdir -p "$ASSET_DIR"
ASSET_DIR="$(readlink -f "$ASSET_DIR")"

# One setup at a time per asset dir (parallel CI jobs, two terminals, ...).
exec 9>"$ASSET_DIR/.lock"
flock 9

T_START=$SECONDS

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

# apt-get update at most once per run, and only if some stage needs apt.
APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        apt-get "${APT_OPTS[@]}" update >/dev/null
        APT_UPDATED=1
    fi
}

# is_installed PKG -> 0 if dpkg says "install ok installed"
is_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

# apt_install_missing PKG... : install only those not yet installed, never
# upgrading what is there.  Refuses (returns 1) if apt would remove anything.
apt_install_missing() {
    local missing=() p
    for p in "$@"; do is_installed "$p" || missing+=("$p"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    apt_update_once
    local sim
    sim="$(apt-get "${APT_OPTS[@]}" install -s --no-install-recommends --no-upgrade "${missing[@]}" 2>&1)" \
        || { log "apt-get simulation failed for: ${missing[*]}"; printf '%s\n' "$sim" >&2; return 1; }
    if grep -q '^Remv' <<<"$sim"; then
        log "refusing to apt-install ${missing[*]}: it would remove:"
        grep '^Remv' <<<"$sim" >&2
        return 1
    fi
    log "apt-get install ${missing[*]}"
    apt-get "${APT_OPTS[@]}" install -y --no-install-recommends --no-upgrade "${missing[@]}" >/dev/null
}

# stamp_ok FILE CONTENT -> 0 if FILE holds exactly CONTENT (and no refresh)
stamp_ok() { [[ $REFRESH != 1 && -f $1 && "$(cat "$1")" == "$2" ]]; }

# candidate_version PKG -> apt's candidate version (needs apt lists)
candidate_version() {
    apt-cache policy "$1" | awk '/Candidate:/ {print $2; exit}'
}

# ---------------------------------------------------------------------------
# 1. host tools (used to build the initramfs, and copied into it)
# ---------------------------------------------------------------------------
# iproute2 and ethtool: the net guest's `ip` (netns-free, but busybox's lacks
# `promisc`/`address` details) and `ethtool -L/-l/-S`; the host tests use `ip netns` too.
HOST_PKGS=(busybox-static fio e2fsprogs cpio gzip xz-utils zstd kmod coreutils util-linux
           iproute2 ethtool)
apt_install_missing "${HOST_PKGS[@]}" || die "cannot install host tools"
for t in busybox fio mke2fs e2fsck cpio gzip xz zstd depmod modprobe ldd flock timeout ip ethtool; do
    command -v "$t" >/dev/null || die "tool '$t' missing after install"
done

# ---------------------------------------------------------------------------
# 2. QEMU 7.2 from bookworm, unpacked (not installed)
# ---------------------------------------------------------------------------
QEMU_ROOT="$ASSET_DIR/qemu"
FW_DIR="$ASSET_DIR/firmware"
QEMU_LIBS="$ASSET_DIR/qemu-libs"        # only used in the NO_APT_LIBS fallback
QEMU_BIN="$QEMU_ROOT/usr/bin/qemu-system-x86_64"
QEMU_MODDIR="$QEMU_ROOT/usr/lib/x86_64-linux-gnu/qemu"
QEMU_STAMP="$QEMU_ROOT/.stamp"

if [[ -f $QEMU_STAMP && $REFRESH != 1 && -x $QEMU_BIN ]]; then
    log "qemu: already unpacked ($(cat "$QEMU_STAMP"))"
else
    apt_update_once
    qver="$(candidate_version qemu-system-x86)"
    [[ -n $qver && $qver != "(none)" ]] || die "no candidate for qemu-system-x86"
    case "$qver" in
        1:7.*) ;;
        *) log "warning: qemu-system-x86 candidate is $qver (expected bookworm 7.2)";;
    esac
    log "qemu: downloading qemu-system-x86 $qver and firmware debs"
    rm -rf "$QEMU_ROOT" "$FW_DIR" "$ASSET_DIR/debs/qemu"
    mkdir -p "$ASSET_DIR/debs/qemu" "$QEMU_ROOT"
    # qemu-system-common must match qemu-system-x86 exactly; the arch:all data
    # package has its own version string (no binNMU suffix) so use candidates.
    ( cd "$ASSET_DIR/debs/qemu" &&
      apt-get "${APT_OPTS[@]}" download "qemu-system-x86=$qver" "qemu-system-common=$qver" \
          qemu-system-data seabios ipxe-qemu >/dev/null )
    for deb in "$ASSET_DIR"/debs/qemu/*.deb; do
        dpkg -x "$deb" "$QEMU_ROOT"
    done
    [[ -x $QEMU_BIN ]] || die "qemu-system-x86_64 not found after unpacking"
    # Flat firmware folder for -L: the Debian binary has a compiled-in search
    # path (/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu) that points
    # at the (uninstalled) system locations; -L takes one folder, so merge.
    # cp -L resolves the packages' relative symlinks (vgabios.bin -> ...).
    mkdir -p "$FW_DIR"
    cp -rL "$QEMU_ROOT"/usr/share/qemu/. "$FW_DIR"/
    cp -L "$QEMU_ROOT"/usr/share/seabios/* "$FW_DIR"/
    cp -L "$QEMU_ROOT"/usr/lib/ipxe/qemu/* "$FW_DIR"/
    [[ -f $FW_DIR/bios-256k.bin && -f $FW_DIR/kvmvapic.bin && -f $FW_DIR/linuxboot_dma.bin ]] \
        || die "firmware folder incomplete"
    echo "qemu-system-x86 $qver" >"$QEMU_STAMP"
fi

# Runtime libraries.  qemu-system-x86's Depends minus the QEMU/firmware
# packages we unpacked; most are already present, a handful (libcapstone4,
# libfdt1, libslirp0, libvdeplug2, libpmem1, librdmacm1, libibverbs1) are not.
qemu_lib_pkgs() {
    dpkg-deb -f "$ASSET_DIR"/debs/qemu/qemu-system-x86_*.deb Depends |
        tr ',' '\n' | sed -E 's/^ *//; s/ .*//; s/\|.*//' |
        grep -vE '^(qemu-system-common|qemu-system-data|seabios|ipxe-qemu)$' | grep -v '^$'
}

# List libs QEMU (binary + the TCG accel module it dlopens) cannot resolve.
qemu_missing_libs() {
    local ldp="${1:-}"
    { LD_LIBRARY_PATH="$ldp" ldd "$QEMU_BIN"
      LD_LIBRARY_PATH="$ldp" ldd "$QEMU_MODDIR/accel-tcg-x86_64.so"; } 2>/dev/null |
        awk '/not found/ {print $1}' | sort -u
}

# A previous fallback run's unpacked libs count as present.
QEMU_LD_PATH=""
lib_dirs() { echo "$QEMU_LIBS/usr/lib/x86_64-linux-gnu:$QEMU_LIBS/lib/x86_64-linux-gnu"; }
[[ -d $QEMU_LIBS ]] && QEMU_LD_PATH="$(lib_dirs)"
if [[ -n "$(qemu_missing_libs "$QEMU_LD_PATH")" ]]; then
    mapfile -t LIBPKGS < <(qemu_lib_pkgs)
    if [[ $NO_APT_LIBS != 1 ]] && apt_install_missing "${LIBPKGS[@]}"; then
        :
    else
        # Fallback: unpack the missing lib packages, and the not-installed
        # packages they depend on (first alternative of each Depends, walked
        # to a fixed point), next to QEMU; LD_LIBRARY_PATH points there.
        log "qemu: unpacking runtime libs into $QEMU_LIBS instead of installing"
        apt_update_once
        rm -rf "$QEMU_LIBS" "$ASSET_DIR/debs/qemu-libs"
        mkdir -p "$QEMU_LIBS" "$ASSET_DIR/debs/qemu-libs"
        declare -A seen=()
        todo=()
        for p in "${LIBPKGS[@]}"; do is_installed "$p" || { todo+=("$p"); seen[$p]=1; }; done
        while [[ ${#todo[@]} -gt 0 ]]; do
            ( cd "$ASSET_DIR/debs/qemu-libs" && apt-get "${APT_OPTS[@]}" download "${todo[@]}" >/dev/null )
            next=()
            for p in "${todo[@]}"; do
                debs=("$ASSET_DIR"/debs/qemu-libs/"${p}"_*.deb)
                deb="${debs[0]}"
                dpkg -x "$deb" "$QEMU_LIBS"
                while read -r d; do
                    [[ -n $d && -z ${seen[$d]:-} ]] || continue
                    seen[$d]=1
                    is_installed "$d" || next+=("$d")
                done < <(dpkg-deb -f "$deb" Pre-Depends Depends | sed 's/^[A-Za-z-]*: //' |
                         tr ',' '\n' | sed -E 's/\|.*//; s/\(.*//; s/:any//; s/^ +//; s/ +$//')
            done
            todo=("${next[@]}")
        done
        QEMU_LD_PATH="$(lib_dirs)"
    fi
fi
unresolved="$(qemu_missing_libs "$QEMU_LD_PATH")"
[[ -z $unresolved ]] || die "qemu still misses libraries: $unresolved"
# QEMU 7.2 in Debian is built with modules: TCG itself is accel-tcg-x86_64.so.
# QEMU_MODULE_DIR makes it load ours, never a system QEMU's (other version).
LD_LIBRARY_PATH="$QEMU_LD_PATH" QEMU_MODULE_DIR="$QEMU_MODDIR" "$QEMU_BIN" --version | head -1 >&2 \
    || die "qemu-system-x86_64 does not start"
LD_LIBRARY_PATH="$QEMU_LD_PATH" QEMU_MODULE_DIR="$QEMU_MODDIR" "$QEMU_BIN" -accel help 2>&1 | grep -qw tcg \
    || die "qemu-system-x86_64 has no TCG accelerator (module dir $QEMU_MODDIR)"

# ---------------------------------------------------------------------------
# 3. guest kernel: whatever linux-image-amd64 (bookworm) depends on
# ---------------------------------------------------------------------------
KROOT="$ASSET_DIR/kernel"
KSTAMP="$KROOT/.stamp"
if [[ -f $KSTAMP && $REFRESH != 1 && -f $ASSET_DIR/vmlinuz ]]; then
    KVER="$(cat "$KSTAMP")"
    log "kernel: already unpacked ($KVER)"
else
    apt_update_once
    kpkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
    [[ -n $kpkg ]] || die "cannot find the kernel package linux-image-amd64 depends on"
    KVER="${kpkg#linux-image-}"
    log "kernel: downloading $kpkg"
    rm -rf "$KROOT" "$ASSET_DIR/debs/kernel"
    mkdir -p "$KROOT" "$ASSET_DIR/debs/kernel"
    ( cd "$ASSET_DIR/debs/kernel" && apt-get "${APT_OPTS[@]}" download "$kpkg" >/dev/null )
    dpkg -x "$ASSET_DIR"/debs/kernel/"$kpkg"_*.deb "$KROOT"
    # usr-merged or not: modules live in lib/modules or usr/lib/modules.
    if [[ ! -d $KROOT/lib/modules/$KVER && -d $KROOT/usr/lib/modules/$KVER ]]; then
        mkdir -p "$KROOT/lib"; ln -s ../usr/lib/modules "$KROOT/lib/modules"
    fi
    # The deb does not ship modules.dep (postinst runs depmod): make it.
    depmod -b "$KROOT" "$KVER"
    cp "$KROOT/boot/vmlinuz-$KVER" "$ASSET_DIR/vmlinuz"
    # The deb stays in debs/kernel (70 MB) only until unpacked.
    rm -rf "$ASSET_DIR/debs/kernel"
    echo "$KVER" >"$KSTAMP"
fi

# ---------------------------------------------------------------------------
# 4. initramfs
# ---------------------------------------------------------------------------
INITRD="$ASSET_DIR/initramfs.cpio.gz"
ISTAMP="$ASSET_DIR/.stamp-initramfs"
# Modules to load (modprobe --show-depends adds their deps and softdeps in
# load order): PCI transport + block and net drivers (virtio_net pulls in
# net_failover and failover) + fw_cfg (test script) + ext4.
GUEST_MODULES=(virtio_pci virtio_blk virtio_net qemu_fw_cfg ext4)
# Dynamically linked tools copied with their libraries.
# util-linux blkdiscard: busybox's lacks -z (BLKZEROOUT -> WRITE_ZEROES).
# iproute2 ip and ethtool for the net guest (net-guest.sh calls them by path).
GUEST_TOOLS=(/usr/bin/fio /sbin/mke2fs /sbin/e2fsck /sbin/blkdiscard /usr/sbin/ip /usr/sbin/ethtool)

pkgver() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo none; }
ikey="$(
    {
        echo "kernel $KVER"
        for p in busybox-static fio e2fsprogs util-linux iproute2 ethtool libc6; do echo "$p $(pkgver "$p")"; done
        sha256sum "$SCRIPT_PATH" | cut -d' ' -f1   # the build recipe itself
    } | sha256sum | cut -d' ' -f1
)"

if stamp_ok "$ISTAMP" "$ikey" && [[ -f $INITRD ]]; then
    log "initramfs: up to date"
else
    log "initramfs: building for kernel $KVER"
    STAGE="$(mktemp -d "$ASSET_DIR/.initramfs-stage.XXXXXX")"
    trap 'rm -rf "$STAGE"' EXIT
    mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,root,lib/modules,etc/outboard}

    # busybox + applet symlinks (skipping names that real tools take).
    cp "$(command -v busybox)" "$STAGE/bin/busybox"
    if ldd "$STAGE/bin/busybox" >/dev/null 2>&1; then die "busybox is not static (busybox-static?)"; fi
    for a in $("$STAGE/bin/busybox" --list); do
        case "$a" in busybox|mke2fs|mkfs.ext2|mkfs.ext4|e2fsck|fsck.ext4|blkdiscard) continue;; esac
        [[ -e $STAGE/bin/$a ]] || ln -s busybox "$STAGE/bin/$a"
    done

    # Dynamic tools at their host paths, plus every library ldd lists, also at
    # its host path (keeps RUNPATH subdirs such as .../ceph/ working).
    copy_with_libs() {
        local bin="$1" dest lib
        dest="$STAGE$bin"
        mkdir -p "$(dirname "$dest")"
        cp -L "$bin" "$dest"
        # ldd lines: "libx.so => /path (0x..)" or "/lib64/ld-linux-x86-64.so.2 (0x..)"
        while read -r lib; do
            [[ -n $lib && -e $lib ]] || continue
            [[ -e $STAGE$lib ]] && continue
            mkdir -p "$STAGE$(dirname "$lib")"
            cp -L "$lib" "$STAGE$lib"
        done < <(ldd "$bin" | awk '/=>/ {print $3; next} /^[[:space:]]*\// {print $1}')
        if ldd "$bin" | grep -q 'not found'; then die "ldd: $bin has unresolved libraries"; fi
    }
    # On usr-merged hosts ldd may print /lib/... (a symlink to usr/lib); in
    # the initramfs those are real dirs, which the loader searches by default.
    for t in "${GUEST_TOOLS[@]}"; do
        [[ -x $t ]] || t="$(command -v "$(basename "$t")")"
        copy_with_libs "$t"
    done
    # Make the tools reachable under the usual names.
    [[ -e $STAGE/sbin/mkfs.ext4 ]] || ln -s mke2fs "$STAGE/sbin/mkfs.ext4"
    [[ -e $STAGE/sbin/fsck.ext4 ]] || ln -s e2fsck "$STAGE/sbin/fsck.ext4"
    [[ -e $STAGE/usr/bin/fio ]] || die "fio missing from initramfs"
    # mke2fs defaults (ext4 feature set); without it mke2fs uses odd fallbacks.
    [[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$STAGE/etc/"
    # The dynamic loader cache is not needed (default dirs + RUNPATH), but an
    # empty ld.so.conf keeps ldconfig-less loaders quiet.
    : >"$STAGE/etc/ld.so.conf"
    echo "root:x:0:0:root:/root:/bin/sh" >"$STAGE/etc/passwd"
    echo "root:x:0:" >"$STAGE/etc/group"

    # Kernel modules in load order, flat in /lib/modules, decompressed.
    : >"$STAGE/etc/outboard/modules"
    for m in "${GUEST_MODULES[@]}"; do
        modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
    done | awk '!seen[$0]++' | while read -r ko; do
        name="$(basename "$ko")"
        case "$name" in
            *.ko.xz)  name="${name%.xz}";  xz -dc "$ko" >"$STAGE/lib/modules/$name";;
            *.ko.zst) name="${name%.zst}"; zstd -qdc "$ko" >"$STAGE/lib/modules/$name";;
            *.ko.gz)  name="${name%.gz}";  gzip -dc "$ko" >"$STAGE/lib/modules/$name";;
            *.ko)     cp "$ko" "$STAGE/lib/modules/$name";;
            *) die "unexpected module file $ko";;
        esac
        echo "$name" >>"$STAGE/etc/outboard/modules"
    done
    [[ -s $STAGE/etc/outboard/modules ]] || die "no kernel modules resolved"
    echo "$KVER" >"$STAGE/etc/outboard/kernel"

    # /init: PID 1.  Loads modules, fetches the test script from fw_cfg, runs
    # it, powers off.  Anything going wrong still ends in poweroff (or, if
    # init itself dies, in a panic that panic=-1 + -no-reboot turn into exit).
    cat >"$STAGE/init" <<'INIT'
#!/bin/busybox sh
# Outboard guest init (generated by tests/guest/setup.sh).
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
mount -t tmpfs tmpfs /tmp
echo "init: kernel $(uname -r), $(nproc) cpus, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"

for m in $(cat /etc/outboard/modules); do
    insmod "/lib/modules/$m" 2>/tmp/insmod.err || {
        # "File exists" = built in or already loaded: fine.
        grep -q 'exists' /tmp/insmod.err || echo "init: insmod $m failed: $(cat /tmp/insmod.err)"
    }
done

SCRIPT_FW=/sys/firmware/qemu_fw_cfg/by_name/opt/outboard/script/raw
i=0
while [ ! -r "$SCRIPT_FW" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if [ -r "$SCRIPT_FW" ]; then
    cat "$SCRIPT_FW" >/tmp/outboard-test.sh
    echo "init: running test script ($(wc -c </tmp/outboard-test.sh) bytes)"
    sh /tmp/outboard-test.sh
    echo "init: test script exited with $?"
else
    echo "init: no test script at $SCRIPT_FW"
    [ -c /dev/ttyS1 ] && echo "RESULT FAIL no-test-script" >/dev/ttyS1
fi
sync
echo "init: powering off"
poweroff -f
# Not reached; if it is, exiting PID 1 panics and panic=-1 ends QEMU.
sleep 5
INIT
    chmod 755 "$STAGE/init"

    # cpio newc + gzip (the kernel unpacks gzip fast; level 6 is a fair trade).
    ( cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet ) |
        gzip -6 >"$INITRD.tmp"
    mv "$INITRD.tmp" "$INITRD"
    rm -rf "$STAGE"; trap - EXIT
    echo "$ikey" >"$ISTAMP"
    log "initramfs: $(du -h "$INITRD" | cut -f1) written"
fi

# ---------------------------------------------------------------------------
# 5. env.sh for the run scripts
# ---------------------------------------------------------------------------
cat >"$ASSET_DIR/env.sh.tmp" <<EOF
# Generated by tests/guest/setup.sh — paths of the real-guest test assets.
OUTBOARD_QEMU='$QEMU_BIN'
OUTBOARD_QEMU_MODULE_DIR='$QEMU_MODDIR'
OUTBOARD_QEMU_LD_PATH='$QEMU_LD_PATH'
OUTBOARD_FIRMWARE_DIR='$FW_DIR'
OUTBOARD_KERNEL='$ASSET_DIR/vmlinuz'
OUTBOARD_KERNEL_VERSION='$KVER'
OUTBOARD_INITRD='$INITRD'
EOF
mv "$ASSET_DIR/env.sh.tmp" "$ASSET_DIR/env.sh"

log "done in $((SECONDS - T_START)) s"
cat <<EOF
asset dir:  $ASSET_DIR
qemu:       $QEMU_BIN
module dir: $QEMU_MODDIR
firmware:   $FW_DIR
kernel:     $ASSET_DIR/vmlinuz ($KVER)
initramfs:  $INITRD
env:        $ASSET_DIR/env.sh
EOF
