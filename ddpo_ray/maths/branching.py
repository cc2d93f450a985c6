"""Branched sampling: a prompt's K = 2^b samples as the leaves of a binary tree. Pure numpy.

With `sample.initial_noise: tree` the K samples of a prompt start from one x_T and split in two
at each of the first b = log2(K) denoising steps: two samples share the noise of every step
before the one where their paths part. Leaf i's node at depth d (after d steps) is
i >> (b - d), and the noise of step s belongs to the node it leads to, at depth s + 1.

That gives each branching step its own advantage (`tree_advantages`): the mean reward under
the child a step chose minus the mean under its parent. The variance from x_T and from the
other steps' noise, which no action of that step explains and which a per-sample advantage
carries into every step's gradient, cancels in that difference (BranchGRPO / TreeRL's idea for
DDPO). Steps after the last branch belong to one leaf each: nothing to compare them with, so
their advantage is 0 and they do not train.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

EPS = 1e-6


def tree_depth(samples_per_prompt: int, num_steps: int) -> int:
    """b = log2(K): the number of branching steps; K must be a power of two and b <= num_steps."""
    k = int(samples_per_prompt)
    if k < 2 or k & (k - 1):
        raise ValueError(f"sample.samples_per_prompt={k}: branched sampling needs a power of two >= 2")
    depth = k.bit_length() - 1
    if depth > num_steps:
        raise ValueError(
            f"sample.samples_per_prompt={k} needs {depth} branching steps; sample.num_steps={num_steps} has fewer"
        )
    return depth


def step_node(leaf: int, step: int, depth: int) -> int:
    """The node leaf `leaf` reaches after step `step` (0-based), which owns that step's noise.

    Branching steps (step < depth) are shared by every leaf under that node; later steps
    belong to the leaf alone (node index = leaf, at the tree's last level).
    """
    return leaf >> (depth - step - 1) if step < depth else leaf


def tree_advantages(
    prompts: Sequence[str], rewards: np.ndarray, samples_per_prompt: int, num_steps: int
) -> np.ndarray:
    """Per-step advantages (N, num_steps) of an epoch sampled as binary trees, one per group.

    Sample j is leaf j % K of group j // K (groups are contiguous, as the prompt sampler lays
    them out). For a branching step s: (mean reward of the leaf's subtree after s - mean of its
    subtree before s) / (the group's reward std + 1e-6); later steps get 0.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 1 or len(rewards) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts and rewards of shape {rewards.shape}; expected one reward per prompt")
    if not np.all(np.isfinite(rewards)):
        raise ValueError(f"rewards contain non-finite values at indices {np.flatnonzero(~np.isfinite(rewards)).tolist()}")
    k = int(samples_per_prompt)
    depth = tree_depth(k, num_steps)
    if len(rewards) == 0 or len(rewards) % k:
        raise ValueError(f"{len(rewards)} samples do not split into groups of sample.samples_per_prompt={k}")
    groups = rewards.reshape(-1, k)
    for g in range(len(groups)):
        group_prompts = set(prompts[g * k:(g + 1) * k])
        if len(group_prompts) != 1:
            raise ValueError(f"samples {g * k}..{(g + 1) * k - 1} should be one prompt's tree; they have prompts {sorted(group_prompts)}")
    advantages = np.zeros((len(groups), k, num_steps))
    for d in range(depth):
        # subtree means at depth d (parents) and d + 1 (children), broadcast back to the leaves
        parent = groups.reshape(len(groups), 2**d, -1).mean(-1, keepdims=True)
        child = groups.reshape(len(groups), 2 ** (d + 1), -1).mean(-1, keepdims=True)
        parent = np.broadcast_to(parent, (len(groups), 2**d, k // 2**d)).reshape(len(groups), k)
        child = np.broadcast_to(child, (len(groups), 2 ** (d + 1), k // 2 ** (d + 1))).reshape(len(groups), k)
        advantages[:, :, d] = child - parent
    advantages /= groups.std(axis=1).reshape(-1, 1, 1) + EPS
    return advantages.reshape(len(rewards), num_steps)
