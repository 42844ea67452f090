"""The Prometheus exporter: a scrape endpoint serving the exposition rendered once per cycle.

    exporter.py    the exporter: renders each cycle's batch once, keeps the bytes
    exposition.py  pure renderers over a Batch: text 0.0.4 and OpenMetrics 1.0
    protobuf.py    the pure protobuf renderer (native histograms)
    labels.py      each series' encoded labels, kept across cycles for both renderers
    naming.py      the one naming rule (dotted names to Prometheus names)
    server.py      the HTTP side: endpoints, bearer token, TLS, content negotiation
    http.py        HTTP/1.1 in one thread with bounded headers, connections and time
    config.py      its settings
"""

from kpod.exporters.prometheus.config import PrometheusConfig
from kpod.exporters.prometheus.exporter import PrometheusExporter

from kpod.component import Factory

factory = Factory(
    type="prometheus",
    kind="exporter",
    config_class=PrometheusConfig,
    create=PrometheusExporter,
    description="Serves the Prometheus exposition (/metrics, /actuator/prometheus), /healthz and /readyz.",
)

__all__ = ["factory"]
