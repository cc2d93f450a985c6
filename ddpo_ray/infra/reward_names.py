"""The rewards a config may name: one table for the config, the in-process functions, the Serve
registry and the tests. Each name is also the Serve application's name and route (`/<name>`).
"""

from __future__ import annotations

JPEG_REWARDS: tuple[str, ...] = ("jpeg_compressibility", "jpeg_incompressibility")
MODEL_REWARDS: tuple[str, ...] = ("aesthetic", "llava_bertscore")
REWARD_NAMES: tuple[str, ...] = JPEG_REWARDS + MODEL_REWARDS

