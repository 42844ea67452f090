"""Helpers that several test modules (and the benchmarks) share; tests/README.md lists the
other support modules and the rule for what a test may skip.

A tool that `make setup` installs is a hard requirement: `require_tools` fails the test when
it is missing (the machine is not set up as the Makefile says), it never skips.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kpod.component import Receiver

# The commands the tests run, by the Debian package that provides them.  Each package is in
# the Makefile's APT_PACKAGES (tests/test_self_contained.py checks), so `make setup` installs it.
TOOL_PACKAGES = {
    "bpftool": "bpftool",
    "clang": "clang",
    "llvm-strip": "llvm",
    "ip": "iproute2",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "openssl": "openssl",
    "setpriv": "util-linux",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "losetup": "util-linux",
    "findmnt": "util-linux",
    "mkfs.ext4": "e2fsprogs",
    "busybox": "busybox-static",
    "make": "make",
    "podman": "podman",
    "runc": "runc",
    "mmdebstrap": "mmdebstrap",
}


def require_tools(*names: str) -> None:
    """Fail (not skip) when a command `make setup` installs is missing."""
    unknown = [name for name in names if name not in TOOL_PACKAGES]
    assert not unknown, f"{unknown}: add them to TOOL_PACKAGES and the Makefile's APT_PACKAGES"
    missing = [f"{name} (package {TOOL_PACKAGES[name]})" for name in names if shutil.which(name) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: `make setup` installs it", pytrace=False)


def poll_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Whether `predicate` became true within `timeout` seconds (asked every `interval`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --------------------------------------------------------------------------- fake HTTP servers


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing and answers in one call."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def serve_http(handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1", port: int = 0,
               tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:  # fmt: skip
    """A threaded HTTP server (HTTPS with `tls`) serving in a daemon thread; stop_http() ends it."""

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True  # a restarted fake server gets its port back at once

    server = Server((host, port), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def stop_http(server: ThreadingHTTPServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()


def server_tls(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    return context


# --------------------------------------------------------------------------- bpftool


def bpftool_ids(kind: str) -> frozenset[int]:
    """The ids of every BPF `kind` (prog, map, link) on the machine now, as bpftool lists them."""
    require_tools("bpftool")
    out = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True, check=True, timeout=30)
    return frozenset(int(entry["id"]) for entry in json.loads(out.stdout or "[]"))


class BpftoolBtf:
    """BTF types as bpftool reads them: the independent side of the layout comparisons."""

    def __init__(self, path: str | Path) -> None:
        require_tools("bpftool")
        out = subprocess.run(
            ["bpftool", "-j", "btf", "dump", "file", str(path), "format", "raw"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        self.types: dict[int, dict[str, Any]] = {t["id"]: t for t in json.loads(out)["types"]}

    def named(self, kind: str, name: str) -> int:
        """The id of the type `kind` (STRUCT, ...) called `name`."""
        (type_id,) = [i for i, t in self.types.items() if t["kind"] == kind and t.get("name") == name]
        return type_id

    def resolve(self, type_id: int) -> dict[str, Any]:
        t = self.types[type_id]
        while t["kind"] in ("TYPEDEF", "VOLATILE", "CONST", "RESTRICT", "TYPE_TAG"):
            t = self.types[t["type_id"]]
        return t

    def size(self, type_id: int) -> int:
        t = self.resolve(type_id)
        if t["kind"] == "ARRAY":
            return self.size(t["type_id"]) * t["nr_elems"]
        if t["kind"] == "PTR":
            return 8
        return t["size"]

    def layout(self, type_id: int, prefix: str = "") -> dict[str, tuple[int, int]]:
        """{member path: (byte offset, size)}, nested structs flattened, bitfields left out."""
        t = self.resolve(type_id)
        out: dict[str, tuple[int, int]] = {}
        if t["kind"] not in ("STRUCT", "UNION"):
            return out
        for i, m in enumerate(t["members"]):
            if m.get("bitfield_size") or m["bits_offset"] % 8:
                continue
            name = m["name"] if m["name"] != "(anon)" else f"_anon{i}"
            offset = m["bits_offset"] // 8
            out[prefix + name] = (offset, self.size(m["type_id"]))
            for inner, (off, size) in self.layout(m["type_id"], prefix + name + ".").items():
                out[inner] = (offset + off, size)
        return out

    def maps(self) -> dict[str, tuple[int, int]]:
        """map name -> (key type id, value type id), from the `.maps` DATASEC (maps without a
        key type, ring buffers, are not keyed: left out)."""
        out: dict[str, tuple[int, int]] = {}
        for t in self.types.values():
            if t["kind"] != "DATASEC" or t["name"] != ".maps":
                continue
            for var in t["vars"]:
                v = self.types[var["type_id"]]
                definition = self.resolve(v["type_id"])
                members = {m["name"]: m["type_id"] for m in definition["members"]}
                if "key" not in members:
                    continue
                key = self.types[members["key"]]["type_id"]  # __type(key, T) is a T *
                value = self.types[members["value"]]["type_id"]
                out[v["name"]] = (key, value)
        return out


# --------------------------------------------------------------------------- the agent's plugins


def receiver_classes() -> list[type[Receiver]]:
    """The receiver class of every registered receiver plugin, as scripts/gen_docs.py finds them."""
    from scripts import gen_docs

    return [doc.cls for doc in gen_docs.receivers()]


def histogram_count_families(rng: random.Random, buckets: int) -> list[list[tuple[int, ...]]]:
    """Kernel histogram count tuples an encoder must get right, cut into families of all sizes:
    empty, only the zero bucket, only +Inf, all ones, then 300 random ones of every magnitude
    (within and beyond 4- and 8-byte varints), mostly `buckets` long, some short or long."""
    shapes = [(0,) * buckets, (4,) + (0,) * (buckets - 1), (0,) * (buckets - 1) + (9,), (1,) * buckets]
    for _ in range(300):
        big = rng.choice((10, 9000, 2**20, 2**26 // buckets, 2**29, 2**50, 2**60))
        width = rng.choice((buckets,) * 20 + (buckets - 3, buckets + 2))
        shapes.append(tuple(rng.choice((0, 0, 1, rng.randrange(big))) for _ in range(width)))
    return [shapes[:4], shapes] + [shapes[i : i + 37] for i in range(4, len(shapes), 37)]
