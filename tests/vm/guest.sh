#!/bin/sh
# Stage 2, PID 1 of the VM, on the overlay root (the host's tree, writable in RAM).
# Mounts what a Kubernetes node with pure cgroup v2 has, runs the command that the host wrote
# to the results share, stores its exit code and output there, and powers off.
# Runs under the host's /bin/sh with the host's tools (mount, ip, modprobe, python).

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RESULTS=/run/kpod-vm

say() { echo "kpod-vm: $*"; }

halt_now() {
    sync
    # busybox's poweroff -f calls reboot(2) directly (the host's poweroff wants systemd).
    # Should it fail, PID 1 exiting panics, which with panic=-1 and -no-reboot also ends qemu.
    busybox poweroff -f
    echo o > /proc/sysrq-trigger
    exit 1
}

fail() {
    say "FAILED: $*"
    halt_now
}

arg() {  # the value of kpod.$1= on the kernel command line
    for word in $(cat /proc/cmdline); do
        case "$word" in
            "kpod.$1="*) echo "${word#kpod.$1=}" ;;
        esac
    done
}

# The checkout this script runs from, and the kernel modules: both must stay visible, so
# no fresh tmpfs goes over a directory that holds them (a CI clone under /tmp, say).
holds_ours() {
    case "$repo/" in "$1"/*) return 0 ;; esac
    case "$modules/" in "$1"/*) return 0 ;; esac
    return 1
}
fresh_tmpfs() {  # DIR MODE
    if holds_ours "$1"; then
        say "$1 holds the repo or the modules: kept from the host (writes go to the overlay)"
    else
        mount -t tmpfs -o "mode=$2" tmpfs "$1"
    fi
}

mount -t proc proc /proc || fail "mount /proc"
repo=$(cd "$(dirname "$0")/../.." && pwd)
modules=$(arg modules)
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
fresh_tmpfs /run 0755
fresh_tmpfs /tmp 1777

# Pure cgroup v2 at the usual place, with the controllers a kubelet enables.
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || fail "mount cgroup2"
echo "+io +memory +cpu +pids" > /sys/fs/cgroup/cgroup.subtree_control || fail "enable cgroup controllers"
mount -t bpf bpf /sys/fs/bpf || fail "mount bpffs"
mount -t tracefs tracefs /sys/kernel/tracing || fail "mount tracefs"
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

# The results share: the only place where the guest writes to the host.
mkdir -p "$RESULTS"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none results "$RESULTS" \
    || fail "mount the results share"

# This kernel's modules (the host has none for it): modprobe, and the kernel's own module
# requests (veth, crc32c for ext4...), find them at the usual path.
release=$(uname -r)
mkdir -p "/lib/modules/$release"
mount --bind "$modules" "/lib/modules/$release" || fail "bind-mount modules from $modules"
modprobe -a virtio_blk ext4 loop veth || fail "modprobe"

# The raw disk image as vda, ext4: real io.stat for a real block device.  /var/tmp lives on
# it too, so tests that need page-cache pages they can drop (major faults) get a disk-backed
# filesystem: the overlay's upper layer is tmpfs.
mkdir -p /mnt/data
for _ in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done
mount -o noatime /dev/vda /mnt/data || fail "mount /dev/vda"
mkdir -p /mnt/data/var-tmp
chmod 1777 /mnt/data/var-tmp
if holds_ours /var/tmp; then
    say "/var/tmp holds the repo or the modules: not moved to the disk"
else
    mount --bind /mnt/data/var-tmp /var/tmp
fi

ip link set lo up || fail "lo up"
hostname kpod-vm

say "kernel $release, $(nproc) CPUs, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo), up $(cut -d' ' -f1 /proc/uptime) s"
[ -r "$RESULTS/cmd" ] || fail "no command in the results share"
say "running: $(tail -n 1 "$RESULTS/cmd")"
if [ -e "$RESULTS/interactive" ]; then
    # The console as the command's controlling terminal (job control, Ctrl-C), no tee.
    setsid -c -w sh "$RESULTS/cmd" < /dev/console > /dev/console 2>&1
    echo $? > "$RESULTS/rc.tmp"
else
    # The command's output goes to the console (the host shows it live) and to output.log.
    { sh "$RESULTS/cmd" < /dev/null; echo $? > "$RESULTS/rc.tmp"; } 2>&1 | tee "$RESULTS/output.log"
fi
mv "$RESULTS/rc.tmp" "$RESULTS/rc"
say "command exited $(cat "$RESULTS/rc"), up $(cut -d' ' -f1 /proc/uptime) s"
umount /mnt/data 2>/dev/null
umount "$RESULTS"
halt_now
