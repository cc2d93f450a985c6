"""Prompt sets and the per-epoch prompt sampler (pure Python, no Ray, no torch)."""

import pytest

from ddpo_ray.prompts import PROMPT_SETS, PromptSampler, get_prompts
from ddpo_ray.prompts.sets import (
    ACTIVITIES,
    HELD_OUT_ANIMALS,
    IMAGENET_ANIMALS,
    INANIMATE_OBJECTS,
    NOUNS_ACTIVITIES,
    SIMPLE_ANIMALS,
)

# ---------------------------------------------------------------------------------------------
# Prompt sets
# ---------------------------------------------------------------------------------------------


def test_counts():
    assert len(SIMPLE_ANIMALS) == 45
    assert len(IMAGENET_ANIMALS) == 398
    assert len(ACTIVITIES) == 3
    assert len(NOUNS_ACTIVITIES) == 135
    assert len(HELD_OUT_ANIMALS) >= 20
    assert len(INANIMATE_OBJECTS) >= 20


def test_prompt_set_names():
    assert set(PROMPT_SETS) == {
        "simple_animals",
        "imagenet_animals",
        "nouns_activities",
        "held_out_animals",
        "inanimate_objects",
        "held_out",
        "tiny_shapes",
        "tiny_shapes_held_out",
    }
    assert PROMPT_SETS["held_out"] == HELD_OUT_ANIMALS + INANIMATE_OBJECTS


@pytest.mark.parametrize("name", sorted(PROMPT_SETS))
def test_every_set_is_unique_clean_strings(name):
    prompts = PROMPT_SETS[name]
    assert isinstance(prompts, tuple) and prompts
    assert len(set(prompts)) == len(prompts), f"{name} has duplicates"
    for p in prompts:
        assert isinstance(p, str) and p == p.strip() and "  " not in p and p


def test_imagenet_known_indices():
    known = {
        0: "tench",
        1: "goldfish",
        2: "great white shark",
        7: "cock",
        9: "ostrich",
        100: "black swan",
        130: "flamingo",
        134: "crane",
        145: "king penguin",
        151: "Chihuahua",
        207: "golden retriever",
        208: "Labrador retriever",
        281: "tabby",
        285: "Egyptian cat",
        291: "lion",
        292: "tiger",
        340: "zebra",
        366: "gorilla",
        388: "giant panda",
        397: "puffer",
    }
    for index, name in known.items():
        assert IMAGENET_ANIMALS[index] == name, (index, IMAGENET_ANIMALS[index], name)


def test_simple_animals_are_lowercase_nouns():
    assert all(a == a.lower() and " " not in a for a in SIMPLE_ANIMALS)
    assert {"cat", "dog", "kangaroo", "hedgehog"} <= set(SIMPLE_ANIMALS)


def test_nouns_activities_articles_and_order():
    assert "an ant riding a bike" in NOUNS_ACTIVITIES
    assert "a cat playing chess" in NOUNS_ACTIVITIES
    assert "a dog washing the dishes" in NOUNS_ACTIVITIES
    assert "a ant riding a bike" not in NOUNS_ACTIVITIES
    # Animal-major: the first animal's three activities come first.
    assert NOUNS_ACTIVITIES[:3] == (
        "a cat washing the dishes",
        "a cat riding a bike",
        "a cat playing chess",
    )
    for prompt in NOUNS_ACTIVITIES:
        article, animal = prompt.split(" ")[:2]
        assert article == ("an" if animal[0] in "aeiou" else "a"), prompt
        assert any(prompt.endswith(" " + activity) for activity in ACTIVITIES), prompt


def test_held_out_sets_are_disjoint_from_training():
    assert not set(HELD_OUT_ANIMALS) & set(SIMPLE_ANIMALS)
    assert not set(INANIMATE_OBJECTS) & set(SIMPLE_ANIMALS)
    assert not set(INANIMATE_OBJECTS) & set(HELD_OUT_ANIMALS)


def test_get_prompts():
    assert get_prompts("simple_animals") is SIMPLE_ANIMALS
    with pytest.raises(ValueError, match="simple_animalz") as info:
        get_prompts("simple_animalz")
    assert str(sorted(PROMPT_SETS)) in str(info.value)


