"""The OTLP exporter (being split into modules: see the next commit)."""

from kpod.exporters.otlp.exporter import Encoder, OtlpConfig, OtlpExporter, TlsConfig, factory, resolve_target

__all__ = ["Encoder", "OtlpConfig", "OtlpExporter", "TlsConfig", "factory", "resolve_target"]
