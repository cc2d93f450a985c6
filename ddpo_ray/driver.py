"""The distributed DDPO epoch loop, run by the driver: samplers -> rewards -> advantages -> learner.

The same algorithm as `ddpo_ray.local`, with the work spread over Ray:

    for each epoch:
        wait for the policy version this epoch is sampled with (staleness.sampling_version)
        samplers sample the epoch's batches with it, rewards come back from Ray Serve
        advantages over the whole epoch (the per-prompt tracker lives here, in one place)
        shards of the epoch go to the learner workers (Ray Train), which train and publish
        the next version
        when an epoch's training is done: record its metrics, grid, curve, checkpoint

At staleness 0 the driver waits for version e before sampling epoch e (exact DDPO). At
staleness 1 it samples epoch e with version e - 1 while the learner trains epoch e - 1.
The driver never holds trajectories: it passes object refs from samplers to learner workers.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ddpo_ray.advantages import AdvantageEstimator
from ddpo_ray.checkpoint import load_run_state, resolve_resume_path, save_run_state
from ddpo_ray.config import DDPOConfig
from ddpo_ray.epoch_steps import checkpoint_due, format_progress, summary
from ddpo_ray.evaluation import EvalRecorder
from ddpo_ray.learner import Learner, split_epoch
from ddpo_ray.metrics import EpochMetrics
from ddpo_ray.prompts import PromptSampler, get_prompts
from ddpo_ray.run_dir import RunDirectory
from ddpo_ray.sampler import SampleTask
from ddpo_ray.sampler_pool import SampledEpoch, SamplerPool
from ddpo_ray.staleness import is_stale, sampling_version
from ddpo_ray.weight_sync import ObjectStoreTransport


@dataclass
class _SampledRecord:
    """What the driver keeps of an epoch between sampling it and its training finishing."""

    epoch: int
    metrics: dict[str, Any]
    images: np.ndarray
    prompts: list[str]
    rewards: np.ndarray
    tracker_state: dict[str, Any]  # the advantage tracker right after this epoch, for its checkpoint
    started: float


def _epoch_tasks(cfg: DDPOConfig, prompt_sampler: PromptSampler, epoch: int) -> list[SampleTask]:
    prompts = prompt_sampler.epoch_prompts(epoch, cfg.samples_per_epoch)
    size = cfg.sample.batch_size
    return [
        SampleTask(epoch, b, tuple(prompts[b * size:(b + 1) * size]))
        for b in range(cfg.sample.num_batches_per_epoch)
    ]


def _sampling_metrics(epoch: int, sampled: SampledEpoch, rewards: np.ndarray, advantages: np.ndarray) -> dict[str, Any]:
    versions = sorted({b.policy_version for b in sampled.batches})
    metrics: dict[str, Any] = {"epoch": epoch, "samples": int(len(rewards)), "sampled_with_version": versions[-1]}
    metrics.update(summary("reward", rewards))
    metrics.update(summary("advantage", advantages, extremes=False))
    for name in sampled.batches[0].components:
        values = np.concatenate([b.components[name] for b in sampled.batches])
        metrics.update(summary(f"reward_{name}", values, extremes=False))  # each unweighted component
    metrics.update(
        time_sampling=sampled.time_sampling,
        time_reward=sampled.time_reward_wait,
        time_weight_sync=max(b.time_weight_sync for b in sampled.batches),
        sampler_reissued=sampled.reissued,
        sampler_nodes=sorted({b.node_id for b in sampled.batches}),
        stale_dropped=sampled.stale_dropped,
    )
    return metrics


def run_distributed(
    cfg: DDPOConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Train for cfg.num_epochs epochs on the connected Ray cluster; returns per-epoch metrics.

    The reward applications the config names must be running on Serve (`run.py` sees to it).
    `on_epoch` is called with each epoch's metrics after they are written.
    """
    run_dir = RunDirectory(f"{cfg.output_dir}/{cfg.resolved_run_name()}")
    run_dir.write_config(cfg.to_dict())
    print(f"run directory: {run_dir.root}", flush=True)

    advantage_fn = AdvantageEstimator(cfg.advantage.mode, cfg.advantage.buffer_size, cfg.advantage.min_count)
    prompt_sampler = PromptSampler(get_prompts(cfg.prompts.name), cfg.sample.samples_per_prompt, cfg.seed)
    first_epoch, first_version, resume_path = 0, 0, None
    if cfg.resume_from:
        resume_path = resolve_resume_path(cfg.resume_from, run_dir)
        state = load_run_state(resume_path, advantage_fn)
        first_epoch, first_version = state["epoch"] + 1, state["policy_version"]
        run_dir.truncate_metrics(after_epoch=state["epoch"])
        print(f"resumed from {resume_path} at epoch {first_epoch}", flush=True)
    history = run_dir.read_metrics()
    if first_epoch >= cfg.num_epochs:
        return history

    exported = EpochMetrics(run_dir.root.name, "ray" if cfg.metrics else "off")
    learner = Learner(cfg, run_dir, first_epoch, resume_path)
    samplers = SamplerPool(cfg, name_prefix=f"sampler-{run_dir.root.name}")
    waiting: deque[_SampledRecord] = deque()  # sampled, handed to the learner, not yet trained

    # Held-out evaluation (ddpo_ray.evaluation): a sampler generates, the reward apps score.
    evals = EvalRecorder(cfg, run_dir, exported, first_version)
    weight_transport = ObjectStoreTransport()  # the learner's: to fetch the best version's weights
    eval_client = None
    if cfg.eval.every:
        from reward_services.client import RewardClient

        eval_client = RewardClient({name: 1.0 for name in cfg.eval_reward_names()},
                                   timeout_s=cfg.reward.timeout_s, max_retries=cfg.reward.max_retries)

    def evaluate_policy(version: int) -> dict[str, Any]:
        """Evaluate policy `version`; record it, keep the best, check the guard."""
        start = time.perf_counter()
        weights = learner.policy(version).weights
        images = samplers.generate_eval(weights)
        scores = eval_client(images, list(evals.eval_set.prompts)).components
        return evals.record(version, images, scores, lambda: weight_transport.fetch(weights), start)

    def finish_epoch(record: _SampledRecord) -> None:
        """The learner has trained `record.epoch`: write its metrics, pictures and checkpoint."""
        published = learner.policy(record.epoch + 1)
        metrics = {**record.metrics, **published.metrics, "policy_version": record.epoch + 1}
        if evals.due(record.epoch + 1):
            metrics.update(evaluate_policy(record.epoch + 1))  # of the weights this epoch produced
        metrics["time_epoch"] = time.perf_counter() - record.started
        run_dir.append_metrics(metrics)
        exported.record(metrics)
        history.append(metrics)
        run_dir.save_sample_grid(record.epoch, record.images, record.prompts, record.rewards.tolist())
        run_dir.save_reward_curve(history)
        if checkpoint_due(cfg, record.epoch):
            directory = learner.checkpoint(record.epoch)  # the learner's half is written
            save_run_state(directory, record.epoch, record.epoch + 1, record.tracker_state)
            run_dir.mark_checkpoint_complete(record.epoch)
        print(format_progress(metrics), flush=True)
        if on_epoch is not None:
            on_epoch(metrics)

    try:
        if evals.due(first_version):
            evaluate_policy(first_version)  # the base model, or where a resumed run stands
        for epoch in range(first_epoch, cfg.num_epochs):
            started = time.perf_counter()
            # 1. the policy this epoch is sampled with (staleness 0: the one trained on epoch - 1)
            version = sampling_version(epoch, cfg.cluster.staleness, first_version)
            policy = learner.policy(version)
            while waiting and waiting[0].epoch < version:
                finish_epoch(waiting.popleft())  # may evaluate, and so trip the guard
            if evals.stopped:  # (at staleness 1 the epoch already handed to the learner finishes)
                print(evals.stop_message(), flush=True)
                break
            time_waiting = time.perf_counter() - started

            # 2. sample on the samplers; rewards come back from Serve as batches finish
            sampled = samplers.sample_epoch(
                _epoch_tasks(cfg, prompt_sampler, epoch), policy.weights,
                is_stale=lambda v, e=epoch: is_stale(v, e, cfg.cluster.staleness),
            )
            for event in sampled.events:
                print(f"epoch {epoch}: {event}", flush=True)

            # 3. advantages over the whole epoch
            prompts = [p for b in sampled.batches for p in b.task.prompts]
            rewards = np.concatenate([b.rewards for b in sampled.batches])
            advantages = advantage_fn(prompts, rewards)

            # 4. hand the epoch to the learner: refs to the samplers' trajectories, split by worker
            shards = split_epoch(
                [(ref, len(b.task.prompts)) for ref, b in zip(sampled.trajectories, sampled.batches)],
                advantages, cfg.cluster.learner_workers, epoch,
            )
            learner.put_epoch(epoch, shards)

            metrics = _sampling_metrics(epoch, sampled, rewards, advantages)
            metrics["time_waiting_for_learner"] = time_waiting
            waiting.append(_SampledRecord(
                epoch, metrics, np.concatenate([b.images for b in sampled.batches]), prompts, rewards,
                copy.deepcopy(advantage_fn.state_dict()), started,
            ))
            if cfg.cluster.staleness == 0:
                finish_epoch(waiting.popleft())
        while waiting:
            finish_epoch(waiting.popleft())
        learner.finish()
    finally:
        samplers.shutdown()
        learner.abort()
    return history

