"""Held-out evaluation, the over-optimisation guard and `best` checkpoint selection. No Ray.

An evaluation of policy version v generates one image per eval prompt from fixed initial noise
with deterministic DDIM (`eval.eta` 0; with eta > 0, the stochastic policy DDPO trains, its
per-step noise fixed per image too), so the image in a given cell changes only when the weights do:
a user watches one image evolve over a run, and two runs with one seed show the same base images.
The eval set is the config's held-out prompt groups (`prompts.eval_name`), plus a fixed sample of
the training prompts (group "train"), `eval.prompts_per_group` each.

Every evaluation is scored by the training reward and by `eval.rewards` and the guard reward,
and summarised into `eval_*` keys (mean/std overall and per group). `EvalTracker` then keeps
the best version by `eval.best_metric` and watches the guard: when the guard reward's eval mean
falls more than `eval.guard_margin` below its best so far, the run stops (the paper's
over-optimisation: compressibility blurs everything away, incompressibility turns to noise).

Versions evaluated: 0 (the base model, before training), every `eval.every`-th, and the last.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ddpo_ray.config import DDPOConfig
from ddpo_ray.infra.hf_loading import compute_dtype
from ddpo_ray.maths.diffusion import generate_images
from ddpo_ray.maths.seeding import EVALUATION, make_generator
from ddpo_ray.prompts import get_prompts, prompt_groups, spread_pick
from ddpo_ray.records.checkpoint import read_best_info, save_best
from ddpo_ray.records.console import format_eval
from ddpo_ray.records.model_card import run_model_card
from ddpo_ray.records.run_dir import RunDirectory
from ddpo_ray.training.learning_gain import in_spreads

TRAIN_GROUP = "train"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    """The eval prompts, in grid order, and the group of each."""

    prompts: tuple[str, ...]
    groups: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: DDPOConfig) -> EvalSet:
        count = cfg.eval.prompts_per_group
        chosen: dict[str, list[str]] = {}
        if cfg.eval.include_train_prompts:
            chosen[TRAIN_GROUP] = spread_pick(get_prompts(cfg.prompts.name), count)
        for group, prompts in prompt_groups(cfg.prompts.eval_name).items():
            chosen[group] = spread_pick(prompts, count)
        return cls(
            prompts=tuple(p for prompts in chosen.values() for p in prompts),
            groups=tuple(g for g, prompts in chosen.items() for _ in prompts),
        )

    def __len__(self) -> int:
        return len(self.prompts)

    def group_names(self) -> list[str]:
        return list(dict.fromkeys(self.groups))


def eval_due(cfg: DDPOConfig, policy_version: int) -> bool:
    """Is `policy_version` evaluated? 0, every `eval.every`-th, and the final one."""
    every = cfg.eval.every
    return every > 0 and (policy_version % every == 0 or policy_version == cfg.num_epochs)


def eval_num_steps(cfg: DDPOConfig) -> int:
    return cfg.eval.num_steps or cfg.sample.num_steps


def initial_latents(seed: int, shape: Sequence[int], count: int) -> torch.Tensor:
    """(count, *shape) standard normal latents; row i depends only on (seed, i), never on the
    epoch or the weights, so every evaluation of a run starts from the same noise."""
    rows = [
        torch.randn(tuple(shape), generator=make_generator(seed, EVALUATION, i), dtype=torch.float32)
        for i in range(count)
    ]
    return torch.stack(rows)


def step_noise(seed: int, num_steps: int, shape: Sequence[int], count: int) -> torch.Tensor:
    """(count, num_steps, *shape) standard normal per-step noise for eval.eta > 0; like the initial
    latents, row i depends only on (seed, i), so every evaluation of a run draws the same noise."""
    rows = [
        torch.randn((num_steps, *shape), generator=make_generator(seed, EVALUATION, i, 1), dtype=torch.float32)
        for i in range(count)
    ]
    return torch.stack(rows)


def generate_eval_images(pipe, cfg: DDPOConfig, eval_set: EvalSet) -> np.ndarray:
    """The eval images of the pipeline's current weights: (N, H, W, 3) uint8, eval-set order."""
    latent_size = cfg.sample.resolution // pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, latent_size, latent_size)
    latents = initial_latents(cfg.seed, shape, len(eval_set))
    steps = eval_num_steps(cfg)
    noise = step_noise(cfg.seed, steps, shape, len(eval_set)) if cfg.eval.eta > 0 else None
    images = []
    size = cfg.eval.batch_size
    for start in range(0, len(eval_set), size):
        images.append(generate_images(
            pipe, eval_set.prompts[start:start + size], latents[start:start + size],
            num_steps=steps, guidance_scale=cfg.sample.guidance_scale,
            compute_dtype=compute_dtype(cfg.model.mixed_precision),
            eta=cfg.eval.eta, step_noise=None if noise is None else noise[start:start + size],
        ))
    return torch.cat(images).numpy()


