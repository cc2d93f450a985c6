"""Off-world versions of tiny-world images, for the reward models trained on the world.

A diffusion model's samples are not clean renders: they are noisy, blurred, half-formed. The
tiny reward models (aesthetic scorer, captioner, attribute model) are trained on a mix of clean
renders and degraded ones, so what they say about the policy's images means something.
`noise` and `blur` keep an image's attributes (its caption stays true); `blend` (a mix of two
images) does not, so only the aesthetic scorer, whose target is recomputed from the pixels,
uses it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

DEGRADATIONS = ("noise", "blur", "blend")


def degrade(
    images: np.ndarray,
    rng: np.random.Generator,
    fraction: float = 0.4,
    kinds: Sequence[str] = DEGRADATIONS,
) -> np.ndarray:
    """A copy of `images` (N, H, W, 3) uint8 with about `fraction` of them degraded by one of `kinds`."""
    unknown = sorted(set(kinds) - set(DEGRADATIONS))
    if unknown or not kinds:
        raise ValueError(f"kinds={list(kinds)}; expected a non-empty subset of {DEGRADATIONS}")
    out = images.copy()
    for i in np.nonzero(rng.uniform(size=len(images)) < fraction)[0]:
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "noise":
            noisy = out[i].astype(np.float64) + rng.normal(0, rng.uniform(5, 60), out[i].shape)
            out[i] = np.clip(noisy, 0, 255).astype(np.uint8)
        elif kind == "blur":
            blurred = Image.fromarray(out[i]).filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5))))
            out[i] = np.asarray(blurred)
        else:
            other = images[rng.integers(len(images))].astype(np.float64)
            alpha = rng.uniform(0.2, 0.8)
            out[i] = np.clip(alpha * out[i] + (1 - alpha) * other, 0, 255).astype(np.uint8)
    return out
