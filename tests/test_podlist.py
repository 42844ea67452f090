"""The PodList decoder fed in chunks: the same pods and errors as decoding the whole document,
and never the whole document's objects (or an endless value) in memory.

The reference is what the decoder replaces: json.loads of the whole body, then pod_from_json
per item (tests/test_fuzz.py compares the two on generated documents and random cuts).
"""

from __future__ import annotations

import itertools
import json
import tracemalloc
from collections.abc import Iterator

import pytest
from fake_apiserver import container_id, make_pod
from kpod.processors.k8sattributes import podlist
from kpod.processors.k8sattributes.podlist import PodListDecoder, PodListPage, decode_pod_list
from kpod.processors.k8sattributes.pods import pod_from_json

CHUNK = 65536


def node_pods(count: int) -> list[dict]:
    """A node's pods as the kubelet lists them: alternately two containers and one."""
    pods = []
    for i in range(count):
        containers = [("app", container_id(f"scale/p{i}/app"))]
        if i % 2 == 0:
            containers.append(("sidecar", container_id(f"scale/p{i}/sidecar")))
        pods.append(make_pod(f"p{i}", namespace="scale", labels={"app": f"a{i % 7}"}, containers=containers))
    return pods


def body_of(items: list, metadata: object = None) -> bytes:
    return json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": metadata or {}, "items": items}).encode()


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def decode_chunks(chunks: Iterator[bytes]) -> PodListPage:
    decoder = PodListDecoder()
    for chunk in chunks:
        decoder.feed(chunk)
    return decoder.finish()


@pytest.mark.parametrize("size", [1, 7, 4096, CHUNK, 1 << 30])
def test_chunks_of_any_size_give_the_pods_of_the_whole_document(size: int) -> None:
    items = [*node_pods(12), {"metadata": {}}, 5, "x", {"metadata": {"uid": 7}}]
    data = body_of(items, {"resourceVersion": "42", "continue": "next"})
    page = decode_chunks(chunked(data, size))
    assert page.pods == [pod_from_json(p) for p in items[:12]]
    assert (page.skipped, page.resource_version, page.cont) == (4, "42", "next")
    # Every field enrichment reads came through: names, namespace, labels, container ids.
    first = page.pods[0]
    assert (first.name, first.namespace, dict(first.labels)) == ("p0", "scale", {"app": "a0"})
    assert set(first.containers.values()) == {"app", "sidecar"} and first.all_started


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not JSON"),
        (b"<html>", "not JSON"),
        (b'{"kind": "Status", "code": 500}', "not a PodList (kind 'Status')"),
        (b"[1, 2]", "not a PodList (kind 'list')"),
        (b'"items"', "not a PodList (kind 'str')"),
        (b'{"items": {}}', "not a PodList"),
        (b'{"items": [], "items": 3}', "not a PodList"),  # the last key counts, as in json.loads
        (b'{"items": []} {}', "not JSON"),
        (b'{"items": [] "kind": 1}', "not JSON"),
        (b'{"items": [{"metadata": {"uid": "a"}} {}]}', "not JSON"),
        (b'{"items": [{"metadata": {"uid": "a"}}]', "not JSON"),  # cut
        (b'{"items": [' + b"[" * 5000 + b"]" * 5000 + b"]}", "not JSON (RecursionError)"),
        (b'{"items": ["\xff"]}', "not JSON (UnicodeDecodeError)"),
    ],
)
def test_errors_are_the_same_in_one_piece_and_byte_by_byte(data: bytes, message: str) -> None:
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
            decode_chunks(iter(chunks))
        assert str(caught.value).startswith("response ") and "\n" not in str(caught.value)


def test_a_number_cut_by_a_chunk_is_not_taken_for_a_shorter_one() -> None:
    data = b'{"metadata": {"resourceVersion": 12345}, "items": [123, {"metadata": {"uid": "A"}}]}'
    for cut in range(1, len(data)):
        page = decode_chunks(iter([data[:cut], data[cut:]]))
        assert ([p.uid for p in page.pods], page.skipped, page.resource_version) == (["a"], 1, "12345"), cut


def test_a_fraction_or_an_exponent_cut_by_a_chunk_is_not_an_error() -> None:
    # "0" of "0.5" and "1" of "1e5" decode as numbers that stop before a tail the next chunk
    # completes (the fuzz test found {"":0.0} fed byte by byte called "not JSON").
    data = (b'{"x": 0.5, "y": 1e5, "z": -2E-3, "metadata": {"resourceVersion": "9", "n": 3.5e1}, '
            b'"items": [{"metadata": {"uid": "A"}}]}')
    for cut in range(1, len(data)):
        page = decode_chunks(iter([data[:cut], data[cut:]]))
        assert ([p.uid for p in page.pods], page.resource_version) == (["a"], "9"), cut
    with pytest.raises(ValueError, match="not a PodList"):
        decode_chunks(iter([b'{"":0', b'.0}']))


def test_a_byte_order_mark_and_multibyte_characters_cut_anywhere() -> None:
    pod = make_pod("caf\u00e9-\u65e5\u672c", namespace="\u00fc")
    data = b"\xef\xbb\xbf" + body_of([pod])
    for cut in range(len(data)):
        assert decode_chunks(iter([data[:cut], data[cut:]])).pods[0].name == "caf\u00e9-\u65e5\u672c", cut


@pytest.mark.parametrize("size", [512, CHUNK])
def test_decoding_in_chunks_holds_a_fraction_of_the_whole_document(size: int) -> None:
    """110 pods: json.loads of the body builds every pod's objects at once; the decoder holds
    one pod's and the undecoded remainder, whether a pod spans many chunks (512 bytes) or a
    chunk holds many pods.  Allocations counted by tracemalloc (exact)."""
    data = body_of(node_pods(110))

    def whole() -> list:
        return [pod_from_json(item) for item in json.loads(data)["items"]]

    def streamed() -> list:
        return decode_chunks(chunked(data, size)).pods

    peaks = {}
    for decode in (whole, streamed):
        tracemalloc.start()
        try:
            pods = decode()
            peaks[decode.__name__] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(pods) == 110
    assert peaks["streamed"] * 4 < peaks["whole"], peaks
    assert peaks["streamed"] < len(data), peaks  # less than the raw body itself


def test_an_endless_value_is_refused_at_the_cap_without_holding_more(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(podlist, "MAX_VALUE_CHARS", 1 << 20)
    head = b'{"kind": "PodList", "items": [{"metadata": {"uid": "a", "annotations": {"x": "'
    decoder = PodListDecoder()
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"response has a value larger than 1 MiB"):
            for chunk in itertools.chain([head], itertools.repeat(b"y" * CHUNK, 10 * 16)):  # 10 MiB offered
                decoder.feed(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # the cap and a copy of it, not the 10 MiB


def test_whole_document_helper_accepts_text() -> None:
    page = decode_pod_list(body_of(node_pods(2)).decode())
    assert [p.name for p in page.pods] == ["p0", "p1"]
