"""Rewards computed in the caller's process, by name, for the single-process loop and tools.

The distributed system calls the same functions inside Ray Serve replicas; this module is the
in-process path (no network, no Ray). Model-based rewards (aesthetic, llava_bertscore, and the
gold references aesthetic_gold, alignment_gold) load their offline defaults here (the trained
tiny scorer, captioner + MiniLM BERTScore, attribute model: the Serve applications' default
args) on first use, once per process.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ddpo_ray.infra.reward_names import REWARD_NAMES
from reward_services.jpeg import jpeg_compressibility, jpeg_incompressibility

# name -> f(images (N, H, W, 3) uint8, prompts) -> rewards (N,)
IN_PROCESS_REWARDS: dict[str, Callable[[np.ndarray, Sequence[str]], np.ndarray]] = {
    "jpeg_compressibility": lambda images, prompts: jpeg_compressibility(images),
    "jpeg_incompressibility": lambda images, prompts: jpeg_incompressibility(images),
}


def _aesthetic() -> Callable[[np.ndarray, Sequence[str]], np.ndarray]:
    from reward_services.aesthetic_model import AestheticPredictor

    predictor = AestheticPredictor()
    return lambda images, prompts: predictor(list(images))


def _llava_bertscore() -> Callable[[np.ndarray, Sequence[str]], np.ndarray]:
    from reward_services.bertscore import BertScore
    from reward_services.captioner import Captioner

    captioner, bertscore = Captioner(), BertScore()
    return lambda images, prompts: llava_bertscore_rewards(captioner, bertscore, images, prompts)[0]


def _gold(name: str) -> Callable[[], Callable[[np.ndarray, Sequence[str]], np.ndarray]]:
    def load() -> Callable[[np.ndarray, Sequence[str]], np.ndarray]:
        from reward_services.gold import gold_function

        function = gold_function(name)
        return lambda images, prompts: np.asarray(function(list(zip(list(images), prompts))))

    return load


# name -> loader of the default model, called once per process (they take seconds to build)
MODEL_REWARDS: dict[str, Callable[[], Callable[[np.ndarray, Sequence[str]], np.ndarray]]] = {
    "aesthetic": _aesthetic,
    "llava_bertscore": _llava_bertscore,
    "aesthetic_gold": _gold("aesthetic_gold"),
    "alignment_gold": _gold("alignment_gold"),
}
_loaded_models: dict[str, Callable[[np.ndarray, Sequence[str]], np.ndarray]] = {}


def reward_function(name: str) -> Callable[[np.ndarray, Sequence[str]], np.ndarray]:
    """The in-process function of reward `name` (a model reward is loaded on first use)."""
    if name in IN_PROCESS_REWARDS:
        return IN_PROCESS_REWARDS[name]
    if name in MODEL_REWARDS:
        if name not in _loaded_models:
            _loaded_models[name] = MODEL_REWARDS[name]()
        return _loaded_models[name]
    raise ValueError(f"unknown reward {name!r}; expected one of {list(REWARD_NAMES)}")


def compute_rewards(
    weights: Mapping[str, float], images: np.ndarray, prompts: Sequence[str]
) -> tuple[np.ndarray, dict[str, Any]]:
    """The weighted sum of the named rewards; `info` holds each component's values."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; expected one prompt per image")
    total = np.zeros(len(images), dtype=np.float64)
    info: dict[str, Any] = {}
    for name, weight in weights.items():
        values = np.asarray(reward_function(name)(images, prompts), dtype=np.float64)
        info[name] = values
        total += weight * values
    return total, info


def llava_bertscore_rewards(
    captioner: Callable[[list[np.ndarray]], list[str]],
    bertscore: Callable[[Sequence[str], Sequence[str]], tuple[np.ndarray, np.ndarray, np.ndarray]],
    images: np.ndarray | Sequence[np.ndarray],
    prompts: Sequence[str],
    reference_template: str = "The image contains {prompt}",
) -> tuple[np.ndarray, dict[str, list]]:
    """The alignment reward in one process (a `captioner.Captioner` and a `bertscore.BertScore`).

    What the llava_bertscore application computes across its deployments: BERTScore recall of
    each caption against `reference_template`, with captions and P/R/F1 as `info`.
    """
    from reward_services.alignment import alignment_result, references_for

    images = list(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; expected one prompt per image")
    captions = captioner(images)
    precision, recall, f1 = bertscore(captions, references_for(prompts, reference_template))
    return alignment_result(captions, precision, recall, f1)
