"""The rewards a config may name: one table for the config, the in-process functions, the Serve
registry and the tests. Each name is also the Serve application's name and route (`/<name>`).

The gold rewards are the tiny world's references for the learned proxies (`aesthetic` and
`llava_bertscore` on `tiny`): what those models stand for, computed independently, for the
evaluation and guards that show over-optimisation.
"""

from __future__ import annotations

JPEG_REWARDS: tuple[str, ...] = ("jpeg_compressibility", "jpeg_incompressibility")
MODEL_REWARDS: tuple[str, ...] = ("aesthetic", "llava_bertscore")
GOLD_REWARDS: tuple[str, ...] = ("aesthetic_gold", "alignment_gold")
REWARD_NAMES: tuple[str, ...] = JPEG_REWARDS + MODEL_REWARDS + GOLD_REWARDS
