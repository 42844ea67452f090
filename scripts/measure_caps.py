"""Measure which capabilities the agent needs, on this host, against real processes.

Run as root (full capabilities): `python scripts/measure_caps.py`.  It

1. builds a kubepods-shaped cgroup2 tree under a scratch directory of the cgroup2 mount with
   three "containers", each a real process in its own network and mount namespace with a
   tmpfs volume, shaped like what a node runs:
     - root-full:    uid 0 with every capability (a privileged container, or a node daemon)
     - root-runtime: uid 0 with the container runtime's default capability set (most pods)
     - uid1000:      uid 1000, no capabilities, its volume under a 0700 directory (runAsUser pods)
2. runs the receivers in a child process whose capability bounding set is cut down, as a
   container with `capabilities: {drop: [ALL], add: [...]}` running as uid 0 gets it
   (execve as root gives permitted = bounding set), and
3. prints, per capability set, per receiver and per container, what was collected and the
   error count, then a summary of what each missing capability loses.

It also checks how cgroup.procs reads from a child PID namespace (why the DaemonSet needs
hostPID).  Everything created is removed again (processes by PID, then the cgroups, deepest
first).  The result is recorded in docs/CAPABILITIES.md.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

RUNTIME_DEFAULT_CAPS = (
    "chown,dac_override,fowner,fsetid,kill,setgid,setuid,setpcap,net_bind_service,net_raw,"
    "sys_chroot,mknod,audit_write,setfcap"
)
CAP_SETS: dict[str, list[str]] = {
    "BPF+PERFMON": ["bpf", "perfmon"],
    "BPF+PERFMON+SYS_PTRACE": ["bpf", "perfmon", "sys_ptrace"],
    "BPF+PERFMON+DAC_READ_SEARCH": ["bpf", "perfmon", "dac_read_search"],
    "BPF+PERFMON+SYS_PTRACE+DAC_READ_SEARCH": ["bpf", "perfmon", "sys_ptrace", "dac_read_search"],
    "PERFMON only (no BPF)": ["perfmon", "sys_ptrace", "dac_read_search"],
    "BPF only (no PERFMON)": ["bpf", "sys_ptrace", "dac_read_search"],
}
RECEIVERS = ("cpu_sched", "memory", "bpf_maps", "cgroup_cpu", "cgroup_memory", "disk", "pressure",
             "net_iface", "filesystem")  # fmt: skip


def _cgroup2_mount() -> str:
    from kpod.cgroup.mounts import parse_mountinfo_cgroups

    unified = parse_mountinfo_cgroups(Path("/proc/self/mountinfo").read_text()).unified
    if not unified:
        sys.exit("no cgroup2 mount")
    return unified


# ----------------------------------------------------------------------------- the probe


def probe(root: str, proc_root: str) -> dict[str, Any]:
    """Runs inside the cut-down process: start every receiver, collect twice, report."""
    from kpod.cgroup.index import CgroupIndex
    from kpod.component import ComponentUnavailable, Context
    from kpod.registry import Registry
    from kpod.selfmetrics import SelfMetrics
    from kpod.settings import KpodSettings

    settings = KpodSettings()
    settings.cgroup.root = root
    settings.cgroup.proc_root = proc_root
    index = CgroupIndex(root, scope="all")
    index.refresh()
    registry = Registry()
    report: dict[str, Any] = {"capeff": Path("/proc/self/status").read_text().split("CapEff:")[1].split()[0]}
    running = []
    for name in RECEIVERS:
        factory = registry.factory("receiver", name)
        config = factory.config_class()
        if name == "net_iface":
            config.exclude_interfaces = []  # our namespaces have only lo
        selfm = SelfMetrics()
        receiver = factory.create(Context(name, settings, index, selfm), config)
        entry: dict[str, Any] = {}
        try:
            reason = receiver.preflight()
            if reason:
                raise ComponentUnavailable(reason)
            receiver.start()
            running.append((name, receiver, selfm, entry))
        except (ComponentUnavailable, OSError) as error:
            entry["unavailable"] = str(error)
        report[name] = entry
    time.sleep(1.5)  # let the workloads run under the attached programs
    for name, receiver, selfm, entry in running:
        try:
            receiver.collect()
            batch = receiver.collect()
        except Exception as error:  # a measurement: report anything
            entry["collect_failed"] = f"{type(error).__name__}: {error}"
            continue
        per_container: dict[str, int] = {}
        for point in batch.points:
            if point.cgroup is None:  # the agent's own points (bpf_maps, program stats)
                per_container["agent"] = per_container.get("agent", 0) + 1
                continue
            leaf = point.cgroup.path.rsplit("/", 1)[-1]
            label = leaf.split("-")[-1].removesuffix(".scope") if "cri-containerd" in leaf else "pod"
            per_container[label] = per_container.get(label, 0) + 1
        entry["points"] = dict(sorted(per_container.items()))
        entry["errors"] = int(selfm.get("kpod.collection.errors", (("receiver", name),)))
    for _, receiver, _, _ in running:  # after every collect: bpf_maps reads the others' maps
        receiver.shutdown()
    return report


# ----------------------------------------------------------------------------- the setup

WORKLOAD = (
    "import os,time\n"
    "os.system('ip link set lo up')\n"
    "deadline=time.time()+600\n"
    "while time.time()<deadline:\n"
    "    sum(range(20000)); os.sched_yield(); time.sleep(0.002)\n"
)


def _start(cgroup: Path, volume: Path, as_user: str) -> subprocess.Popen[bytes]:
    """A process in `cgroup`, in new net and mount namespaces, with a tmpfs at `volume`."""
    if as_user == "uid1000":
        drop = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all"]  # fmt: skip
    elif as_user == "root-runtime":
        caps = ",".join("+" + c for c in RUNTIME_DEFAULT_CAPS.split(","))
        drop = ["setpriv", f"--bounding-set=-all,{caps}", f"--inh-caps=-all,{caps}"]
    else:
        drop = []
    workload = [sys.executable, "-c", WORKLOAD]
    uid = 1000 if as_user == "uid1000" else 0
    inner = f"mount -t tmpfs -o size=8m,mode=0755,uid={uid} kpodcaps {volume} && exec {shlex.join([*drop, *workload])}"
    script = (
        f"echo $$ > {cgroup}/cgroup.procs && "
        f"exec {shlex.join(['unshare', '--net', '--mount', '--propagation', 'private', 'sh', '-c', inner])}"
    )
    return subprocess.Popen(["sh", "-c", script])


def pidns_cgroup_procs(cgroup: Path) -> str:
    """cgroup.procs of `cgroup` as a process in a new PID namespace reads it."""
    out = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "cat", f"{cgroup}/cgroup.procs"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return out.stdout.strip().replace("\n", " ") or out.stderr.strip()


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("run as root")
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        print(json.dumps(probe(sys.argv[2], sys.argv[3])))
        return 0
    for tool in ("setpriv", "unshare", "ip"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}")
    base = Path(_cgroup2_mount()) / f"kpodcaps{os.getpid()}"
    # The systemd cgroup driver's names: kubepods-<qos>-pod<uid with underscores>.slice.
    pod_slice = "kubepods-burstable-pod" + str(uuid.uuid4()).replace("-", "_") + ".slice"
    pod = base / "kubepods.slice" / "kubepods-burstable.slice" / pod_slice
    scratch = Path(tempfile.mkdtemp(prefix="kpodcaps"))
    procs: list[subprocess.Popen[bytes]] = []
    made: list[Path] = []
    try:
        for directory in (base, base / "kubepods.slice", base / "kubepods.slice" / "kubepods-burstable.slice", pod):
            directory.mkdir()
            made.append(directory)
        containers = {}
        for who in ("root-full", "root-runtime", "uid1000"):
            cid = uuid.uuid4().hex * 2
            cgroup = pod / f"cri-containerd-{cid}.scope"
            cgroup.mkdir()
            made.append(cgroup)
            if who == "uid1000":
                private = scratch / who
                private.mkdir(mode=0o700)
                os.chown(private, 1000, 1000)
                volume = private / "data"
                volume.mkdir()
                os.chown(volume, 1000, 1000)
            else:
                volume = scratch / who
                volume.mkdir()
            procs.append(_start(cgroup, volume, who))
            containers[cid] = who
        time.sleep(1.0)
        print(f"pid namespace: cgroup.procs of {containers[next(iter(containers))]} read from a child PID "
              f"namespace: {pidns_cgroup_procs(pod / f'cri-containerd-{next(iter(containers))}.scope')!r}")  # fmt: skip
        results: dict[str, Any] = {}
        for label, caps in [("root (all capabilities)", None), *CAP_SETS.items()]:
            argv = [sys.executable, __file__, "--probe", str(base), "/proc"]
            if caps is not None:
                spec = ",".join("+" + c for c in caps)
                argv = ["setpriv", f"--bounding-set=-all,{spec}", f"--inh-caps=-all,{spec}", *argv]
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            out = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
            try:
                report = json.loads(out.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                report = {"probe_failed": out.stderr.strip()[-500:]}
            results[label] = report
            print(f"\n== {label} (CapEff {report.get('capeff', '?')})")
            for name in RECEIVERS:
                entry = report.get(name, report)
                shown = {containers.get(k, k): v for k, v in entry.get("points", {}).items()}
                rest = {k: v for k, v in entry.items() if k != "points"}
                print(f"  {name:<14} points={shown} {rest}")
        return 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for directory in reversed(made):
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
