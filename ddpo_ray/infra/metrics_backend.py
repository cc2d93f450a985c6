"""Prometheus metrics: one definition per metric, exported by Ray or by prometheus-client.

Inside Ray (the driver, sampler actors, Serve replicas) metrics go through `ray.util.metrics`
and Ray's metrics agent exports them on each node's metrics port (Ray puts `ray_` in front
of the name: `ddpo_reward_mean` is scraped as `ray_ddpo_reward_mean`). Outside Ray (the
single-process loop, rewards computed in-process) the same definitions are held by
`prometheus_client` and `serve_prometheus(port)` exposes them. `off` records nothing (for
measuring what metrics cost). Ray is imported only by the `ray` backend.

No metric has a per-sample label: labels are run, reward application, deployment, sampler,
phase, error kind.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

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
