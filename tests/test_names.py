"""The name tables a config validates against match what the code defines (pure, no Ray)."""

from ddpo_ray.infra.prompt_names import PROMPT_SET_NAMES
from ddpo_ray.prompts import PROMPT_SETS


def test_every_prompt_set_name_has_exactly_one_set():
    assert tuple(PROMPT_SETS) == PROMPT_SET_NAMES
