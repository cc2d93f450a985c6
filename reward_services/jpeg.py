"""JPEG size rewards (the DDPO paper's compressibility tasks), exactly as DESIGN.md defines them.

size = bytes of the image saved by PIL as JPEG at quality 95, in kB (bytes / 1000);
jpeg_compressibility = -size, jpeg_incompressibility = +size. Cheap and CPU-only.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

JPEG_QUALITY = 95


def as_uint8_images(images: np.ndarray | Sequence[np.ndarray | Image.Image]) -> list[np.ndarray]:
    """Validate and normalise a batch to a list of (H, W, 3) uint8 arrays."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images array has shape {images.shape}; expected (N, H, W, 3)")
        images = list(images)
    out = []
    for i, image in enumerate(images):
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"image {i} is {image.dtype} with shape {image.shape}; expected uint8 (H, W, 3)"
            )
        out.append(image)
    return out


def jpeg_size_kb(image: np.ndarray | Image.Image) -> float:
    """Size in kB (1000 bytes) of the image as PIL's quality-95 JPEG."""
    (array,) = as_uint8_images([image])
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell() / 1000.0


def jpeg_sizes_kb(images: np.ndarray | Sequence[np.ndarray | Image.Image]) -> np.ndarray:
    return np.array([jpeg_size_kb(image) for image in as_uint8_images(images)], dtype=np.float64)


def jpeg_compressibility(images: np.ndarray | Sequence[np.ndarray | Image.Image]) -> np.ndarray:
    """Reward smaller files: -(JPEG size in kB)."""
    return -jpeg_sizes_kb(images)


def jpeg_incompressibility(images: np.ndarray | Sequence[np.ndarray | Image.Image]) -> np.ndarray:
    """Reward larger files: +(JPEG size in kB)."""
    return jpeg_sizes_kb(images)
