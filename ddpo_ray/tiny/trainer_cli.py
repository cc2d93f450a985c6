"""The command line the tiny reward-model trainers share: output dir, steps, batch, seed, lr.

Each trainer is `python -m ddpo_ray.tiny.<name>_trainer [--out DIR] [--steps N] ...`: it logs its
progress and losses to the console, writes its weights and a training.json (settings, time,
held-out quality) to --out, and prints that summary at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable


def trainer_parser(module: str, doc: str | None, out: Path, steps: int, batch_size: int, seed: int, lr: float) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=out, help="where the weights and training.json go")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--lr", type=float, default=lr)
    return parser


def run_trainer(train: Callable[..., dict], args: argparse.Namespace) -> int:
    """Log progress to the console, train with the parsed arguments, print the summary."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = train(**vars(args))
    print(json.dumps(summary, indent=1))
    return 0
