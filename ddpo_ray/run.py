"""`python -m ddpo_ray.run`: DDPO on a Ray cluster (sampler actors, Serve rewards, Ray Train learner).

    python -m ddpo_ray.run                                   # offline `tiny` preset, local Ray
    python -m ddpo_ray.run --config my.yaml cluster.num_samplers=4 train.learning_rate=1e-4
    ray job submit --address http://HEAD:8265 -- python -m ddpo_ray.run --config my.yaml

Order of business: validate the config (before touching Ray); connect to the cluster this runs
in (`--address`, `RAY_ADDRESS`, or the cluster of a Ray job), or start a local one; make sure
every reward application the config needs runs on Ray Serve (deploy the missing ones, attach
to the ones already deployed, e.g. by `serve deploy deploy/serve.yaml`, and leave those as they
are); run the epochs (`ddpo_ray.distributed.driver`); shut down only what this run started.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

from ddpo_ray.config import add_config_arguments
from ddpo_ray.infra.logs import setup_console_logging
from ddpo_ray.preflight import PREFLIGHT_ERRORS, preflight

log = logging.getLogger("ddpo_ray.run")


def main(argv: Sequence[str] | None = None, prog: str = "python -m ddpo_ray.run") -> int:
    """The command line of `run`; `prog` is how it was called (`ddpo-ray run` from ddpo_ray.cli)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser)
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local cluster)")
    parser.add_argument("--serve-port", type=int, default=8000, help="Serve HTTP port, if this run starts Serve")
    parser.add_argument("--metrics-export-port", type=int, default=None,
                        help="Prometheus port of a local cluster's metrics agent (default: Ray picks one; printed)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, Serve's and Ray Train's log lines too (they always go to Ray's log files)")
    args = parser.parse_args(argv)
    setup_console_logging(verbose=args.verbose)
    try:
        cfg, run_root = preflight(args)  # before Ray, a server or a model starts
    except PREFLIGHT_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # The training stack (torch, diffusers, transformers, peft) takes ~3.7 s to import; a thread
    # imports it while this one starts (or connects to) Ray and deploys the rewards, which mostly
    # waits on other processes (Ray keeps its signal handling on the main thread).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="import") as importer:
        driver_module = importer.submit(importlib.import_module, "ddpo_ray.distributed.driver")
        return _run_on_ray(args, cfg, run_root, driver_module)


def _run_on_ray(args: argparse.Namespace, cfg, run_root, driver_module: Future) -> int:
    import ray

    from ddpo_ray.distributed.cluster import connect
    from ddpo_ray.records.console import format_summary
    from ddpo_ray.records.run_dir import RunDirectory
    from reward_services.client import RewardServiceError, ensure_reward_apps, shutdown_reward_apps

    try:
        started_cluster = connect(args.address, cfg, args.serve_port, args.metrics_export_port, verbose=args.verbose)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started_apps: list[str] = []
    try:
        try:
            started_apps = ensure_reward_apps(
                cfg.eval_reward_names() if cfg.eval.every else cfg.reward.components(),
                model_pretrained=cfg.model.pretrained,
            )
        except RewardServiceError as exc:  # e.g. a real model and no real reward model deployed
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if started_apps:
            log.info("deployed reward applications: %s", ", ".join(started_apps))
        history = driver_module.result().run_distributed(cfg)
        run_dir = RunDirectory(run_root)
        print(format_summary(history, run_dir.read_evals(), str(run_dir.root)), flush=True)
    finally:
        if started_cluster:  # Serve and the applications go with the cluster
            ray.shutdown()
        else:  # someone else's cluster: take away only what this run deployed
            shutdown_reward_apps(started_apps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
