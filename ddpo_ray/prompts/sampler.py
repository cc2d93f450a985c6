"""Which prompts an epoch samples (`PromptSampler`) and which a held-out evaluation uses (`spread_pick`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def spread_pick(prompts: Sequence[str], count: int) -> list[str]:
    """`count` prompts evenly spaced over `prompts` (all of them if there are fewer): a fixed,
    representative subset for evaluation, the same in every run."""
    if count >= len(prompts):
        return list(prompts)
    return [prompts[(i * len(prompts)) // count] for i in range(count)]


class PromptSampler:
    """Draws each epoch's prompts, reproducibly from (seed, epoch) alone.

    Seeding per epoch (rather than one generator advanced across epochs) means a run resumed
    at epoch k draws exactly the prompts an uninterrupted run would have, and any worker can
    recompute an epoch's prompts without coordination.

    With `samples_per_prompt` > 1 each chosen prompt is repeated that many times in a row, so
    the images of one prompt form a contiguous group for per-prompt advantage normalisation.
    """

    def __init__(self, prompts: Sequence[str], samples_per_prompt: int = 1, seed: int = 0):
        if isinstance(prompts, str):
            raise ValueError(f"prompts must be a sequence of strings, not the string {prompts!r}")
        if len(prompts) == 0:
            raise ValueError("prompts must be non-empty, got an empty sequence")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must all be strings, got {list(prompts)!r}")
        if not isinstance(samples_per_prompt, (int, np.integer)) or samples_per_prompt < 1:
            raise ValueError(
                f"samples_per_prompt must be an integer >= 1, got {samples_per_prompt!r}"
            )
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.prompts: tuple[str, ...] = tuple(prompts)
        self.samples_per_prompt = samples_per_prompt
        self.seed = seed

    def epoch_prompts(self, epoch: int, num_samples: int) -> list[str]:
        """`num_samples` prompts for `epoch`, in groups of `samples_per_prompt` identical ones."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        valid = isinstance(num_samples, (int, np.integer)) and num_samples >= 1
        if not valid or num_samples % self.samples_per_prompt:
            raise ValueError(
                f"num_samples must be a positive multiple of samples_per_prompt="
                f"{self.samples_per_prompt}, got num_samples={num_samples!r}"
            )
        rng = np.random.default_rng([self.seed, epoch])
        num_groups = num_samples // self.samples_per_prompt
        # Single samples: uniform with replacement, like ddpo-pytorch's random.choice. Groups:
        # distinct prompts where possible, so two groups never merge into one larger group.
        replace = self.samples_per_prompt == 1 or num_groups > len(self.prompts)
        chosen = rng.choice(len(self.prompts), size=num_groups, replace=replace)
        return [self.prompts[i] for i in chosen.tolist() for _ in range(self.samples_per_prompt)]

    def __repr__(self) -> str:
        return (
            f"PromptSampler({len(self.prompts)} prompts, "
            f"samples_per_prompt={self.samples_per_prompt}, seed={self.seed})"
        )
