"""The one epoch path both loops run: sample -> reward -> advantages -> train -> record. No Ray.

    for each epoch:
        finish the epochs whose training the next sampling needs (staleness policy)
        sample the epoch with its policy version, score it             (backend)
        advantages over the whole epoch (the per-prompt tracker lives here)
        hand it to training                                            (backend)
        at most `staleness` epochs wait for training: finish the older ones
    finishing an epoch: its training metrics (backend), then the metrics row, the held-out
    evaluation, metrics.jsonl, the sample grid, the reward curve, Prometheus, the checkpoint
    (rows and grids also go to the config's `trackers`, TensorBoard / W&B)

`EpochLoop` owns everything a run promises about its records: resume, the metrics row,
evaluation (best version and guard), writing, checkpoint policy and stop handling. How to
sample, score and train is the backend's: `ddpo_ray.training.local_loop.LocalBackend` in one
process, `ddpo_ray.distributed.driver.RayBackend` on a cluster. So both loops write the same
records from the same code, and differ only in where the work runs.

Time keys of a metrics row, in both loops: `time_sampling` (denoising and decoding the epoch),
`time_reward` (from the last trajectory sampled until every reward is in hand: in one process
that is computing them, on Ray the wait for the Serve replicas still scoring), `time_training`
(the learner's PPO passes), `time_epoch` (from the epoch's start until its row is written).
"""

from __future__ import annotations

import copy
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch

from ddpo_ray.config import DDPOConfig
from ddpo_ray.infra.logs import log_file
from ddpo_ray.maths.advantages import AdvantageEstimator
from ddpo_ray.maths.staleness import epochs_awaiting_training, sampling_version
from ddpo_ray.maths.stats import summary
from ddpo_ray.prompts import PromptSampler, get_prompts
from ddpo_ray.records.checkpoint import MODEL_CARD, load_run_state, resolve_resume_path, save_run_state
from ddpo_ray.records.console import format_eval, format_progress
from ddpo_ray.records.files import atomic_write
from ddpo_ray.records.metrics import EpochMetrics
from ddpo_ray.records.model_card import run_model_card
from ddpo_ray.records.run_dir import RunDirectory, new_run_root
from ddpo_ray.records.storage import RunStorage, StorageError
from ddpo_ray.records.trackers import open_trackers
from ddpo_ray.training.evaluation import EvalRecorder

log = logging.getLogger(__name__)


@dataclass
class ScoredEpoch:
    """An epoch sampled and scored: what the epoch path keeps (the trajectories are the backend's)."""

    epoch: int
    sampled_with_version: int
    prompts: list[str]
    rewards: np.ndarray  # (N,) weighted reward
    components: dict[str, np.ndarray]  # reward name -> (N,) unweighted
    images: np.ndarray  # (N, H, W, 3) uint8, for the sample grid
    time_sampling: float
    time_reward: float  # see the module docstring
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific metrics for the row
    trajectories: Any = None  # the backend's handle on the trajectories (tensors, or object refs)


class EpochBackend(Protocol):
    """Where an epoch's work runs. Every call is for one policy version or one epoch."""

    def start(self, run_dir: RunDirectory, first_epoch: int, resume_path: Path | None) -> None:
        """Load the policy (from `resume_path`'s trainable weights and optimizer, if given)."""

    def sample(self, epoch: int, prompts: list[str], policy_version: int) -> ScoredEpoch:
        """Sample `epoch`'s prompts with policy `policy_version` and score the images."""

    def hand_to_training(self, scored: ScoredEpoch, advantages: np.ndarray) -> None:
        """Give the epoch to the learner (it may start at once, or when `trained` asks)."""

    def trained(self, epoch: int) -> dict[str, Any]:
        """Wait for `epoch`'s training; its metrics (time_training included). Version epoch+1 exists after."""

    def eval_images(self, policy_version: int) -> np.ndarray:
        """The held-out eval images of `policy_version` (fixed noise, eta 0)."""

    def score_eval(self, images: np.ndarray, prompts: list[str]) -> Mapping[str, np.ndarray]:
        """{reward name: per-image values} for every reward evaluation scores."""

    def policy_state(self, policy_version: int) -> dict[str, torch.Tensor]:
        """The trainable state dict of `policy_version` (for checkpoints/best)."""

    def learner_checkpoint(self, epoch: int, directory: Path, final: bool) -> None:
        """Write the learner's half of checkpoint `epoch` into `directory` (weights, optimizer).

        `final`: the run is stopping here (a guard stop) although `epoch` is not a scheduled
        checkpoint; the learner trained nothing after `epoch`.
        """

    def finish(self) -> None:
        """The run ended normally: wait for the learner to wind down (and raise what it raised)."""

    def close(self) -> None:
        """Release what `start` took (always called, also after an error)."""


