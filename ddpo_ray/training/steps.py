"""The steps of one DDPO epoch, shared by the single-process loop and the distributed system.

Both call exactly these functions, with randomness keyed by what a draw is (seed, epoch, batch,
inner epoch, learner rank) rather than by how many draws came before it. So one sampler and one
learner worker on Ray compute what the single-process loop computes, and tests can hold them to it.
No Ray here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch

from ddpo_ray.config import DDPOConfig
from ddpo_ray.infra.hf_loading import compute_dtype
from ddpo_ray.maths.diffusion import Trajectories, sample_trajectories
from ddpo_ray.maths.ppo import (
    make_grad_scaler,
    make_optimizer,
    recompute_log_probs,
    scheduled_learning_rate,
    set_learning_rate,
    train_epoch,
)
from ddpo_ray.maths.branching import step_node, tree_depth
from ddpo_ray.maths.seeding import INITIAL_NOISE, SAMPLING, TRAINING, TREE_NOISE, make_generator
from ddpo_ray.models.lora import trainable_parameters


def epoch_batches(cfg: DDPOConfig, prompts: Sequence[str]) -> list[tuple[str, ...]]:
    """An epoch's prompts cut into its `sample.num_batches_per_epoch` sampling batches, in order."""
    size = cfg.sample.batch_size
    if len(prompts) != size * cfg.sample.num_batches_per_epoch:
        raise ValueError(f"{len(prompts)} prompts; expected {size * cfg.sample.num_batches_per_epoch} for one epoch")
    return [tuple(prompts[b * size:(b + 1) * size]) for b in range(cfg.sample.num_batches_per_epoch)]


def sample_batch(
    pipe, cfg: DDPOConfig, prompts: Sequence[str], epoch: int, batch_index: int, policy_version: int
) -> Trajectories:
    """Sampling batch `batch_index` of `epoch`; its noise depends only on (seed, epoch, batch),
    with `sample.initial_noise: per_group` its x_T on (seed, epoch, prompt group), and with
    `tree` every draw on (seed, epoch, group, step, tree node) (`tree_step_noise`)."""
    generator = make_generator(cfg.seed, SAMPLING, epoch, batch_index, device=pipe.unet.device)
    initial_noise = step_noise = None
    if cfg.sample.initial_noise in ("per_group", "tree"):
        initial_noise = group_initial_noise(pipe, cfg, epoch, batch_index, len(prompts))
    if cfg.sample.initial_noise == "tree":
        step_noise = tree_step_noise(pipe, cfg, epoch, batch_index, len(prompts))
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
        initial_noise=initial_noise,
        step_noise=step_noise,
    )


def _latent_shape(pipe, cfg: DDPOConfig) -> tuple[int, int, int, int]:
    size = cfg.sample.resolution // pipe.vae_scale_factor
    return (1, pipe.unet.config.in_channels, size, size)


def group_positions(cfg: DDPOConfig, batch_index: int, batch: int) -> list[tuple[int, int]]:
    """(group, index within the group) of each sample of a sampling batch: sample j of the epoch
    is sample j % K of group j // K (PromptSampler lays a prompt's K samples out contiguously)."""
    first = batch_index * cfg.sample.batch_size
    return [divmod(first + i, cfg.sample.samples_per_prompt) for i in range(batch)]


def group_initial_noise(pipe, cfg: DDPOConfig, epoch: int, batch_index: int, batch: int) -> torch.Tensor:
    """x_T for each sample of a sampling batch when a prompt's K samples share one: each
    group's x_T is drawn from (seed, epoch, group) alone (`group_positions`), so a group split
    over two batches, or two samplers, still shares it."""
    shape = _latent_shape(pipe, cfg)
    groups = [group for group, _ in group_positions(cfg, batch_index, batch)]
    noise = {
        g: torch.randn(shape, generator=make_generator(cfg.seed, INITIAL_NOISE, epoch, g), dtype=torch.float32)
        for g in dict.fromkeys(groups)
    }
    return torch.cat([noise[g] for g in groups]).to(pipe.unet.device)


def tree_step_noise(pipe, cfg: DDPOConfig, epoch: int, batch_index: int, batch: int) -> torch.Tensor:
    """Every step's noise z (batch, T, C, h, w) for a batch of binary trees (`initial_noise: tree`).

    A sample's place in its group (`group_positions`) is its leaf; its noise at step s is the
    one of the tree node it reaches after s (`ddpo_ray.maths.branching.step_node`), drawn from
    (seed, epoch, group, step, node) alone: leaves that share a node share that step's noise,
    and a tree split over batches or samplers is still one tree.
    """
    steps = cfg.sample.num_steps
    depth = tree_depth(cfg.sample.samples_per_prompt, steps)
    shape = _latent_shape(pipe, cfg)
    drawn: dict[tuple[int, int, int], torch.Tensor] = {}
    rows = []
    for group, leaf in group_positions(cfg, batch_index, batch):
        row = []
        for step in range(steps):
            key = (group, step, step_node(leaf, step, depth))
            if key not in drawn:
                drawn[key] = torch.randn(shape, generator=make_generator(cfg.seed, TREE_NOISE, epoch, *key))
            row.append(drawn[key])
        rows.append(torch.cat(row))
    return torch.stack(rows).to(pipe.unet.device)


