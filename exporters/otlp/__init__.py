"""The OTLP exporter: pushes each cycle's snapshot to an OpenTelemetry Collector (gRPC or HTTP).

Configured as `exporters: {otlp: {...}}`, several at once as `otlp/<name>`:

    endpoint          host:port or a URL.  grpc: default localhost:4317; http/protobuf: default
                      localhost:4318, path /v1/metrics unless the URL names one
    protocol          grpc (default) | http/protobuf
    headers           sent with every request (gRPC metadata, HTTP headers): auth tokens...
    tls               insecure (plaintext), ca_file, cert_file + key_file (client certificate)
    compression       gzip (default) | none
    timeout           one request attempt
    interval          how often a snapshot is sent (default: the poll interval)
    max_batch_points  points per request; requests are also split until each stays under the
                      Collector's default 4 MiB receive limit
    queue_size        snapshots held while the collector is slow or away (default 10)
    backoff_initial / backoff_max   transient-error retry backoff (doubling, with jitter)
    histograms        explicit (default) | exponential: how histograms are sent (docs/otlp.md)

How a snapshot travels: `export()` (called from the collection loop) only appends the batch to a
bounded queue and returns; it never converts, encodes or touches the network.  One sender thread
encodes each batch straight into ExportMetricsServiceRequest bytes (encoding.py: no SDK data
classes, no MeterProvider, since kernel data is already aggregated) of at most max_batch_points
points (and under 4 MiB), keeps them gzip-compressed (about 0.15 MB per 110-pod snapshot instead
of ~3 MB of Point objects), and sends them oldest first.  Batches that arrive while a retry waits
are encoded during the wait.

Why not `OTLPMetricExporter.export()`: in opentelemetry-exporter-otlp 1.45 it retries inside the
call (up to 6 attempts, backoff 1 s, 2 s, 4 s... with +-20 % jitter, all within one `timeout`
deadline), logs every failure at ERROR, and returns only SUCCESS/FAILURE, so the caller can tell
neither a permanent rejection (bad request, auth) from a transient outage nor how long to wait.
Here one attempt is one request; this module owns the retry loop (capped exponential backoff with
jitter, RetryInfo / Retry-After honoured up to the cap), classifies errors as the OTLP spec does,
logs each distinct error once and counts everything in self-metrics.

Failure behaviour:
  - transient (gRPC UNAVAILABLE, DEADLINE_EXCEEDED, ...; HTTP 429/502/503/504; connection errors):
    the request is retried with backoff until it succeeds or its batch is superseded;
  - permanent (gRPC INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, ...; other HTTP 4xx):
    logged once per distinct error, counted, the request's points dropped; no retry;
  - the queue holds at most `queue_size` batches, the one being retried included; when a new
    batch arrives to a full queue the OLDEST is dropped (values are cumulative: the newest
    snapshot carries everything the dropped one did except its timestamp) and its points are
    counted in kpod_exporter_dropped_points_total{exporter}.  Memory stays bounded however long
    the collector is away, and delivery resumes by itself when it is back.

gRPC and the OTLP protobuf modules are imported in `start()`, so an agent without an OTLP exporter
never loads them; the OpenTelemetry SDK is never imported.

    config.py     OtlpConfig, TlsConfig, and the Target they resolve to
    encoding.py   Points -> ExportMetricsServiceRequest bytes, written directly, gzipped (Encoder)
    transport.py  one request over gRPC or HTTP/protobuf; errors classified (SendError)
    queue.py      the bounded, drop-oldest queue of snapshots between the loop and the sender
    exporter.py   the exporter: the sender thread, retries with backoff, accounting
"""

from kpod.exporters.otlp.config import OtlpConfig
from kpod.exporters.otlp.exporter import OtlpExporter

from kpod.component import Factory

factory = Factory(
    type="otlp",
    kind="exporter",
    config_class=OtlpConfig,
    create=OtlpExporter,
    description="Pushes every snapshot to an OpenTelemetry Collector (OTLP gRPC or HTTP/protobuf).",
)

__all__ = ["factory"]
