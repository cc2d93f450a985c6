"""Trains the `tiny` aesthetic scorer: a CLIP vision tower + the LAION MLP head, on the tiny world.

    python -m ddpo_ray.tiny.aesthetic_trainer                 # writes ddpo_ray/tiny/assets/aesthetic
    python -m ddpo_ray.tiny.aesthetic_trainer --out DIR --steps 2000 --seed 0

The scorer has the real predictor's classes and shapes (`CLIPVisionModelWithProjection`
projecting to 768 dims, L2-normalised, into `AestheticMLP` 768 -> 1024 -> 128 -> 64 -> 16 -> 1),
so the serving path is the one a GPU uses with ViT-L/14; only the tower is small (64x64 input,
8x8 patches). Its target is `reward_services.tiny_aesthetic` (the `aesthetic_gold` reward) on
freshly drawn tiny-world images, a fraction of them degraded (noise, blur, blends with another
image) so the scorer also sees the off-world images a diffusion model makes. The weights ship
in fp16 (a few MB); held-out Spearman correlation with the gold is written to training.json.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ddpo_ray.maths.stats import spearman
from ddpo_ray.tiny import ASSETS
from ddpo_ray.tiny.augment import degrade
from ddpo_ray.tiny.trainer_cli import run_trainer, trainer_parser
from ddpo_ray.tiny.world import IMAGE_SIZE, make_batch
from reward_services.aesthetic_model import EMBEDDING_DIM, AestheticMLP, CLIPImageProcessor
from reward_services.tiny_aesthetic import tiny_aesthetic

log = logging.getLogger(__name__)

DEFAULT_OUT = ASSETS / "aesthetic"
MLP_FILE = "mlp.safetensors"


def tiny_clip_config() -> CLIPVisionConfig:
    """The trained tower: 3 layers, 64 wide, 64x64 images in 8x8 patches, projecting to 768 like ViT-L/14."""
    return CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8, projection_dim=EMBEDDING_DIM,
    )


def tiny_clip_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def world_batch(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, gold tiny-aesthetic scores) of freshly drawn, partly degraded world images."""
    images, _ = make_batch(rng, size)
    images = degrade(images, rng)
    return images, tiny_aesthetic(images)


class Scorer(torch.nn.Module):
    """The predictor's forward pass with gradients: tower -> projection -> L2 norm -> LAION MLP."""

    def __init__(self, clip: CLIPVisionModelWithProjection, mlp: AestheticMLP):
        super().__init__()
        self.clip, self.mlp = clip, mlp

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.clip(pixel_values=pixel_values).image_embeds
        return self.mlp(embeddings / torch.linalg.vector_norm(embeddings, dim=-1, keepdim=True)).squeeze(-1)


def train(out: Path, steps: int, batch_size: int, seed: int, lr: float) -> dict:
    """Train, evaluate on held-out images (another seed), write the weights; returns the summary."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    processor = tiny_clip_processor()
    scorer = Scorer(CLIPVisionModelWithProjection(tiny_clip_config()), AestheticMLP())
    # The gold spans about 2..9: predict it directly (the LAION head is linear, no output scale).
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)

    def pixels(images: np.ndarray) -> torch.Tensor:
        return processor(images=list(images), return_tensors="pt")["pixel_values"]

    held_out_images, held_out_gold = world_batch(np.random.default_rng(10_000 + seed), 512)
    held_out_pixels = pixels(held_out_images)
    start, losses = time.perf_counter(), []
    scorer.train()
    for step in range(steps):
        images, gold = world_batch(rng, batch_size)
        loss = torch.nn.functional.mse_loss(scorer(pixels(images)), torch.as_tensor(gold, dtype=torch.float32))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(scorer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step == steps - 1:
            log.info("step %d/%d  mse %.4f  (%.0f s)", step + 1, steps, np.mean(losses[-50:]), time.perf_counter() - start)
    scorer.eval()
    with torch.no_grad():
        predicted = scorer(held_out_pixels).numpy()
    summary = {
        "steps": steps, "batch_size": batch_size, "seed": seed, "learning_rate": lr,
        "seconds": round(time.perf_counter() - start, 1), "final_train_mse": float(np.mean(losses[-50:])),
        "held_out_images": len(held_out_gold), "held_out_mse": float(np.mean((predicted - held_out_gold) ** 2)),
        "held_out_spearman": spearman(predicted, held_out_gold),
    }
    save(scorer, processor, out, summary)
    return summary


def save(scorer: Scorer, processor: CLIPImageProcessor, out: Path, summary: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    scorer.clip.to(torch.float16).save_pretrained(out / "clip")
    processor.save_pretrained(out / "clip")
    save_file({k: v.to(torch.float16).contiguous() for k, v in scorer.mlp.state_dict().items()}, out / MLP_FILE)
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = trainer_parser("ddpo_ray.tiny.aesthetic_trainer", __doc__, DEFAULT_OUT,
                            steps=2000, batch_size=64, seed=0, lr=1e-3)
    return run_trainer(train, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
