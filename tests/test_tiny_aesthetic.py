"""The tiny aesthetic (the future `aesthetic_gold`): a documented pixel function (pure, no Ray)."""

import numpy as np
import pytest

from ddpo_ray.tiny.world import Scene, make_batch, render
from reward_services.tiny_aesthetic import aesthetic_terms, tiny_aesthetic


def scene(texture: str = "plain", colour: str = "red", background: str = "white", centre=(32.0, 32.0)) -> np.ndarray:
    drawn = Scene(1, "large", colour, "circle", background, texture, None, (centre,), 14.0)
    return render(drawn, np.random.default_rng(0))


def test_a_clear_centred_subject_on_a_calm_background_scores_highest():
    best = tiny_aesthetic([scene()])[0]
    assert best > tiny_aesthetic([scene(texture="striped")])[0]  # clutter at the edges
    assert best > tiny_aesthetic([scene(centre=(12.0, 12.0))])[0]  # off to a corner
    assert best > tiny_aesthetic([scene(colour="white", background="white")])[0]  # no visible subject
    assert best > tiny_aesthetic([np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)])[0]


def test_scores_are_deterministic_bounded_and_see_pixels_only():
    images, _ = make_batch(np.random.default_rng(3), 64)
    scores = tiny_aesthetic(images)
    np.testing.assert_array_equal(scores, tiny_aesthetic(list(images)))
    assert np.all((scores >= 0) & (scores <= 10)) and scores.std() > 0.5
    assert all(0.0 <= value <= 1.0 for value in aesthetic_terms(images[0]).values())


def test_bad_images_are_refused_by_name():
    with pytest.raises(ValueError, match=r"images\[0\] is a float64 array"):
        tiny_aesthetic([np.zeros((64, 64, 3))])
