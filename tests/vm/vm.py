#!/usr/bin/env python3
"""Run a command inside Debian's 6.1 kernel under qemu (TCG): amd64, or arm64 (`--arch arm64`).

    tests/vm/vm.py prepare [--arch A]                 # idempotent: packages, kernel, modules, initramfs
    tests/vm/vm.py run [--arch A] [options] -- CMD..  # boot, run CMD in the current directory, power off

Why this shape (docs/VM.md has the whole story):
* amd64: the guest's root is the host's "/" over 9p, read-only, under a tmpfs overlay: the
  guest runs the same Python, venv and repo checkout at the same paths as the host, and cannot
  write to the host.  The only writable share is a per-run results directory.
* arm64: the host's binaries cannot run there, so the root is an arm64 userland unpacked from
  Debian's arm64 packages (python3.11, libbpf1, bpftool, iproute2, busybox...) under
  build/vm-arm64/rootfs, with the repo overlaid at its host path, an arm64 venv (wheels for
  aarch64 from the package index) over its .venv, and the arm64 BPF objects over its bpf/.
* The kernel comes from `apt-get download` + `dpkg-deb -x` into the build directory: nothing is
  installed as a boot kernel, nothing outside the build directory is changed (arm64 packages
  come through a private apt state, scripts/debian_kernel.py: no `dpkg --add-architecture`).
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
import json
import os
import re
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
sys.path.insert(0, str(REPO / "scripts"))
import debian_kernel  # noqa: E402  (scripts/ is not a package; the path is set just above)

KEEP_RUNS = 5

# Debian's kernel is mostly modular: these are what /init needs to reach the 9p root and build
# the overlay (config-6.1.0-*-{amd64,arm64}: VIRTIO_PCI, NET_9P*, 9P_FS, OVERLAY_FS are all =m;
# arm64's virt machine has its virtio devices on PCI too, PCI_HOST_GENERIC is built in).  The
# rest (virtio_blk, ext4, loop, veth...) is loaded by guest.sh with modprobe, from this
# kernel's module tree at /lib/modules/<release>.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
KERNEL_META = "linux-image-amd64"  # bookworm's meta package: depends on the current 6.1 ABI
DISK_MIB = 64

# The arm64 guest's userland: what guest.sh and the tests run (python3 and the stdlib, libbpf
# for the loader, bpftool and iproute2 for tests, util-linux's setpriv/setsid, mount's
# losetup, kmod's modprobe, coreutils (a `sleep` that can be copied and renamed), clang, gcc
# and libc6-dev (tests compile their C workloads and small BPF programs with clang, as on the
# host, where a missing tool fails a test; libbpf-dev for <bpf/bpf_helpers.h>), e2fsprogs
# (mkfs.ext4 for the mount-namespace test), busybox for the rest).  Their dependencies come along (apt resolves them).
ARM64_USERLAND = ("python3", "python3.11", "libbpf1", "bpftool", "iproute2", "util-linux", "mount", "kmod",
                  "coreutils", "procps", "clang", "gcc", "libc6-dev", "libbpf-dev", "e2fsprogs",
                  "busybox-static")  # fmt: skip
# An AArch32 (armhf) static busybox in the arm64 root, at this path: 32-bit syscalls for the
# compat test (their numbers are the arm table's, not arm64's).
ARMHF_BUSYBOX = "usr/local/bin/busybox-armhf"
# Python packages of the arm64 venv: the agent's dependencies and what the guest's tests import
# (prometheus_client: tests/agent_proc.py parses the agent's scrape with it).
GUEST_TEST_REQUIREMENTS = ("pytest", "prometheus_client")


@dataclass(frozen=True)
class Arch:
    name: str  # Debian's architecture name
    qemu: str
    machine: tuple[str, ...]
    console: str
    host_packages: tuple[str, ...]
    own_userland: bool  # the guest cannot run the host's binaries: it gets its own root


ARCHES = {
    "amd64": Arch(
        "amd64", "qemu-system-x86_64", ("-machine", "q35", "-cpu", "max"), "ttyS0",
        ("qemu-system-x86", "busybox-static", "kmod", "e2fsprogs"), own_userland=False,
    ),
    # pauth-impdef: TCG's pointer authentication with the architected QARMA cipher costs
    # several times more per instruction than the implementation-defined one; the guest
    # cannot tell the difference.
    "arm64": Arch(
        "arm64", "qemu-system-aarch64", ("-machine", "virt", "-cpu", "max,pauth-impdef=on"), "ttyAMA0",
        # busybox-static: the host's busybox lists the applets the arm64 one (same version) has.
        ("qemu-system-arm", "busybox-static", "kmod", "e2fsprogs"), own_userland=True,
    ),
}  # fmt: skip


class Target:
    """Where one architecture's VM lives: build/vm (amd64) or build/vm-arm64."""

    def __init__(self, arch: str = "amd64") -> None:
        self.arch = ARCHES[arch]
        base = Path(os.environ.get("KPOD_VM_BUILD", REPO / "build" / "vm"))
        self.build = base if arch == "amd64" else base.with_name(f"{base.name}-{arch}")
        # amd64: the extracted kernel package; arm64: the whole root, kernel included.
        self.kernel_root = self.build / ("rootfs" if self.arch.own_userland else "kernel")
        self.initramfs = self.build / "initramfs.cpio.gz"
        self.runs = self.build / "runs"
        self.venv = self.build / "venv"  # arm64: mounted over the repo's .venv in the guest
        self.layer = self.build / "layer"  # arm64: laid over the repo (bpf/*.bpf.o for arm64)
        self.btf = self.build / "vmlinux.btf"  # arm64: what `make bpf-arm64` compiles against


