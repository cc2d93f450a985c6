"""Connecting to a Ray cluster (or starting a local one) and starting Serve on it."""

from __future__ import annotations

import logging
import math
import os

from ddpo_ray.config import DDPOConfig

log = logging.getLogger(__name__)

# Logical CPUs a local cluster adds for the reward replicas and Serve (bookkeeping only: the
# replicas run as many torch threads as they reserve, and JPEG needs one).
_LOCAL_SERVICE_CPUS = 4


# Serve kills its HTTP proxy when the proxy's process has not answered a readiness check within
# 5 s, three times in a row: on 2 loaded cores a new proxy process takes longer than that to
# import (seen: serve.start failing with the proxy "killed by ray.kill" while two trainings ran).
# A cluster started here inherits this process's environment, so it gets a patient check.
#
# Ray Train V2 starts a preemption watcher actor (~110 MB) with every run; it polls for nodes
# being drained, which a one-machine local cluster never does.
LOCAL_CLUSTER_ENV = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def set_local_cluster_env() -> None:
    """Before ray.init starts a local cluster: `LOCAL_CLUSTER_ENV`, unless the caller set them."""
    for name, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(name, value)


def local_cluster_cpus(cfg: DDPOConfig) -> int:
    """Logical CPUs for a local cluster: enough to place every actor this run asks for."""
    cluster = cfg.cluster
    needed = (
        cluster.num_samplers * cluster.cpus_per_sampler
        + cluster.learner_workers * cluster.cpus_per_learner_worker
        + _LOCAL_SERVICE_CPUS
    )
    return max(os.cpu_count() or 1, math.ceil(needed))


def connect(
    address: str | None, cfg: DDPOConfig, serve_port: int, metrics_export_port: int | None = None,
    verbose: bool = False,
) -> bool:
    """Connect to (or start) Ray, and start Serve unless it runs; True if this started the cluster.

    Serve already running on the cluster (say, from `serve deploy deploy/serve.yaml`) is used as
    it is; otherwise it starts with one HTTP proxy, on the head node at `serve_port` (samplers
    reach the rewards through handles, not HTTP). Unless `verbose`, the actors' output (Serve
    access logs, Ray Train reports) stays in Ray's log files and Ray's own driver lines are off.
    """
    import ray
    from ray import serve

    from ddpo_ray.infra.logs import quiet_serve_driver_lines

    quiet_serve_driver_lines(verbose)
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.ERROR}

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if metrics_export_port is not None:
            raise ValueError(
                "--metrics-export-port is for a local cluster; a running cluster exports on the port "
                "its nodes were started with (`ray start --metrics-export-port`)"
            )
        ray.init(address=address, **quiet)
        log.info("connected to the Ray cluster at %s", address)
    else:
        num_cpus = local_cluster_cpus(cfg)
        set_local_cluster_env()
        ray.init(num_cpus=num_cpus, _metrics_export_port=metrics_export_port, **quiet)
        log.info("started a local Ray cluster (%d logical CPUs)", num_cpus)
    if cfg.metrics:
        for node in ray.nodes():
            if node["Alive"]:
                log.info("metrics (ddpo_* as ray_ddpo_*): http://%s:%s/metrics",
                         node["NodeManagerAddress"], node["MetricsExportPort"])
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": serve_port})
    return not address
