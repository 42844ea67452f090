"""The Prometheus exporter: renders each cycle's batch once per format and keeps the bytes.

`export()` renders the batch in the formats scrapers asked for in the last RECENT_S (text 0.0.4
with OpenMetrics, exposition.py; the protobuf exposition with native histograms, protobuf.py),
gzipped if they asked for that; the HTTP server (server.py) only picks the cached bytes, so a
scrape's cost does not grow with the number of series and a scrape never triggers collection.
A format nobody asked for lately is rendered when a scrape first asks for it, once per cycle:
a node scraped only in protobuf does not pay for text every cycle, nor the other way round.
The protobuf renderer (and its module, with the varint table of protowire.py: ~0.85 MiB of
resident memory) is made when a scrape first asks for protobuf: a node scraped in text never
holds it.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from kpod.exporters.prometheus.config import PrometheusConfig
from kpod.exporters.prometheus.exposition import Rendered, Renderer
from kpod.exporters.prometheus.http import REFUSED_REASONS
from kpod.exporters.prometheus.server import (
    EMPTY_EXPOSITION,
    OPENMETRICS,
    PROTOBUF,
    TEXT,
    Exposition,
    Render,
    ScrapeServer,
)

from kpod.component import Context, Exporter
from kpod.model import Batch
from kpod.selfmetrics import EXPORTER_SENT_POINTS, EXPORTER_SENT_POINTS_HELP, declare_exporter_metrics

HTTP_REFUSED = "kpod.exporter.http.refused"
HTTP_REFUSED_HELP = (
    "Connections and requests the metrics listener refused or cut, by reason (its bounds: docs/SECURITY.md)."
)

if TYPE_CHECKING:
    from kpod.exporters.prometheus.protobuf import ProtobufRenderer

    from kpod.status import AgentStatus

# A format (and its gzip) a scrape asked for within this long is rendered in export(), ahead of
# the scrapes; before any scrape, and when none came for this long, text and OpenMetrics are.
RECENT_S = 300.0


class PrometheusExporter(Exporter):
    def __init__(self, context: Context, config: PrometheusConfig) -> None:
        super().__init__(context, config)
        self.config: PrometheusConfig = config
        self._renderer = Renderer()
        self._protobuf: ProtobufRenderer | None = None  # made when a scrape first asks for protobuf
        self._render_lock = threading.Lock()  # the renderers' caches: one render at a time
        self._asked: dict[tuple[str, bool], float] = {}  # (format, gzipped) -> when a scrape last asked
        self.exposition: Exposition = EMPTY_EXPOSITION
        self.series = 0
        self._server = ScrapeServer(
            self.id, config.endpoint, config.tls, config.bearer_token_file, self, self.log, self._refused
        )
        # Same self-metrics as every exporter; "sent" here means rendered into the exposition
        # (a scrape serves them; nothing is queued, so queue and drops stay 0).
        declare_exporter_metrics(context.self_metrics, self.id)
        self._labels = (("exporter", self.id),)
        for reason in REFUSED_REASONS:  # at 0 from the start, so that rate() works from the first
            self._refused(reason, 0)

    def _refused(self, reason: str, amount: int = 1) -> None:
        labels = (("exporter", self.id), ("reason", reason))
        self.context.self_metrics.inc(HTTP_REFUSED, HTTP_REFUSED_HELP, labels, amount)

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

    def _render_protobuf(self, batch: Batch) -> dict[str, bytes]:
        if self._protobuf is None:
            from kpod.exporters.prometheus.protobuf import ProtobufRenderer

            self._protobuf = ProtobufRenderer(self.config.histograms)
        body, self.series = self._protobuf.render(batch)
        return {PROTOBUF: body}

    def export(self, batch: Batch) -> None:
        now = time.monotonic()
        previous = self.exposition
        if previous is not EMPTY_EXPOSITION:
            for key in previous.asked():
                self._asked[key] = now
        self._asked = {key: when for key, when in self._asked.items() if now - when <= RECENT_S}

        rendered: list[Rendered] = []  # the batch's samples, rendered once for both text formats

        def samples() -> Rendered:
            if not rendered:
                rendered.append(self._renderer.render_parts(batch))
                self.series = rendered[0].series
            return rendered[0]

        renders: dict[str, Render] = {
            TEXT: lambda: {TEXT: samples().parts(TEXT)},
            OPENMETRICS: lambda: {OPENMETRICS: samples().parts(OPENMETRICS)},
        }
        if self.config.protobuf:
            renders[PROTOBUF] = lambda: self._render_protobuf(batch)
        exposition = Exposition(renders, self._render_lock)
        wanted = self._asked or {(OPENMETRICS, False): now}
        for fmt, gzipped in wanted:
            if exposition.offers(fmt):
                exposition.body(fmt, gzipped)
        # What scrapers asked for lately is made.  A format's plain body made only to be gzipped
        # is not kept (Prometheus asks for gzip: a megabyte at 110 pods), nor then the rendered
        # samples (that body's parts): a scrape that asks for something else after all has it
        # rendered from the batch again.
        if exposition.drop_plain({fmt for fmt, gzipped in wanted if not gzipped}):
            with self._render_lock:
                rendered.clear()
        self.context.self_metrics.inc(EXPORTER_SENT_POINTS, EXPORTER_SENT_POINTS_HELP, self._labels, len(batch))
        self.exposition = exposition

    def status(self) -> dict[str, Any]:
        return {
            "endpoint": self.config.endpoint,
            "listening": self._server.listening,
            "series": self.series,
            "connections": self._server.connections,
        }
