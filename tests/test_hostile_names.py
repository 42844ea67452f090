"""A pod names its interfaces and mount points with the characters str.splitlines() breaks at.

The kernel ends the lines of /proc/<pid>/net/dev and mountinfo with "\\n" and does not escape
"\\x1c", "\\x1d", "\\x1e", "\\x85" or U+2028 in interface names (nor "\\r", "\\x0b", "\\x0c" in
mount points): a parser that splits at them let `x\\x1ceth0` make the real eth0 report the
dummy's bytes, `z\\x1dfake` appear as interface="fake", and such mounts vanish.  Here a real
agent process reads a real network and mount namespace made that way; the ground truth is
iproute2's JSON and the tmpfs sizes we chose.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from agent_proc import free_port, running_agent
from hostile import Scratch, agent_config, pod_cgroups, run, scratch, skip_reason

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]
__all__ = ["scratch"]

# Legal interface names (dev_valid_name refuses only '/', ':', NUL and \t\n\v\f\r space).
ODD_INTERFACES = ["x\x1ceth0", "z\x1dfake", "a\x1eb", "c\u2028d", "e\x85f", "g|h"]
# Mount points may hold anything but NUL; mountinfo escapes only space, tab, newline, backslash.
ODD_MOUNTS = ["m\x1cn", "p\rq", "u\u2028v", "s\x85t", "f\x0cg", "v\x0bw", "y\x1dfake"]

# In the pod's network namespace and its own mount namespace: mount a tmpfs of (i+1) MiB on each
# odd name, send (i+1)*3 raw frames of 100+i bytes on each interface, then wait.
WORKLOAD = r"""
import json, socket, subprocess, sys
plan = json.loads(sys.argv[1])
for i, point in enumerate(plan["mounts"]):
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={i + 1}m", "kpodh", point], check=True)
for i, name in enumerate(plan["interfaces"]):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((name, 0))
    frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5"
    for _ in range((i + 1) * 3):
        s.send(frame + b"\x00" * (100 + i - len(frame)))
    s.close()
print("ready", flush=True)
sys.stdin.readline()
"""


def truth_tx_bytes(netns: str) -> dict[str, int]:
    # strict=False: iproute2 writes control characters of names into JSON strings unescaped.
    links = json.loads(run("ip", "-n", netns, "-j", "-s", "link", "show"), strict=False)
    return {link["ifname"]: link["stats64"]["tx"]["bytes"] for link in links if link["ifname"] != "lo"}


def test_odd_interface_and_mount_names_are_reported_as_they_are(scratch: Scratch, tmp_path: Path) -> None:
    s = scratch
    ns = s.netns()
    peer = f"kh{s.tag[-10:]}"
    run("ip", "link", "add", peer, "type", "veth", "peer", "name", f"{peer}p")
    s.defer(f"link {peer}", lambda: run("ip", "link", "del", peer))
    run("sysctl", "-qw", f"net.ipv6.conf.{peer}.disable_ipv6=1")
    run("ip", "link", "set", f"{peer}p", "netns", ns, "name", "eth0")
    run("ip", "link", "set", peer, "up")
    run("ip", "-n", ns, "link", "set", "eth0", "up")
    # veth pairs inside the namespace, odd name to odd name (no dummy module needed).
    for name, other in zip(ODD_INTERFACES[::2], ODD_INTERFACES[1::2], strict=True):
        run("ip", "-n", ns, "link", "add", "name", name, "type", "veth", "peer", "name", other)
    for name in ODD_INTERFACES:
        run("ip", "-n", ns, "link", "set", name, "up")
    points = [str(s.mkdir(tmp_path / name)) for name in ODD_MOUNTS]
    base, pods = pod_cgroups(s, pods=1, containers=1)
    container = pods[0][0]
    plan = json.dumps({"mounts": points, "interfaces": ["eth0", *ODD_INTERFACES]})
    proc = s.spawn(["ip", "netns", "exec", ns, "unshare", "-m", "--propagation", "private",
                    sys.executable, "-c", WORKLOAD, plan], container)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    truth = truth_tx_bytes(ns)
    assert set(truth) == {"eth0", *ODD_INTERFACES}
    # Distinct and non-zero everywhere: a swapped or shadowed line cannot go unnoticed.
    assert len(set(truth.values())) == len(truth) and all(truth.values()), truth

    port = free_port()
    config = agent_config(base, port, {"net_iface": "", "filesystem": ""})
    with running_agent(config, tmp_path, port) as agent:
        agent.wait_ready()

        def reported() -> bool:
            names = {x.name for x in agent.metrics()}
            return {"kpod_net_iface_tx_bytes_total", "kpod_fs_capacity_bytes"} <= names

        agent.wait_until(reported, 15, "reporting interfaces and filesystems")
        samples = agent.metrics()
        log = agent.log()
        assert agent.stop() == 0

    tx = {x.labels["interface"]: int(x.value) for x in samples if x.name == "kpod_net_iface_tx_bytes_total"}
    assert tx == truth, (tx, truth)  # every interface once, by its full name, with its own bytes
    capacity = {x.labels["mountpoint"]: int(x.value) for x in samples if x.name == "kpod_fs_capacity_bytes"}
    for i, point in enumerate(points):
        assert capacity.get(point) == (i + 1) << 20, (point, capacity)
    assert not any(m.endswith("fake") and "\x1d" not in m for m in capacity), capacity
    assert "Traceback" not in log
