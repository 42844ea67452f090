"""The Prometheus exporter's settings (`exporters: {prometheus: {...}}`)."""

from __future__ import annotations

from dataclasses import dataclass, field


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'0.0.0.0:9090' -> ('0.0.0.0', 9090); '[::]:9090' -> ('::', 9090); ':9090' -> ('0.0.0.0', 9090)."""
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected host:port, got {endpoint!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


@dataclass
class TlsSettings:
    cert_file: str = ""  # PEM certificate (chain); empty with key_file empty: plain HTTP
    key_file: str = ""  # PEM private key


@dataclass
class PrometheusConfig:
    endpoint: str = "0.0.0.0:9090"
    tls: TlsSettings = field(default_factory=TlsSettings)
    # A file holding the token scrapers must send; empty: no authentication.
    bearer_token_file: str = ""
    # Histogram buckets in the protobuf exposition, the one Prometheus asks for when native
    # histograms are on (2.40-3.7: --enable-feature=native-histograms; 3.8+: scrape_native_histograms):
    # both (native and classic buckets), native (one series per histogram), or classic (no protobuf
    # exposition: every scraper gets the text formats, as before).  Text formats always carry classic buckets.
    histograms: str = field(default="both", metadata={"choices": ("both", "native", "classic")})

    @property
    def protobuf(self) -> bool:
        """Whether the protobuf exposition is offered (`histograms` is not classic)."""
        return self.histograms != "classic"

    def validate(self) -> None:
        try:
            parse_endpoint(self.endpoint)
        except ValueError as error:
            raise ValueError(f"endpoint: {error}") from None
        if bool(self.tls.cert_file) != bool(self.tls.key_file):
            raise ValueError("tls: set both cert_file and key_file, or neither")