# ---------------------------------------------------------------------------------------------
# PromptSampler
# ---------------------------------------------------------------------------------------------


def test_sampler_is_deterministic_per_seed_and_epoch():
    a = PromptSampler(SIMPLE_ANIMALS, seed=3)
    b = PromptSampler(SIMPLE_ANIMALS, seed=3)
    first = a.epoch_prompts(5, 32)
    assert len(first) == 32 and set(first) <= set(SIMPLE_ANIMALS)
    assert b.epoch_prompts(5, 32) == first
    assert a.epoch_prompts(6, 32) != first
    assert PromptSampler(SIMPLE_ANIMALS, seed=4).epoch_prompts(5, 32) != first


def test_sampler_is_independent_of_call_order():
    # A resumed run (which never drew epochs 0..4) sees the same prompts as an uninterrupted one.
    uninterrupted = PromptSampler(SIMPLE_ANIMALS, seed=0)
    history = [uninterrupted.epoch_prompts(e, 16) for e in range(8)]
    resumed = PromptSampler(SIMPLE_ANIMALS, seed=0)
    assert [resumed.epoch_prompts(e, 16) for e in (7, 5, 6)] == [history[7], history[5], history[6]]
    assert resumed.epoch_prompts(5, 16) == history[5]


def test_sampler_draws_with_replacement_when_ungrouped():
    sampler = PromptSampler(["a", "b", "c"])
    drawn = sampler.epoch_prompts(0, 60)
    assert len(drawn) == 60 and set(drawn) == {"a", "b", "c"}
    # Over many epochs every prompt turns up.
    big = PromptSampler(SIMPLE_ANIMALS)
    seen = {p for e in range(20) for p in big.epoch_prompts(e, 32)}
    assert seen == set(SIMPLE_ANIMALS)


def _runs(prompts):
    runs = []
    for p in prompts:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return runs


def test_sampler_groups_identical_prompts():
    sampler = PromptSampler(SIMPLE_ANIMALS, samples_per_prompt=4, seed=1)
    drawn = sampler.epoch_prompts(0, 32)
    assert len(drawn) == 32
    groups = [drawn[i : i + 4] for i in range(0, 32, 4)]
    assert all(len(set(g)) == 1 for g in groups)
    # Enough prompts: the 8 groups use 8 distinct prompts, so no two groups merge.
    assert len({g[0] for g in groups}) == 8
    assert [n for _, n in _runs(drawn)] == [4] * 8


def test_sampler_groups_with_replacement_when_prompts_run_out():
    sampler = PromptSampler(["x", "y"], samples_per_prompt=4, seed=2)
    drawn = sampler.epoch_prompts(3, 40)
    assert len(drawn) == 40 and set(drawn) <= {"x", "y"}
    assert all(len(set(drawn[i : i + 4])) == 1 for i in range(0, 40, 4))
    assert sampler.epoch_prompts(3, 40) == drawn


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"prompts": []}, "prompts"),
        ({"prompts": "cat"}, "prompts"),
        ({"prompts": ["cat", 3]}, "prompts"),
        ({"prompts": ["cat"], "samples_per_prompt": 0}, "samples_per_prompt"),
        ({"prompts": ["cat"], "samples_per_prompt": 2.0}, "samples_per_prompt"),
        ({"prompts": ["cat"], "seed": -1}, "seed"),
    ],
)
def test_sampler_constructor_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PromptSampler(**kwargs)


@pytest.mark.parametrize("num_samples", [0, -4, 6, 9])
def test_sampler_bad_num_samples(num_samples):
    sampler = PromptSampler(SIMPLE_ANIMALS, samples_per_prompt=4)
    with pytest.raises(ValueError, match="num_samples") as info:
        sampler.epoch_prompts(0, num_samples)
    assert "samples_per_prompt=4" in str(info.value)
    assert f"num_samples={num_samples}" in str(info.value)


def test_sampler_bad_epoch():
    with pytest.raises(ValueError, match="epoch"):
        PromptSampler(SIMPLE_ANIMALS).epoch_prompts(-1, 4)
