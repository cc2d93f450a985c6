"""`python -m ddpo_ray.evaluate`: the held-out table and side-by-side grids for checkpoints.

    python -m ddpo_ray.evaluate --run outputs/my-run            # base, best and last checkpoint
    python -m ddpo_ray.evaluate --run outputs/my-run --checkpoint outputs/my-run/checkpoints/epoch_0004
    python -m ddpo_ray.evaluate --preset tiny_compressibility --checkpoint DIR eval.rewards=[aesthetic]

Every model is evaluated as in training (ddpo_ray.evaluation): the eval prompts, the same
fixed noise, deterministic DDIM; rewards are computed in this process (the offline defaults of
the model rewards). With `--run`, the config is the run's own config.yaml (overrides apply on
top). Writes eval_table.json and eval_grid.png (one row per prompt, one column per model) to
--out (default: <run>/evaluation, else ./evaluation) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpo_ray.checkpoint import load_policy_weights, read_best_info, load_trainable_state_dict, trainable_state_dict
from ddpo_ray.config import ConfigError, DDPOConfig, add_config_arguments, build_config
from ddpo_ray.evaluation import EvalSet, evaluate
from ddpo_ray.models import load_pipeline, trainable_parameters
from ddpo_ray.run_dir import RunDirectory, write_image_grid
from reward_services.functions import compute_rewards


def models_of_run(run: Path) -> list[tuple[str, Path]]:
    """(label, checkpoint) for a run directory: checkpoints/best (if any) and the newest epoch."""
    run_dir = RunDirectory(run)
    found = []
    if read_best_info(run_dir) is not None:
        found.append(("best", run_dir.best_dir))
    latest = run_dir.latest_checkpoint()
    if latest is not None:
        found.append((latest.name, latest))
    return found


def evaluate_models(
    cfg: DDPOConfig, checkpoints: Sequence[tuple[str, Path]], include_base: bool = True, device: str = "cpu"
) -> tuple[list[dict[str, Any]], list[np.ndarray], list[np.ndarray], EvalSet]:
    """Evaluate the base model and each (label, checkpoint).

    Returns (table rows, images per model, training reward per image per model, the eval set).
    """
    pipe = load_pipeline(cfg.model, device, seed=cfg.seed)
    trainable_parameters(pipe.unet, cfg.model.use_lora, cfg.model.lora_rank, seed=cfg.seed)
    pipe.unet.requires_grad_(False).eval()
    base_weights = trainable_state_dict(pipe.unet, cfg.model.use_lora)  # LoRA at init = the base model
    eval_set = EvalSet.from_config(cfg)
    weights = {name: 1.0 for name in cfg.eval_reward_names()}

    def score(images: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        return compute_rewards(weights, images, prompts)[1]

    models: list[tuple[str, Path | None]] = [("base", None)] if include_base else []
    models += [(label, Path(path)) for label, path in checkpoints]
    rows, all_images, all_rewards = [], [], []
    for label, path in models:
        if path is None:
            load_trainable_state_dict(pipe.unet, cfg.model.use_lora, base_weights)
        else:
            use_lora, state_dict = load_policy_weights(path)
            if use_lora != cfg.model.use_lora:
                raise ValueError(f"checkpoint {path} has use_lora={use_lora}; the config has model.use_lora={cfg.model.use_lora}")
            load_trainable_state_dict(pipe.unet, use_lora, state_dict)
        start = time.perf_counter()
        metrics, images, rewards = evaluate(pipe, cfg, eval_set, score)
        rows.append({"model": label, "path": None if path is None else str(path),
                     "seconds": round(time.perf_counter() - start, 2), **metrics})
        all_images.append(images)
        all_rewards.append(rewards)
    return rows, all_images, all_rewards, eval_set


def format_table(rows: Sequence[dict[str, Any]], cfg: DDPOConfig, eval_set: EvalSet) -> str:
    """Mean +- std of each reward, then the per-group means, one line per model."""
    single = len(cfg.reward.components()) == 1  # then "reward" is that one component
    names = cfg.eval_reward_names() if single else ["reward", *cfg.eval_reward_names()]
    groups = eval_set.group_names()
    header = ["model"] + [f"{n} (mean+-std)" for n in names] + [f"{n}|{g}" for n in names for g in groups]
    lines = [header]
    for row in rows:
        cells = [row["model"]]
        cells += [f"{row[f'eval_{n}_mean']:+.4f} +- {row[f'eval_{n}_std']:.4f}" for n in names]
        cells += [f"{row[f'eval_{n}_{g}_mean']:+.4f}" for n in names for g in groups]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def write_side_by_side(
    path: Path, rows: Sequence[dict], images: Sequence[np.ndarray], rewards: Sequence[np.ndarray], eval_set: EvalSet
) -> Path:
    """One row per eval prompt, one column per model; captions say model, prompt and training reward."""
    cells, captions, values = [], [], []
    for i, prompt in enumerate(eval_set.prompts):
        for row, imgs, model_rewards in zip(rows, images, rewards):
            cells.append(imgs[i])
            captions.append(f"[{row['model']}] {prompt}")
            values.append(float(model_rewards[i]))
    return write_image_grid(path, np.stack(cells), captions, values, max_images=len(cells), columns=len(rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpo_ray.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--run", type=Path, help="a run directory: its config, best and newest checkpoint")
    parser.add_argument("--checkpoint", type=Path, action="append", default=[],
                        help="a checkpoint directory (checkpoints/epoch_NNNN or checkpoints/best); repeatable")
    parser.add_argument("--no-base", action="store_true", help="leave out the base model")
    parser.add_argument("--out", type=Path, help="output directory (default: <run>/evaluation or ./evaluation)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

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