def summarise(
    cfg: DDPOConfig, eval_set: EvalSet, components: Mapping[str, np.ndarray]
) -> tuple[dict[str, float], np.ndarray]:
    """(`eval_*` metrics, per-image training reward) from each reward's per-image values.

    Keys: eval_reward_mean/std (the training reward, weighted as in training), and for each
    scored reward eval_<name>_mean/std; per group g: eval_reward_<g>_mean, eval_<name>_<g>_mean.
    """
    missing = [name for name in cfg.eval_reward_names() if name not in components]
    if missing:
        raise ValueError(f"eval rewards missing from the scores: {missing}")
    groups = np.asarray(eval_set.groups)
    total = np.zeros(len(eval_set), dtype=np.float64)
    for name, weight in cfg.reward.components().items():
        total += weight * np.asarray(components[name], dtype=np.float64)
    metrics: dict[str, float] = {}
    for name, values in [("reward", total), *((n, np.asarray(components[n], dtype=np.float64)) for n in cfg.eval_reward_names())]:
        if len(values) != len(eval_set):
            raise ValueError(f"eval reward {name!r}: {len(values)} values for {len(eval_set)} images")
        metrics[f"eval_{name}_mean"] = float(values.mean())
        metrics[f"eval_{name}_std"] = float(values.std())
        for group in eval_set.group_names():
            metrics[f"eval_{name}_{group}_mean"] = float(values[groups == group].mean())
    return metrics, total


ScoreFn = Callable[[np.ndarray, Sequence[str]], Mapping[str, np.ndarray]]


