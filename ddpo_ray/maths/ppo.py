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
import logging
import math
from collections.abc import Callable, Sequence
from typing import ContextManager

import torch
from diffusers import DDIMScheduler

from ddpo_ray.config import TrainConfig
from ddpo_ray.maths.diffusion import Trajectories, gaussian_log_prob, policy_step_mean, step_score_scale
from ddpo_ray.models.lora import reference_policy

log = logging.getLogger(__name__)


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
    trajectories: Trajectories, advantages: torch.Tensor, generator: torch.Generator,
    steps_with_signal: int | None = None,
) -> tuple[Trajectories, torch.Tensor]:
    """Shuffle samples, and each sample's timesteps independently (DDPO's per-sample permutation).

    After this, column j of row i is some step of trajectory i; the first
    int(T * timestep_fraction) columns are the ones trained. Per-step advantages (B, T) move
    with their steps; per-sample ones (B,) with their rows. With `steps_with_signal` = s (only
    the first s denoising steps can carry a nonzero advantage: branched sampling), each row's
    permutation puts those s steps first, in their random order, so the columns after s hold
    only zero-advantage steps.
    """
    batch, steps = trajectories.timesteps.shape
    order = torch.randperm(batch, generator=generator)
    shuffled = trajectories.select(order)
    advantages = advantages[order.to(advantages.device)]
    perms = torch.stack([torch.randperm(steps, generator=generator) for _ in range(batch)])
    if steps_with_signal is not None:  # a stable sort on "no signal": the signal steps' order stays random
        perms = torch.stack([row[torch.argsort((row >= steps_with_signal).to(torch.int8), stable=True)] for row in perms])
    perms = perms.to(shuffled.timesteps.device)

    def per_row(x: torch.Tensor) -> torch.Tensor:
        index = perms.reshape(batch, steps, *([1] * (x.ndim - 2))).expand_as(x)
        return torch.gather(x, 1, index)

    shuffled.timesteps = per_row(shuffled.timesteps)
    shuffled.latents = per_row(shuffled.latents)
    shuffled.next_latents = per_row(shuffled.next_latents)
    shuffled.log_probs = per_row(shuffled.log_probs)
    if advantages.ndim == 2:
        advantages = per_row(advantages)
    return shuffled, advantages


def _check_steps_with_signal(steps_with_signal: int, advantages: torch.Tensor, steps: int, train: TrainConfig) -> None:
    if not 1 <= steps_with_signal <= steps:
        raise ValueError(f"steps_with_signal={steps_with_signal}; expected 1..{steps} (the trajectories' steps)")
    if advantages.ndim != 2:
        raise ValueError("steps_with_signal needs per-step advantages (B, T); got one per sample")
    if train.kl_coef > 0:
        raise ValueError(
            f"steps_with_signal with train.kl_coef={train.kl_coef}: the KL penalty has a gradient at every "
            "step, so no step may be skipped"
        )
    if steps_with_signal < steps and bool(advantages[:, steps_with_signal:].any()):
        raise ValueError(f"steps_with_signal={steps_with_signal}, but advantages after step {steps_with_signal} are not 0")


