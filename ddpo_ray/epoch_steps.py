"""The steps of one DDPO epoch, shared by the single-process loop and the distributed system.

Both call exactly these functions, with randomness keyed by what a draw is (seed, epoch, batch,
inner epoch, learner rank) rather than by how many draws came before it. So one sampler and one
learner worker on Ray compute what `ddpo_ray.local` computes, and tests can hold them to it.
No Ray here.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Sequence

import contextlib

import numpy as np
import torch

from ddpo_ray.config import DDPOConfig
from ddpo_ray.diffusion import Trajectories, sample_trajectories
from ddpo_ray.models import compute_dtype
from ddpo_ray.ppo import train_epoch
from ddpo_ray.seeding import SAMPLING, TRAINING, make_generator


def sample_batch(
    pipe, cfg: DDPOConfig, prompts: Sequence[str], epoch: int, batch_index: int, policy_version: int
) -> Trajectories:
    """Sampling batch `batch_index` of `epoch`; its noise depends only on (seed, epoch, batch)."""
    generator = make_generator(cfg.seed, SAMPLING, epoch, batch_index, device=pipe.unet.device)
    return sample_trajectories(
        pipe,
        list(prompts),
        num_steps=cfg.sample.num_steps,
        guidance_scale=cfg.sample.guidance_scale,
        eta=cfg.sample.eta,
        resolution=cfg.sample.resolution,
        generator=generator,
        compute_dtype=compute_dtype(cfg.model.mixed_precision),
        policy_version=policy_version,
    )


def train_guidance_scale(cfg: DDPOConfig) -> float:
    """The CFG weight log-probs are recomputed with: the sampling one if train.cfg, else none."""
    return cfg.sample.guidance_scale if cfg.train.cfg else 1.0


def train_inner_epochs(
    unet: torch.nn.Module,
    scheduler,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    trajectories: Trajectories,
    advantages: torch.Tensor,
    cfg: DDPOConfig,
    epoch: int,
    rank: int = 0,
    no_sync: Callable[[], ContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """`train.num_inner_epochs` PPO passes over one epoch's trajectories; averaged metrics.

    `ratio_dev_before_update` is the largest |ratio - 1| before the first optimizer step of
    the first pass: 0 (to float precision) when the trajectories were sampled with the weights
    being trained (staleness 0), about the policy lag otherwise.
    """
    inner_metrics = []
    for inner in range(cfg.train.num_inner_epochs):
        inner_metrics.append(train_epoch(
            unet, scheduler, optimizer, params, trajectories, advantages, cfg.train,
            guidance_scale=train_guidance_scale(cfg),
            eta=cfg.sample.eta,
            generator=make_generator(cfg.seed, TRAINING, epoch, inner, rank),
            compute_dtype=compute_dtype(cfg.model.mixed_precision),
            no_sync=no_sync,
        ))
    metrics = {key: float(np.mean([m[key] for m in inner_metrics])) for key in inner_metrics[0]}
    metrics["ratio_max_dev"] = max(m["ratio_max_dev"] for m in inner_metrics)
    metrics["ratio_dev_before_update"] = inner_metrics[0]["ratio_dev_before_update"]
    return metrics


def summary(name: str, values: np.ndarray, extremes: bool = True) -> dict[str, float]:
    """{name_mean, name_std[, name_min, name_max]} of an epoch's values."""
    values = np.asarray(values, dtype=np.float64)
    out = {f"{name}_mean": float(np.mean(values)), f"{name}_std": float(np.std(values))}
    if extremes:
        out.update({f"{name}_min": float(np.min(values)), f"{name}_max": float(np.max(values))})
    return out


def format_progress(metrics: dict) -> str:
    """The one line per epoch both loops print."""
    line = (
        f"epoch {metrics['epoch']:4d} | samples {metrics['samples']:4d} | "
        f"reward {metrics['reward_mean']:+.4f} +- {metrics['reward_std']:.4f} | "
        f"kl {metrics['approx_kl']:.2e} clipfrac {metrics['clipfrac']:.3f} | "
        f"time sample {metrics['time_sampling']:.1f}s reward {metrics['time_reward']:.1f}s "
        f"train {metrics['time_training']:.1f}s"
    )
    if "time_weight_sync" in metrics:
        line += f" sync {metrics['time_weight_sync']:.2f}s"
    return line


def format_summary(history: list[dict], run_root: str) -> str:
    """The last line both loops print."""
    if not history:
        return f"done: nothing to do; run directory {run_root}"
    first, last = history[0], history[-1]
    return (
        f"done: {len(history)} epochs, reward {first['reward_mean']:+.4f} -> {last['reward_mean']:+.4f}; "
        f"run directory {run_root}"
    )


def checkpoint_due(cfg: DDPOConfig, epoch: int) -> bool:
    """Checkpoint after `epoch`? Every `save_freq` epochs (0: never) and always after the last."""
    return epoch == cfg.num_epochs - 1 or bool(cfg.save_freq and (epoch + 1) % cfg.save_freq == 0)
