"""DDPO's policy-gradient losses over denoising steps, and one training epoch. No Ray.

Each (sample, timestep) is one action. Two estimators, as in the DDPO paper (`train.algorithm`):
- DDPO-IS (`ddpo_is`, default): the importance ratio exp(log p_new - log p_old), where log p_old
  was recorded while sampling, in PPO's pessimistic clipped surrogate; several optimizer steps
  may reuse one epoch's samples.
- DDPO-SF (`ddpo_sf`): the score-function (REINFORCE) estimator -A log p_new, with no ratio,
  so each epoch's samples feed exactly one optimizer step (the config enforces it).
At the sampling weights the ratio is 1 and both give the same gradient.

Optionally (`train.kl_coef` > 0) a KL penalty to the reference policy (the UNet with LoRA off)
is added per denoising step; with the std fixed by the schedule it is exactly
||mean_theta - mean_ref||^2 / (2 std^2), averaged over pixels like the log-probs.
Gradients accumulate over the trained timesteps of a minibatch and over
`gradient_accumulation_steps` minibatches before one AdamW step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import ContextManager

import torch
from diffusers import DDIMScheduler

from ddpo_ray.config import TrainConfig
from ddpo_ray.maths.diffusion import Trajectories, gaussian_log_prob, policy_step_mean, step_score_scale
from ddpo_ray.models.lora import reference_policy


def ppo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mean(w max(-A r, -A clip(r, 1-eps, 1+eps))) with A clipped to +-adv_clip_max.

    `weights` (B,) scales each sample's term (`step_weights`); None: all 1.
    Returns the loss and detached statistics: approx_kl = 0.5 mean((logp - old)^2),
    clipfrac = fraction of |r - 1| > clip_range, and the ratio's mean and max deviation from 1.
    """
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = _weighted_mean(torch.maximum(unclipped, clipped), weights)
    return loss, _step_stats(loss, log_probs, old_log_probs, clip_range)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return values.mean()
    if weights.shape != values.shape:
        raise ValueError(f"weights has shape {tuple(weights.shape)}; expected {tuple(values.shape)}")
    return (weights.to(values) * values).mean()


def _step_stats(
    loss: torch.Tensor, log_probs: torch.Tensor, old_log_probs: torch.Tensor, clip_range: float | None
) -> dict[str, torch.Tensor]:
    """Detached statistics of a loss over a batch of steps; clipfrac 0 when nothing clips (None)."""
    with torch.no_grad():
        ratio = torch.exp(log_probs - old_log_probs)
        if clip_range is None:
            clipped = torch.zeros_like(ratio, dtype=torch.bool)
        else:
            clipped = (ratio - 1.0).abs() > clip_range
        return {
            "loss": loss.detach(),
            "approx_kl": 0.5 * ((log_probs - old_log_probs) ** 2).mean(),
            "clipfrac": clipped.float().mean(),
            "ratio_mean": ratio.mean(),
            "ratio_max_dev": (ratio - 1.0).abs().max(),
        }


def score_function_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    adv_clip_max: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO-SF: mean(-w A log p) with A clipped to +-adv_clip_max; the same statistics as ppo_loss.

    `old_log_probs` only feeds the statistics (approx_kl, ratio): the gradient has no ratio.
    """
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    loss = _weighted_mean(-advantages * log_probs, weights)
    return loss, _step_stats(loss, log_probs, old_log_probs, clip_range=None)


def step_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(reference_mean, std^2 I)) per sample, averaged over pixels: (B,).

    Exact for two DDIM step policies with the same schedule and eta (same std): zero when the
    means agree (LoRA at init), growing as the policy moves away from the reference.
    """
    kl = (mean - reference_mean) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def step_weights(scheduler: DDIMScheduler, timesteps: torch.Tensor, train: TrainConfig, eta: float) -> torch.Tensor | None:
    """Per-sample loss weights for one column of training steps (`train.step_weighting`).

    score_scale: 1 / step_score_scale, normalised so the schedule's steps average 1 (the
    learning rate keeps its meaning). Every step's policy-gradient term then has the size of
    (noise x d model output), whatever its std. A positive reweighting of the per-step terms:
    each term still points uphill for its own step, while the low-noise steps no longer
    dominate the sum with their 1/std-sized, mostly-noise scores. uniform: None (DDPO).
    """
    if train.step_weighting == "uniform":
        return None
    inverse = 1.0 / step_score_scale(scheduler, timesteps, eta)
    schedule = 1.0 / step_score_scale(scheduler, scheduler.timesteps, eta)
    return inverse / schedule.mean().to(inverse)


def make_optimizer(params: Sequence[torch.nn.Parameter], train: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params,
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
    )


