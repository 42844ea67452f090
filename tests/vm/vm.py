#!/usr/bin/env python3
"""Run a command inside Debian's 6.1 kernel under qemu (TCG), on the host's own root filesystem.

    tests/vm/vm.py prepare                 # idempotent: packages, kernel, modules, initramfs
    tests/vm/vm.py run [options] -- CMD..  # boot, run CMD in the current directory, power off

Why this shape (docs/VM.md has the whole story):
* The guest's root is the host's "/" over 9p, read-only, under a tmpfs overlay: the guest runs
  the same Python, venv and repo checkout at the same paths as the host, and cannot write to
  the host.  The only writable share is a per-run results directory.
* The kernel comes from `apt-get download` + `dpkg-deb -x` into build/vm/: nothing is installed
  as a boot kernel, nothing outside the build directory is changed.
* The initramfs is written here as a cpio archive by Python, so building it needs no root, no
  device nodes on disk and no cpio tool: busybox, the few modules needed to reach the 9p root,
  and tests/vm/init.sh.  Everything after that (cgroup2, bpffs, the disk...) is done by
  tests/vm/guest.sh, which is read from the host tree at boot, so editing it needs no rebuild.

Only the standard library: this runs before the venv exists, and under any python3.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD = Path(os.environ.get("KPOD_VM_BUILD", REPO / "build" / "vm"))
KERNEL_ROOT = BUILD / "kernel"  # the extracted linux-image package (boot/, lib/modules/)
INITRAMFS = BUILD / "initramfs.cpio.gz"
RUNS = BUILD / "runs"
KEEP_RUNS = 5

# Debian's kernel is mostly modular: these are what /init needs to reach the 9p root and build
# the overlay (config-6.1.0-*-amd64: VIRTIO_PCI, NET_9P*, 9P_FS, OVERLAY_FS are all =m).  The
# rest (virtio_blk, ext4, loop, veth...) is loaded by guest.sh with the host's modprobe, from
# this kernel's module tree bind-mounted at /lib/modules/<release>.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
APT_PACKAGES = ("qemu-system-x86", "busybox-static", "kmod", "e2fsprogs")
KERNEL_META = "linux-image-amd64"  # bookworm's meta package: depends on the current 6.1 ABI
DISK_MIB = 64


def log(message: str) -> None:
    print(f"vm: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ prepare


def _installed(package: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False)
    return "install ok installed" in result.stdout


def ensure_packages(packages: Iterable[str] = APT_PACKAGES) -> None:
    missing = [p for p in packages if not _installed(p)]
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)


def _kernel_package() -> str:
    """linux-image-6.1.0-NN-amd64: pinned by KPOD_VM_KERNEL, else what the meta package wants.

    Following the meta package (rather than pinning an ABI number here) keeps CI working when
    Debian drops an old ABI's package from the mirror at a point release.
    """
    pinned = os.environ.get("KPOD_VM_KERNEL")
    if pinned:
        return pinned
    for attempt in range(2):
        out = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            name = line.strip().removeprefix("Depends:").strip()
            if line.strip().startswith("Depends:") and name.startswith("linux-image-6.1."):
                return name
        if attempt == 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], check=True)
    raise SystemExit(f"vm: cannot tell which kernel {KERNEL_META} depends on (apt-cache depends)")


def kernel_release() -> str | None:
    """The release of the extracted kernel (e.g. 6.1.0-56-amd64), None before `prepare`."""
    modules = KERNEL_ROOT / "lib" / "modules"
    releases = sorted(p.name for p in modules.iterdir()) if modules.is_dir() else []
    for release in releases:
        if (KERNEL_ROOT / "boot" / f"vmlinuz-{release}").exists() and (modules / release / "modules.dep").exists():
            return release
    return None


def ensure_kernel() -> str:
    release = kernel_release()
    if release:
        return release
    package = _kernel_package()
    downloads = BUILD / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    debs = sorted(downloads.glob(f"{package}_*.deb"))
    if not debs:
        log(f"downloading {package}")
        # apt-get download writes into the current directory; as root it would otherwise warn
        # that its _apt sandbox user cannot write to our build directory.
        subprocess.run(
            ["apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", package], cwd=downloads, check=True
        )
        debs = sorted(downloads.glob(f"{package}_*.deb"))
    if not debs:
        raise SystemExit(f"vm: apt-get download {package} produced no .deb in {downloads}")
    staging = BUILD / "kernel.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(staging)], check=True)
    release = next(p.name for p in (staging / "lib" / "modules").iterdir())
    # The package ships no modules.dep (its postinst runs depmod); -b keeps depmod in our tree.
    subprocess.run(["depmod", "-b", str(staging), release], check=True)
    shutil.rmtree(KERNEL_ROOT, ignore_errors=True)
    staging.rename(KERNEL_ROOT)
    # The .deb is no longer needed: the extracted tree is the cache.
    for deb in debs:
        deb.unlink()
    log(f"kernel {release} extracted to {KERNEL_ROOT}")
    return release


def module_load_order(release: str, wanted: Iterable[str]) -> list[Path]:
    """The .ko files for `wanted` and their dependencies, each after what it depends on."""
    base = KERNEL_ROOT / "lib" / "modules" / release
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise SystemExit(f"vm: module {name} not found in {base}/modules.dep (built in? check the config)")
        visit(by_name[key])
    return [base / p for p in order]


def _module_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


class Cpio:
    """A newc ("070701") archive, the format the kernel unpacks as an initramfs.

    Entries are plain headers, so device nodes and root ownership need no privileges here.
    """

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + name.encode() + b"\0")
        self._pad()
        self.out.write(data)
        self._pad()

    def _pad(self) -> None:
        self.out.write(b"\0" * (-self.out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def build_initramfs(release: str) -> bytes:
    archive = Cpio()
    for directory in ("bin", "dev", "proc", "sys", "modules", "ro", "rw", "newroot"):
        archive.directory(directory)
    # The kernel opens /dev/console for /init's stdio before devtmpfs is mounted.
    archive.char_device("dev/console", 5, 1)
    busybox = shutil.which("busybox") or "/bin/busybox"
    archive.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    modules = module_load_order(release, INITRAMFS_MODULES)
    for module in modules:
        archive.file(f"modules/{module.name}", module.read_bytes())
    archive.file("modules/order", "".join(f"{m.name}\n" for m in modules).encode())
    archive.file("init", (HERE / "init.sh").read_bytes(), 0o755)
    return archive.finish()


def ensure_initramfs(release: str) -> Path:
    """Rewrite the initramfs only when its content changes (init.sh, busybox, modules)."""
    data = build_initramfs(release)
    digest = hashlib.sha256(data).hexdigest()
    stamp = BUILD / "initramfs.sha256"
    if INITRAMFS.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return INITRAMFS
    tmp = INITRAMFS.with_suffix(".tmp")
    # mtime=0: the same inputs give the same bytes.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(data)
    tmp.rename(INITRAMFS)
    stamp.write_text(digest + "\n")
    log(f"initramfs written: {INITRAMFS} ({INITRAMFS.stat().st_size // 1024} KiB)")
    return INITRAMFS


def prepare(install: bool = True) -> str:
    BUILD.mkdir(parents=True, exist_ok=True)
    if install:
        ensure_packages()
    release = ensure_kernel()
    ensure_initramfs(release)
    return release


# ---------------------------------------------------------------------------------------- run


@dataclass
class RunResult:
    exit_code: int | None  # the guest command's, None when the guest never reported one
    run_dir: Path
    console: Path
    seconds: float
    timed_out: bool


def make_disk(path: Path, mib: int = DISK_MIB) -> None:
    """A fresh sparse raw image with ext4 on the whole disk (no partition table, like the fixtures)."""
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "kpoddata", str(path)], check=True)


def guest_script(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    """The shell script the guest runs: the command, in `cwd`, with the chosen environment."""
    lines = ["set -u"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines += [f"cd {shlex.quote(str(cwd))}", shlex.join(argv)]
    return "\n".join(lines) + "\n"


def qemu_argv(release: str, run_dir: Path, disk: Path, console: Path, smp: int, memory_mib: int,
              loglevel: int, interactive: bool = False) -> list[str]:  # fmt: skip
    vmlinuz = KERNEL_ROOT / "boot" / f"vmlinuz-{release}"
    cmdline = " ".join(
        (
            "console=ttyS0",
            "panic=-1",  # a guest that dies reboots at once, and -no-reboot turns that into an exit
            f"loglevel={loglevel}",
            # Read by init.sh from /proc/cmdline: stage 2 lives in the host tree.
            f"kpod.guest={HERE / 'guest.sh'}",
            f"kpod.modules={KERNEL_ROOT / 'lib' / 'modules' / release}",
        )
    )
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",  # KVM cannot run this kernel on these hosts (issue 8)
        "-machine", "q35",
        "-cpu", "max",
        "-smp", str(smp),
        "-m", str(memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        # Interactive: the serial line on our terminal (Ctrl-A x quits qemu), still logged.
        *(["-chardev", f"stdio,id=con,mux=on,signal=off,logfile={console}", "-serial", "chardev:con",
           "-mon", "chardev=con"] if interactive else ["-serial", f"file:{console}"]),
        "-kernel", str(vmlinuz),
        "-initrd", str(INITRAMFS),
        "-append", cmdline,
        # multidevs=remap: "/" spans several host filesystems; without it inode numbers can
        # collide in the guest.
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={run_dir},mount_tag=results,security_model=none",
        "-drive", f"file={disk},format=raw,if=virtio,cache=unsafe",
    ]  # fmt: skip


def _prune_runs() -> None:
    """Keep the newest KEEP_RUNS finished runs.  Runs of other sessions may be going on at the
    same time: a run without its "done" marker is left alone unless it is older than a day."""
    runs = sorted(p for p in RUNS.iterdir() if p.is_dir() and not p.is_symlink()) if RUNS.is_dir() else []
    stale = time.time() - 86400
    finished = [p for p in runs if (p / "done").exists() or p.stat().st_mtime < stale]
    for old in finished[:-KEEP_RUNS]:
        shutil.rmtree(old, ignore_errors=True)


class ConsoleTail:
    """Copies what the guest writes to its serial console to our stdout while it runs."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled, self.offset = path, enabled, 0

    def pump(self) -> None:
        if not self.enabled or not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        if chunk:
            # The serial line gives \r\n; a plain \n reads better in a terminal and a CI log.
            sys.stdout.buffer.write(chunk.replace(b"\r\n", b"\n"))
            sys.stdout.flush()


