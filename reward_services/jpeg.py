"""JPEG size rewards (the DDPO paper's compressibility tasks), exactly as DESIGN.md defines them.

size = bytes of the image saved by PIL as JPEG at quality 95, in kB (bytes / 1000);
jpeg_compressibility = -size, jpeg_incompressibility = +size. Cheap and CPU-only.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from ddpo_ray.infra.images import as_image_list

JPEG_QUALITY = 95


def jpeg_size_kb(image: np.ndarray | Image.Image) -> float:
    """Size in kB (1000 bytes) of the image as PIL's quality-95 JPEG."""
    (array,) = as_image_list([image])
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell() / 1000.0


def jpeg_sizes_kb(images: np.ndarray | Sequence[np.ndarray | Image.Image]) -> np.ndarray:
    return np.array([jpeg_size_kb(image) for image in as_image_list(images)], dtype=np.float64)


def jpeg_compressibility(images: np.ndarray | Sequence[np.ndarray | Image.Image]) -> np.ndarray:
    """Reward smaller files: -(JPEG size in kB)."""
    return -jpeg_sizes_kb(images)


def jpeg_incompressibility(images: np.ndarray | Sequence[np.ndarray | Image.Image]) -> np.ndarray:
    """Reward larger files: +(JPEG size in kB)."""
    return jpeg_sizes_kb(images)