def scheduled_learning_rate(train: TrainConfig, epoch: int, num_epochs: int) -> float:
    """The learning rate of `epoch` (0-based) of `num_epochs`: a function of the epoch alone, so a
    resumed run needs no scheduler state. cosine: learning_rate at epoch 0 down to
    lr_final_fraction x learning_rate at the last epoch."""
    if train.lr_schedule == "constant" or num_epochs <= 1:
        return train.learning_rate
    progress = min(max(epoch, 0), num_epochs - 1) / (num_epochs - 1)
    floor = train.lr_final_fraction
    return train.learning_rate * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def shuffle_for_training(
    trajectories: Trajectories, advantages: torch.Tensor, generator: torch.Generator
) -> tuple[Trajectories, torch.Tensor]:
    """Shuffle samples, and each sample's timesteps independently (DDPO's per-sample permutation).

    After this, column j of row i is some step of trajectory i; the first
    int(T * timestep_fraction) columns are the ones trained.
    """
    batch, steps = trajectories.timesteps.shape
    order = torch.randperm(batch, generator=generator)
    shuffled = trajectories.select(order)
    advantages = advantages[order.to(advantages.device)]
    perms = torch.stack([torch.randperm(steps, generator=generator) for _ in range(batch)])
    perms = perms.to(shuffled.timesteps.device)

    def per_row(x: torch.Tensor) -> torch.Tensor:
        index = perms.reshape(batch, steps, *([1] * (x.ndim - 2))).expand_as(x)
        return torch.gather(x, 1, index)

    shuffled.timesteps = per_row(shuffled.timesteps)
    shuffled.latents = per_row(shuffled.latents)
    shuffled.next_latents = per_row(shuffled.next_latents)
    shuffled.log_probs = per_row(shuffled.log_probs)
    return shuffled, advantages


def train_epoch(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    trajectories: Trajectories,
    advantages: torch.Tensor,
    train: TrainConfig,
    *,
    guidance_scale: float,
    eta: float,
    generator: torch.Generator,
    compute_dtype: torch.dtype = torch.float32,
    no_sync: Callable[[], ContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """One pass of DDPO-IS or DDPO-SF over `trajectories` (one inner epoch); averaged statistics.

    `unet` may be wrapped (DDP); `no_sync` is its no_sync context, used for every backward
    pass that is not the last before an optimizer step. `guidance_scale` is the CFG weight
    the log-probs are recomputed with (the sampling one when train.cfg, else 1.0).
    """
    batch, steps = trajectories.timesteps.shape
    if advantages.shape != (batch,):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected ({batch},)")
    if batch % train.batch_size:
        raise ValueError(f"{batch} samples do not split into train.batch_size={train.batch_size} minibatches")
    num_minibatches = batch // train.batch_size
    if num_minibatches % train.gradient_accumulation_steps:
        raise ValueError(
            f"{num_minibatches} minibatches do not split into groups of "
            f"train.gradient_accumulation_steps={train.gradient_accumulation_steps}"
        )
    num_train_timesteps = int(steps * train.timestep_fraction)
    backwards_per_step = num_train_timesteps * train.gradient_accumulation_steps

    device = trajectories.latents.device
    scheduler.set_timesteps(steps, device=device)
    shuffled, shuffled_adv = shuffle_for_training(trajectories, advantages, generator)
    unet.train()
    optimizer.zero_grad(set_to_none=True)

    totals: dict[str, float] = {}
    ratio_max_dev = 0.0
    # Before the first optimizer step the weights are those that sampled (at staleness 0), so
    # every ratio there must be exactly 1: the key check that training scores what sampling drew.
    ratio_dev_before_update = 0.0
    grad_norms: list[float] = []
    count = 0
    for m in range(num_minibatches):
        rows = slice(m * train.batch_size, (m + 1) * train.batch_size)
        mb_adv = shuffled_adv[rows].to(device, torch.float32)
        update_after_minibatch = m % train.gradient_accumulation_steps == train.gradient_accumulation_steps - 1
        for j in range(num_train_timesteps):
            step_inputs = (
                shuffled.latents[rows, j], shuffled.timesteps[rows, j],
                shuffled.prompt_embeds[rows], shuffled.negative_prompt_embeds[rows],
            )
            step_options = {"guidance_scale": guidance_scale, "eta": eta, "compute_dtype": compute_dtype}
            if train.kl_coef > 0:
                # Before the policy's forward: switching the adapter off between a (DDP) forward
                # and its backward would change which parameters require grad in between.
                with torch.no_grad(), reference_policy(unet) as reference:
                    reference_mean, _ = policy_step_mean(reference, scheduler, *step_inputs, **step_options)
            mean, std = policy_step_mean(unet, scheduler, *step_inputs, **step_options)
            log_prob = gaussian_log_prob(shuffled.next_latents[rows, j], mean, std)
            old_log_prob = shuffled.log_probs[rows, j]
            weights = step_weights(scheduler, shuffled.timesteps[rows, j], train, eta)
            if train.algorithm == "ddpo_sf":
                loss, stats = score_function_loss(log_prob, old_log_prob, mb_adv, train.adv_clip_max, weights)
            else:
                loss, stats = ppo_loss(log_prob, old_log_prob, mb_adv, train.clip_range, train.adv_clip_max, weights)
            if train.kl_coef > 0:
                kl = step_kl(mean, reference_mean, std).mean()
                loss = loss + train.kl_coef * kl
                stats["kl_ref"] = kl.detach()
                stats["loss"] = loss.detach()
            last_backward = update_after_minibatch and j == num_train_timesteps - 1
            with contextlib.nullcontext() if last_backward else no_sync():
                (loss / backwards_per_step).backward()
            for key, value in stats.items():
                if key == "ratio_max_dev":
                    ratio_max_dev = max(ratio_max_dev, float(value))
                    if not grad_norms:
                        ratio_dev_before_update = max(ratio_dev_before_update, float(value))
                else:
                    totals[key] = totals.get(key, 0.0) + float(value)
            count += 1
        if update_after_minibatch:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            grad_norms.append(float(grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    unet.eval()
    metrics = {key: value / count for key, value in totals.items()}
    metrics["ratio_max_dev"] = ratio_max_dev
    metrics["ratio_dev_before_update"] = ratio_dev_before_update
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
    metrics["optimizer_steps"] = float(len(grad_norms))
    return metrics