def train_guidance_scale(cfg: DDPOConfig) -> float:
    """The CFG weight log-probs are recomputed with: the sampling one if train.cfg, else none."""
    return cfg.sample.guidance_scale if cfg.train.cfg else 1.0


@dataclass
class TrainerState:
    """What a learner holds besides the pipeline: the trained parameters, AdamW, the fp16 scaler."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    grad_scaler: "torch.amp.GradScaler | None"


def make_trainer_state(pipe, cfg: DDPOConfig) -> TrainerState:
    """Open what trains on `pipe.unet` (LoRA, or the whole UNet in fp32 master weights), with the
    optimizer, the fp16 loss scaler and, if asked, gradient checkpointing. The single-process
    loop and every learner worker build their state here."""
    params = trainable_parameters(pipe.unet, cfg.model.use_lora, cfg.model.lora_rank, seed=cfg.seed)
    if cfg.train.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    return TrainerState(
        params=params,
        optimizer=make_optimizer(params, cfg.train),
        grad_scaler=make_grad_scaler(compute_dtype(cfg.model.mixed_precision), pipe.unet.device),
    )


def with_recomputed_log_probs(unet: torch.nn.Module, scheduler, trajectories: Trajectories, cfg: DDPOConfig
                              ) -> tuple[Trajectories, float]:
    """`trajectories` with their old log-probs rescored by this learner (train.recompute_old_log_probs),
    and the largest |exp(rescored - sampled) - 1|: how far the sampler's kernels were from these."""
    rescored = recompute_log_probs(
        unet, scheduler, trajectories, cfg.train.batch_size,
        guidance_scale=train_guidance_scale(cfg), eta=cfg.sample.eta,
        compute_dtype=compute_dtype(cfg.model.mixed_precision),
    )
    deviation = float((torch.exp(rescored - trajectories.log_probs) - 1).abs().max())
    out = trajectories.select(range(len(trajectories)))
    out.log_probs = rescored
    return out, deviation


def steps_with_signal(cfg: DDPOConfig) -> int | None:
    """How many of a trajectory's first steps can carry a nonzero advantage, when fewer than all:
    with branched sampling (`advantage.mode: tree`) the steps after the last branch get 0, so
    training skips them (a third to a half of its compute on `tiny`). None: every step can (and
    always with a KL penalty, which acts at every step, and with train.timestep_fraction < 1,
    whose random subset of steps the skip would bias towards the signal steps)."""
    if cfg.advantage.mode != "tree" or cfg.train.kl_coef > 0 or cfg.num_train_timesteps != cfg.sample.num_steps:
        return None
    depth = tree_depth(cfg.sample.samples_per_prompt, cfg.sample.num_steps)
    return depth if depth < cfg.sample.num_steps else None


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
    grad_scaler: "torch.amp.GradScaler | None" = None,
) -> dict[str, float]:
    """`train.num_inner_epochs` PPO passes over one epoch's trajectories; averaged metrics.

    `ratio_dev_before_update` is the largest |ratio - 1| before the first optimizer step of
    the first pass: 0 (to float precision) when the trajectories were sampled with the weights
    being trained (staleness 0), about the policy lag otherwise. With the old log-probs
    recomputed (`cfg.recompute_old_log_probs`), `sampling_log_prob_dev` is the sampler-vs-learner
    deviation that recomputing removed.
    """
    lr = scheduled_learning_rate(cfg.train, epoch, cfg.num_epochs)
    set_learning_rate(optimizer, lr)
    sampling_dev = None
    if cfg.recompute_old_log_probs:
        trajectories, sampling_dev = with_recomputed_log_probs(unet, scheduler, trajectories, cfg)
    inner_metrics = []
    for inner in range(cfg.train.num_inner_epochs):
        inner_metrics.append(train_epoch(
            unet, scheduler, optimizer, params, trajectories, advantages, cfg.train,
            guidance_scale=train_guidance_scale(cfg),
            eta=cfg.sample.eta,
            generator=make_generator(cfg.seed, TRAINING, epoch, inner, rank),
            compute_dtype=compute_dtype(cfg.model.mixed_precision),
            no_sync=no_sync,
            grad_scaler=grad_scaler,
            steps_with_signal=steps_with_signal(cfg),
        ))
    metrics = {key: float(np.mean([m[key] for m in inner_metrics])) for key in inner_metrics[0]}
    metrics["ratio_max_dev"] = max(m["ratio_max_dev"] for m in inner_metrics)
    metrics["ratio_dev_before_update"] = inner_metrics[0]["ratio_dev_before_update"]
    metrics["learning_rate"] = lr
    if sampling_dev is not None:
        metrics["sampling_log_prob_dev"] = sampling_dev
    return metrics
