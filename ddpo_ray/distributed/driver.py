"""The distributed backend of the epoch path: samplers -> Serve rewards -> Ray Train learner.

`ddpo_ray.training.epoch_loop.EpochLoop` runs the epochs (resume, advantages, records,
evaluation, checkpoints, stops, the staleness policy); `RayBackend` says where the work runs:

    sample:    wait for the policy version the epoch is sampled with (a fresh run's version 0
               is the samplers' own initial adapter: no wait), send the epoch's batches to the
               sampler actors with its weights; rewards come back from Ray Serve
    train:     cut the epoch into one shard per learner worker (object refs to the samplers'
               trajectories, and the advantages) and put it in the exchange; the learner
               workers pull their shards, train, and rank 0 publishes the next version
    evaluate:  a sampler generates the eval images of a version, the reward apps score them

The driver never holds trajectories: it passes object refs from samplers to learner workers.
The reward applications the config names must be running on Serve (`ddpo_ray.run` sees to it).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ddpo_ray.config import DDPOConfig
from ddpo_ray.distributed.learner import Learner
from ddpo_ray.distributed.sampler import SampleTask
from ddpo_ray.distributed.sampler_pool import SamplerPool
from ddpo_ray.distributed.weight_transport import INITIAL_POLICY, PolicyWeights, make_transport
from ddpo_ray.maths.sharding import split_epoch
from ddpo_ray.records.checkpoint import write_learner_state
from ddpo_ray.records.console import PhaseCounter
from ddpo_ray.records.run_dir import RunDirectory
from ddpo_ray.training.epoch_loop import EpochLoop, ScoredEpoch
from ddpo_ray.training.steps import epoch_batches

log = logging.getLogger(__name__)


class RayBackend:
    """Sampler actors, the Serve reward apps and a Ray Train learner, on the connected cluster."""

    def __init__(self, cfg: DDPOConfig):
        self.cfg = cfg
        self.transport = make_transport(cfg.cluster.weight_transport)  # to fetch the best version's weights
        self.learner: Learner | None = None
        self.samplers: SamplerPool | None = None
        self.eval_client = None
        self.counter = PhaseCounter()

    def start(self, run_dir: RunDirectory, first_epoch: int, resume_path: Path | None) -> None:
        cfg = self.cfg
        self._fresh = first_epoch == 0 and resume_path is None
        # The samplers load while the learner's worker group starts; a fresh run's epoch 0 needs
        # only the samplers (INITIAL_POLICY), so the learner's start-up overlaps its sampling.
        self.samplers = SamplerPool(cfg, name_prefix=f"sampler-{run_dir.root.name}", wait=False)
        self.learner = Learner(cfg, run_dir, first_epoch, resume_path)
        self.samplers.wait_until_ready()
        if cfg.eval.every:
            from reward_services.client import RewardClient

            self.eval_client = RewardClient(cfg.eval_reward_weights(),
                                            timeout_s=cfg.reward.timeout_s, max_retries=cfg.reward.max_retries)

    def _weights(self, policy_version: int) -> PolicyWeights:
        """What the samplers sample `policy_version` with. A fresh run's version 0 is the adapter
        each sampler built from the seed (`INITIAL_POLICY`), so the base evaluation and epoch 0
        run while the learner's worker group is still starting; later versions wait for it."""
        if policy_version == 0 and self._fresh:
            return INITIAL_POLICY
        return self.learner.policy(policy_version).weights

    def sample(self, epoch: int, prompts: list[str], policy_version: int) -> ScoredEpoch:
        start = time.perf_counter()
        weights = self._weights(policy_version)
        time_waiting = time.perf_counter() - start
        tasks = [SampleTask(epoch, b, batch) for b, batch in enumerate(epoch_batches(self.cfg, prompts))]
        self.counter.show(epoch, f"sampling {len(tasks)} batches on {len(self.samplers.actors)} samplers")
        sampled = self.samplers.sample_epoch(tasks, weights, republished=self.learner.republished)
        self.counter.clear()
        for event in sampled.events:
            log.warning("epoch %d: %s", epoch, event)
        batches = sampled.batches
        return ScoredEpoch(
            epoch=epoch,
            sampled_with_version=policy_version,
            prompts=[p for b in batches for p in b.task.prompts],
            rewards=np.concatenate([b.rewards for b in batches]),
            components={name: np.concatenate([b.components[name] for b in batches]) for name in batches[0].components},
            images=np.concatenate([b.images for b in batches]),
            time_sampling=sampled.time_sampling,
            time_reward=sampled.time_reward_wait,
            extra={
                "time_weight_sync": max(b.time_weight_sync for b in batches),
                "time_waiting_for_learner": time_waiting,
                "sampler_reissued": sampled.reissued,
                "sampler_nodes": sorted({b.node_id for b in batches}),
            },
            trajectories=sampled,
        )

    def hand_to_training(self, scored: ScoredEpoch, advantages: np.ndarray) -> None:
        sampled = scored.trajectories
        shards = split_epoch(
            [(ref, len(b.task.prompts)) for ref, b in zip(sampled.trajectories, sampled.batches)],
            advantages, self.cfg.cluster.learner_workers, scored.epoch,
        )
        self.learner.put_epoch(scored.epoch, shards)

    def trained(self, epoch: int) -> dict[str, Any]:
        self.counter.show(epoch, "training (learner)")
        metrics = dict(self.learner.policy(epoch + 1).metrics)
        self.counter.clear()
        return metrics

    def eval_images(self, policy_version: int) -> np.ndarray:
        return self.samplers.generate_eval(self._weights(policy_version))

    def score_eval(self, images: np.ndarray, prompts: list[str]) -> Mapping[str, np.ndarray]:
        return self.eval_client(images, prompts).components

    def policy_state(self, policy_version: int) -> dict[str, torch.Tensor]:
        return self.transport.fetch(self.learner.policy(policy_version).weights)

    def learner_checkpoint(self, epoch: int, directory: Path, final: bool) -> None:
        if final:
            self.learner.stop(checkpoint_epoch=epoch)  # the learner hands it over as it stops
        write_learner_state(directory, self.learner.checkpoint(epoch))  # here: the workers see no run directory

    def finish(self) -> None:
        self.learner.finish()

    def close(self) -> None:
        if self.samplers is not None:
            self.samplers.shutdown()
        if self.learner is not None:
            self.learner.abort()


def run_distributed(
    cfg: DDPOConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Train for cfg.num_epochs epochs on the connected Ray cluster; returns per-epoch metrics.

    `on_epoch` is called with each epoch's metrics after they are written.
    """
    return EpochLoop(cfg, RayBackend(cfg), exporter="ray", on_epoch=on_epoch).run()
