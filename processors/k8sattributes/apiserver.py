"""How the informer reaches the API server: where it is, who we are, one GET at a time.

In a pod that is the service account's in-cluster config: KUBERNETES_SERVICE_HOST/_PORT, the
mounted token (re-read every minute: projected tokens rotate) and CA; the requests are plain
http.client over ssl.  None of it imports the `kubernetes` package, whose import alone costs
some 30 MiB of RSS (docs/perf/k8s.md) for a list and a watch of one node's pods.

Outside a cluster the config is a kubeconfig (kpod's `kubeconfig` setting or $KUBECONFIG).
Kubeconfigs carry contexts, client certificates, exec and auth-provider plugins: there the
`kubernetes` package's loader reads it (that import is paid only in this mode), and its
result (server, bearer token or client certificate, CA) drives the same http.client requests.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from kpod.component import ComponentUnavailable

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_REFRESH_S = 60.0  # as client-go: a projected token is rewritten well before it expires


class ApiError(Exception):
    """The API server answered with a non-2xx status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}".strip())
        self.status = status
        self.reason = reason


@dataclass
class ApiServer:
    """Where the API server is and how to authenticate to it."""

    url: str  # scheme://host[:port], no path
    authorization: Callable[[], str | None]  # the Authorization header's value, if any
    tls: ssl.SSLContext | None  # None for http://

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or ""
        if parts.scheme == "https":
            return http.client.HTTPSConnection(host, parts.port or 443, timeout=timeout, context=self.tls)
        return http.client.HTTPConnection(host, parts.port or 80, timeout=timeout)


class _FileToken:
    """A token file read again when the last read is older than TOKEN_REFRESH_S."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._value = ""
        self._read_at = -TOKEN_REFRESH_S
        self._lock = threading.Lock()

    def __call__(self) -> str | None:
        with self._lock:
            if time.monotonic() - self._read_at >= TOKEN_REFRESH_S or not self._value:
                try:
                    with open(self.path) as handle:
                        self._value = handle.read().strip()
                    self._read_at = time.monotonic()
                except OSError:
                    pass  # keep the last token; the server's 401 will say so if it expired
            return f"Bearer {self._value}" if self._value else None


def in_cluster(environ: Mapping[str, str], account_dir: str | None = None) -> ApiServer:
    """The pod's own config.  Raises ComponentUnavailable naming what is missing."""
    account_dir = account_dir or SERVICE_ACCOUNT_DIR
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "443")
    token, ca = os.path.join(account_dir, "token"), os.path.join(account_dir, "ca.crt")
    if not os.path.exists(token):
        raise ComponentUnavailable(f"in-cluster config: service account token {token} is missing")
    try:
        tls = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as error:
        raise ComponentUnavailable(f"in-cluster config: CA file {ca}: {error}") from None
    if ":" in host:  # an IPv6 service address
        host = f"[{host}]"
    return ApiServer(f"https://{host}:{port}", _FileToken(token), tls)


def from_kubeconfig(path: str) -> ApiServer:
    """A kubeconfig's current context, read by the `kubernetes` package (imported only here)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=path, client_configuration=configuration)
    except Exception as error:
        raise ComponentUnavailable(f"kubeconfig {path}: {error}".replace("\n", " ")) from None

    def authorization() -> str | None:
        # Calls the loader's refresh hook: exec plugins and expiring tokens stay current.
        setting = configuration.auth_settings().get("BearerToken")
        return setting["value"] if setting and setting.get("value") else None

    tls = None
    if configuration.host.startswith("https://"):
        tls = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
        if not configuration.verify_ssl:
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
        elif configuration.tls_server_name is None and configuration.assert_hostname is False:
            tls.check_hostname = False
        if configuration.cert_file:
            tls.load_cert_chain(configuration.cert_file, configuration.key_file)
    return ApiServer(configuration.host.rstrip("/"), authorization, tls)


def load(kubeconfig: str, environ: Mapping[str, str] | None = None) -> ApiServer:
    """kpod's kubeconfig if given, else in-cluster, else $KUBECONFIG (or ~/.kube/config).

    Raises ComponentUnavailable with the reason when none works.
    """
    env = os.environ if environ is None else environ
    if kubeconfig:
        return from_kubeconfig(kubeconfig)
    if env.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster(env)
    path = env.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    path = path.split(os.pathsep)[0]
    if not os.path.exists(path):
        raise ComponentUnavailable(
            f"no Kubernetes API config: not in a pod, and {path} does not exist"
            " (set KUBECONFIG, or use discovery mode local)"
        )
    return from_kubeconfig(path)


class Request:
    """One GET whose response is read by one thread and can be cut by another (stop)."""

    def __init__(self, server: ApiServer, target: str, connect_timeout: float, read_timeout: float) -> None:
        self.connection = server.connect(connect_timeout)
        headers = {"Accept": "application/json"}
        authorization = server.authorization()
        if authorization:
            headers["Authorization"] = authorization
        self.connection.connect()
        assert self.connection.sock is not None
        self.connection.sock.settimeout(read_timeout)
        self.connection.request("GET", target, headers=headers)
        self.response = self.connection.getresponse()
        if not 200 <= self.response.status <= 299:
            status, reason = self.response.status, self.response.reason
            self.close()
            raise ApiError(status, reason)

    def chunks(self, size: int = 65536) -> Iterator[bytes]:
        """The body as it arrives (a chunked watch stream: each read returns what is there)."""
        while chunk := self.response.read1(size):
            yield chunk

    def read(self) -> bytes:
        return self.response.read()

    def cut(self) -> None:
        """From another thread: unblock a read in progress."""
        sock = self.connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.connection.close()


def describe_error(error: BaseException) -> str:
    """One line for a connection-level failure."""
    if isinstance(error, ApiError):
        return f"API server {error}"
    if isinstance(error, TimeoutError | socket.timeout):
        return "API server read timed out"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"API server TLS certificate not trusted ({error.verify_message})"
    if isinstance(error, ConnectionRefusedError | socket.gaierror):
        return f"cannot connect to the API server: {error}"
    if isinstance(error, http.client.HTTPException | ConnectionError):
        return f"connection to the API server broken: {type(error).__name__}: {error}".rstrip(": ")
    return f"{type(error).__name__}: {error}".replace("\n", " ")
