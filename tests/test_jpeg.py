"""JPEG rewards equal PIL's quality-95 file size in kB."""

import io

import numpy as np
import pytest
from PIL import Image

from reward_services.functions import compute_rewards
from reward_services.jpeg import jpeg_compressibility, jpeg_incompressibility, jpeg_size_kb


def pil_size_kb(array: np.ndarray) -> float:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def images():
    rng = np.random.default_rng(0)
    flat = np.full((64, 64, 3), 128, dtype=np.uint8)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return np.stack([flat, noise])


def test_equals_pil_quality_95_size():
    batch = images()
    expected = np.array([pil_size_kb(im) for im in batch])
    np.testing.assert_array_equal(jpeg_incompressibility(batch), expected)
    np.testing.assert_array_equal(jpeg_compressibility(batch), -expected)
    assert jpeg_size_kb(Image.fromarray(batch[1])) == expected[1]
    assert expected[1] > 5 * expected[0]  # noise is far less compressible than a flat image


def test_weighted_combination():
    batch = images()
    total, info = compute_rewards({"jpeg_compressibility": 0.5, "jpeg_incompressibility": 2.0}, batch, ["x", "y"])
    np.testing.assert_allclose(total, 1.5 * info["jpeg_incompressibility"])


def test_bad_images_are_rejected():
    with pytest.raises(ValueError, match=r"expected a uint8 array of shape \(N, H, W, 3\)"):
        jpeg_compressibility(np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"images\[0\] is a float32"):
        jpeg_compressibility([np.zeros((8, 8, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        compute_rewards({"jpeg_compressibility": 1.0}, images(), ["x"])
    with pytest.raises(ValueError, match="unknown reward 'beauty'"):
        compute_rewards({"beauty": 1.0}, images(), ["x", "y"])