def checkpoint_due(cfg: DDPOConfig, epoch: int) -> bool:
    """Checkpoint after `epoch`? Every `save_freq` epochs (0: never) and always after the last."""
    return epoch == cfg.num_epochs - 1 or bool(cfg.save_freq and (epoch + 1) % cfg.save_freq == 0)


@dataclass
class _Pending:
    """An epoch handed to training whose row is not written yet."""

    scored: ScoredEpoch
    advantages: np.ndarray
    tracker_state: dict[str, Any]  # the advantage tracker right after this epoch, for its checkpoint
    started: float


class EpochLoop:
    """Runs `cfg.num_epochs` epochs on a backend; returns the metrics rows (see the module docstring).

    `exporter`: the Prometheus backend of the run's metrics ("ray" or "prometheus"; "off" when
    `cfg.metrics` is false). `on_epoch(row)` is called after each row is written (tests use it
    to inject faults at a known point).
    """

    def __init__(
        self,
        cfg: DDPOConfig,
        backend: EpochBackend,
        exporter: str,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.cfg, self.backend, self.on_epoch = cfg, backend, on_epoch
        self.run_dir = RunDirectory(new_run_root(cfg))
        # storage_uri: the run directory is mirrored there after every checkpoint and at the end.
        self.storage = RunStorage(cfg.storage_uri, self.run_dir.root.name) if cfg.storage_uri else None
        self.exported = EpochMetrics(self.run_dir.root.name, exporter if cfg.metrics else "off")
        self.advantages = AdvantageEstimator(
            cfg.advantage.mode, cfg.advantage.buffer_size, cfg.advantage.min_count,
            samples_per_prompt=cfg.sample.samples_per_prompt, num_steps=cfg.sample.num_steps,
        )
        self.prompts = PromptSampler(get_prompts(cfg.prompts.name), cfg.sample.samples_per_prompt, cfg.seed)
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: int | None = None  # the epoch of the newest checkpoint this run wrote
        self._last_finished: _Pending | None = None
        self._rng_state: torch.Tensor | None = None  # a resumed run's, restored once the backend is up

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        self._fetch_mirrored_run()  # before this session writes its config and log there
        with log_file(self.run_dir.log_path):  # everything this process logs, in the run directory
            return self._run()

    def _fetch_mirrored_run(self) -> None:
        """storage_uri: check the mirror agrees with the run directory here, and fetch the run for
        `resume_from=latest` on a node without it (see ddpo_ray.records.storage)."""
        if self.storage is None:
            return
        self.storage.check(self.run_dir, resuming=bool(self.cfg.resume_from))
        if self.cfg.resume_from == "latest" and self.run_dir.latest_checkpoint() is None:
            fetched = self.storage.pull(self.run_dir.root)
            log.info("fetched %d files of the run from %s", fetched, self.storage.uri)

    def _run(self) -> list[dict[str, Any]]:
        cfg, run_dir = self.cfg, self.run_dir
        run_dir.write_config(cfg.to_dict())
        log.info("run directory: %s (log: %s)", run_dir.root, run_dir.log_path.name)
        if self.storage is not None:
            log.info("mirrored to %s after every checkpoint and at the end", self.storage.uri)
        first_epoch, first_version, resume_path = self._resume()
        self.history = run_dir.read_metrics()
        if first_epoch >= cfg.num_epochs:
            return self.history

        self.evals = EvalRecorder(cfg, run_dir, self.exported, first_version)
        pending: deque[_Pending] = deque()
        failing = True  # until the loop ends normally: then a failed last mirror push is an error of its own
        # Every row and grid written from here on also goes to the config's trackers.
        run_dir.trackers = open_trackers(cfg.trackers, run_dir.root, cfg.to_dict(), first_epoch)
        try:
            self.backend.start(run_dir, first_epoch, resume_path)
            if self._rng_state is not None:  # after the backend built its models (which may seed)
                torch.random.set_rng_state(self._rng_state)
            if self.evals.due(first_version):
                metrics = self._evaluate(first_version)  # the base model, or where a resumed run stands
                log.info(format_eval(first_version, metrics, cfg))
            for epoch in range(first_epoch, cfg.num_epochs):
                started = time.perf_counter()
                version = sampling_version(epoch, cfg.cluster.staleness, first_version)
                while pending and pending[0].scored.epoch < version:
                    self._finish(pending.popleft())  # may evaluate, and so trip the guard
                if self.evals.stopped:  # (at staleness 1 the epoch already in training is finished below)
                    break
                scored = self.backend.sample(epoch, self.prompts.epoch_prompts(epoch, cfg.samples_per_epoch), version)
                advantages = self.advantages(scored.prompts, scored.rewards)
                self.backend.hand_to_training(scored, advantages)
                scored.trajectories = None  # the backend's now: the loop keeps no reference to them
                pending.append(_Pending(scored, advantages, copy.deepcopy(self.advantages.state_dict()), started))
                while len(pending) > epochs_awaiting_training(cfg.cluster.staleness):
                    self._finish(pending.popleft())
            while pending:
                self._finish(pending.popleft())
            if self.evals.stopped:
                log.info(self.evals.stop_message())
                self._checkpoint_on_stop()
            self.backend.finish()
            failing = False
        finally:
            self.backend.close()
            run_dir.trackers.close()
            run_dir.trackers = None
            self._mirror(end_of_failing_run=failing)
        return self.history

    def _mirror(self, end_of_failing_run: bool = False) -> None:
        """Push the run directory to storage_uri. At the end of a run that is failing, a push that
        fails too is logged, so the run's own error is the one raised."""
        if self.storage is None:
            return
        try:
            uploaded = self.storage.push(self.run_dir.root)
            log.debug("pushed %d files to %s", uploaded, self.storage.uri)
        except StorageError as exc:
            if not end_of_failing_run:
                raise
            log.error("%s", exc)

    def _resume(self) -> tuple[int, int, Path | None]:
        """(first epoch, first policy version, checkpoint directory) of this run."""
        if not self.cfg.resume_from:
            return 0, 0, None
        path = resolve_resume_path(self.cfg.resume_from, self.run_dir)
        state = load_run_state(path, self.advantages)
        self._rng_state = state["torch_rng"]
        self.run_dir.truncate_metrics(after_epoch=state["epoch"])
        log.info("resumed from %s at epoch %d", path, state["epoch"] + 1)
        return state["epoch"] + 1, state["policy_version"], path

    # --- finishing an epoch ----------------------------------------------------------------

    def _finish(self, item: _Pending) -> None:
        """The epoch has been (or now is) trained: write its row, pictures and checkpoint."""
        cfg, scored = self.cfg, item.scored
        epoch, version = scored.epoch, scored.epoch + 1
        trained = self.backend.trained(epoch)
        row: dict[str, Any] = {"epoch": epoch, "samples": len(scored.rewards),
                               "sampled_with_version": scored.sampled_with_version, "policy_version": version}
        row.update(summary("reward", scored.rewards))
        row.update(summary("advantage", item.advantages, extremes=False))
        for name, values in scored.components.items():
            row.update(summary(f"reward_{name}", values, extremes=False))  # each unweighted component
        row.update(trained)
        row.update(time_sampling=scored.time_sampling, time_reward=scored.time_reward, **scored.extra)
        if self.evals.due(version):
            row.update(self._evaluate(version))  # of the weights this epoch produced
        row["time_epoch"] = time.perf_counter() - item.started
        self.run_dir.append_metrics(row)
        self.exported.record(row)
        self.history.append(row)
        self.run_dir.save_sample_grid(epoch, scored.images, scored.prompts, scored.rewards.tolist())
        self.run_dir.save_reward_curve(self.history)
        if checkpoint_due(cfg, epoch):
            self._checkpoint(epoch, item.tracker_state, final=False)
        self._last_finished = item
        log.info(format_progress(row))
        if self.on_epoch is not None:
            self.on_epoch(row)

    def _evaluate(self, version: int) -> dict[str, Any]:
        """Evaluate policy `version`: record it, keep the best, check the guard."""
        start = time.perf_counter()
        images = self.backend.eval_images(version)
        scores = self.backend.score_eval(images, list(self.evals.eval_set.prompts))
        return self.evals.record(version, images, scores, lambda: self.backend.policy_state(version), start)

    def _checkpoint(self, epoch: int, tracker_state: Mapping[str, Any], final: bool) -> None:
        directory = self.run_dir.checkpoint_path(epoch)
        self.backend.learner_checkpoint(epoch, directory, final)  # the learner's half
        save_run_state(directory, epoch, epoch + 1, tracker_state)  # the loop's half
        if self.cfg.model.use_lora:  # the LoRA's model card, evaluation included when there was one
            card = run_model_card(self.cfg, self.run_dir, label=directory.name, policy_version=epoch + 1,
                                  weights_location=directory)
            atomic_write(directory / MODEL_CARD, card.encode("utf-8"))
        self.run_dir.mark_checkpoint_complete(epoch)
        self.last_checkpoint = epoch
        for pruned in self.run_dir.prune_checkpoints(self.cfg.keep_last_n):
            log.debug("deleted checkpoint %s (keep_last_n=%d)", pruned.name, self.cfg.keep_last_n)
        self._mirror()

    def _checkpoint_on_stop(self) -> None:
        """A guard stop checkpoints the last finished epoch, so `resume_from=latest` starts there."""
        last = self._last_finished
        if last is not None and self.last_checkpoint != last.scored.epoch:
            self._checkpoint(last.scored.epoch, last.tracker_state, final=True)
