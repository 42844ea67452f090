"""The Prometheus exporter (being split into modules: see the next commit)."""

from kpod.exporters.prometheus.server import PrometheusConfig, PrometheusExporter, TlsSettings, factory

__all__ = ["PrometheusConfig", "PrometheusExporter", "TlsSettings", "factory"]
