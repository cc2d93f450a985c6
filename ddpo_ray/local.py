"""`python -m ddpo_ray.local`: the whole DDPO algorithm in this process, no Ray.

    python -m ddpo_ray.local                                  # the offline `tiny` preset
    python -m ddpo_ray.local --preset tiny num_epochs=2 sample.num_steps=10
    python -m ddpo_ray.local --config my.yaml resume_from=latest run_name=my-run

The same epoch path and records as `python -m ddpo_ray.run` (`ddpo_ray.training.local_loop`):
the reference the distributed system is checked against, and a debugging tool.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ddpo_ray.config import add_config_arguments
from ddpo_ray.infra.logs import setup_console_logging
from ddpo_ray.preflight import PREFLIGHT_ERRORS, preflight

log = logging.getLogger("ddpo_ray.local")


def main(argv: Sequence[str] | None = None, prog: str = "python -m ddpo_ray.local") -> int:
    """The command line of `local`; `prog` is how it was called (`ddpo-ray local` from ddpo_ray.cli)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve the ddpo_* Prometheus metrics on http://127.0.0.1:PORT/metrics")
    parser.add_argument("--verbose", action="store_true", help="show library and third-party log lines")
    args = parser.parse_args(argv)
    setup_console_logging(verbose=args.verbose)
    try:
        cfg, run_root = preflight(args)  # before Ray, a server or a model starts
    except PREFLIGHT_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import torch

    from ddpo_ray.infra.metrics_backend import serve_prometheus
    from ddpo_ray.records.console import format_summary
    from ddpo_ray.records.run_dir import RunDirectory
    from ddpo_ray.training.local_loop import run_local

    if args.metrics_port is not None:
        log.info("metrics: http://127.0.0.1:%d/metrics", serve_prometheus(args.metrics_port))
    history = run_local(cfg, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = RunDirectory(run_root)
    print(format_summary(history, run_dir.read_evals(), str(run_dir.root)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
