"""The prompt sets a config may name (`prompts.name`, `prompts.eval_name`).

The config validates names against this table without importing the prompt lists (which
depend on the tiny world's vocabulary, a layer above the config); `ddpo_ray.prompts.sets`
defines exactly these sets (tested).
"""

from __future__ import annotations

PROMPT_SET_NAMES: tuple[str, ...] = (
    "simple_animals",
    "imagenet_animals",
    "nouns_activities",
    "held_out_animals",
    "inanimate_objects",
    "held_out",
    "tiny_shapes",
    "tiny_shapes_held_out",
)

# The sets written in the tiny world's grammar: the only prompts `alignment_gold` can read.
TINY_WORLD_PROMPT_SETS: tuple[str, ...] = ("tiny_shapes", "tiny_shapes_held_out")
