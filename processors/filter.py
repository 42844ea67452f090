"""The `filter` processor: keep or drop points by attribute or by metric name.

    processors:
      filter/no-lo:
        exclude: {interface: [lo]}
      filter/only-syscalls:
        metrics: [kpod.syscall.count]
        include: {syscall: [read, write]}

A point's attributes here are its own (syscall, device, interface, ...) and, once the
k8sattributes processor ran, its Prometheus resource labels (namespace, pod, container, node).
`include` keeps a point only if every listed key has one of the listed values; `exclude` drops a
point if any listed key has one of the listed values.  `metrics` limits the filter to those
metric names (other metrics pass untouched).  Values are matched against values, keys against keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kpod.component import Context, Factory, Processor
from kpod.model import Batch, Point


@dataclass
class FilterConfig:
    include: dict[str, list[str]] = field(default_factory=dict)
    exclude: dict[str, list[str]] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not self.include and not self.exclude:
            raise ValueError("a filter needs include or exclude")


class FilterProcessor(Processor):
    def __init__(self, context: Context, config: FilterConfig) -> None:
        super().__init__(context, config)
        self._include = {key: frozenset(values) for key, values in config.include.items()}
        self._exclude = {key: frozenset(values) for key, values in config.exclude.items()}
        self._metrics = frozenset(config.metrics)

    def keeps(self, point: Point) -> bool:
        if self._metrics and point.metric.name not in self._metrics:
            return True
        values = dict(point.attributes)
        if point.resource is not None:
            values.update(point.resource.labels)
        for key, allowed in self._include.items():
            if values.get(key) not in allowed:
                return False
        return all(values.get(key) not in denied for key, denied in self._exclude.items())

    def process(self, batch: Batch) -> Batch:
        return Batch([p for p in batch.points if self.keeps(p)], batch.time_ns)


factory = Factory(
    type="filter",
    kind="processor",
    config_class=FilterConfig,
    create=FilterProcessor,
    description="Keeps or drops points by attribute value.",
)
