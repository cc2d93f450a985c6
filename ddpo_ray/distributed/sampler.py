"""The sampler: holds the frozen pipeline and the current policy weights, samples trajectories.

A `Sampler` turns a `SampleTask` (epoch, batch index, prompts) into Trajectories with
log-probs, sends the decoded images to the reward applications without waiting, and goes on to
its next task; `rewards(task)` later hands back the scored batch. Every task carries the
`PolicyWeights` it must be sampled with: the sampler swaps weights between tasks (never
mid-denoising), and a sampler restarted after a crash gets the right weights with its next task.

The noise of a batch depends only on (seed, epoch, batch index), so a task gives the same
trajectories on any sampler, and a re-issued task repeats exactly.

`SamplerActor` is the Ray actor around it: `sample` runs in one concurrency group and `rewards`
in another, so waiting for rewards never stops sampling. All torch work (loading included) goes
through one `TorchThread` with as many torch threads as the actor's CPUs: Ray runs `__init__`
and each concurrency group on different threads, and torch on CPU runs about 2x slower on a
thread other than the first that used it (see `ddpo_ray.infra.torch_thread.TorchThread`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import ray
import torch

from ddpo_ray.config import DDPOConfig
from ddpo_ray.distributed.weight_transport import INITIAL_POLICY, PolicyWeights, WeightTransport, make_transport
from ddpo_ray.maths.diffusion import Trajectories
from ddpo_ray.models.lora import trainable_parameters
from ddpo_ray.models.merged_lora import MergedLora
from ddpo_ray.models.pipelines import load_pipeline
from ddpo_ray.records.metrics import SamplerMetrics
from ddpo_ray.training.steps import sample_batch


@dataclass(frozen=True)
class SampleTask:
    """One sampling batch of an epoch; `batch_index` orders the epoch's batches."""

    epoch: int
    batch_index: int
    prompts: tuple[str, ...]

    @property
    def key(self) -> tuple[int, int]:
        return (self.epoch, self.batch_index)


@dataclass
class ScoredBatch:
    """What the driver needs of a sampled batch (the trajectories go straight to the learner)."""

    task: SampleTask
    rewards: np.ndarray  # (B,) weighted reward
    components: dict[str, np.ndarray]  # reward name -> (B,) unweighted
    info: dict[str, dict[str, list]]
    images: np.ndarray  # (B, H, W, 3) uint8
    policy_version: int
    sampler_id: int
    time_sampling: float  # seconds of denoising + decoding
    time_weight_sync: float  # seconds spent loading new weights before this batch (0 if none)
    node_id: str = ""  # the Ray node that sampled it


class SamplingError(RuntimeError):
    """A sampler's `sample` raised for a batch; the message names the sampler, the batch and the cause."""


class WeightsLostError(SamplingError):
    """The batch's policy weights are gone from the object store (their owner, learner rank 0,
    died): the batch can be sampled again once the restarted learner republishes the version."""


@dataclass
class _InFlight:
    pending: Any  # reward_services.client.PendingRewards
    scored: ScoredBatch


