"""The name tables a config validates against match what the code defines (pure, no Ray)."""

from ddpo_ray.infra.prompt_names import PROMPT_SET_NAMES
from ddpo_ray.prompts import PROMPT_SETS


def test_every_prompt_set_name_has_exactly_one_set():
    assert tuple(PROMPT_SETS) == PROMPT_SET_NAMES


def test_tiny_world_prompt_sets_are_exactly_those_in_the_world_grammar():
    from ddpo_ray.infra.prompt_names import TINY_WORLD_PROMPT_SETS
    from ddpo_ray.tiny.world import parse_caption

    def readable(prompts) -> bool:
        try:
            return all(parse_caption(p) for p in prompts)
        except ValueError:
            return False

    assert {name for name, prompts in PROMPT_SETS.items() if readable(prompts)} == set(TINY_WORLD_PROMPT_SETS)


def test_alignment_gold_with_prompts_outside_the_tiny_world_fails_at_config_time():
    import pytest

    from ddpo_ray.config import build_config

    build_config("tiny_alignment")  # its eval reward is alignment_gold, its prompts tiny
    with pytest.raises(ValueError, match="prompts.name='simple_animals': alignment_gold reads tiny-world prompts only"):
        build_config("tiny_alignment", overrides=["prompts.name=simple_animals"])
