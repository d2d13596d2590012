"""Prometheus metrics of the serving stages.

Inside Ray (a Serve replica), the metrics go through ``ray.serve.metrics`` and Ray's metrics agent
exports them on each node's metrics port. In a process without Ray (the plain in-process
service), they go to ``prometheus_client``'s default registry, which that service exposes at
``GET /metrics``. Both backends use the same names, tags and buckets.
"""

from __future__ import annotations

import threading

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

STAGE_LATENCY = "seqrec_stage_latency_s"
FALLBACKS = "seqrec_fallbacks_total"
STAGE_ERRORS = "seqrec_stage_errors_total"
RANK_BATCH_SIZE = "seqrec_rank_batch_size"
CANDIDATES = "seqrec_candidates_total"


class ServingMetrics:
    """Latency per stage, fallbacks by reason, errors by stage and kind, ranker batch sizes."""

    def __init__(self, use_ray: bool) -> None:
        if use_ray:
            from ray.serve import metrics

            self._latency = metrics.Histogram(
                STAGE_LATENCY, "Latency of a serving stage in seconds.", LATENCY_BUCKETS_S, tag_keys=("stage",)
            )
            self._fallbacks = metrics.Counter(FALLBACKS, "Responses served by a fallback, by reason.", tag_keys=("reason",))
            self._errors = metrics.Counter(STAGE_ERRORS, "Failed stage calls, by stage and kind.", tag_keys=("stage", "kind"))
            self._batch = metrics.Histogram(RANK_BATCH_SIZE, "Requests per ranker model call.", BATCH_SIZE_BUCKETS)
            self._candidates = metrics.Counter(CANDIDATES, "Candidates generated, by source.", tag_keys=("source",))
        else:
            import prometheus_client

            self._latency = prometheus_client.Histogram(
                STAGE_LATENCY, "Latency of a serving stage in seconds.", ("stage",), buckets=LATENCY_BUCKETS_S
            )
            self._fallbacks = prometheus_client.Counter(FALLBACKS, "Responses served by a fallback, by reason.", ("reason",))
            self._errors = prometheus_client.Counter(STAGE_ERRORS, "Failed stage calls, by stage and kind.", ("stage", "kind"))
            self._batch = prometheus_client.Histogram(RANK_BATCH_SIZE, "Requests per ranker model call.", buckets=BATCH_SIZE_BUCKETS)
            self._candidates = prometheus_client.Counter(CANDIDATES, "Candidates generated, by source.", ("source",))
        self.use_ray = use_ray

    def observe_latency(self, stage: str, seconds: float) -> None:
        if self.use_ray:
            self._latency.observe(seconds, tags={"stage": stage})
        else:
            self._latency.labels(stage=stage).observe(seconds)

    def count_fallback(self, reason: str) -> None:
        if self.use_ray:
            self._fallbacks.inc(tags={"reason": reason})
        else:
            self._fallbacks.labels(reason=reason).inc()

    def count_error(self, stage: str, kind: str) -> None:
        if self.use_ray:
            self._errors.inc(tags={"stage": stage, "kind": kind})
        else:
            self._errors.labels(stage=stage, kind=kind).inc()

    def observe_batch_size(self, size: int) -> None:
        self._batch.observe(size)

    def count_candidates(self, source: str, count: int) -> None:
        if count <= 0:
            return
        if self.use_ray:
            self._candidates.inc(count, tags={"source": source})
        else:
            self._candidates.labels(source=source).inc(count)


_metrics: ServingMetrics | None = None
_metrics_lock = threading.Lock()


def get_metrics() -> ServingMetrics:
    """Return this process's metrics, created on first use with Ray's backend where Ray is running."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            import ray

            _metrics = ServingMetrics(use_ray=ray.is_initialized())
        return _metrics
