"""Degraded tiny-world images for the reward models' training (pure, no Ray)."""

import numpy as np
import pytest

from ddpo_ray.tiny.augment import degrade
from ddpo_ray.tiny.world import make_batch


def test_degrade_changes_about_the_fraction_asked_and_keeps_dtype_and_shape():
    images, _ = make_batch(np.random.default_rng(0), 200)
    out = degrade(images, np.random.default_rng(1), 0.5, kinds=("noise", "blur"))
    changed = np.mean([not np.array_equal(a, b) for a, b in zip(images, out)])
    assert 0.35 < changed < 0.65 and out.dtype == np.uint8 and out.shape == images.shape
    assert np.array_equal(degrade(images, np.random.default_rng(1), 0.0), images)
    np.testing.assert_array_equal(out, degrade(images, np.random.default_rng(1), 0.5, kinds=("noise", "blur")))


def test_degrade_refuses_unknown_kinds():
    images, _ = make_batch(np.random.default_rng(0), 2)
    with pytest.raises(ValueError, match=r"kinds=\['sharpen'\]"):
        degrade(images, np.random.default_rng(0), 1.0, kinds=("sharpen",))
