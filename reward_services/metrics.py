"""Prometheus metrics: one definition per metric, exported by Ray or by prometheus-client.

Inside Ray (the driver, sampler actors, Serve replicas) metrics go through `ray.util.metrics`
and Ray's metrics agent exports them on each node's metrics port (Ray puts `ray_` in front
of the name: `ddpo_reward_mean` is scraped as `ray_ddpo_reward_mean`). Outside Ray (the
single-process loop, rewards computed in-process) the same definitions are held by
`prometheus_client` and `serve_prometheus(port)` exposes them. `off` records nothing (for
measuring what metrics cost).

No metric has a per-sample label: labels are run, reward application, deployment, sampler,
phase, error kind.

This module also defines the reward services' own metrics (`ServiceMetrics`), recorded by the
Serve replicas around every request and model batch.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

MetricKind = Literal["counter", "gauge", "histogram"]
Backend = Literal["ray", "prometheus", "off"]
BACKENDS: tuple[str, ...] = ("ray", "prometheus", "off")

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class MetricSpec:
    """What a metric is; the backend decides how it is exported."""

    name: str  # starts with ddpo_
    kind: MetricKind
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()  # histograms only

    def __post_init__(self) -> None:
        if not self.name.startswith("ddpo_"):
            raise ValueError(f"metric name {self.name!r} must start with 'ddpo_'")
        if (self.kind == "histogram") != bool(self.boundaries):
            raise ValueError(f"metric {self.name!r}: boundaries are for histograms, and histograms need them")


@dataclass
class Metric:
    """A metric of one backend: `inc` (counter), `set` (gauge), `observe` (histogram)."""

    spec: MetricSpec
    backend: Backend
    _impl: Any = field(default=None, repr=False)

    def _tags(self, tags: dict[str, str]) -> dict[str, str]:
        if set(tags) != set(self.spec.tag_keys):
            raise ValueError(f"metric {self.spec.name!r} takes tags {self.spec.tag_keys}; got {sorted(tags)}")
        return {k: str(v) for k, v in tags.items()}

    def inc(self, value: float = 1.0, **tags: str) -> None:
        self._record("counter", value, tags)

    def set(self, value: float, **tags: str) -> None:
        self._record("gauge", value, tags)

    def observe(self, value: float, **tags: str) -> None:
        self._record("histogram", value, tags)

    def _record(self, kind: MetricKind, value: float, tags: dict[str, str]) -> None:
        if kind != self.spec.kind:
            raise TypeError(f"metric {self.spec.name!r} is a {self.spec.kind}, not a {kind}")
        tags = self._tags(tags)
        method = _RECORD_METHOD[kind]  # both libraries name them alike
        if self.backend == "ray":
            getattr(self._impl, method)(value, tags=tags)
        elif self.backend == "prometheus":
            getattr(self._impl.labels(**tags) if tags else self._impl, method)(value)


_RECORD_METHOD: dict[str, str] = {"counter": "inc", "gauge": "set", "histogram": "observe"}


_created: dict[tuple[str, str], Metric] = {}  # (backend, name) -> metric, one per process
_lock = threading.Lock()


def make_metric(spec: MetricSpec, backend: Backend) -> Metric:
    """The process's metric for `spec` on `backend` (created once: both registries refuse twins)."""
    if backend not in BACKENDS:
        raise ValueError(f"metrics backend {backend!r}; expected one of {BACKENDS}")
    with _lock:
        existing = _created.get((backend, spec.name))
        if existing is not None:
            if existing.spec != spec:
                raise ValueError(f"metric {spec.name!r} is already defined differently: {existing.spec}")
            return existing
        impl = None
        if backend == "ray":
            from ray.util import metrics as ray_metrics

            if spec.kind == "counter":
                impl = ray_metrics.Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
            elif spec.kind == "gauge":
                impl = ray_metrics.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
            else:
                impl = ray_metrics.Histogram(
                    spec.name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tag_keys
                )
        elif backend == "prometheus":
            import prometheus_client

            kind = {"counter": prometheus_client.Counter, "gauge": prometheus_client.Gauge}
            if spec.kind == "histogram":
                impl = prometheus_client.Histogram(
                    spec.name, spec.description, labelnames=spec.tag_keys, buckets=spec.boundaries
                )
            else:
                impl = kind[spec.kind](spec.name, spec.description, labelnames=spec.tag_keys)
        metric = Metric(spec, backend, impl)
        _created[(backend, spec.name)] = metric
        return metric


def default_backend() -> Backend:
    """`ray` in a process connected to Ray (driver, actor, replica), else `prometheus`."""
    import ray

    return "ray" if ray.is_initialized() else "prometheus"


def serve_prometheus(port: int, host: str = "127.0.0.1") -> int:
    """Expose this process's prometheus-client metrics on http://host:port/metrics; returns the port."""
    import prometheus_client

    server, _ = prometheus_client.start_http_server(port, addr=host)
    return server.server_port


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
