"""kpod-metrics: per-pod kernel metrics agent."""

__version__ = "0.1.0"
