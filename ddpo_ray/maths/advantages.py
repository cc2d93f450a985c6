"""Advantages: turn an epoch's rewards into normalised learning signals. Pure numpy.

Three estimators, chosen by `advantage.mode`:
- per_prompt: DDPO's per-prompt stat tracker. Each prompt keeps a bounded history of its
  rewards across epochs; a sample's advantage is its reward standardised by that history, so
  easy prompts do not drown out hard ones. Until a prompt has `min_count` rewards, the whole
  batch's statistics stand in. The history is state and goes into checkpoints.
- group: standardise within the K samples of each prompt drawn this epoch (GRPO-style).
- group_centred: subtract each prompt's group mean, then divide by one scale for the epoch
  (the std of all centred rewards). Dividing by each group's own std turns a group whose K
  rewards barely differ (nothing there to learn) into full-size advantages of its noise;
  one scale keeps such a group's advantages as small as its differences (Dr. GRPO's point).
- batch: standardise over the whole epoch.
- tree: per denoising step, for groups sampled as binary trees (`sample.initial_noise: tree`):
  the mean reward under the child a step chose minus the mean under its parent, over the
  group's std (the tree's layout: ddpo_ray.maths.branching). The only mode whose advantages
  are (N, num_steps).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Mapping, Sequence

import numpy as np

from ddpo_ray.maths.branching import tree_depth

EPS = 1e-6
ADVANTAGE_MODES = ("per_prompt", "group", "group_centred", "batch", "tree")
GROUP_MODES = ("group", "group_centred", "tree")  # need K >= 2 samples of each prompt per epoch


def _check(prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (one per sample), got shape {rewards.shape}")
    if len(prompts) != len(rewards):
        raise ValueError(f"{len(prompts)} prompts but {len(rewards)} rewards; expected one reward per prompt")
    if len(rewards) == 0:
        raise ValueError("no rewards to compute advantages from")
    if not np.all(np.isfinite(rewards)):
        raise ValueError(f"rewards contain non-finite values at indices {np.flatnonzero(~np.isfinite(rewards)).tolist()}")
    return rewards


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """(r - mean) / (std + 1e-6) over the whole batch."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + EPS)


def _group_masks(prompts: Sequence[str]) -> list[np.ndarray]:
    """One boolean mask per distinct prompt, in first-seen order."""
    prompts_arr = np.asarray(prompts, dtype=object)
    return [prompts_arr == prompt for prompt in dict.fromkeys(prompts)]


def group_advantages(prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
    """Standardise each reward within the samples of the same prompt in this batch."""
    rewards = _check(prompts, rewards)
    advantages = np.empty_like(rewards)
    for mask in _group_masks(prompts):
        group = rewards[mask]
        advantages[mask] = (group - group.mean()) / (group.std() + EPS)
    return advantages


def group_centred_advantages(prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
    """Each reward minus its prompt group's mean, over the std of all those differences."""
    rewards = _check(prompts, rewards)
    centred = np.empty_like(rewards)
    for mask in _group_masks(prompts):
        centred[mask] = rewards[mask] - rewards[mask].mean()
    return centred / (np.sqrt(np.mean(centred**2)) + EPS)


def tree_advantages(
    prompts: Sequence[str], rewards: np.ndarray, samples_per_prompt: int, num_steps: int
) -> np.ndarray:
    """Per-step advantages (N, num_steps) of an epoch sampled as binary trees, one per group.

    Sample j is leaf j % K of group j // K (groups are contiguous, as the prompt sampler lays
    them out). For a branching step s: (mean reward of the leaf's subtree after s - mean of its
    subtree before s) / (the group's reward std + 1e-6); later steps get 0.
    """
    rewards = _check(prompts, rewards)
    k = int(samples_per_prompt)
    depth = tree_depth(k, num_steps)
    if len(rewards) % k:
        raise ValueError(f"{len(rewards)} samples do not split into groups of sample.samples_per_prompt={k}")
    groups = rewards.reshape(-1, k)
    for g in range(len(groups)):
        group_prompts = set(prompts[g * k:(g + 1) * k])
        if len(group_prompts) != 1:
            raise ValueError(f"samples {g * k}..{(g + 1) * k - 1} should be one prompt's tree; they have prompts {sorted(group_prompts)}")

    def subtree_means(d: int) -> np.ndarray:
        """Each leaf's subtree mean at depth d (its 2^d nodes hold K / 2^d leaves each): (G, K)."""
        return np.repeat(groups.reshape(len(groups), 2**d, -1).mean(-1), k // 2**d, axis=1)

    advantages = np.zeros((len(groups), k, num_steps))
    for d in range(depth):  # step d leads from depth d to depth d + 1
        advantages[:, :, d] = subtree_means(d + 1) - subtree_means(d)
    advantages /= groups.std(axis=1).reshape(-1, 1, 1) + EPS
    return advantages.reshape(len(rewards), num_steps)


class PerPromptStatTracker:
    """Per-prompt reward history (bounded), as in DDPO. Checkpoint it with state_dict()."""

    def __init__(self, buffer_size: int, min_count: int) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size={buffer_size} must be >= 1")
        if not 1 <= min_count <= buffer_size:
            raise ValueError(f"min_count={min_count} must be in [1, buffer_size={buffer_size}]")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        """Add this epoch's rewards to the history and return their advantages."""
        rewards = _check(prompts, rewards)
        prompts_arr = np.asarray(prompts, dtype=object)
        batch_mean, batch_std = rewards.mean(), rewards.std()
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            mask = prompts_arr == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer)
            advantages[mask] = (rewards[mask] - mean) / (std + EPS)
        return advantages

    def stats(self) -> dict[str, float]:
        lengths = [len(b) for b in self.buffers.values()]
        return {
            "tracker_prompts": len(lengths),
            "tracker_mean_buffer": float(np.mean(lengths)) if lengths else 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("buffer_size", "min_count", "buffers"):
            if key not in state:
                raise ValueError(f"tracker state is missing {key!r}")
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.buffers = {
            prompt: deque((float(r) for r in values), maxlen=self.buffer_size)
            for prompt, values in state["buffers"].items()
        }


class AdvantageEstimator:
    """The estimator `advantage.mode` names, behind one call; stateful only for per_prompt.

    Returns (N,) advantages, one per sample, or for `tree` (N, num_steps), one per denoising
    step (`samples_per_prompt` and `num_steps` describe the trees).
    """

    def __init__(self, mode: str, buffer_size: int = 16, min_count: int = 16,
                 samples_per_prompt: int = 1, num_steps: int = 1) -> None:
        if mode not in ADVANTAGE_MODES:
            raise ValueError(f"advantage.mode={mode!r}; expected one of {', '.join(ADVANTAGE_MODES)}")
        self.mode = mode
        self.samples_per_prompt, self.num_steps = samples_per_prompt, num_steps
        self.tracker = PerPromptStatTracker(buffer_size, min_count) if mode == "per_prompt" else None

    def __call__(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        if self.tracker is not None:
            return self.tracker.update(prompts, rewards)
        if self.mode == "group":
            return group_advantages(prompts, rewards)
        if self.mode == "group_centred":
            return group_centred_advantages(prompts, rewards)
        if self.mode == "tree":
            return tree_advantages(prompts, rewards, self.samples_per_prompt, self.num_steps)
        return batch_advantages(_check(prompts, rewards))

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "tracker": self.tracker.state_dict() if self.tracker else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"advantage state is for mode {state.get('mode')!r}, this run uses {self.mode!r}")
        if self.tracker is not None:
            self.tracker.load_state_dict(state["tracker"])
