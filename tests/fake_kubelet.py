"""A fake kubelet serving GET /pods over HTTPS (or HTTP) with bearer-token authentication.

`make_certs(directory)` makes a throwaway CA, a server certificate for 127.0.0.1 signed by it,
and an unrelated second CA (for "wrong CA" tests), with the `openssl` command.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from helpers import QuietHandler, serve_http, server_tls, stop_http


@dataclass(frozen=True)
class Certs:
    ca: str
    cert: str
    key: str
    other_ca: str


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> tuple[str, str]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return str(key), str(cert)


def make_certs(directory: Path, ip: str = "127.0.0.1") -> Certs:
    """A CA, a server certificate for `ip` signed by it, and an unrelated CA."""
    ca_key, ca_cert = _make_ca(directory, "kpod-test-ca")
    _, other_cert = _make_ca(directory, "kpod-other-ca")
    key, csr, cert = directory / "kubelet.key", directory / "kubelet.csr", directory / "kubelet.crt"
    extensions = directory / "kubelet.ext"
    extensions.write_text(
        f"subjectAltName=IP:{ip}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={ip}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(extensions),
    )  # fmt: skip
    return Certs(ca=ca_cert, cert=str(cert), key=str(key), other_ca=other_cert)


class FakeKubelet:
    """Serves `pods` as a PodList at /pods.  `garbage = True` serves a broken body instead;
    `stream`, when set, makes each answer's body: its chunks are written as they come, without a
    Content-Length (the body ends when the connection closes), until the client hangs up."""

    def __init__(self, token: str = "kubelet-token", certs: Certs | None = None) -> None:
        self.token = token
        self.certs = certs
        self.pods: list[dict[str, Any]] = []
        self.garbage = False
        self.forbidden = False  # RBAC refuses the token's identity: 403 as the kubelet answers it
        self.stream: Callable[[], Iterable[bytes]] | None = None
        self.requests = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        scheme = "https" if self.certs else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}/pods"

    def start(self) -> FakeKubelet:
        kubelet = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                kubelet.requests += 1
                if self.path != "/pods":
                    self._reply(404, b"404 page not found\n")
                elif kubelet.token and self.headers.get("Authorization") != f"Bearer {kubelet.token}":
                    self._reply(401, b"Unauthorized\n")
                elif kubelet.forbidden:
                    self._reply(403, b"Forbidden (user=system:serviceaccount:kpod:kpod, verb=get, resource=nodes,"
                                     b" subresource(s)=[pods])\n")  # fmt: skip
                elif kubelet.garbage:
                    self._reply(200, b'{"kind": "PodList", "items": [{"metadata": ')
                elif kubelet.stream is not None:
                    self._stream(kubelet.stream())
                else:
                    body = {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": kubelet.pods}
                    self._reply(200, json.dumps(body).encode())

            def _reply(self, code: int, data: bytes) -> None:
                self.reply(code, data, "application/json")

            def _stream(self, chunks: Iterable[bytes]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                with contextlib.suppress(OSError):  # the client hung up (a refused body)
                    for chunk in chunks:
                        self.wfile.write(chunk)

        self._server = serve_http(Handler, tls=server_tls(self.certs.cert, self.certs.key) if self.certs else None)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        stop_http(server)
