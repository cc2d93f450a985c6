"""The trained `tiny` reward models mean something on held-out tiny-world images (no Ray).

Held-out images come from seeds no trainer used (the trainers draw from seeds 0/1 and
10_000 / 30_000 / 40_000 + seed for their own held-out sets). Each quality figure is printed
(`pytest -s`) beside the bar the issue sets.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ddpo_ray.maths.stats import spearman
from ddpo_ray.tiny.world import COLOURS, make_batch, object_prompt, scene_attributes
from tests.helpers import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HELD_OUT = 90_000  # seed of the images here: never drawn by a trainer


@pytest.fixture(scope="module")
def held_out():
    return make_batch(np.random.default_rng(HELD_OUT), 200)


@pytest.fixture(scope="module")
def captions(held_out):
    from reward_services.captioner import Captioner

    return Captioner(device="cpu")(held_out[0])


# The shipped captioner, measured on its trainer's 512 held-out images: colour, background and
# texture 100%, count 92%, shape 96% (on this test's 200: count 92%, shape 92.5%). Issue 13's bar:
# colour and shape both right in at least 85% of captions.
CAPTION_FLOORS = {"colour": 0.95, "background": 0.95, "texture": 0.95, "count": 0.8, "colour_and_shape": 0.85}


def test_captioner_names_what_is_drawn(held_out, captions):
    from ddpo_ray.tiny.captioner_trainer import caption_accuracy

    accuracy = caption_accuracy(captions, held_out[1])
    print(f"\ncaptioner on {len(captions)} held-out images: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))
    print("  e.g.", captions[0], "|", held_out[1][0].caption())
    assert all(accuracy[name] >= floor for name, floor in CAPTION_FLOORS.items()), accuracy


def test_llava_bertscore_prefers_the_prompt_that_describes_the_image(held_out, captions):
    """For each image, its own object prompt against one with another colour and one with
    another shape (the alternative drawn at random): the true prompt must score higher."""
    from ddpo_ray.tiny.captioner_trainer import describing_prompt_wins
    from reward_services.bertscore import BertScore

    wins = describing_prompt_wins(captions, held_out[1], BertScore(device="cpu"), np.random.default_rng(1))
    colour_pairs, shape_pairs = wins[0::2].mean(), wins[1::2].mean()
    print(f"\nllava_bertscore: the describing prompt wins {wins.mean():.1%} of {len(wins)} pairs "
          f"(against another colour {colour_pairs:.1%}, another shape {shape_pairs:.1%})")
    # Issue 13's bar: 90% of pairs. Measured 95.0% here (another colour 96.5%, another shape 93.5%).
    assert colour_pairs >= 0.95 and wins.mean() >= 0.90


def test_aesthetic_scorer_ranks_like_its_gold():
    from ddpo_ray.tiny.aesthetic_trainer import world_batch
    from reward_services.aesthetic_model import AestheticPredictor

    images, gold = world_batch(np.random.default_rng(HELD_OUT), 256)  # clean and degraded
    predicted = AestheticPredictor(device="cpu")(images)
    rho = spearman(predicted, gold)
    print(f"\naesthetic scorer vs aesthetic_gold on 256 held-out images: Spearman {rho:.3f}")
    assert rho >= 0.8


def test_alignment_gold_reads_the_true_attributes(held_out):
    from reward_services.attribute_model import AttributeModel

    images, scenes = held_out
    model = AttributeModel(device="cpu")
    read = model.attributes(images)
    all_right = np.mean([r == scene_attributes(s) for r, s in zip(read, scenes)])
    full_prompt = model(images, [s.caption() for s in scenes])
    print(f"\nalignment_gold: every attribute right on {all_right:.1%} of {len(scenes)} held-out images; "
          f"mean score of the true full caption {full_prompt.mean():.3f}")
    assert all_right >= 0.95
    # A prompt with one of three attributes wrong scores 2/3.
    s = scenes[0]
    wrong_colour = next(c for c in COLOURS if c != s.colour)
    if read[0] == scene_attributes(s):
        assert model(images[:1], [object_prompt(s.count, wrong_colour, s.shape)])[0] == pytest.approx(2 / 3)


def test_alignment_gold_refuses_prompts_outside_the_tiny_world(held_out):
    from reward_services.attribute_model import AttributeModel

    with pytest.raises(ValueError, match=r"prompts\[1\]: alignment_gold reads tiny-world prompts only"):
        AttributeModel(device="cpu")(held_out[0][:2], ["a red circle", "a cat riding a bike"])


SCRIPT = """
import json, numpy as np
from ddpo_ray.tiny.world import make_batch
from reward_services.functions import reward_function
images, scenes = make_batch(np.random.default_rng(5), 6)
prompts = [s.caption(with_size=False) for s in scenes]
print(json.dumps({name: [float(x) for x in reward_function(name)(images, prompts)]
                  for name in ("aesthetic", "llava_bertscore", "aesthetic_gold", "alignment_gold")}))
"""


def test_every_shipped_model_loads_offline_and_scores_alike_in_two_processes():
    """HF_HUB_OFFLINE=1 and an unreachable hub endpoint: the shipped weights need no network;
    two fresh processes (two replicas' worth of loading) give identical scores."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    first, second = (json.loads(run.stdout.strip().splitlines()[-1]) for run in runs)
    assert first == second
    assert all(np.ptp(values) > 0 for values in first.values())  # the images are told apart
