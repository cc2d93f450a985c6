"""Deterministic seeds from (run seed, epoch, batch, ...) keys.

Every random draw of a run is seeded by what it is (say, epoch 3, sampling batch 5), not by
how many draws came before it. So a batch gives the same noise whichever sampler runs it, a
re-issued batch repeats exactly, and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch

# Purposes, so that streams for different uses never coincide.
SAMPLING = 1
TRAINING = 2
EVALUATION = 3
INITIAL_NOISE = 4  # x_T shared by a prompt's group (sample.initial_noise: per_group or tree)
TREE_NOISE = 5  # the step noise of a tree node (sample.initial_noise: tree)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (and their order)."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative integers, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def make_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(*keys))
    return generator
