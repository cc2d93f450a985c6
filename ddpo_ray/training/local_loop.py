"""The single-process DDPO loop: the epoch path (`epoch_loop`) on a backend that does the work here.

Read `LocalBackend` top to bottom: sample a batch at a time with the current weights, score the
images in-process, train with the same PPO code the Ray learner runs. No Ray. It is the
reference the distributed system is checked and measured against, and a debugging tool
(`python -m ddpo_ray.local`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ddpo_ray.config import DDPOConfig
from ddpo_ray.infra.reward_names import tiny_reward_refusal
from ddpo_ray.maths.diffusion import Trajectories
from ddpo_ray.models.lora import trainable_state_dict
from ddpo_ray.models.merged_lora import MergedLora
from ddpo_ray.models.pipelines import load_pipeline
from ddpo_ray.records.checkpoint import load_learner_state, save_learner_state
from ddpo_ray.records.console import PhaseCounter
from ddpo_ray.records.run_dir import RunDirectory
from ddpo_ray.training.epoch_loop import EpochLoop, ScoredEpoch
from ddpo_ray.training.evaluation import EvalSet, generate_eval_images
from ddpo_ray.training.steps import epoch_batches, make_trainer_state, sample_batch, train_inner_epochs
from reward_services.functions import compute_rewards
from reward_services.metrics import ServiceMetrics

# (images (N, H, W, 3) uint8, prompts) -> (rewards (N,), info per reward component)
TrainingRewards = Callable[[np.ndarray, Sequence[str]], tuple[np.ndarray, dict[str, Any]]]


class LocalBackend:
    """The policy (frozen pipeline + LoRA), its optimizer and the rewards, all in this process."""

    def __init__(self, cfg: DDPOConfig, device: str | torch.device = "cpu",
                 training_rewards: TrainingRewards | None = None):
        self.cfg, self.device = cfg, device
        self.training_rewards = training_rewards or (
            lambda images, prompts: compute_rewards(cfg.reward.components(), images, prompts)
        )
        self.policy_version = 0
        self._to_train: dict[int, tuple[Trajectories, np.ndarray]] = {}
        self.counter = PhaseCounter()

    def start(self, run_dir: RunDirectory, first_epoch: int, resume_path: Path | None) -> None:
        cfg = self.cfg
        # The in-process rewards load only their offline (tiny-world) defaults.
        refusal = tiny_reward_refusal(
            cfg.model.pretrained, cfg.eval_reward_names() if cfg.eval.every else cfg.reward.components(),
            "the single-process loop",
        )
        if refusal is not None:
            raise ValueError(f"{refusal}; then run it with python -m ddpo_ray.run")
        self.pipe = load_pipeline(cfg.model, self.device, seed=cfg.seed)
        self.trainer = make_trainer_state(self.pipe, cfg)
        self.params, self.optimizer = self.trainer.params, self.trainer.optimizer
        self.merged_lora = MergedLora.for_sampling(self.pipe.unet, cfg.model.use_lora, cfg.sample.merge_lora)
        if resume_path is not None:
            load_learner_state(resume_path, self.pipe.unet, cfg.model.use_lora, self.optimizer)
        self.policy_version = first_epoch
        # The in-process rewards report as a reward service would (labelled as the in-process path).
        backend = "prometheus" if cfg.metrics else "off"
        self.reward_metrics = ServiceMetrics(backend, app="+".join(cfg.reward.components()), deployment="in_process")
        self.eval_set = EvalSet.from_config(cfg)

    # --- sample and score --------------------------------------------------------------------

    def sample(self, epoch: int, prompts: list[str], policy_version: int) -> ScoredEpoch:
        if policy_version != self.policy_version:
            raise RuntimeError(f"epoch {epoch}: asked to sample with policy v{policy_version}, "
                               f"this process holds v{self.policy_version}")
        start = time.perf_counter()
        batches = []
        todo = epoch_batches(self.cfg, prompts)
        with self.merged_lora.merged_for_sampling():  # restored before training touches the UNet
            for b, batch in enumerate(todo):
                self.counter.show(epoch, "sampling batch", b + 1, len(todo))
                batches.append(sample_batch(self.pipe, self.cfg, batch, epoch, b, policy_version))
        self.counter.show(epoch, "scoring")
        trajectories = Trajectories.concat(batches)
        time_sampling = time.perf_counter() - start

        start = time.perf_counter()
        images = trajectories.images.numpy()
        with self.reward_metrics.request() as request:
            request["images"] = len(trajectories)
            rewards, components = self.training_rewards(images, trajectories.prompts)
        return ScoredEpoch(
            epoch=epoch, sampled_with_version=policy_version, prompts=list(trajectories.prompts),
            rewards=rewards, components=components, images=images,
            time_sampling=time_sampling, time_reward=time.perf_counter() - start, trajectories=trajectories,
        )

    # --- train -------------------------------------------------------------------------------

    def hand_to_training(self, scored: ScoredEpoch, advantages: np.ndarray) -> None:
        self._to_train[scored.epoch] = (scored.trajectories, advantages)

    def trained(self, epoch: int) -> dict[str, Any]:
        trajectories, advantages = self._to_train.pop(epoch)
        self.counter.show(epoch, "training")
        start = time.perf_counter()
        metrics = train_inner_epochs(
            self.pipe.unet, self.pipe.scheduler, self.optimizer, self.params, trajectories,
            torch.as_tensor(advantages, dtype=torch.float32), self.cfg, epoch,
            grad_scaler=self.trainer.grad_scaler,
        )
        metrics["time_training"] = time.perf_counter() - start
        self.policy_version = epoch + 1
        self.counter.clear()
        return metrics

    # --- evaluate and checkpoint ------------------------------------------------------------

    def _check_current(self, policy_version: int, what: str) -> None:
        if policy_version != self.policy_version:
            raise RuntimeError(f"{what} of policy v{policy_version} asked; this process holds v{self.policy_version}")

    def eval_images(self, policy_version: int) -> np.ndarray:
        self._check_current(policy_version, "eval images")
        return generate_eval_images(self.pipe, self.cfg, self.eval_set)

    def score_eval(self, images: np.ndarray, prompts: list[str]) -> Mapping[str, np.ndarray]:
        return compute_rewards(self.cfg.eval_reward_weights(), images, prompts)[1]

    def policy_state(self, policy_version: int) -> dict[str, torch.Tensor]:
        self._check_current(policy_version, "the weights")
        return trainable_state_dict(self.pipe.unet, self.cfg.model.use_lora)

    def learner_checkpoint(self, epoch: int, directory: Path, final: bool) -> None:
        self._check_current(epoch + 1, f"checkpoint {epoch}")
        save_learner_state(directory, self.pipe.unet, self.cfg.model.use_lora, self.optimizer)

    def finish(self) -> None:
        pass  # nothing runs in the background here

    def close(self) -> None:
        self._to_train.clear()


def run_local(
    cfg: DDPOConfig, device: str | torch.device = "cpu", training_rewards: TrainingRewards | None = None
) -> list[dict[str, Any]]:
    """Train for cfg.num_epochs epochs in this process; returns the per-epoch metrics.

    `training_rewards` replaces the rewards the epochs are trained on (evaluation still scores
    the config's): for controls such as `bench/learning.py --no-signal`.
    """
    return EpochLoop(cfg, LocalBackend(cfg, device, training_rewards), exporter="prometheus").run()