def run(argv: list[str], *, timeout: float, cwd: Path, smp: int = 2, memory_mib: int = 2048,
        stream: bool = True, loglevel: int = 4, env: dict[str, str] | None = None,
        interactive: bool = False) -> RunResult:  # fmt: skip
    release = kernel_release()
    if release is None or not INITRAMFS.exists():
        raise SystemExit("vm: not prepared: run `tests/vm/vm.py prepare` (or `make vm-setup`) first")
    RUNS.mkdir(parents=True, exist_ok=True)
    _prune_runs()
    run_dir = RUNS / time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    run_dir = run_dir.with_name(f"{run_dir.name}-{os.getpid()}")
    run_dir.mkdir()
    # build/vm/runs/last -> this run; replaced atomically, as other runs may do the same.
    link = RUNS / f".last-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(run_dir.name)
    os.replace(link, RUNS / "last")
    console = run_dir / "console.log"
    disk = run_dir / "disk.img"
    make_disk(disk)
    guest_env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "KPOD_IN_VM": "1",  # lets VM-only tests run, and skip elsewhere
        **(env or {}),
    }
    (run_dir / "cmd").write_text(guest_script(argv, cwd, guest_env))
    if interactive:  # guest.sh then gives the command the console as its terminal
        (run_dir / "interactive").touch()
    qemu = qemu_argv(release, run_dir, disk, console, smp, memory_mib, loglevel, interactive)
    (run_dir / "qemu.argv").write_text(shlex.join(qemu) + "\n")
    tail = ConsoleTail(console, stream and not interactive)
    start = time.monotonic()
    proc = subprocess.Popen(
        qemu,
        stdin=None if interactive else subprocess.DEVNULL,
        stdout=None if interactive else subprocess.PIPE,
        stderr=None if interactive else subprocess.STDOUT,
    )
    timed_out = False
    try:
        while proc.poll() is None:
            tail.pump()
            if time.monotonic() - start > timeout:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:  # timed out or interrupted: stop our qemu, by its PID only
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        tail.pump()
        qemu_output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        if qemu_output:
            (run_dir / "qemu.log").write_text(qemu_output)
        disk.unlink(missing_ok=True)  # sparse, but nobody needs it after the run
        (run_dir / "done").touch()  # lets later runs prune this directory
    seconds = time.monotonic() - start
    exit_code: int | None = None
    with contextlib.suppress(OSError, ValueError):
        exit_code = int((run_dir / "rc").read_text().strip())
    return RunResult(exit_code, run_dir, console, seconds, timed_out)


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="install packages, fetch the kernel, build the initramfs (idempotent)")
    prep.add_argument("--no-install", action="store_true", help="do not call apt-get install")
    runp = sub.add_parser("run", help="boot the VM and run a command in it")
    runp.add_argument("--timeout", type=float, default=900, help="seconds before the VM is killed (default 900)")
    runp.add_argument("--smp", type=int, default=2)
    runp.add_argument("--memory", type=int, default=2048, help="MiB")
    runp.add_argument("--quiet", action="store_true", help="do not copy the guest console to stdout")
    runp.add_argument("--loglevel", type=int, default=4, help="kernel console loglevel (7: everything)")
    runp.add_argument("--cwd", default=os.getcwd(), help="directory to run in (same path in the guest)")
    runp.add_argument(
        "--interactive",
        action="store_true",
        help="the guest console on this terminal, e.g. `run --interactive -- bash`",
    )
    runp.add_argument("argv", nargs="+", help="the command (after --)")
    opts = parser.parse_args(args)
    if opts.command == "prepare":
        release = prepare(install=not opts.no_install)
        log(f"ready: kernel {release}, {INITRAMFS}")
        return 0
    result = run(opts.argv, timeout=opts.timeout, cwd=Path(opts.cwd), smp=opts.smp, memory_mib=opts.memory,
                 stream=not opts.quiet, loglevel=opts.loglevel, interactive=opts.interactive)  # fmt: skip
    where = f"console log: {result.console}"
    if result.timed_out:
        log(f"FAILED: timed out after {result.seconds:.0f} s, VM killed; {where}")
        return 124
    if result.exit_code is None:
        log(f"FAILED: the VM stopped after {result.seconds:.0f} s without the command's exit code "
            f"(did not boot, or the guest crashed); {where}")  # fmt: skip
        return 125
    status = "ok" if result.exit_code == 0 else "FAILED"
    log(f"{status}: guest command exited {result.exit_code} after {result.seconds:.0f} s in the VM; {where}")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
