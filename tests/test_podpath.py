"""Parsing cgroup paths into pod uid / container id, on the real trees of the captured fixtures."""

from __future__ import annotations

import os

import pytest
from cgroup_tree import V2
from kpod.processors.k8sattributes.podpath import (
    PodPath,
    parse_container_path,
    parse_pod_path,
    short_id,
    split_container_id,
)

FIXTURE = str(V2)

UID = "0a1b2c3d-0000-4000-8000-00000000000{}"
# Container ids of the fixture (tests/fixtures/README.md), by pod number.
SANDBOX1 = "dfa15a989fae12701a7a9b2890bad323888b19ccf407ba514797a491c2d2a09a"
IO1 = "a38b6325e8f53ac409df59c7e8415bdad54139296ebfa17f5dbb24a9774ed983"
THROTTLED1 = "3c0c837a59a218341857c7aea4e6464fa8a940d7464c340799f75275162afcc9"
OOM2 = "5077669150416569f6f5c2be020a49214c621558c4eb634b2d0b28997af70417"
HOLDER3 = "13bf7efd066cba86cb078dd995ca5edd1ca632bfe55d45fa78038acb8ce9dbd4"
IO4 = "16a5c6d1889da2b39df77fbad988e488b3439c045ffde5d674d4ec741d57202a"
THROTTLED4 = "49f23186d2d246f4876c5265d01ee0d626ef3dfb3b06746f4dfc9a38ebbe383f"
OOM5 = "267466eaac6dd05ee9555d3a95d989576e6e9096baaea95f589935fff5b21acf"

# Every cgroup directory of the fixture and what it must parse to (None: not a pod's cgroup).
P1 = (
    "/kubepods.slice/kubepods-burstable.slice/"
    "kubepods-burstable-pod0a1b2c3d_0000_4000_8000_000000000001.slice"
)
P2 = "/kubepods.slice/kubepods-pod0a1b2c3d_0000_4000_8000_000000000002.slice"
P3 = (
    "/kubepods.slice/kubepods-besteffort.slice/"
    "kubepods-besteffort-pod0a1b2c3d_0000_4000_8000_000000000003.slice"
)
P4 = "/kubepods/burstable/pod0a1b2c3d-0000-4000-8000-000000000004"
P5 = "/kubepods/pod0a1b2c3d-0000-4000-8000-000000000005"
EXPECTED: dict[str, PodPath | None] = {
    "/kubepods.slice": None,
    "/kubepods.slice/kubepods-burstable.slice": None,
    "/kubepods.slice/kubepods-besteffort.slice": None,
    P1: PodPath(UID.format(1), "", "", "burstable"),
    f"{P1}/cri-containerd-{SANDBOX1}.scope": PodPath(UID.format(1), SANDBOX1, "containerd", "burstable"),
    f"{P1}/cri-containerd-{IO1}.scope": PodPath(UID.format(1), IO1, "containerd", "burstable"),
    f"{P1}/cri-containerd-{THROTTLED1}.scope": PodPath(UID.format(1), THROTTLED1, "containerd", "burstable"),
    P2: PodPath(UID.format(2), "", "", "guaranteed"),
    f"{P2}/cri-containerd-{OOM2}.scope": PodPath(UID.format(2), OOM2, "containerd", "guaranteed"),
    P3: PodPath(UID.format(3), "", "", "besteffort"),
    f"{P3}/cri-containerd-{HOLDER3}.scope": PodPath(UID.format(3), HOLDER3, "containerd", "besteffort"),
    "/kubepods": None,
    "/kubepods/burstable": None,
    "/kubepods/besteffort": None,
    P4: PodPath(UID.format(4), "", "", "burstable"),
    f"{P4}/{IO4}": PodPath(UID.format(4), IO4, "", "burstable"),
    f"{P4}/{THROTTLED4}": PodPath(UID.format(4), THROTTLED4, "", "burstable"),
    P5: PodPath(UID.format(5), "", "", "guaranteed"),
    f"{P5}/{OOM5}": PodPath(UID.format(5), OOM5, "", "guaranteed"),
}


def fixture_cgroups() -> list[str]:
    """Every cgroup directory of the fixture tree, as a path relative to its root."""
    found = []
    for directory, subdirs, _files in os.walk(FIXTURE):
        relative = directory[len(FIXTURE) :]
        if relative in ("", "/proc", "/sys") or relative.startswith(("/proc/", "/sys/")):
            if relative == "":
                subdirs[:] = [d for d in subdirs if d not in ("proc", "sys")]
            continue
        found.append(relative)
    return sorted(found)


def test_every_fixture_cgroup_parses_as_documented() -> None:
    paths = fixture_cgroups()
    # The walk must find the tree the README documents, not an empty or partial one.
    assert set(paths) == set(EXPECTED)
    for path in paths:
        assert parse_pod_path(path) == EXPECTED[path], path


def test_proc_cgroup_file_of_the_fixture_container_parses() -> None:
    # /proc/<pid>/cgroup of pid 224 (pod 3's memory holder): "0::<path>".
    with open(os.path.join(FIXTURE, "proc", "cgroup-container.txt")) as f:
        line = f.read().strip()
    path = line.split("::", 1)[1]
    assert parse_pod_path(path) == PodPath(UID.format(3), HOLDER3, "containerd", "besteffort")