def log(message: str) -> None:
    print(f"vm: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ prepare


def _installed(package: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False)
    return "install ok installed" in result.stdout


def ensure_packages(packages: Iterable[str]) -> None:
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


def kernel_release(target: Target) -> str | None:
    """The release of the extracted kernel (e.g. 6.1.0-56-amd64), None before `prepare`."""
    modules = target.kernel_root / "lib" / "modules"
    releases = sorted(p.name for p in modules.iterdir()) if modules.is_dir() else []
    for release in releases:
        vmlinuz = target.kernel_root / "boot" / f"vmlinuz-{release}"
        if vmlinuz.exists() and (modules / release / "modules.dep").exists():
            return release
    return None


def ensure_kernel(target: Target) -> str:
    """amd64: the kernel package alone, extracted into build/vm/kernel (the root is the host's)."""
    release = kernel_release(target)
    if release:
        return release
    package = _kernel_package()
    downloads = target.build / "downloads"
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
    staging = target.build / "kernel.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(staging)], check=True)
    release = next(p.name for p in (staging / "lib" / "modules").iterdir())
    # The package ships no modules.dep (its postinst runs depmod); -b keeps depmod in our tree.
    subprocess.run(["depmod", "-b", str(staging), release], check=True)
    shutil.rmtree(target.kernel_root, ignore_errors=True)
    staging.rename(target.kernel_root)
    # The .deb is no longer needed: the extracted tree is the cache.
    for deb in debs:
        deb.unlink()
    log(f"kernel {release} extracted to {target.kernel_root}")
    return release


# ------------------------------------------------------------------- arm64: a root of its own

ROOTFS_STAMP = ".kpod-rootfs.json"  # what the root was built from: a change rebuilds it
# Minimal /etc: root's name for `id`/getpwuid, localhost for tests' sockets, files-only lookups.
ROOTFS_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
    "etc/hostname": "kpod-vm\n",
}


def merge_usr(root: Path) -> None:
    """/bin, /sbin, /lib as symlinks into /usr, as Debian 12 lays them out (usrmerge).

    Extracting packages does not run base-files' setup, and bookworm's packages still ship
    some files under /bin and /lib: move them where the symlinks will point.
    """
    for name in ("bin", "sbin", "lib"):
        top, usr = root / name, root / "usr" / name
        usr.mkdir(parents=True, exist_ok=True)
        if top.is_symlink():
            continue
        if top.is_dir():
            for entry in top.iterdir():
                dest = usr / entry.name
                if dest.is_dir() and entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, dest, symlinks=True, dirs_exist_ok=True)
                    shutil.rmtree(entry)
                else:
                    entry.replace(dest)
            top.rmdir()
        top.symlink_to(f"usr/{name}")


def busybox_applets() -> list[str]:
    """Where busybox's applets live (usr/bin/awk, sbin/ifconfig...), from the host's busybox.

    Same Debian version as the arm64 one (both bookworm's busybox-static), so the same list;
    the arm64 binary itself cannot run here.
    """
    busybox = shutil.which("busybox") or "/bin/busybox"
    return subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout.split()


