"""The OTLP exporter's settings (`exporters: {otlp: {...}}`) and where they point."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from kpod.units import Duration

GRPC_DEFAULT_PORT = 4317
HTTP_DEFAULT_PORT = 4318
HTTP_METRICS_PATH = "/v1/metrics"


@dataclass
class TlsConfig:
    # Plaintext (no TLS).  With grpc an endpoint http://... means the same; https://... means TLS.
    insecure: bool = False
    # PEM file of the CA that signed the collector's certificate; empty = the system's roots.
    ca_file: str = ""
    # Client certificate and key (PEM) for mutual TLS; both or neither.
    cert_file: str = ""
    key_file: str = ""

    def validate(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if self.insecure and (self.ca_file or self.cert_file):
            raise ValueError("tls.insecure is plaintext: ca_file, cert_file and key_file would be ignored")


@dataclass
class OtlpConfig:
    endpoint: str = ""
    protocol: str = field(default="grpc", metadata={"choices": ("grpc", "http/protobuf")})
    headers: dict[str, str] = field(default_factory=dict)
    tls: TlsConfig = field(default_factory=TlsConfig)
    compression: str = field(default="gzip", metadata={"choices": ("gzip", "none")})
    timeout: Duration = field(default_factory=lambda: Duration.parse("10s"), metadata={"min": 0.01, "max": 300})
    # None: every cycle (the poll interval).
    interval: Duration | None = None
    max_batch_points: int = field(default=5000, metadata={"min": 1, "max": 1_000_000})
    queue_size: int = field(default=10, metadata={"min": 1, "max": 10_000})
    backoff_initial: Duration = field(default_factory=lambda: Duration.parse("1s"), metadata={"min": 0.01})
    backoff_max: Duration = field(default_factory=lambda: Duration.parse("30s"), metadata={"min": 0.01})
    # How histograms are sent: explicit (explicit-bucket Histogram, the kernel's power-of-two bounds:
    # every backend reads it) or exponential (ExponentialHistogram of scale 0, the same buckets in
    # fewer bytes, for backends that take it: Prometheus' OTLP receiver needs native histograms on).
    histograms: str = field(default="explicit", metadata={"choices": ("explicit", "exponential")})

    def validate(self) -> None:
        resolve_target(self)  # raises ValueError with the reason
        if self.backoff_max.seconds < self.backoff_initial.seconds:
            raise ValueError("backoff_max must be at least backoff_initial")
        for key in self.headers:
            if not key or any(c in key for c in " \r\n:"):
                raise ValueError(f"headers: invalid header name {key!r}")
        for value in self.headers.values():
            if "\r" in value or "\n" in value:
                raise ValueError("headers: a value contains a line break")


@dataclass(frozen=True)
class Target:
    """Where and how to connect, resolved from endpoint, protocol and tls."""

    protocol: str  # grpc | http/protobuf
    secure: bool
    host: str
    port: int
    path: str  # HTTP only

    @property
    def grpc_target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        if self.protocol == "grpc":
            return f"grpc{'s' if self.secure else ''}://{self.grpc_target}"
        return f"{'https' if self.secure else 'http'}://{self.grpc_target}{self.path}"


def resolve_target(config: OtlpConfig) -> Target:
    """Endpoint + protocol + tls -> Target.  Raises ValueError naming the problem.

    Without a scheme the endpoint is host[:port] and TLS is on unless tls.insecure (as the
    Collector's own otlp exporter does); the default ports are 4317 (grpc) and 4318 (http).
    """
    grpc = config.protocol == "grpc"
    default_port = GRPC_DEFAULT_PORT if grpc else HTTP_DEFAULT_PORT
    endpoint = config.endpoint.strip() or f"localhost:{default_port}"
    scheme = ""
    if "://" in endpoint:
        scheme = endpoint.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"endpoint {endpoint!r}: scheme must be http or https")
        parsed = urllib.parse.urlsplit(endpoint)
    else:
        parsed = urllib.parse.urlsplit("//" + endpoint)
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError as error:
        raise ValueError(f"endpoint {endpoint!r}: {error}") from None
    if not host:
        raise ValueError(f"endpoint {endpoint!r}: no host")
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme, default_port) if scheme and not grpc else default_port
    if scheme == "https" and config.tls.insecure:
        raise ValueError(f"endpoint {endpoint!r} is https but tls.insecure asks for plaintext")
    secure = scheme == "https" or (not scheme and not config.tls.insecure)
    if scheme == "http" and (config.tls.ca_file or config.tls.cert_file):
        raise ValueError(f"endpoint {endpoint!r} is plaintext http but tls files are configured")
    path = parsed.path or ""
    if grpc:
        if path not in ("", "/"):
            raise ValueError(f"endpoint {endpoint!r}: a gRPC endpoint has no path")
        path = ""
    elif path in ("", "/"):
        path = HTTP_METRICS_PATH
    if parsed.query:
        path += "?" + parsed.query
    return Target(config.protocol, secure, host, port, path)
