"""What an image batch is, checked in one place: uint8 RGB, (H, W, 3) each, (N, H, W, 3) stacked.

Samplers, reward functions, reward replicas, the reward client and the run's image grids all
take image batches; they all validate them here, so a bad batch gets the same error naming the
bad element wherever it enters. No Ray, no torch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

ImageBatch = np.ndarray | Sequence[np.ndarray | Image.Image]


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


def as_image_list(images: ImageBatch, what: str = "images", allow_pil: bool = True) -> list[np.ndarray]:
    """A batch as a list of (H, W, 3) uint8 arrays; ValueError naming the first bad element.

    Takes an (N, H, W, 3) uint8 array or a sequence of (H, W, 3) uint8 arrays (and PIL images
    when `allow_pil`, converted to RGB). Sizes may differ between elements.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{what} is a {_describe(images)}; expected a uint8 array of shape (N, H, W, 3)")
        return list(images)
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise ValueError(f"{what} is a {type(images).__name__}; expected a list of images or an (N, H, W, 3) array")
    out = []
    for i, image in enumerate(images):
        if allow_pil and isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{what}[{i}] is a {_describe(image)}; expected a uint8 array of shape (H, W, 3)")
        out.append(image)
    return out


def as_image_array(images: ImageBatch, what: str = "images") -> np.ndarray:
    """A non-empty batch of same-size images stacked as one (N, H, W, 3) uint8 array."""
    arrays = as_image_list(images, what)
    if not arrays:
        raise ValueError(f"{what}: expected at least one image, got none")
    for i, array in enumerate(arrays):
        if array.shape != arrays[0].shape:
            raise ValueError(f"{what}[{i}]: expected the same size as {what}[0] {arrays[0].shape}, got {array.shape}")
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise ValueError(f"{what}[{i}]: expected a non-empty image, got shape {array.shape}")
    return images if isinstance(images, np.ndarray) else np.stack(arrays)
