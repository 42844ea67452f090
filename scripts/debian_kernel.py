"""Debian 12 packages of another architecture, and the BTF of Debian's kernel, without dpkg.

    python3 scripts/debian_kernel.py btf --arch arm64 --out deploy/btf/vmlinux-arm64.btf

Two users: `make bpf-arm64` / the image build (deploy/Dockerfile), which compile the CO-RE
objects for arm64 against the BTF of Debian's arm64 kernel when the build machine is not
arm64, and tests/vm/vm.py, which unpacks an arm64 userland and kernel for `make test-vm-arm64`.

apt runs with a private state directory (its own package lists, an empty dpkg status) and
APT::Architecture set to the target, reading the machine's own sources: no
`dpkg --add-architecture`, and nothing outside that directory changes.  Packages are
unpacked with `dpkg-deb -x`, which needs no emulation.

The BTF is carved out of the kernel image itself: /sys/kernel/btf/vmlinux is the bytes
between __start_BTF and __stop_BTF, which sit in the image's data as they are (an arm64
`vmlinuz` is the uncompressed Image; an x86 bzImage is decompressed first).  No debug
package (~1 GB), no boot.

Only the standard library: this runs before any venv exists, and inside the image build.
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STATE = REPO / "build" / "apt"
KERNEL_SERIES = "linux-image-6.1."  # bookworm's kernel: the meta package depends on linux-image-6.1.0-NN-<arch>
BTF_MAGIC = 0xEB9F
BTF_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len


def log(message: str) -> None:
    print(f"debian_kernel: {message}", file=sys.stderr, flush=True)


class ForeignApt:
    """apt for Debian packages of `arch`, with all its state under `root`."""

    def __init__(self, arch: str, root: Path = DEFAULT_STATE) -> None:
        self.arch = arch
        self.root = root / arch
        self.status = self.root / "status"

    def options(self) -> list[str]:
        return [
            "-o", f"Dir::State={self.root / 'state'}",
            "-o", f"Dir::State::status={self.status}",
            "-o", f"Dir::Cache={self.root / 'cache'}",
            "-o", f"APT::Architecture={self.arch}",
            "-o", f"APT::Architectures::={self.arch}",
            # Pins of the machine's own apt (other origins, other arches) do not apply here.
            "-o", "Dir::Etc::Preferences=/dev/null",
            "-o", "Dir::Etc::PreferencesParts=/dev/null",
            # As root, apt would otherwise hand downloads to its _apt user, who cannot write here.
            "-o", "APT::Sandbox::User=root",
            "-o", "Debug::NoLocking=1",  # our own state: the machine's dpkg lock is not ours to take
            "-qq",
        ]  # fmt: skip

    def _apt(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        result = subprocess.run(
            [tool, *self.options(), *args], capture_output=True, text=True, cwd=cwd, check=False,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )  # fmt: skip
        if result.returncode != 0:
            raise SystemExit(f"debian_kernel: {tool} {' '.join(args)} failed ({self.arch}): {result.stderr.strip()}")
        return result.stdout

    def update(self, force: bool = False) -> None:
        lists = self.root / "state" / "lists"
        if not force and lists.is_dir() and any(lists.glob("*_Packages*")):
            return
        for sub in ("state/lists/partial", "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.status.touch()
        log(f"apt-get update ({self.arch} package lists, private to {self.root})")
        self._apt("apt-get", "update")

    def depends(self, package: str) -> list[str]:
        out = self._apt("apt-cache", "depends", package)
        return [line.split(":", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("Depends:")]

    def kernel_package(self) -> str:
        """linux-image-6.1.0-NN-<arch>: what bookworm's meta package depends on right now.

        KPOD_VM_KERNEL_<ARCH> (e.g. KPOD_VM_KERNEL_ARM64) pins one.  Following the meta package
        keeps builds working when Debian drops an old ABI from the mirror.
        """
        pinned = os.environ.get(f"KPOD_VM_KERNEL_{self.arch.upper()}")
        if pinned:
            return pinned
        meta = f"linux-image-{self.arch}"
        for attempt in range(2):
            found = [d for d in self.depends(meta) if d.startswith(KERNEL_SERIES)]
            if found:
                return found[0]
            if attempt == 0:
                self.update(force=True)
        raise SystemExit(f"debian_kernel: cannot tell which kernel {meta} depends on")

    def download(self, packages: Iterable[str], dest: Path) -> list[Path]:
        """The .debs of exactly these packages (no dependencies), into `dest`."""
        dest.mkdir(parents=True, exist_ok=True)
        names = list(packages)
        self._apt("apt-get", "download", *names, cwd=dest)
        return sorted(p for p in dest.glob("*.deb") if p.name.split("_", 1)[0] in names)

    def download_closure(self, packages: Iterable[str]) -> list[Path]:
        """The .debs of these packages and everything they depend on (no recommends).

        `install --download-only` against an empty dpkg status resolves the whole closure
        and leaves the files in our cache; nothing is installed anywhere.
        """
        archives = self.root / "cache" / "archives"
        self._apt("apt-get", "install", "-y", "--download-only", "--no-install-recommends", *packages)
        return sorted(archives.glob("*.deb"))


def unpack(deb: Path, dest: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)


# --------------------------------------------------------------------------------------- BTF


def _btf_at(data: bytes, offset: int) -> bytes | None:
    """The BTF blob starting at `offset` if a plausible header is there, else None."""
    if offset + BTF_HEADER.size > len(data):
        return None
    magic, version, flags, hdr_len, type_off, type_len, str_off, str_len = BTF_HEADER.unpack_from(data, offset)
    if (magic, version, flags, hdr_len, type_off) != (BTF_MAGIC, 1, 0, BTF_HEADER.size, 0):
        return None
    end = offset + hdr_len + str_off + str_len
    if str_off != type_len or str_len < 2 or type_len < 16 or end > len(data):
        return None
    strings = data[offset + hdr_len + str_off : end]
    if strings[:1] != b"\0" or strings[-1:] != b"\0":
        return None
    return data[offset:end]


def find_btf(data: bytes) -> bytes | None:
    """The largest BTF blob in `data` (the kernel's own; modules' and stray matches are smaller)."""
    magic = struct.pack("<H", BTF_MAGIC) + b"\x01\x00"
    best: bytes | None = None
    offset = data.find(magic)
    while offset >= 0:
        blob = _btf_at(data, offset)
        if blob is not None and (best is None or len(blob) > len(best)):
            best = blob
        offset = data.find(magic, offset + 1)
    return best


def _decompressed(image: bytes) -> Iterable[bytes]:
    """The image itself, then each compressed payload found in it (an x86 bzImage)."""
    yield image
    for magic, unpack_one in ((b"\xfd7zXZ\x00", _xz), (b"\x1f\x8b\x08", _gzip)):
        offset = image.find(magic)
        while offset >= 0:
            data = unpack_one(image[offset:])
            if data:
                yield data
                break
            offset = image.find(magic, offset + 1)


def _xz(data: bytes) -> bytes | None:
    try:
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    except lzma.LZMAError:
        return None


def _gzip(data: bytes) -> bytes | None:
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    except zlib.error:
        return None


def kernel_btf(image: bytes) -> bytes:
    for data in _decompressed(image):
        blob = find_btf(data)
        if blob is not None:
            return blob
    raise SystemExit("debian_kernel: no BTF found in the kernel image (built without CONFIG_DEBUG_INFO_BTF?)")


def btf_of_debian_kernel(arch: str, out: Path, state: Path = DEFAULT_STATE) -> Path:
    """Download Debian 12's current kernel package for `arch` and write its BTF to `out`."""
    apt = ForeignApt(arch, state)
    apt.update()
    package = apt.kernel_package()
    with tempfile.TemporaryDirectory(prefix="kpod-kernel-") as tmp:
        work = Path(tmp)
        (deb,) = apt.download([package], work)
        unpack(deb, work / "root")
        (vmlinuz,) = (work / "root" / "boot").glob("vmlinuz-*")
        image = vmlinuz.read_bytes()
        if image[:2] == b"\x1f\x8b":  # some arches ship a gzipped Image
            image = gzip.decompress(image)
        blob = kernel_btf(image)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_bytes(blob)
    tmp_out.replace(out)
    log(f"{out}: BTF of {package} ({len(blob) // 1024} KiB)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    btf = sub.add_parser("btf", help="write the BTF of Debian 12's kernel for ARCH")
    btf.add_argument("--arch", required=True, choices=("amd64", "arm64"))
    btf.add_argument("--out", required=True, type=Path)
    btf.add_argument("--state", type=Path, default=DEFAULT_STATE, help="apt's private state (default build/apt)")
    carve = sub.add_parser("carve", help="write the BTF found in a kernel image file")
    carve.add_argument("image", type=Path)
    carve.add_argument("--out", required=True, type=Path)
    opts = parser.parse_args(argv)
    if shutil.which("apt-get") is None and opts.command == "btf":
        raise SystemExit("debian_kernel: needs apt-get and dpkg-deb (a Debian or Ubuntu machine)")
    if opts.command == "btf":
        btf_of_debian_kernel(opts.arch, opts.out, opts.state)
    else:
        opts.out.write_bytes(kernel_btf(opts.image.read_bytes()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
