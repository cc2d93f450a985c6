"""`python -m ddpo_ray.run`: DDPO on a Ray cluster (sampler actors, Serve rewards, Ray Train learner).

    python -m ddpo_ray.run                                   # offline `tiny` preset, local Ray
    python -m ddpo_ray.run --config my.yaml cluster.num_samplers=4 train.learning_rate=1e-4
    ray job submit --address http://HEAD:8265 -- python -m ddpo_ray.run --config my.yaml

Order of business: validate the config (before touching Ray); connect to the cluster this runs
in (`--address`, `RAY_ADDRESS`, or the cluster of a Ray job), or start a local one; make sure
every reward application the config needs runs on Ray Serve (deploy the missing ones, attach
to the ones already deployed, e.g. by `serve deploy deploy/serve.yaml`, and leave those as they
are); run the epochs (`ddpo_ray.driver`); shut down only what this run started.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence

from ddpo_ray.config import ConfigError, DDPOConfig, add_config_arguments, config_from_args

# Logical CPUs a local cluster adds for the reward replicas and Serve (bookkeeping only: the
# replicas run as many torch threads as they reserve, and JPEG needs one).
_LOCAL_SERVICE_CPUS = 4


def local_cluster_cpus(cfg: DDPOConfig) -> int:
    """Logical CPUs for a local cluster: enough to place every actor this run asks for."""
    cluster = cfg.cluster
    needed = (
        cluster.num_samplers * cluster.cpus_per_sampler
        + cluster.learner_workers * cluster.cpus_per_learner_worker
        + _LOCAL_SERVICE_CPUS
    )
    return max(os.cpu_count() or 1, math.ceil(needed))


def connect(address: str | None, cfg: DDPOConfig, serve_port: int, metrics_export_port: int | None = None) -> bool:
    """Connect to (or start) Ray, and start Serve unless it runs; True if this started the cluster.

    Serve already running on the cluster (say, from `serve deploy deploy/serve.yaml`) is used as
    it is; otherwise it starts with one HTTP proxy, on the head node at `serve_port` (samplers
    reach the rewards through handles, not HTTP).
    """
    import ray
    from ray import serve

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if metrics_export_port is not None:
            raise ValueError(
                "--metrics-export-port is for a local cluster; a running cluster exports on the port "
                "its nodes were started with (`ray start --metrics-export-port`)"
            )
        ray.init(address=address)
        print(f"connected to the Ray cluster at {address}", flush=True)
    else:
        num_cpus = local_cluster_cpus(cfg)
        ray.init(num_cpus=num_cpus, _metrics_export_port=metrics_export_port)
        print(f"started a local Ray cluster ({num_cpus} logical CPUs)", flush=True)
    if cfg.metrics:
        for node in ray.nodes():
            if node["Alive"]:
                print(f"metrics (ddpo_* as ray_ddpo_*): http://{node['NodeManagerAddress']}:"
                      f"{node['MetricsExportPort']}/metrics", flush=True)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": serve_port})
    return not address


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddpo_ray.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser)
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local cluster)")
    parser.add_argument("--serve-port", type=int, default=8000, help="Serve HTTP port, if this run starts Serve")
    parser.add_argument("--metrics-export-port", type=int, default=None,
                        help="Prometheus port of a local cluster's metrics agent (default: Ray picks one; printed)")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if cfg.run_name is None:
        cfg.run_name = cfg.resolved_run_name()  # one name for the whole run (it is time-stamped)

    import ray
    from ray import serve

    from ddpo_ray.driver import run_distributed
    from ddpo_ray.epoch_steps import format_summary
    from reward_services.client import ensure_reward_apps, shutdown_reward_apps

    try:
        started_cluster = connect(args.address, cfg, args.serve_port, args.metrics_export_port)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started_apps: list[str] = []
    try:
        started_apps = ensure_reward_apps(cfg.eval_reward_names() if cfg.eval.every else cfg.reward.components())
        if started_apps:
            print(f"deployed reward applications: {', '.join(started_apps)}", flush=True)
        history = run_distributed(cfg)
        print(format_summary(history, f"{cfg.output_dir}/{cfg.resolved_run_name()}"), flush=True)
    finally:
        shutdown_reward_apps(started_apps)
        if started_cluster:
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
