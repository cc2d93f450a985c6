"""The prompt-alignment reward's definition (DDPO's llava_bertscore), free of any model import.

LLaVA is asked QUESTION about each image; its answer is the BERTScore candidate and
"The image contains {prompt}" the reference; the reward is the recall, and the captions and
precision/recall/F1 go to `info`. Kept apart from the models so the application's ingress,
which only composes the two deployments, starts without importing torch or transformers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

QUESTION = "Answer concisely: what is going on in this image?"
# LLaVA-1.5's conversation format (what llava-hf's chat template produces for one user turn).
LLAVA_15_PROMPT = "USER: <image>\n{question} ASSISTANT:"
MAX_NEW_TOKENS = 64
REFERENCE_TEMPLATE = "The image contains {prompt}"


def references_for(prompts: Sequence[str], template: str = REFERENCE_TEMPLATE) -> list[str]:
    return [template.format(prompt=prompt) for prompt in prompts]


def alignment_result(
    captions: Sequence[str], precision: np.ndarray, recall: np.ndarray, f1: np.ndarray
) -> tuple[np.ndarray, dict[str, list]]:
    """The llava_bertscore reward (recall) and its `info` (captions, P/R/F1), per image."""
    info = {
        "captions": list(captions),
        "bertscore_precision": [float(x) for x in precision],
        "bertscore_recall": [float(x) for x in recall],
        "bertscore_f1": [float(x) for x in f1],
    }
    return np.asarray(recall, dtype=np.float64), info
