#!/bin/busybox sh
# Stage 1, /init of the VM's initramfs (busybox only): reach the host's root over 9p, put a
# tmpfs overlay on it, and hand over to stage 2 (tests/vm/guest.sh, read from the host tree).
# Anything that can live in stage 2 does, so that changing it needs no initramfs rebuild.

/bin/busybox --install -s /bin
export PATH=/bin

fail() {
    echo "kpod-vm init: FAILED: $*"
    # Power off rather than panic: the host then reports "no exit code" and names the log.
    sync
    poweroff -f
}

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"

# Dependencies first: the order was computed from modules.dep when the initramfs was built.
while read -r module; do
    insmod "/modules/$module" || fail "insmod $module"
done < /modules/order

# The host's "/" read-only.  cache=loose: nothing changes underneath during a run, and Python
# imports stat thousands of files, which is slow without a dentry/attribute cache.
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /ro \
    || fail "mount 9p hostroot"
mount -t tmpfs -o mode=0755 rw /rw || fail "mount tmpfs /rw"
mkdir -p /rw/upper /rw/work

arg() {  # the value of kpod.$1= on the kernel command line
    for word in $(cat /proc/cmdline); do
        case "$word" in
            "kpod.$1="*) echo "${word#kpod.$1=}" ;;
        esac
    done
}
guest=$(arg guest)
rootfs=$(arg rootfs)
[ -n "$guest" ] || fail "no kpod.guest= on the kernel command line"

if [ -z "$rootfs" ]; then
    # Same architecture as the host: the host's own tree is the root.
    mount -t overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
        || fail "mount overlay"
else
    # Another architecture (arm64): its own userland (tests/vm/vm.py ensure_rootfs) is the
    # root; the repo goes over it at its host path, writable in RAM, with the arm64 layer
    # (BPF objects built for arm64) copied over it and the arm64 venv on its .venv.
    repo=$(arg repo)
    layer=$(arg layer)
    venv=$(arg venv)
    mount -t overlay -o "lowerdir=/ro$rootfs,upperdir=/rw/upper,workdir=/rw/work" overlay /newroot \
        || fail "mount overlay on $rootfs"
    mkdir -p /rw/repo-upper /rw/repo-work "/newroot$repo"
    mount -t overlay -o "lowerdir=/ro$repo,upperdir=/rw/repo-upper,workdir=/rw/repo-work" overlay "/newroot$repo" \
        || fail "mount the repo overlay"
    # Copied, not stacked as a second lower layer: the layer lives inside the repo, and
    # overlayfs refuses nested lower directories.
    [ -d "/ro$layer" ] || fail "no arm64 layer at $layer (make bpf-arm64)"
    cp -a "/ro$layer/." "/newroot$repo/" || fail "copy the arm64 layer"
    mkdir -p "/newroot$repo/.venv"
    mount --bind "/ro$venv" "/newroot$repo/.venv" || fail "bind-mount the venv $venv"
fi

[ -r "/newroot$guest" ] || fail "stage 2 $guest not found in the host tree"

umount /proc /sys /dev
exec switch_root /newroot /bin/sh "$guest"
