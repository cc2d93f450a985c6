"""The procedural world the tiny model is pretrained on: captions match pixels, JPEG size varies."""

import numpy as np
import pytest

from ddpo_ray.prompts.sets import TINY_SHAPES, TINY_SHAPES_HELD_OUT
from ddpo_ray.tiny.world import COLOURS, SHAPES, make_batch, object_mask, random_scene, render, sample_caption
from reward_services.jpeg import jpeg_sizes_kb


def test_same_seed_same_world():
    a, scenes_a = make_batch(np.random.default_rng(3), 8)
    b, scenes_b = make_batch(np.random.default_rng(3), 8)
    assert np.array_equal(a, b) and scenes_a == scenes_b
    assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8


def test_caption_names_what_is_drawn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = random_scene(rng)
        image = render(scene, rng)
        caption = scene.caption()
        assert caption.split()[0] == {1: "an" if caption.split()[1][0] in "aeiou" else "a", 2: "two", 3: "three"}[scene.count]
        assert f"{scene.colour} {scene.shape}" in caption and f"{scene.texture} {scene.background} background" in caption
        # the object's colour is at its centre, the background's colour is in the image
        cx, cy = (int(round(v)) for v in scene.centres[0])
        assert tuple(image[cy, cx]) == COLOURS[scene.colour]
        assert (image.reshape(-1, 3) == COLOURS[scene.background]).all(axis=1).any()


def test_patterned_backgrounds_are_less_compressible_than_plain():
    images, scenes = make_batch(np.random.default_rng(1), 200)
    sizes = jpeg_sizes_kb(images)
    plain = np.array([s.texture == "plain" for s in scenes])
    assert sizes[~plain].mean() > 1.4 * sizes[plain].mean()


def test_captions_include_partial_and_empty_ones():
    rng = np.random.default_rng(2)
    scene = random_scene(rng)
    captions = {sample_caption(scene, rng) for _ in range(200)}
    assert "" in captions and scene.caption() in captions
    assert any("background" not in c and c for c in captions)


def test_tiny_prompt_sets():
    assert len(TINY_SHAPES) == 72 and len(set(TINY_SHAPES)) == 72
    assert "two red circles" in TINY_SHAPES and "a green diamond" in TINY_SHAPES_HELD_OUT
    assert "an orange circle" in TINY_SHAPES and "a large orange circle" not in TINY_SHAPES
    assert not any("diamond" in p for p in TINY_SHAPES)


def test_parse_caption_reads_back_every_caption_form():
    from ddpo_ray.tiny.world import parse_caption, random_scene, scene_attributes

    rng = np.random.default_rng(4)
    forms = [{}, {"with_size": False}, {"with_position": False}, {"with_background": False},
             {"with_size": False, "with_position": False, "with_background": False}]
    for _ in range(300):
        scene = random_scene(rng)
        truth = scene_attributes(scene)
        for form in forms:
            named = parse_caption(scene.caption(**form))
            assert all(truth[key] == value for key, value in named.items()), (scene.caption(**form), named)
            assert ("size" in named) == form.get("with_size", True)
            assert ("background" in named) == form.get("with_background", True)
        assert parse_caption(scene.background_caption()) == {"texture": scene.texture, "background": scene.background}
    assert parse_caption("two red circles") == {"count": 2, "colour": "red", "shape": "circle"}


def test_parse_caption_names_what_is_outside_the_grammar():
    from ddpo_ray.tiny.world import parse_caption

    for text, expected in [("a cat", "expected '<a|an|two|three>"), ("", "names nothing"),
                           ("a red circle on a furry blue background", "'<texture> <colour> background'")]:
        with pytest.raises(ValueError, match=expected):
            parse_caption(text)


def test_object_mask_covers_exactly_the_object_pixels():
    rng = np.random.default_rng(5)
    for _ in range(20):
        scene = random_scene(rng)
        image, mask = render(scene, rng), object_mask(scene)
        assert mask.shape == (64, 64) and mask.any()
        # every masked pixel is painted in the object colour (shapes are drawn over the background)
        assert (image[mask] == COLOURS[scene.colour]).all()


def test_patch_targets_follow_the_tower_token_order():
    from ddpo_ray.tiny.captioner_trainer import patch_targets

    rng = np.random.default_rng(6)
    scenes = [random_scene(rng) for _ in range(6)]
    mask, shape, centre = patch_targets(scenes, patch=8)
    assert mask.shape == (6, 64, 64) and shape.shape == (6, 64) and centre.shape == (6, 64)
    for i, scene in enumerate(scenes):
        full = object_mask(scene)
        assert mask[i].sum() == full.sum()
        # token k covers rows 8*(k // 8) ..., columns 8*(k % 8) ...: raster order, like CLIP's patches
        k = int(np.argmax(mask[i].sum(1)))
        assert mask[i, k].numpy().reshape(8, 8).tolist() == full[8 * (k // 8):8 * (k // 8) + 8, 8 * (k % 8):8 * (k % 8) + 8].tolist()
        assert set(shape[i].unique().tolist()) <= {0, SHAPES.index(scene.shape) + 1}
        assert 1 <= centre[i].sum() <= scene.count
        cx, cy = scene.centres[0]
        assert centre[i, int(cy) // 8 * 8 + int(cx) // 8] == 1


@pytest.mark.parametrize("factor", [-0.1, float("nan")])
def test_captioner_trainer_refuses_a_tower_rate_below_zero(factor, tmp_path):
    from ddpo_ray.tiny.captioner_trainer import main

    with pytest.raises(ValueError, match=r"--tower-lr-factor=.*expected >= 0"):
        main(["--out", str(tmp_path), "--tower-lr-factor", str(factor)])
    assert not any(tmp_path.iterdir())  # refused before anything was trained or written
