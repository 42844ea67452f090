"""PodInfo extraction from API JSON, and the PodStore's lookups and generations."""

from __future__ import annotations

import json

import pytest
from fake_apiserver import make_pod
from kpod.processors.k8sattributes.podlist import decode_pod_list
from kpod.processors.k8sattributes.pods import PodStore, pod_from_json

A, B, C, OLD = "a" * 64, "b" * 64, "c" * 64, "d" * 64


def test_fields_kept() -> None:
    raw = make_pod(
        "web-1",
        namespace="shop",
        uid="6F9C1E2A-1B2C-4D3E-8F90-A1B2C3D4E5F6",
        labels={"app": "web"},
        containers=[("app", A), ("sidecar", B)],
        init_containers=[("init", C)],
        host_network=True,
        runtime="cri-o",
    )
    raw["status"]["containerStatuses"][0]["lastState"] = {"terminated": {"containerID": f"cri-o://{OLD}"}}
    raw["status"]["ephemeralContainerStatuses"] = [{"name": "debug", "containerID": f"cri-o://{'e' * 64}"}]
    raw["metadata"]["deletionTimestamp"] = "2026-11-28T11:00:00Z"
    pod = pod_from_json(raw)
    assert (pod.uid, pod.name, pod.namespace) == ("6f9c1e2a-1b2c-4d3e-8f90-a1b2c3d4e5f6", "web-1", "shop")
    assert dict(pod.labels) == {"app": "web"}
    assert pod.host_network and pod.deleting and pod.phase == "Running"
    assert dict(pod.containers) == {A: "app", B: "sidecar", C: "init", OLD: "app", "e" * 64: "debug"}
    assert pod.all_started


def test_all_started_needs_every_spec_container() -> None:
    assert not pod_from_json(make_pod("p", containers=[("app", A), ("sidecar", "")])).all_started
    no_status = make_pod("p")
    del no_status["status"]["containerStatuses"]
    assert not pod_from_json(no_status).all_started


def test_pod_without_uid_is_rejected() -> None:
    raw = make_pod("p")
    del raw["metadata"]["uid"]
    with pytest.raises(ValueError, match="uid"):
        pod_from_json(raw)


def test_static_pod_found_by_config_hash() -> None:
    raw = make_pod("kube-proxy-node-a", namespace="kube-system")
    raw["metadata"]["annotations"]["kubernetes.io/config.hash"] = "AB" * 16
    store = PodStore()
    store.replace([pod_from_json(raw)])
    found = store.get("ab" * 16)
    assert found is not None and found.name == "kube-proxy-node-a"
    assert store.get(raw["metadata"]["uid"]) is found


def test_generations_and_no_op_updates() -> None:
    store = PodStore()
    assert not store.synced and store.get("x") is None
    pod = pod_from_json(make_pod("p", uid="11111111-1111-1111-1111-111111111111"))
    store.replace([pod])
    assert store.synced and store.generation == 1
    before = store.snapshot()
    # An update that changes nothing we keep (a condition timestamp) is not a new generation.
    store.upsert(pod_from_json(make_pod("p", uid="11111111-1111-1111-1111-111111111111")))
    assert store.generation == 1
    store.upsert(pod_from_json(make_pod("p", uid="11111111-1111-1111-1111-111111111111", labels={"x": "y"})))
    assert store.generation == 2
    assert dict(before[pod.uid].labels) != {"x": "y"}  # readers' snapshots are never changed
    store.delete(pod.uid)
    store.delete(pod.uid)
    assert store.generation == 3 and len(store) == 0


def test_a_complete_list_of_the_same_pods_is_not_a_new_generation() -> None:
    """A kubelet poll (or a relist) that finds the pods as they were changes nothing readers
    derived; one that finds any difference, or the first list (even an empty one), does."""
    raw = [make_pod(f"p{i}", uid=f"{i}1111111-1111-1111-1111-111111111111") for i in range(3)]
    store = PodStore()
    store.replace([])
    assert store.synced and store.generation == 1
    store.replace([pod_from_json(p) for p in raw])
    assert store.generation == 2
    store.set_error("poll failed")
    store.replace([pod_from_json(p) for p in reversed(raw)])  # decoded again, another order
    assert store.generation == 2 and store.last_error == ""
    raw[1]["metadata"]["labels"]["tier"] = "new"
    store.replace([pod_from_json(p) for p in raw])
    assert store.generation == 3 and dict(store.snapshot()[pod_from_json(raw[1]).uid].labels)["tier"] == "new"
    store.replace([pod_from_json(p) for p in raw[:2]])
    assert store.generation == 4 and len(store) == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"<html>", "not JSON"),
        (b'{"kind": "Status", "code": 500}', "not a PodList"),
        (b"[1, 2]", "not a PodList"),
    ],
)
def test_decode_pod_list_errors(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_pod_list(data)


def test_decode_pod_list_skips_a_malformed_item() -> None:
    good = make_pod("good")
    page = decode_pod_list(
        b'{"kind": "PodList", "metadata": {"resourceVersion": "7", "continue": "x"}, "items": ['
        + json.dumps(good).encode()
        + b', {"metadata": {}}, 5]}'
    )
    assert [p.name for p in page.pods] == ["good"] and (page.resource_version, page.cont) == ("7", "x")