def link_busybox(root: Path) -> None:
    """Each applet that no real package provides becomes a link to busybox (sh, mount, awk...)."""
    for applet in busybox_applets():
        name = Path(applet).name
        if any((root / d / name).exists() or (root / d / name).is_symlink() for d in ("usr/bin", "usr/sbin")):
            continue
        (root / "usr" / ("sbin" if "sbin" in applet else "bin") / name).symlink_to("/usr/bin/busybox")


def ensure_rootfs(target: Target) -> str:
    """arm64: Debian's arm64 userland and kernel, unpacked into build/vm-arm64/rootfs."""
    apt = debian_kernel.ForeignApt(target.arch.name, target.build / "apt")
    wanted = {"userland": list(ARM64_USERLAND), "armhf": ARMHF_BUSYBOX}
    stamp = target.kernel_root / ROOTFS_STAMP
    release = kernel_release(target)
    if release and stamp.exists() and all(json.loads(stamp.read_text()).get(k) == v for k, v in wanted.items()):
        return release
    apt.update()
    kernel = apt.kernel_package()
    log(f"downloading {target.arch.name} packages: {' '.join(ARM64_USERLAND)} (+ dependencies), {kernel}")
    debs = apt.download_closure(ARM64_USERLAND)
    debs += apt.download([kernel], target.build / "downloads")
    staging = target.build / "rootfs.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for deb in debs:
        debian_kernel.unpack(deb, staging)
    merge_usr(staging)
    link_busybox(staging)
    for name, text in ROOTFS_ETC.items():
        (staging / name).write_text(text)
    install_armhf_busybox(target, staging / ARMHF_BUSYBOX)
    for directory in ("proc", "sys", "dev", "run", "tmp", "root", "mnt", "var/tmp", "sys/fs/cgroup"):
        (staging / directory).mkdir(parents=True, exist_ok=True)
    (staging / "tmp").chmod(0o1777)
    release = next(p.name for p in (staging / "lib" / "modules").iterdir())
    subprocess.run(["depmod", "-b", str(staging), release], check=True)
    (staging / ROOTFS_STAMP).write_text(json.dumps({**wanted, "kernel": kernel}) + "\n")
    shutil.rmtree(target.kernel_root, ignore_errors=True)
    staging.rename(target.kernel_root)
    for deb in debs:  # the unpacked root is the cache
        deb.unlink()
    log(f"{target.arch.name} root with kernel {release} unpacked to {target.kernel_root}")
    return release


def install_armhf_busybox(target: Target, dest: Path) -> None:
    """Debian's armhf busybox-static (one static binary, no dependencies) at `dest`."""
    armhf = debian_kernel.ForeignApt("armhf", target.build / "apt")
    armhf.update()
    work = target.build / "armhf.tmp"
    shutil.rmtree(work, ignore_errors=True)
    (deb,) = armhf.download(["busybox-static"], work)
    debian_kernel.unpack(deb, work / "root")
    (binary,) = [p for p in (work / "root" / d / "busybox" for d in ("bin", "usr/bin")) if p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, dest)
    shutil.rmtree(work)


def ensure_btf(target: Target, release: str) -> Path:
    """The guest kernel's BTF, carved from its image: `make bpf-arm64` compiles against it."""
    vmlinuz = target.kernel_root / "boot" / f"vmlinuz-{release}"
    if target.btf.exists() and target.btf.stat().st_mtime >= vmlinuz.stat().st_mtime:
        return target.btf
    blob = debian_kernel.kernel_btf(vmlinuz.read_bytes())
    target.btf.write_bytes(blob)
    log(f"{target.btf}: BTF of {release} ({len(blob) // 1024} KiB)")
    return target.btf


