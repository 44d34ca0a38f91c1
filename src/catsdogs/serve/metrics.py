"""Prometheus metrics of ``catsdogs serve``, scraped at ``GET /metrics`` (prometheus-client's text format).

* ``catsdogs_http_requests_total`` and ``catsdogs_http_request_duration_seconds`` (a histogram), both by
  ``route`` (the route's template, never the raw path: a scan of random URLs stays one ``unmatched``
  series), ``method`` and ``status``. The middleware is the outermost one, so refusals (401, 413, 429)
  are counted and timed too; ``catsdogs_http_requests_in_progress`` is the gauge of requests in flight.
* ``catsdogs_predictions_total{label}``: one per classified image, by the label answered, ``unknown``
  included (every label starts at 0), so a drift towards "neither" shows as a rate.
* ``catsdogs_batch_size`` (a histogram of images per forward pass), ``catsdogs_forward_seconds_total``
  and ``catsdogs_queue_depth`` (images waiting for a forward worker): read from the micro-batcher at
  scrape time, so the hot path pays nothing for them.
* ``catsdogs_model_info{model,backend,image_size,classes}``: which model and engine answer.

Each app has its own registry (two apps in one process, as in the tests, never share counters), and
nothing in it names a path or a library version.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from catsdogs.serve.batcher import MicroBatcher

METRICS_PATH = "/metrics"
"""Where Prometheus scrapes; behind the API key when one is configured (docs/security.md)."""

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""Media type of the scrape (Prometheus' text exposition format)."""

UNMATCHED = "unmatched"
"""The route label of a request that matched no route (404s of scanners, typos)."""

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods kept as their own label value; anything else is counted as ``other`` (bounded labels)."""

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Request latency buckets in seconds: a batch-1 forward is 10-100 ms on 2 cores (docs/engines.md);
uploads over a slow line may take up to --body-timeout-s (60 s)."""

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Images per forward pass; --max-batch defaults to 32."""


class _BatcherCollector(Collector):
    """Batch sizes, forward time and queue depth read from the micro-batcher when scraped."""

    def __init__(self) -> None:
        self.batcher: MicroBatcher | None = None

    def collect(self) -> Iterable[Metric]:
        batcher = self.batcher
        stats = batcher.stats if batcher is not None else None
        sizes = dict(stats.sizes) if stats is not None else {}
        buckets: list[tuple[str, float]] = []
        for bound in BATCH_BUCKETS:
            buckets.append((str(float(bound)), float(sum(n for size, n in sizes.items() if size <= bound))))
        buckets.append(("+Inf", float(sum(sizes.values()))))
        hist = HistogramMetricFamily("catsdogs_batch_size", "Images per forward pass of the micro-batcher")
        hist.add_metric([], buckets, sum_value=float(sum(size * n for size, n in sizes.items())))
        yield hist
        yield CounterMetricFamily("catsdogs_forward_seconds", "Seconds spent in forward passes",
                                  value=stats.forward_seconds if stats is not None else 0.0)
        yield GaugeMetricFamily("catsdogs_queue_depth", "Decoded images waiting for a forward worker",
                                value=float(batcher.queued) if batcher is not None else 0.0)


class ServeMetrics:
    """The metrics of one app: request middleware counters, answers per label, batcher and model facts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("catsdogs_http_requests", "HTTP requests answered",
                                ("route", "method", "status"), registry=self.registry)
        self.latency = Histogram("catsdogs_http_request_duration_seconds",
                                 "Time from the request's arrival to the end of its answer",
                                 ("route", "method", "status"), buckets=LATENCY_BUCKETS_S,
                                 registry=self.registry)
        self.in_progress = Gauge("catsdogs_http_requests_in_progress", "HTTP requests being answered",
                                 registry=self.registry)
        self.predictions = Counter("catsdogs_predictions", "Images classified, by the label answered",
                                   ("label",), registry=self.registry)
        self.model = Info("catsdogs_model", "The model and engine that answer", registry=self.registry)
        self._batcher = _BatcherCollector()
        self.registry.register(self._batcher)

    def model_loaded(self, facts: dict[str, Any], backend: str, classes: Sequence[str],
                     unknown: str) -> None:
        """Record the model's facts and start every answer's counter at 0 (``unknown`` included)."""
        self.model.info({"model": str(facts.get("name") or ""), "backend": backend,
                         "image_size": str(facts.get("size") or ""), "classes": ",".join(classes)})
        for label in (*classes, unknown):
            self.predictions.labels(label=label)

    def watch(self, batcher: MicroBatcher | None) -> None:
        """Read batch sizes, forward time and queue depth from ``batcher`` (None: zeros)."""
        self._batcher.batcher = batcher

    def answered(self, label: str) -> None:
        """Count one image answered with ``label``."""
        self.predictions.labels(label=label).inc()

    def exposition(self) -> bytes:
        """The current metrics in Prometheus' text format."""
        return _generate_latest(self.registry)


def route_of(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route ``scope`` matches (``/predict``, ``/static``), else :data:`UNMATCHED`."""
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "") or UNMATCHED)
    return UNMATCHED


class MetricsMiddleware:
    """Count and time every HTTP request by route, method and status (outermost middleware)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        method = scope.get("method", "")
        method = method if method in METHODS else "other"
        route = route_of(self.routes, scope)
        status = 500  # an exception that escapes before any answer becomes Starlette's 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.in_progress.dec()
            labels = {"route": route, "method": method, "status": str(status)}
            self.metrics.requests.labels(**labels).inc()
            self.metrics.latency.labels(**labels).observe(time.perf_counter() - start)