CID = "0123456789abcdef" * 4
SYSTEMD_UID = "6f9c1e2a_1b2c_4d3e_8f90_a1b2c3d4e5f6"
API_UID = "6f9c1e2a-1b2c-4d3e-8f90-a1b2c3d4e5f6"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # CRI-O and docker (cri-dockerd) under the systemd driver.
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/crio-{CID}.scope",
            PodPath(API_UID, CID, "crio", "burstable"),
        ),
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/crio-conmon-{CID}.scope",
            PodPath(API_UID, CID, "crio", "burstable", conmon=True),
        ),
        (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD_UID}.slice/docker-{CID}.scope",
            PodPath(API_UID, CID, "docker", "besteffort"),
        ),
        # Guaranteed pod, no QoS slice.
        (
            f"/kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope",
            PodPath(API_UID, CID, "containerd", "guaranteed"),
        ),
        # cgroupfs driver: bare ids (containerd, docker) and CRI-O's prefixed names.
        (f"/kubepods/besteffort/pod{API_UID}/{CID}", PodPath(API_UID, CID, "", "besteffort")),
        (f"/kubepods/pod{API_UID}/crio-{CID}", PodPath(API_UID, CID, "crio", "guaranteed")),
        (
            f"/kubepods/burstable/pod{API_UID}/crio-conmon-{CID}",
            PodPath(API_UID, CID, "crio", "burstable", True),
        ),
        # kind / k3s-in-docker: the node's kubepods under a prefix; a kubelet with --cgroup-root.
        (f"/docker/{'f' * 64}/kubepods/burstable/pod{API_UID}/{CID}", PodPath(API_UID, CID, "", "burstable")),
        (
            f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            f"kubelet-kubepods-besteffort-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope",
            PodPath(API_UID, CID, "containerd", "besteffort"),
        ),
        (
            f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{SYSTEMD_UID}.slice",
            PodPath(API_UID, "", "", "guaranteed"),
        ),
        # Seen from inside a cgroup namespace: relative to a root below or beside ours.
        (f"/../../kubepods/burstable/pod{API_UID}/{CID}", PodPath(API_UID, CID, "", "burstable")),
        (f"/burstable/pod{API_UID}/{CID}", PodPath(API_UID, CID, "", "burstable")),
        # A workload's own sub-cgroups below its container belong to the container.
        (
            f"/kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope/init.scope",
            PodPath(API_UID, CID, "containerd", "guaranteed"),
        ),
        # Static pod: the kubelet's 32-hex config hash instead of a UUID.
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{'ab' * 16}.slice/"
            f"cri-containerd-{CID}.scope",
            PodPath("ab" * 16, CID, "containerd", "burstable"),
        ),
        (f"/kubepods/burstable/pod{'AB' * 16}", PodPath("ab" * 16, "", "", "burstable")),
        # Trailing slash and upper case as some tools print them.
        (f"/kubepods/pod{API_UID.upper()}/{CID.upper()}/", PodPath(API_UID, CID, "", "guaranteed")),
        # Not a pod: services, the QoS level, look-alikes.
        ("/system.slice/containerd.service", None),
        ("/kubepods.slice/kubepods-burstable.slice", None),
        ("/", None),
        ("", None),
        (f"/kubepods/burstable/pod{API_UID[:-1]}/{CID}", None),  # uid one digit short
        (f"/kubepods.slice/kubepods-pod{API_UID}.slice", None),  # "-" inside a slice name nests
        (f"/system.slice/pod{SYSTEMD_UID}.slice", None),  # no "<parent>-" prefix
    ],
)
def test_pod_paths(path: str, expected: PodPath | None) -> None:
    assert parse_pod_path(path) == expected


def test_mixed_separators_are_not_a_uid() -> None:
    assert parse_pod_path("/kubepods/pod6f9c1e2a-1b2c_4d3e-8f90-a1b2c3d4e5f6") is None


def test_non_container_component_below_pod_is_pod_level() -> None:
    got = parse_pod_path(f"/kubepods/burstable/pod{API_UID}/not-a-container")
    assert got == PodPath(API_UID, "", "", "burstable")


@pytest.mark.parametrize(
    ("path", "cid", "runtime"),
    [
        (f"/system.slice/docker-{CID}.scope", CID, "docker"),
        (f"/docker/{CID}", CID, ""),
        (f"/machine.slice/libpod-{CID}.scope/container", CID, "podman"),
        ("/system.slice/ssh.service", None, None),
    ],
)
def test_container_paths_outside_kubepods(path: str, cid: str | None, runtime: str | None) -> None:
    got = parse_container_path(path)
    if cid is None:
        assert got is None
    else:
        assert got is not None and (got.container_id, got.runtime) == (cid, runtime)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"containerd://{CID}", ("containerd", CID)),
        (f"cri-o://{CID}", ("cri-o", CID)),
        (f"docker://{CID.upper()}", ("docker", CID)),
        ("", ("", "")),
        (CID, ("", CID)),
    ],
)
def test_split_container_id(value: str, expected: tuple[str, str]) -> None:
    assert split_container_id(value) == expected


def test_short_id() -> None:
    assert short_id(CID) == CID[:12]