def _host_python() -> str:
    venv_python = REPO / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def guest_requirements() -> list[str]:
    """The agent's dependencies (pyproject.toml) and the guest tests', pinned to the versions
    the host's venv has, so that both sides run the same code."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [*project["dependencies"], *GUEST_TEST_REQUIREMENTS]
    freeze = subprocess.run([_host_python(), "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    pins = {line.split("==")[0].lower().replace("_", "-"): line for line in freeze if "==" in line}
    out = []
    for requirement in names:
        name = requirement.split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("_", "-")
        out.append(pins.get(name, requirement))
    return out


def write_console_scripts(site: Path, bin_dir: Path, python: str) -> list[str]:
    """bin/<name> for each console script the distributions in `site` declare, as pip writes them."""
    import configparser

    written = []
    for entry_points in sorted(site.glob("*.dist-info/entry_points.txt")):
        parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]  # names are case-sensitive
        parser.read_string(entry_points.read_text())
        if not parser.has_section("console_scripts"):
            continue
        for name, target in parser.items("console_scripts"):
            module, _, function = target.strip().partition(":")
            script = bin_dir / name
            script.write_text(f"#!{python}\nimport sys\nfrom {module} import {function.strip()}\n"
                              f"if __name__ == '__main__':\n    sys.exit({function.strip()}())\n")  # fmt: skip
            script.chmod(0o755)
            written.append(name)
    return written


def ensure_venv(target: Target) -> Path:
    """arm64: a venv for the guest's python3.11, filled from the host with aarch64 wheels.

    Made by hand (the arm64 interpreter cannot run here): pyvenv.cfg, bin/python pointing at
    the guest's /usr/bin/python3.11, site-packages from `pip install --target --platform`.
    The guest mounts it over the repo's .venv, so `.venv/bin/pytest` and the editable install
    of kpod (copied from the host venv: pure Python, paths into this checkout) work unchanged.
    """
    venv = target.venv
    requirements = guest_requirements()
    host_site = Path(subprocess.run([_host_python(), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    editable = sorted(host_site.glob("__editable__*kpod_metrics*")) + sorted(host_site.glob("kpod_metrics-*.dist-info"))
    if not editable:
        raise SystemExit(f"vm: the host venv has no editable install of kpod-metrics in {host_site} (make setup)")
    # "layout": bump when this function changes what it writes, so existing venvs are redone.
    wanted = {"layout": 1, "requirements": requirements, "editable": [p.name for p in editable]}
    stamp = venv / "kpod-venv.json"
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return venv
    staging = venv.with_name("venv.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging_site = staging / "lib" / "python3.11" / "site-packages"
    staging_site.mkdir(parents=True)
    log(f"arm64 venv: {' '.join(requirements)} (aarch64 wheels)")
    subprocess.run(
        [_host_python(), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(staging_site),
         # Every manylinux tag up to bookworm's glibc (2.36): pip does not expand them itself.
         *[arg for minor in range(17, 37) for arg in ("--platform", f"manylinux_2_{minor}_aarch64")],
         "--platform", "manylinux2014_aarch64", "--python-version", "3.11", "--implementation", "cp",
         "--abi", "cp311", "--only-binary=:all:", *requirements],
        check=True,
    )  # fmt: skip
    shutil.rmtree(staging_site / "bin", ignore_errors=True)  # host-made scripts; ours are below
    for path in editable:
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, staging_site / path.name)
    (staging / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11\n")
    bin_dir = staging / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3", "python3.11"):
        (bin_dir / name).symlink_to("/usr/bin/python3.11")
    # The shebang names the path the guest sees: the venv is mounted over the repo's .venv.
    python = str(REPO / ".venv" / "bin" / "python")
    scripts = write_console_scripts(staging_site, bin_dir, python)
    if not {"pytest", "kpod-metrics"} <= set(scripts):
        raise SystemExit(f"vm: the arm64 venv lacks the pytest or kpod-metrics script (has {sorted(scripts)})")
    (staging / "kpod-venv.json").write_text(json.dumps(wanted) + "\n")
    shutil.rmtree(venv, ignore_errors=True)
    staging.rename(venv)
    return venv


def module_load_order(kernel_root: Path, release: str, wanted: Iterable[str]) -> list[Path]:
    """The .ko files for `wanted` and their dependencies, each after what it depends on."""
    base = kernel_root / "lib" / "modules" / release
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


def build_initramfs(target: Target, release: str) -> bytes:
    archive = Cpio()
    for directory in ("bin", "dev", "proc", "sys", "modules", "ro", "rw", "newroot"):
        archive.directory(directory)
    # The kernel opens /dev/console for /init's stdio before devtmpfs is mounted.
    archive.char_device("dev/console", 5, 1)
    if target.arch.own_userland:  # the guest architecture's static busybox, from its root
        busybox = str(target.kernel_root / "usr" / "bin" / "busybox")
    else:
        busybox = shutil.which("busybox") or "/bin/busybox"
    archive.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    modules = module_load_order(target.kernel_root, release, INITRAMFS_MODULES)
    for module in modules:
        archive.file(f"modules/{module.name}", module.read_bytes())
    archive.file("modules/order", "".join(f"{m.name}\n" for m in modules).encode())
    archive.file("init", (HERE / "init.sh").read_bytes(), 0o755)
    return archive.finish()


def ensure_initramfs(target: Target, release: str) -> Path:
    """Rewrite the initramfs only when its content changes (init.sh, busybox, modules)."""
    data = build_initramfs(target, release)
    digest = hashlib.sha256(data).hexdigest()
    stamp = target.build / "initramfs.sha256"
    if target.initramfs.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return target.initramfs
    tmp = target.initramfs.with_suffix(".tmp")
    # mtime=0: the same inputs give the same bytes.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(data)
    tmp.rename(target.initramfs)
    stamp.write_text(digest + "\n")
    log(f"initramfs written: {target.initramfs} ({target.initramfs.stat().st_size // 1024} KiB)")
    return target.initramfs


def prepare(target: Target, install: bool = True) -> str:
    target.build.mkdir(parents=True, exist_ok=True)
    if install:
        ensure_packages(target.arch.host_packages)
    if target.arch.own_userland:
        release = ensure_rootfs(target)
        ensure_btf(target, release)
        ensure_venv(target)
    else:
        release = ensure_kernel(target)
    ensure_initramfs(target, release)
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


STALL_WATCHDOG = (
    "watchdog_thresh=30",  # a soft lockup is reported after 2 x 30 s on one CPU
    "softlockup_panic=1",
    "softlockup_all_cpu_backtrace=1",
    "rcupdate.rcu_cpu_stall_timeout=60",
    "sysctl.kernel.panic_on_rcu_stall=1",
    "panic_print=0x20",  # on panic, print the whole kernel log buffer
)
# What the guest kernel prints when one of its CPUs stalls: under TCG an emulator stall (a vCPU
# that stops taking interrupts) looks exactly like this.
STALL = re.compile(r"BUG: soft lockup - CPU#\d+ stuck for \d+s! \[[^\]]*\]|rcu_preempt self-detected stall on CPU"
                   r"|rcu: INFO: rcu_\w+ detected stalls on CPUs")  # fmt: skip


def guest_stall(console: str) -> str | None:
    """The first line in which the guest kernel reported a stalled CPU, or None."""
    found = STALL.search(console)
    return found.group(0) if found else None


def kernel_cmdline(target: Target, release: str, loglevel: int) -> str:
    words = [
        f"console={target.arch.console}",
        "panic=-1",  # a guest that dies reboots at once, and -no-reboot turns that into an exit
        f"loglevel={loglevel}",
        # A CPU stuck in the kernel panics the guest within minutes instead of hanging until the
        # host's timeout (a CI run once sat 1,000 s in a soft lockup), with every CPU's stack and
        # the whole kernel log replayed on the console (loglevel hides the stacks otherwise).
        # Thresholds far above anything a healthy TCG guest shows, even on a busy host.
        *STALL_WATCHDOG,
        # Read by init.sh and guest.sh from /proc/cmdline: stage 2 lives in the host tree.
        f"kpod.guest={HERE / 'guest.sh'}",
    ]
    if target.arch.own_userland:
        # The root is the unpacked userland, the repo goes over it at its host path; modules
        # are in the root where modprobe looks for them anyway.
        words += [f"kpod.rootfs={target.kernel_root}", f"kpod.repo={REPO}", f"kpod.layer={target.layer}",
                  f"kpod.venv={target.venv}", f"kpod.modules=/lib/modules/{release}"]  # fmt: skip
    else:
        words.append(f"kpod.modules={target.kernel_root / 'lib' / 'modules' / release}")
    return " ".join(words)


def qemu_argv(target: Target, release: str, run_dir: Path, disk: Path, console: Path, smp: int, memory_mib: int,
              loglevel: int, interactive: bool = False) -> list[str]:  # fmt: skip
    vmlinuz = target.kernel_root / "boot" / f"vmlinuz-{release}"
    return [
        target.arch.qemu,
        "-accel", "tcg",  # KVM cannot run this kernel on these hosts (issue 8), nor another arch
        *target.arch.machine,
        "-smp", str(smp),
        "-m", str(memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        # Interactive: the serial line on our terminal (Ctrl-A x quits qemu), still logged.
        *(["-chardev", f"stdio,id=con,mux=on,signal=off,logfile={console}", "-serial", "chardev:con",
           "-mon", "chardev=con"] if interactive else ["-serial", f"file:{console}"]),
        "-kernel", str(vmlinuz),
        "-initrd", str(target.initramfs),
        "-append", kernel_cmdline(target, release, loglevel),
        # multidevs=remap: "/" spans several host filesystems; without it inode numbers can
        # collide in the guest.
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={run_dir},mount_tag=results,security_model=none",
        "-drive", f"file={disk},format=raw,if=virtio,cache=unsafe",
    ]  # fmt: skip


def _prune_runs(runs_dir: Path) -> None:
    """Keep the newest KEEP_RUNS finished runs.  Runs of other sessions may be going on at the
    same time: a run without its "done" marker is left alone unless it is older than a day."""
    runs = sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.is_symlink()) if runs_dir.is_dir() else []
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


def run(argv: list[str], *, timeout: float, cwd: Path, target: Target | None = None, smp: int = 2,
        memory_mib: int = 2048, stream: bool = True, loglevel: int = 4, env: dict[str, str] | None = None,
        interactive: bool = False) -> RunResult:  # fmt: skip
    target = target or Target()
    release = kernel_release(target)
    if release is None or not target.initramfs.exists():
        arch = "" if target.arch.name == "amd64" else f" --arch {target.arch.name}"
        raise SystemExit(f"vm: not prepared: run `tests/vm/vm.py prepare{arch}` (or `make vm-setup`) first")
    runs = target.runs
    runs.mkdir(parents=True, exist_ok=True)
    _prune_runs(runs)
    run_dir = runs / time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    run_dir = run_dir.with_name(f"{run_dir.name}-{os.getpid()}")
    run_dir.mkdir()
    # build/vm/runs/last -> this run; replaced atomically, as other runs may do the same.
    link = runs / f".last-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(run_dir.name)
    os.replace(link, runs / "last")
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
    qemu = qemu_argv(target, release, run_dir, disk, console, smp, memory_mib, loglevel, interactive)
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
    for p in (prep, runp):
        p.add_argument("--arch", choices=sorted(ARCHES), default=os.environ.get("KPOD_VM_ARCH", "amd64"),
                       help="the guest's architecture (default amd64, or $KPOD_VM_ARCH)")  # fmt: skip
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
    runp.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                      help="an environment variable for the guest command (repeatable)")  # fmt: skip
    runp.add_argument("--stall-retries", type=int, default=1,
                      help="boot again this many times when the guest kernel panics on a stalled CPU "
                           "(a soft lockup or an RCU stall: under TCG, an emulator stall; default 1)")  # fmt: skip
    runp.add_argument("argv", nargs="+", help="the command (after --)")
    opts = parser.parse_args(args)
    target = Target(opts.arch)
    if opts.command == "prepare":
        release = prepare(target, install=not opts.no_install)
        log(f"ready: {target.arch.name} kernel {release}, {target.initramfs}")
        return 0
    env = dict(item.split("=", 1) for item in opts.env)
    for attempt in range(1 + opts.stall_retries):
        result = run(opts.argv, timeout=opts.timeout, cwd=Path(opts.cwd), target=target, smp=opts.smp,
                     memory_mib=opts.memory, stream=not opts.quiet, loglevel=opts.loglevel, env=env,
                     interactive=opts.interactive)  # fmt: skip
        # A timed-out run has used its time already; a stall normally ends in a panic long before.
        stalled = result.exit_code is None and not result.timed_out and result.console.exists()
        stall = guest_stall(result.console.read_text(errors="replace")) if stalled else None
        if stall is None:
            break
        # The guest kernel stopped, not a test: its stacks are in the console log.  Said on
        # every run it happens, so a stall that comes back every time cannot hide.
        log(f"STALL: the guest kernel reported `{stall}` after {result.seconds:.0f} s and panicked; "
            f"console log (every CPU's stack): {result.console}")  # fmt: skip
        if attempt < opts.stall_retries:
            log(f"booting again ({attempt + 1} of {opts.stall_retries} retries after a kernel stall)")
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
