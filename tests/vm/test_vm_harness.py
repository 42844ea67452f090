"""The VM harness's host-side pieces, without booting anything: fast, on any host."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import vm
from helpers import require_tools


def test_cpio_is_read_back_by_an_independent_cpio(tmp_path: Path) -> None:
    require_tools("busybox")  # its cpio applet reads the archive back
    archive = vm.Cpio()
    archive.directory("bin")
    archive.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    archive.symlink("bin/sh", "hello")
    archive.file("odd", b"x" * 5)  # a length that needs padding
    archive.char_device("console", 5, 1)
    path = tmp_path / "a.cpio"
    path.write_bytes(archive.finish())
    argv = ["busybox", "cpio", "-t"]
    with open(path, "rb") as f:
        listed = subprocess.run(argv, stdin=f, capture_output=True, text=True, check=True).stdout.split()
    assert listed == ["bin", "bin/hello", "bin/sh", "odd", "console"]
    out = tmp_path / "x"
    out.mkdir()
    extract = ["busybox", "cpio", "-id"]
    with open(path, "rb") as f:
        # Device nodes need privileges to create; the regular files are what we compare.
        subprocess.run(extract, stdin=f, cwd=out, capture_output=True, check=False)
    assert (out / "bin" / "hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "odd").read_bytes() == b"xxxxx"
    assert (out / "bin" / "hello").stat().st_mode & 0o777 == 0o755


def test_modules_load_after_their_dependencies(tmp_path: Path) -> None:
    base = tmp_path / "lib" / "modules" / "6.1.0-1-amd64"
    base.mkdir(parents=True)
    (base / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/net/9p/9pnet.ko:\n"
        "kernel/fs/netfs/netfs.ko: kernel/fs/fscache/fscache.ko\n"
        "kernel/fs/fscache/fscache.ko:\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/fs/overlayfs/overlay.ko:\n"
    )
    order = [p.name for p in vm.module_load_order(tmp_path, "6.1.0-1-amd64", ["9pnet-virtio", "9p", "overlay"])]
    assert sorted(order) == sorted(set(order))  # each once
    assert order.index("9pnet.ko") < order.index("9pnet_virtio.ko")
    assert order.index("fscache.ko") < order.index("netfs.ko") < order.index("9p.ko")
    assert order[-1] == "overlay.ko"
    with pytest.raises(SystemExit, match="ext4"):
        vm.module_load_order(tmp_path, "6.1.0-1-amd64", ["ext4"])


def test_guest_script_quotes_the_command() -> None:
    script = vm.guest_script(["sh", "-c", "echo 'a b' $HOME"], Path("/srv/dir with space"), {"X": "1 2"})
    lines = script.splitlines()
    assert "export X='1 2'" in lines
    assert "cd '/srv/dir with space'" in lines
    assert lines[-1] == "sh -c 'echo '\"'\"'a b'\"'\"' $HOME'"


def test_qemu_argv_shares_the_root_read_only_and_uses_tcg(tmp_path: Path) -> None:
    target = vm.Target("amd64")
    argv = vm.qemu_argv(target, "6.1.0-1-amd64", tmp_path, tmp_path / "d.img", tmp_path / "c.log", 2, 2048, 4)
    joined = " ".join(argv)
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert "-no-reboot" in argv
    assert "local,path=/,mount_tag=hostroot,security_model=none,readonly=on" in joined
    assert f"local,path={tmp_path},mount_tag=results,security_model=none" in joined
    assert "readonly" not in argv[argv.index(f"local,path={tmp_path},mount_tag=results,security_model=none")]
    cmdline = argv[argv.index("-append") + 1]
    assert "console=ttyS0" in cmdline and "panic=-1" in cmdline and "kpod.guest=" in cmdline
    assert f"file:{tmp_path / 'c.log'}" in argv


def test_disk_image_is_ext4_of_64_mib(tmp_path: Path) -> None:
    require_tools("mkfs.ext4")
    disk = tmp_path / "disk.img"
    vm.make_disk(disk)
    assert disk.stat().st_size == 64 << 20
    with open(disk, "rb") as f:
        f.seek(1024 + 0x38)  # the ext2/3/4 superblock magic
        assert f.read(2) == b"\x53\xef"


def test_arm64_argv_boots_its_own_root_with_the_repo_over_it(tmp_path: Path) -> None:
    target = vm.Target("arm64")
    argv = vm.qemu_argv(target, "6.1.0-1-arm64", tmp_path, tmp_path / "d.img", tmp_path / "c.log", 2, 2048, 4)
    assert argv[0] == "qemu-system-aarch64" and argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-machine") + 1] == "virt"
    assert argv[argv.index("-kernel") + 1] == str(target.kernel_root / "boot" / "vmlinuz-6.1.0-1-arm64")
    words = dict(w.split("=", 1) for w in argv[argv.index("-append") + 1].split() if "=" in w)
    assert words["console"] == "ttyAMA0"
    # init.sh reads these to lay the arm64 root, the repo, the arm64 objects and venv.
    assert words["kpod.rootfs"] == str(target.kernel_root) and words["kpod.repo"] == str(vm.REPO)
    assert words["kpod.layer"] == str(target.layer) and words["kpod.venv"] == str(target.venv)
    assert words["kpod.modules"] == "/lib/modules/6.1.0-1-arm64"
    assert target.build.name == vm.Target("amd64").build.name + "-arm64"


def test_usr_merge_moves_files_and_leaves_links(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "busybox").write_text("bb")
    (tmp_path / "lib" / "aarch64-linux-gnu").mkdir(parents=True)
    (tmp_path / "lib" / "aarch64-linux-gnu" / "libc.so.6").write_text("c")
    (tmp_path / "usr" / "lib" / "aarch64-linux-gnu").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "aarch64-linux-gnu" / "libm.so.6").write_text("m")
    vm.merge_usr(tmp_path)
    for name in ("bin", "sbin", "lib"):
        assert (tmp_path / name).is_symlink() and str((tmp_path / name).readlink()) == f"usr/{name}"
    assert (tmp_path / "usr" / "bin" / "busybox").read_text() == "bb"
    assert {p.name for p in (tmp_path / "lib" / "aarch64-linux-gnu").iterdir()} == {"libc.so.6", "libm.so.6"}


def test_console_scripts_follow_the_entry_points(tmp_path: Path) -> None:
    dist = tmp_path / "site" / "demo-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "entry_points.txt").write_text("[console_scripts]\nDemo-Tool = demo.cli:main\n[other]\nx = y:z\n")
    (tmp_path / "bin").mkdir()
    assert vm.write_console_scripts(tmp_path / "site", tmp_path / "bin", "/venv/bin/python") == ["Demo-Tool"]
    script = (tmp_path / "bin" / "Demo-Tool").read_text()
    assert script.startswith("#!/venv/bin/python\n") and "from demo.cli import main" in script
    assert (tmp_path / "bin" / "Demo-Tool").stat().st_mode & 0o111


def test_a_guest_kernel_stall_is_recognised_in_the_console() -> None:
    # Lines as Debian's 6.1 printed them on the console of a CI run that hung under TCG.
    hung = (
        "[ 1369.587275] rcu: rcu_preempt kthread starved for 241545 jiffies! g79653 f0x0 RCU_GP_WAIT_FQS(5)\n"
        "[ 1397.065041] watchdog: BUG: soft lockup - CPU#1 stuck for 928s! [pytest:650]\n"
    )
    assert vm.guest_stall(hung) == "BUG: soft lockup - CPU#1 stuck for 928s! [pytest:650]"
    assert vm.guest_stall("[ 1432.599484] rcu: INFO: rcu_preempt self-detected stall on CPU\n")
    # A test run's own output, OOM kills included, is not a stall.
    ok = (
        "[  114.667493] Memory cgroup out of memory: Killed process 231 (hog) total-vm:1320768kB\n"
        "100 passed, 5 skipped in 492.33s (0:08:12)\n"
    )
    assert vm.guest_stall(ok) is None


def test_the_guest_kernel_panics_on_a_stalled_cpu() -> None:
    words = vm.kernel_cmdline(vm.Target(), "6.1.0-1-amd64", 4).split()
    assert {"softlockup_panic=1", "sysctl.kernel.panic_on_rcu_stall=1", "panic=-1"} <= set(words)


def test_a_stalled_guest_is_booted_again_once_and_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    # run() boots qemu; here it returns what a panicked guest leaves: a console, no exit code.
    console = tmp_path / "console.log"
    console.write_text("[ 97.1] watchdog: BUG: soft lockup - CPU#1 stuck for 63s! [pytest:650]\nKernel panic\n")
    boots: list[int] = []

    def fake_run(argv: list[str], **_: object) -> vm.RunResult:
        boots.append(1)
        return vm.RunResult(None, tmp_path, console, 100.0, False)

    monkeypatch.setattr(vm, "run", fake_run)
    assert vm.main(["run", "--quiet", "--", "true"]) == 125
    assert len(boots) == 2  # the first boot and one retry, then the failure
    err = capsys.readouterr().err
    assert err.count("STALL: the guest kernel reported `BUG: soft lockup - CPU#1 stuck for 63s! [pytest:650]`") == 2
    boots.clear()
    assert vm.main(["run", "--quiet", "--stall-retries", "0", "--", "true"]) == 125 and len(boots) == 1
