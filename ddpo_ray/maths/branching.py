"""Branched sampling: a prompt's K = 2^b samples as the leaves of a binary tree. Pure Python.

With `sample.initial_noise: tree` the K samples of a prompt start from one x_T and split in two
at each of the first b = log2(K) denoising steps: two samples share the noise of every step
before the one where their paths part. Leaf i's node at depth d (after d steps) is
i >> (b - d), and the noise of step s belongs to the node it leads to, at depth s + 1.

That gives each branching step its own advantage (`ddpo_ray.maths.advantages.tree_advantages`,
which reads the tree through `tree_depth`): the mean reward under
the child a step chose minus the mean under its parent. The variance from x_T and from the
other steps' noise, which no action of that step explains and which a per-sample advantage
carries into every step's gradient, cancels in that difference (BranchGRPO / TreeRL's idea for
DDPO). Steps after the last branch belong to one leaf each: nothing to compare them with, so
their advantage is 0 and they do not train.
"""

from __future__ import annotations


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
