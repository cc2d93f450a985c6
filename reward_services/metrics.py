"""The reward services' own Prometheus metrics (`ServiceMetrics`), recorded by the Serve
replicas around every request and model batch (and by the single-process loop's in-process
rewards). The export machinery is `ddpo_ray.infra.metrics_backend`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from ddpo_ray.infra.metrics_backend import (
    BATCH_SIZE_BUCKETS,
    LATENCY_BUCKETS_S,
    Backend,
    MetricSpec,
    default_backend,
    make_metric,
)

# --- the reward services' own metrics -----------------------------------------------------

SERVICE_METRICS = {
    "requests": MetricSpec(
        "ddpo_reward_service_requests", "counter", "score requests answered (ok or not)", ("app", "deployment")
    ),
    "images": MetricSpec("ddpo_reward_service_images", "counter", "images scored", ("app", "deployment")),
    "errors": MetricSpec(
        "ddpo_reward_service_errors", "counter",
        "failed score requests; kind: bad_input (the caller's fault: 4xx, the replica is fine) or internal",
        ("app", "deployment", "kind"),
    ),
    "latency": MetricSpec(
        "ddpo_reward_service_latency_seconds", "histogram", "time to answer one score request",
        ("app", "deployment"), LATENCY_BUCKETS_S,
    ),
    "batch_size": MetricSpec(
        "ddpo_reward_service_batch_size", "histogram", "images per model call after @serve.batch merged requests",
        ("app", "deployment"), BATCH_SIZE_BUCKETS,
    ),
    # Images through the model, as a counter: Ray 2.60's histogram `_sum` leaves out a process's
    # first observation (measured: 4 observations of 4 export _count 4, _sum 12), so mean batch
    # sizes divide this by batch_size's `_count`, which is right.
    "model_images": MetricSpec(
        "ddpo_reward_service_model_images", "counter", "items through model calls", ("app", "deployment")
    ),
    "batch_requests": MetricSpec(
        "ddpo_reward_service_batch_requests", "histogram", "requests merged into one model call",
        ("app", "deployment"), BATCH_SIZE_BUCKETS,
    ),
    "model_failures": MetricSpec(
        "ddpo_reward_service_model_failures", "counter",
        "model calls that raised (each fails the requests merged into it; 3 in a row: unhealthy)",
        ("app", "deployment"),
    ),
    "model_latency": MetricSpec(
        "ddpo_reward_service_model_seconds", "histogram", "time of one model call (a merged batch)",
        ("app", "deployment"), LATENCY_BUCKETS_S,
    ),
}


def error_kind(exc: BaseException) -> str:
    """bad_input for what the caller sent wrong (ValueError, incl. RewardInputError), else internal."""
    return "bad_input" if isinstance(exc, ValueError) else "internal"


class ServiceMetrics:
    """The metrics of one reward deployment, labelled with its Serve application and name."""

    def __init__(self, backend: Backend | None = None, app: str | None = None, deployment: str | None = None):
        backend = backend or default_backend()
        if app is None or deployment is None:
            from ray import serve

            try:
                context = serve.get_replica_context()
                app = app or context.app_name
                deployment = deployment or context.deployment
            except Exception:  # noqa: BLE001 - not in a replica (a unit test): label it plainly
                app, deployment = app or "local", deployment or "local"
        self.tags = {"app": app, "deployment": deployment}
        self._metrics = {key: make_metric(spec, backend) for key, spec in SERVICE_METRICS.items()}

    @contextlib.contextmanager
    def request(self) -> Iterator[dict[str, int]]:
        """Around one score request: counts it, its latency and, if it raises, its error kind.
        Set `["images"]` on the yielded dict once the request is parsed."""
        start = time.perf_counter()
        counts = {"images": 0}
        try:
            yield counts
        except BaseException as exc:
            self._metrics["errors"].inc(1, kind=error_kind(exc), **self.tags)
            raise
        finally:
            self._metrics["requests"].inc(1, **self.tags)
            self._metrics["latency"].observe(time.perf_counter() - start, **self.tags)
            if counts["images"]:
                self._metrics["images"].inc(counts["images"], **self.tags)

    def model_batch(self, num_requests: int, num_images: int, seconds: float, failed: bool) -> None:
        """One model call of a `ModelReplica` (a batch merged by @serve.batch)."""
        self._metrics["batch_requests"].observe(num_requests, **self.tags)
        self._metrics["batch_size"].observe(num_images, **self.tags)
        self._metrics["model_images"].inc(num_images, **self.tags)
        self._metrics["model_latency"].observe(seconds, **self.tags)
        if failed:
            self._metrics["model_failures"].inc(1, **self.tags)
