"""The steps of one DDPO epoch, shared by the single-process loop and the distributed system.

Both call exactly these functions, with randomness keyed by what a draw is (seed, epoch, batch,
inner epoch, learner rank) rather than by how many draws came before it. So one sampler and one
learner worker on Ray compute what the single-process loop computes, and tests can hold them to it.
No Ray here.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch

from ddpo_ray.config import DDPOConfig
from ddpo_ray.infra.hf_loading import compute_dtype
from ddpo_ray.maths.diffusion import Trajectories, sample_trajectories
from ddpo_ray.maths.ppo import scheduled_learning_rate, set_learning_rate, train_epoch
from ddpo_ray.maths.seeding import SAMPLING, TRAINING, make_generator


def epoch_batches(cfg: DDPOConfig, prompts: Sequence[str]) -> list[tuple[str, ...]]:
    """An epoch's prompts cut into its `sample.num_batches_per_epoch` sampling batches, in order."""
    size = cfg.sample.batch_size
    if len(prompts) != size * cfg.sample.num_batches_per_epoch:
        raise ValueError(f"{len(prompts)} prompts; expected {size * cfg.sample.num_batches_per_epoch} for one epoch")
    return [tuple(prompts[b * size:(b + 1) * size]) for b in range(cfg.sample.num_batches_per_epoch)]


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
    lr = scheduled_learning_rate(cfg.train, epoch, cfg.num_epochs)
    set_learning_rate(optimizer, lr)
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
    metrics["learning_rate"] = lr
    return metrics