def make_grad_scaler(compute_dtype: torch.dtype, device: torch.device | str) -> "torch.amp.GradScaler | None":
    """A loss scaler for fp16 (None otherwise).

    In fp16 the backward through the frozen UNet underflows: SD1.5's LoRA gradients are of
    order 1e-8..1e-6, below fp16's smallest normal (6e-5). bf16 has fp32's range and needs none.
    """
    if compute_dtype != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def recompute_log_probs(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    trajectories: Trajectories,
    batch_size: int,
    *,
    guidance_scale: float,
    eta: float,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """log p of every stored step under the current weights, in training's batch shape: (B, T).

    The "old" log-probs as the learner's kernels compute them (`train.recompute_old_log_probs`).
    In bf16/fp16 the sampler's (no grad, whole sampling batch, one timestep) and the learner's
    (minibatch, mixed timesteps) kernels round differently, by about the PPO clip range; scoring
    the old policy with the learner's own kernels makes the ratio exactly 1 before the first
    update again. Valid only when the weights are those that sampled (staleness 0).
    """
    module = getattr(unet, "module", unet)  # no DDP forward: nothing to synchronise here
    batch, steps = trajectories.timesteps.shape
    scheduler.set_timesteps(steps, device=trajectories.latents.device)
    was_training = module.training
    module.train()  # as in train_epoch (no dropout in SD's UNet, but the same code path)
    out = torch.empty_like(trajectories.log_probs)
    with torch.no_grad():
        for start in range(0, batch, batch_size):
            rows = slice(start, start + batch_size)
            for j in range(steps):
                mean, std = policy_step_mean(
                    module, scheduler, trajectories.latents[rows, j], trajectories.timesteps[rows, j],
                    trajectories.prompt_embeds[rows], trajectories.negative_prompt_embeds[rows],
                    guidance_scale=guidance_scale, eta=eta, compute_dtype=compute_dtype,
                )
                out[rows, j] = gaussian_log_prob(trajectories.next_latents[rows, j], mean, std)
    module.train(was_training)
    return out


def micro_batches(rows: slice, micro_batch_size: int | None) -> list[slice]:
    """`rows` (one minibatch) cut into consecutive slices of at most `micro_batch_size` rows."""
    if micro_batch_size is None:
        return [rows]
    return [slice(start, min(start + micro_batch_size, rows.stop))
            for start in range(rows.start, rows.stop, micro_batch_size)]


def _step_loss(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    trajectories: Trajectories,
    advantages: torch.Tensor,
    all_weights: torch.Tensor | None,
    rows: slice,
    j: int,
    train: TrainConfig,
    *,
    guidance_scale: float,
    eta: float,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO (or score-function) loss of denoising step j over `rows`, plus the KL penalty."""
    step_inputs = (
        trajectories.latents[rows, j], trajectories.timesteps[rows, j],
        trajectories.prompt_embeds[rows], trajectories.negative_prompt_embeds[rows],
    )
    step_options = {"guidance_scale": guidance_scale, "eta": eta, "compute_dtype": compute_dtype}
    if train.kl_coef > 0:
        # Before the policy's forward: switching the adapter off between a (DDP) forward and its
        # backward would change which parameters require grad in between.
        with torch.no_grad(), reference_policy(unet) as reference:
            reference_mean, _ = policy_step_mean(reference, scheduler, *step_inputs, **step_options)
    mean, std = policy_step_mean(unet, scheduler, *step_inputs, **step_options)
    log_prob = gaussian_log_prob(trajectories.next_latents[rows, j], mean, std)
    old_log_prob = trajectories.log_probs[rows, j]
    weights = None if all_weights is None else all_weights[rows, j]
    row_adv = advantages[rows]  # (b,) per sample or (b, T) per step
    step_adv = row_adv[:, j] if row_adv.ndim == 2 else row_adv
    if train.algorithm == "ddpo_sf":
        loss, stats = score_function_loss(log_prob, old_log_prob, step_adv, train.adv_clip_max, weights)
    else:
        loss, stats = ppo_loss(log_prob, old_log_prob, step_adv, train.clip_range, train.adv_clip_max, weights)
    if train.kl_coef > 0:
        kl = step_kl(mean, reference_mean, std).mean()
        loss = loss + train.kl_coef * kl
        stats["kl_ref"] = kl.detach()
        stats["loss"] = loss.detach()
    return loss, stats


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
    grad_scaler: "torch.amp.GradScaler | None" = None,
    steps_with_signal: int | None = None,
) -> dict[str, float]:
    """One pass of DDPO-IS or DDPO-SF over `trajectories` (one inner epoch); averaged statistics.

    `unet` may be wrapped (DDP); `no_sync` is its no_sync context. It holds the forward and the
    backward of every step that is not the last before an optimizer step: DDP decides at the
    forward whether the backward all-reduces, so one all-reduce per optimizer step.
    `guidance_scale` is the CFG weight the log-probs are recomputed with (the sampling one when
    train.cfg, else 1.0). fp16 needs `grad_scaler` (`make_grad_scaler`); it is unscaled before
    the norm clip, and a step with non-finite gradients is skipped (and not counted).
    Statistics stay on the device until the end: one host sync per epoch, not per step.

    `steps_with_signal` = s: per-step advantages are 0 after each trajectory's first s steps
    (branched sampling's steps after the last branch), so those steps are not computed: their
    loss and gradient are exactly 0 (the PPO loss is proportional to the advantage; refused
    with a KL penalty, whose gradient they would carry). The loss keeps its scale (the mean over
    every trained step), so the gradient is the one computing them would give; the statistics
    (loss, approx_kl, clipfrac, the ratios) are then over the computed steps only. Meant for
    `timestep_fraction` 1: with fewer trained steps it would favour the signal steps.

    `train.micro_batch_size` bounds the samples per forward and backward (activation memory): each
    minibatch's steps are computed over its micro-batches, each loss weighted by its share of the
    minibatch, so the gradient and the statistics are the minibatch's.
    """
    if compute_dtype == torch.float16 and grad_scaler is None:
        raise ValueError(
            "compute_dtype=float16 needs grad_scaler (ddpo_ray.maths.ppo.make_grad_scaler): without "
            "loss scaling the fp16 backward underflows to zero"
        )
    batch, steps = trajectories.timesteps.shape
    if advantages.shape not in ((batch,), (batch, steps)):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected ({batch},) per sample or ({batch}, {steps}) per step"
        )
    if batch % train.batch_size:
        raise ValueError(f"{batch} samples do not split into train.batch_size={train.batch_size} minibatches")
    num_minibatches = batch // train.batch_size
    if num_minibatches % train.gradient_accumulation_steps:
        raise ValueError(
            f"{num_minibatches} minibatches do not split into groups of "
            f"train.gradient_accumulation_steps={train.gradient_accumulation_steps}"
        )
    num_train_timesteps = int(steps * train.timestep_fraction)
    backwards_per_step = num_train_timesteps * train.gradient_accumulation_steps  # the loss's scale
    computed_timesteps = num_train_timesteps
    if steps_with_signal is not None:
        _check_steps_with_signal(steps_with_signal, advantages, steps, train)
        computed_timesteps = min(num_train_timesteps, steps_with_signal)

    device = trajectories.latents.device
    scheduler.set_timesteps(steps, device=device)
    shuffled, shuffled_adv = shuffle_for_training(trajectories, advantages, generator, steps_with_signal)
    shuffled_adv = shuffled_adv.to(device, torch.float32)  # once, not per step and micro-batch
    # Every (sample, step)'s loss weight at once: they depend on the schedule alone.
    flat_weights = step_weights(scheduler, shuffled.timesteps.flatten(), train, eta)
    all_weights = None if flat_weights is None else flat_weights.reshape(shuffled.timesteps.shape)
    unet.train()
    optimizer.zero_grad(set_to_none=True)

    totals: dict[str, torch.Tensor] = {}
    ratio_max_dev = torch.zeros((), device=device)
    # Before the first optimizer step the weights are those that sampled (at staleness 0), so
    # every ratio there must be exactly 1: the key check that training scores what sampling drew.
    ratio_dev_before_update = torch.zeros((), device=device)
    grad_norms: list[torch.Tensor] = []
    count = 0
    for m in range(num_minibatches):
        rows = slice(m * train.batch_size, (m + 1) * train.batch_size)
        update_after_minibatch = m % train.gradient_accumulation_steps == train.gradient_accumulation_steps - 1
        chunks = micro_batches(rows, train.micro_batch_size)
        for j in range(computed_timesteps):
            for c, chunk in enumerate(chunks):
                # A chunk's share of the minibatch: its mean loss and statistics, so weighted, add
                # up to the minibatch's (one chunk: share 1, the arithmetic of no chunking).
                share = (chunk.stop - chunk.start) / train.batch_size
                last_backward = update_after_minibatch and j == computed_timesteps - 1 and c == len(chunks) - 1
                with contextlib.nullcontext() if last_backward else no_sync():
                    loss, stats = _step_loss(
                        unet, scheduler, shuffled, shuffled_adv, all_weights, chunk, j, train,
                        guidance_scale=guidance_scale, eta=eta, compute_dtype=compute_dtype,
                    )
                    scaled = loss * share / backwards_per_step
                    if grad_scaler is not None:
                        scaled = grad_scaler.scale(scaled)
                    scaled.backward()
                for key, value in stats.items():
                    if key == "ratio_max_dev":
                        ratio_max_dev = torch.maximum(ratio_max_dev, value)
                        if not grad_norms:
                            ratio_dev_before_update = torch.maximum(ratio_dev_before_update, value)
                    else:
                        totals[key] = totals[key] + value * share if key in totals else value * share
            count += 1
        if update_after_minibatch:
            if grad_scaler is not None:
                grad_scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
            grad_norms.append(torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm).detach().float())
            if grad_scaler is not None:
                grad_scaler.step(optimizer)  # skipped when a gradient is inf/nan
                grad_scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    unet.eval()
    keys = sorted(totals)
    norms = torch.stack(grad_norms)
    finite = torch.isfinite(norms)
    summary = torch.stack([
        *(totals[k].float() / count for k in keys),
        ratio_max_dev.float(), ratio_dev_before_update.float(),
        torch.where(finite, norms, torch.zeros_like(norms)).sum() / finite.sum().clamp(min=1),
        finite.sum().float(),
    ]).tolist()  # the one host sync of the epoch
    metrics = dict(zip(keys, summary[:len(keys)]))
    metrics["ratio_max_dev"], metrics["ratio_dev_before_update"] = summary[len(keys)], summary[len(keys) + 1]
    metrics["grad_norm"], metrics["optimizer_steps"] = summary[len(keys) + 2], summary[len(keys) + 3]
    skipped = len(grad_norms) - int(metrics["optimizer_steps"])
    if skipped:
        log.warning("%d of %d optimizer steps skipped: non-finite fp16 gradients (the loss scale falls)",
                    skipped, len(grad_norms))
    return metrics
