"""`python -m ddpo_ray.evaluate`: the held-out table and side-by-side grids for checkpoints.

    python -m ddpo_ray.evaluate --run outputs/my-run            # base, best and last checkpoint
    python -m ddpo_ray.evaluate --run outputs/my-run --checkpoint outputs/my-run/checkpoints/epoch_0004
    python -m ddpo_ray.evaluate --preset tiny_compressibility --checkpoint DIR eval.rewards=[aesthetic]

Every model is evaluated as in training (ddpo_ray.training.evaluation): the eval prompts, the same
fixed noise, deterministic DDIM; rewards are computed in this process (the offline defaults of
the model rewards). With `--run`, the config is the run's own config.yaml (overrides apply on
top). Writes eval_table.json and eval_grid.png (one row per prompt, one column per model) to
--out (default: <run>/evaluation, else ./evaluation) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ddpo_ray.config import ConfigError, add_config_arguments, build_config
from ddpo_ray.infra.logs import setup_console_logging
from ddpo_ray.training.checkpoint_eval import evaluate_models, format_table, models_of_run, write_side_by_side


def main(argv: Sequence[str] | None = None, prog: str = "python -m ddpo_ray.evaluate") -> int:
    """The command line of `evaluate`; `prog` is how it was called (`ddpo-ray evaluate` from ddpo_ray.cli)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--run", type=Path, help="a run directory: its config, best and newest checkpoint")
    parser.add_argument("--checkpoint", type=Path, action="append", default=[],
                        help="a checkpoint directory (checkpoints/epoch_NNNN or checkpoints/best); repeatable")
    parser.add_argument("--no-base", action="store_true", help="leave out the base model")
    parser.add_argument("--out", type=Path, help="output directory (default: <run>/evaluation or ./evaluation)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--verbose", action="store_true", help="show library and third-party log lines")
    args = parser.parse_args(argv)
    setup_console_logging(verbose=args.verbose)

    if args.run is not None and not (args.run / "config.yaml").is_file():
        print(f"error: --run {args.run}: no config.yaml there; expected a run directory", file=sys.stderr)
        return 2
    for path in args.checkpoint:
        if not path.is_dir():
            print(f"error: --checkpoint {path}: no such directory", file=sys.stderr)
            return 2
    try:
        config_file = args.config or (args.run / "config.yaml" if args.run else None)
        cfg = build_config(preset=args.preset, config_file=config_file, overrides=args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    checkpoints = models_of_run(args.run) if args.run else []
    checkpoints += [(path.name if path.name != "best" else f"best:{path.parent.parent.name}", path) for path in args.checkpoint]
    if not checkpoints and args.no_base:
        print("error: nothing to evaluate: give --run or --checkpoint, or drop --no-base", file=sys.stderr)
        return 2
    try:
        rows, images, rewards, eval_set = evaluate_models(cfg, checkpoints, include_base=not args.no_base, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    out = args.out or ((args.run / "evaluation") if args.run else Path("evaluation"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_table.json").write_text(json.dumps(
        {"eval_prompts": list(eval_set.prompts), "eval_groups": list(eval_set.groups), "models": rows}, indent=1) + "\n")
    grid = write_side_by_side(out / "eval_grid.png", rows, images, rewards, eval_set)
    print(format_table(rows, cfg, eval_set))
    print(f"wrote {out / 'eval_table.json'} and {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
