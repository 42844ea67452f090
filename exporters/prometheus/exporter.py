"""The Prometheus exporter: renders each cycle's batch once and keeps the bytes to serve.

`export()` renders the batch (text 0.0.4 and OpenMetrics, exposition.py) and gzips both; the
HTTP server (server.py) only picks the cached bytes, so a scrape's cost does not grow with the
number of series and a scrape never triggers collection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kpod.exporters.prometheus.config import PrometheusConfig
from kpod.exporters.prometheus.exposition import Renderer
from kpod.exporters.prometheus.server import EMPTY_EXPOSITION, Exposition, ScrapeServer

from kpod.component import Context, Exporter
from kpod.model import Batch
from kpod.selfmetrics import EXPORTER_SENT_POINTS, EXPORTER_SENT_POINTS_HELP, declare_exporter_metrics

if TYPE_CHECKING:
    from kpod.status import AgentStatus


class PrometheusExporter(Exporter):
    def __init__(self, context: Context, config: PrometheusConfig) -> None:
        super().__init__(context, config)
        self.config: PrometheusConfig = config
        self._renderer = Renderer()
        self.exposition: Exposition = EMPTY_EXPOSITION
        self.series = 0
        self._server = ScrapeServer(self.id, config.endpoint, config.tls, config.bearer_token_file, self)
        # Same self-metrics as every exporter; "sent" here means rendered into the exposition
        # (a scrape serves them; nothing is queued, so queue and drops stay 0).
        declare_exporter_metrics(context.self_metrics, self.id)
        self._labels = (("exporter", self.id),)

    @property
    def agent_status(self) -> AgentStatus | None:
        return self.context.status

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address

    def start(self) -> None:
        self._server.start()
        self.log.info(
            "serving /metrics on %s://%s:%d%s",
            "https" if self._server.secure else "http",
            *self.address,
            " (bearer token required)" if self._server.token is not None else "",
        )

    def shutdown(self) -> None:
        self._server.shutdown()

    def export(self, batch: Batch) -> None:
        text, openmetrics, self.series = self._renderer.render(batch)
        self.context.self_metrics.inc(EXPORTER_SENT_POINTS, EXPORTER_SENT_POINTS_HELP, self._labels, len(batch))
        self.exposition = Exposition.of(text, openmetrics)

    def status(self) -> dict[str, Any]:
        return {"endpoint": self.config.endpoint, "listening": self._server.listening, "series": self.series}
