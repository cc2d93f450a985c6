"""Evaluating saved policies side by side: the base model and checkpoints on the eval set.

Every model is evaluated as in training (`ddpo_ray.training.evaluation`): the eval prompts, the
same fixed noise, deterministic DDIM; rewards are computed in this process (the offline defaults
of the model rewards). `python -m ddpo_ray.evaluate` is the command around it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ddpo_ray.config import DDPOConfig
from ddpo_ray.models.lora import load_trainable_state_dict, trainable_parameters, trainable_state_dict
from ddpo_ray.models.pipelines import load_pipeline
from ddpo_ray.records.checkpoint import load_policy_weights, read_best_info
from ddpo_ray.records.grids import write_image_grid
from ddpo_ray.records.run_dir import RunDirectory
from ddpo_ray.training.evaluation import EvalSet, evaluate
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
    weights = cfg.eval_reward_weights()

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
