"""The "tiny aesthetic": a documented, deterministic pixel function of a small RGB image.

It is what the `tiny` aesthetic scorer is trained to predict, and the `aesthetic_gold` reward:
the exact function the learned scorer stands for, so a proxy/gold study can tell when DDPO
exploits the learned model rather than improving the images. It sees only pixels (no scene
parameters), and rewards what a person would agree with at a glance on the tiny world's
cartoons: one clear, contrasting, well-placed subject on a calm background.

    background  b = the per-channel median of the image's outer ring (2 px wide)
    subject     m = pixels farther than 60 (RGB Euclidean, 0..441) from b
    contrast    mean distance of the subject's pixels from b, / 441            (0 when no subject)
    size        exp(-((coverage - 0.15) / 0.10)^2), coverage = mean(m)           (a subject, not a crowd)
    calm        1 - min(1, 2 * mean(m over the outer ring))                      (no pattern at the edges)
    centred     1 - |centroid(m) - centre| / (0.5 * sqrt(2) * side)              (0 when no subject)

    tiny_aesthetic = 10 * (0.35 contrast + 0.30 size + 0.20 calm + 0.15 centred), in [0, 10]

So a plain background with one bold shape near the centre scores high; a striped or
checkered background, an empty image, a shape the colour of its background, or noise score
low. It says nothing about photographs: it is a stand-in with the LAION scorer's role.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ddpo_ray.infra.images import as_image_list

RING = 2  # px: the outer ring that defines the background
SUBJECT_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel is subject
MAX_DISTANCE = float(np.sqrt(3) * 255)
TARGET_COVERAGE, COVERAGE_WIDTH = 0.15, 0.10
WEIGHTS = {"contrast": 0.35, "size": 0.30, "calm": 0.20, "centred": 0.15}


def aesthetic_terms(image: np.ndarray) -> dict[str, float]:
    """The four terms of one (H, W, 3) uint8 image, each in [0, 1]."""
    pixels = image.astype(np.float64)
    height, width = pixels.shape[:2]
    ring = np.ones((height, width), dtype=bool)
    ring[RING:height - RING, RING:width - RING] = False
    background = np.median(pixels[ring], axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    subject = distance > SUBJECT_DISTANCE
    coverage = float(subject.mean())
    if subject.any():
        contrast = float(distance[subject].mean() / MAX_DISTANCE)
        ys, xs = np.nonzero(subject)
        offset = np.hypot(ys.mean() - (height - 1) / 2, xs.mean() - (width - 1) / 2)
        centred = float(1.0 - offset / (0.5 * np.hypot(height, width)))
    else:
        contrast = centred = 0.0
    return {
        "contrast": contrast,
        "size": float(np.exp(-(((coverage - TARGET_COVERAGE) / COVERAGE_WIDTH) ** 2))),
        "calm": float(1.0 - min(1.0, 2.0 * subject[ring].mean())),
        "centred": max(0.0, centred),
    }


def tiny_aesthetic(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """(N,) tiny-aesthetic scores in [0, 10] of a batch of uint8 RGB images."""
    scores = []
    for image in as_image_list(images):
        terms = aesthetic_terms(image)
        scores.append(10.0 * sum(WEIGHTS[name] * value for name, value in terms.items()))
    return np.asarray(scores, dtype=np.float64)
