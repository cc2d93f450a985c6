"""Prompts: the named sets (`sets`) and the per-epoch sampler (`sampler`)."""

from ddpo_ray.prompts.sampler import PromptSampler, spread_pick
from ddpo_ray.prompts.sets import PROMPT_GROUPS, PROMPT_SETS, get_prompts, prompt_groups

__all__ = ["PROMPT_GROUPS", "PROMPT_SETS", "PromptSampler", "get_prompts", "prompt_groups", "spread_pick"]