def evaluate(pipe, cfg: DDPOConfig, eval_set: EvalSet, score: ScoreFn) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Generate and score the eval set with the pipeline's current weights.

    `score(images, prompts)` returns {reward name: per-image values} for cfg.eval_reward_names().
    Returns (eval_* metrics, images, per-image training reward).
    """
    images = generate_eval_images(pipe, cfg, eval_set)
    metrics, total = summarise(cfg, eval_set, score(images, list(eval_set.prompts)))
    return metrics, images, total


class EvalTracker:
    """The best version by `eval.best_metric`, and the guard: stop when it falls too far.

    `update` takes an evaluation's `eval_*` metrics in version order and returns the keys it adds:
    eval_is_best, eval_best_version, eval_best_value and, with a guard, eval_guard_peak,
    eval_guard_drop and eval_guard_stop. A version that trips the guard is never the best.
    From version 0 on it also adds the gains since version 0 in units of version 0's spread
    (`ddpo_ray.training.learning_gain`), overall and per prompt group, for every scored reward:
    eval_<name>_gain and eval_<name>_<group>_gain (the held-out groups beside "train" show
    whether a gain carries over to prompts never trained on).
    """

    def __init__(self, cfg: DDPOConfig, groups: Sequence[str]):
        self.scored = ["reward", *cfg.eval_reward_names()]
        self.groups = list(groups)
        self.base: dict[str, float] | None = None
        self.metric = cfg.eval.best_metric
        self.guard_key = f"eval_{cfg.eval.guard_reward}_mean" if cfg.eval.guard_reward else None
        self.margin = math.inf if cfg.eval.guard_margin is None else cfg.eval.guard_margin  # None: never stop
        self.best_value = -np.inf
        self.best_version: int | None = None
        self.guard_peak = -np.inf
        self.stopped = False

    @classmethod
    def for_config(cls, cfg: DDPOConfig) -> "EvalTracker":
        """A tracker on its own (benches, tests): the prompt groups of the config's eval set."""
        return cls(cfg, EvalSet.from_config(cfg).group_names())

    def _value(self, policy_version: int, metrics: Mapping[str, Any], key: str) -> float:
        if key not in metrics:
            raise ValueError(
                f"the evaluation of policy version {policy_version} has no {key!r} (eval.best_metric / "
                "eval.guard_reward name a reward that evaluation did not score; after changing them on "
                "resume, start a new run_name)"
            )
        value = metrics[key]
        return float("nan") if value is None else float(value)  # eval.jsonl stores nan as null

    def gains(self, policy_version: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """eval_<name>[_<group>]_gain: (mean - version 0's mean) / version 0's eval_<name>_std."""
        if policy_version == 0:
            self.base = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        if self.base is None:
            return {}
        out = {}
        for name in self.scored:
            spread = self.base.get(f"eval_{name}_std")
            for part in ["", *(f"_{g}" for g in self.groups)]:
                key = f"eval_{name}{part}_mean"
                if spread is not None and key in self.base and metrics.get(key) is not None:
                    out[f"eval_{name}{part}_gain"] = in_spreads(float(metrics[key]), self.base[key], spread)
        return out

    def update(self, policy_version: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self.gains(policy_version, metrics)
        stop = False
        if self.guard_key is not None:
            guard = self._value(policy_version, metrics, self.guard_key)
            if np.isfinite(guard):
                self.guard_peak = max(self.guard_peak, guard)
                drop = self.guard_peak - guard
                stop = drop > self.margin
            else:  # a guard that cannot be scored cannot vouch for the policy
                drop, stop = float("nan"), True
            out.update(eval_guard_peak=self.guard_peak, eval_guard_drop=drop, eval_guard_stop=stop)
        value = self._value(policy_version, metrics, self.metric)
        # Nothing is best once the guard has tripped (at staleness 1 one more epoch is recorded).
        is_best = not self.stopped and not stop and value > self.best_value
        if is_best:
            self.best_value, self.best_version = value, policy_version
        self.stopped = self.stopped or stop
        out.update(eval_is_best=is_best, eval_best_version=self.best_version, eval_best_value=self.best_value)
        return out

    def replay(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Rebuild the state from eval.jsonl rows (a resumed run)."""
        for row in rows:
            self.update(int(row["policy_version"]), row)


class EvalRecorder:
    """What both loops do with an evaluation: summarise, track, write, export, keep the best.

    Built at the start of a run (or resume at `policy_version`): evaluations of later versions
    are dropped from eval.jsonl and the tracker replays the rest, so a resumed run continues the
    guard and the best-so-far exactly where they were.
    """

    def __init__(self, cfg: DDPOConfig, run_dir: RunDirectory, exported: Any, policy_version: int):
        self.cfg, self.run_dir, self.exported = cfg, run_dir, exported
        self.eval_set = EvalSet.from_config(cfg)
        self.tracker = EvalTracker(cfg, self.eval_set.group_names())
        run_dir.truncate_evals(max_version=policy_version)
        done = run_dir.read_evals()
        self.tracker.replay(done)
        self._done = {int(row["policy_version"]) for row in done}
        best = read_best_info(run_dir)
        if best is not None and best.get("policy_version") != self.tracker.best_version:
            # Left by evaluations this resume dropped: its weights are not this run's best.
            log.warning("removing %s (policy version %s), written by evaluations after the resumed "
                        "checkpoint", run_dir.best_dir, best.get("policy_version"))
            shutil.rmtree(run_dir.best_dir)

    def due(self, policy_version: int) -> bool:
        """Is this version to be evaluated (not already, before a resume; not after a guard stop)?"""
        return eval_due(self.cfg, policy_version) and policy_version not in self._done and not self.stopped

    @property
    def stopped(self) -> bool:
        return self.tracker.stopped

    def stop_message(self) -> str:
        return (f"stopped: the guard reward fell past eval.guard_margin; best policy version "
                f"{self.tracker.best_version} in {self.run_dir.best_dir}")

    def record(
        self,
        policy_version: int,
        images: np.ndarray,
        scores: Mapping[str, np.ndarray],
        policy_weights: Callable[[], Mapping[str, torch.Tensor]],
        started: float,
    ) -> dict[str, Any]:
        """Record one evaluation; returns its `eval_*` metrics (for the epoch's metrics row).

        `scores`: {reward name: per-image values}; `policy_weights()` gives the trainable state
        dict of this version, called only when it is the best so far; `started`: perf_counter()
        when the evaluation began.
        """
        cfg = self.cfg
        metrics, total = summarise(cfg, self.eval_set, scores)
        metrics.update(self.tracker.update(policy_version, metrics))
        metrics["time_eval"] = time.perf_counter() - started
        if metrics["eval_is_best"]:  # before the row that says so, so a crash between never lies
            info = {"policy_version": policy_version, "after_epoch": policy_version - 1 if policy_version else None,
                    cfg.eval.best_metric: self.tracker.best_value}
            card = run_model_card(cfg, self.run_dir, label="best", policy_version=policy_version,
                                  weights_location=self.run_dir.best_dir, evaluation=metrics) if cfg.model.use_lora else None
            save_best(self.run_dir, policy_weights(), cfg.model.use_lora, info, model_card=card)
        self.run_dir.append_eval({"policy_version": policy_version, **metrics})
        self.run_dir.save_eval_grid(policy_version, images, self.eval_set.prompts, total.tolist())
        self.exported.record_eval(policy_version, metrics)
        self._done.add(policy_version)
        log.debug("evaluated policy version %d: %s", policy_version, format_eval(policy_version, metrics, cfg))
        return metrics