class Sampler:
    """Pipeline + policy weights + reward client, in one process (the actor's state)."""

    def __init__(
        self,
        cfg: DDPOConfig | Mapping[str, Any],
        sampler_id: int = 0,
        device: str | torch.device = "cpu",
        transport: WeightTransport | None = None,
        reward_client: Any = None,
    ):
        self.cfg = cfg if isinstance(cfg, DDPOConfig) else DDPOConfig.model_validate(dict(cfg))
        self.sampler_id = sampler_id
        self.transport = transport or make_transport(self.cfg.cluster.weight_transport)
        self.pipe = load_pipeline(self.cfg.model, device, seed=self.cfg.seed)
        # The same initial adapter as the learner's; replaced by the first weights it is handed.
        trainable_parameters(self.pipe.unet, self.cfg.model.use_lora, self.cfg.model.lora_rank, seed=self.cfg.seed)
        self.pipe.unet.requires_grad_(False)
        self.merged_lora = MergedLora.for_sampling(self.pipe.unet, self.cfg.model.use_lora, self.cfg.sample.merge_lora)
        self.policy_version: int | None = None  # None until weights are applied
        if reward_client is None:
            from reward_services.client import RewardClient

            reward_client = RewardClient(
                self.cfg.reward.components(),
                timeout_s=self.cfg.reward.timeout_s,
                max_retries=self.cfg.reward.max_retries,
            )
        self.reward_client = reward_client
        self._in_flight: dict[tuple[int, int], _InFlight] = {}
        self._failed: dict[tuple[int, int], BaseException] = {}  # tasks whose sample raised
        self._changed = threading.Condition()
        self.batches_sampled = 0
        self.torch_threads = torch.get_num_threads()  # of the thread building (and so running) this
        self.metrics = SamplerMetrics(sampler_id, None if self.cfg.metrics else "off")
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def apply_weights(self, weights: PolicyWeights) -> float:
        """Load `weights` unless they are already current; returns the seconds it took."""
        if weights.version == self.policy_version:
            return 0.0
        if weights == INITIAL_POLICY:
            if self.policy_version is not None:
                raise RuntimeError(
                    f"sampler {self.sampler_id} holds policy v{self.policy_version}; the initial policy "
                    "is only its own starting adapter (a fresh run's version 0), which it no longer has"
                )
            self.policy_version = 0  # the adapter built in __init__, the learner's version 0
            self.metrics.weights_applied(0, 0.0)
            return 0.0
        from ddpo_ray.models.lora import load_trainable_state_dict

        start = time.perf_counter()
        state_dict = self.transport.fetch(weights)
        load_trainable_state_dict(self.pipe.unet, self.cfg.model.use_lora, state_dict)
        self.policy_version = weights.version
        seconds = time.perf_counter() - start
        self.metrics.weights_applied(weights.version, seconds)
        return seconds

    def sample(self, task: SampleTask, weights: PolicyWeights) -> Trajectories:
        """Sample `task` with `weights`, submit its images for rewards, return the trajectories.

        The returned trajectories are compact CPU tensors with no images (the learner does not
        need them; the images come back with the rewards), whatever device sampled them. If it
        raises, the failure is handed to the `rewards` call waiting for this task, which raises
        it too (that call used to wait for the batch forever).
        """
        try:
            return self._sample(task, weights)
        except BaseException as exc:
            with self._changed:
                self._failed[task.key] = exc
                self._changed.notify_all()
            raise

    def _sample(self, task: SampleTask, weights: PolicyWeights) -> Trajectories:
        if len(task.prompts) != self.cfg.sample.batch_size:
            raise ValueError(
                f"task {task.key} has {len(task.prompts)} prompts; expected sample.batch_size="
                f"{self.cfg.sample.batch_size}"
            )
        time_sync = self.apply_weights(weights)
        start = time.perf_counter()
        with self.merged_lora.merged_for_sampling():
            trajectories = sample_batch(
                self.pipe, self.cfg, task.prompts, task.epoch, task.batch_index, self.policy_version
            )
        time_sampling = time.perf_counter() - start
        self.metrics.batch_sampled(len(task.prompts), time_sampling)
        images = trajectories.images.numpy()
        pending = self.reward_client.submit(images, trajectories.prompts)
        scored = ScoredBatch(
            task=task, rewards=np.empty(0), components={}, info={}, images=images,
            policy_version=self.policy_version, sampler_id=self.sampler_id,
            time_sampling=time_sampling, time_weight_sync=time_sync, node_id=self.node_id,
        )
        with self._changed:
            self._in_flight[task.key] = _InFlight(pending, scored)
            self.batches_sampled += 1
            self._changed.notify_all()
        # CPU, compact, no pixels (they went to the rewards): what the learner's object refs hold.
        return trajectories.for_transport(keep_images=False)

    def generate_eval(self, weights: PolicyWeights) -> np.ndarray:
        """The held-out eval images of `weights` (fixed noise, eta 0; ddpo_ray.training.evaluation)."""
        from ddpo_ray.training.evaluation import EvalSet, generate_eval_images

        self.apply_weights(weights)
        return generate_eval_images(self.pipe, self.cfg, EvalSet.from_config(self.cfg))

    def rewards(self, task: SampleTask, timeout_s: float | None = None) -> ScoredBatch:
        """The scored batch of `task` (sampled, or queued to be sampled, on this sampler)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while task.key not in self._in_flight:
                failure = self._failed.pop(task.key, None)
                if failure is not None:
                    error = WeightsLostError if isinstance(failure, ray.exceptions.ObjectLostError) else SamplingError
                    raise error(
                        f"sampler {self.sampler_id}: batch {task.batch_index} of epoch {task.epoch} failed "
                        f"while sampling: {type(failure).__name__}: {failure}"
                    ) from failure
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"sampler {self.sampler_id}: task {task.key} was never sampled here")
                self._changed.wait(remaining)
            entry = self._in_flight.pop(task.key)
        result = entry.pending.result()
        scored = entry.scored
        scored.rewards = result.rewards
        scored.components = result.components
        scored.info = result.info
        return scored

    def stats(self) -> dict[str, Any]:
        return {
            "sampler_id": self.sampler_id,
            "policy_version": self.policy_version,
            "batches_sampled": self.batches_sampled,
            "in_flight": len(self._in_flight),
            "torch_threads": self.torch_threads,
            "node_id": self.node_id,
        }


@ray.remote(concurrency_groups={"sampling": 1, "rewards": 1, "control": 1})
class SamplerActor:
    """A `Sampler` in its own process; see the module docstring for the concurrency groups."""

    def __init__(self, cfg: Mapping[str, Any], sampler_id: int):
        from ddpo_ray.infra.torch_thread import TorchThread

        self.torch = TorchThread("sampler", DDPOConfig.model_validate(dict(cfg)).cluster.torch_threads_here())
        use_cuda = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        self.sampler = self.torch.call(Sampler, cfg, sampler_id, device="cuda" if use_cuda else "cpu")

    @ray.method(concurrency_group="sampling")
    def sample(self, task: SampleTask, weights: PolicyWeights) -> Trajectories:
        return self.torch.call(self.sampler.sample, task, weights)

    @ray.method(concurrency_group="sampling")
    def generate_eval(self, weights: PolicyWeights) -> np.ndarray:
        return self.torch.call(self.sampler.generate_eval, weights)

    @ray.method(concurrency_group="rewards")
    def rewards(self, task: SampleTask, timeout_s: float | None = None) -> ScoredBatch:
        return self.sampler.rewards(task, timeout_s)

    @ray.method(concurrency_group="control")
    def stats(self) -> dict[str, Any]:
        return self.sampler.stats()

    @ray.method(concurrency_group="control")
    def ready(self) -> bool:
        return True
