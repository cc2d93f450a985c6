"""Trains the `tiny` aesthetic scorer: a CLIP vision tower + the LAION MLP head, on the tiny world.

    python -m ddpo_ray.tiny.aesthetic_trainer                 # writes ddpo_ray/tiny/assets/aesthetic
    python -m ddpo_ray.tiny.aesthetic_trainer --out DIR --steps 600 --seed 0

The scorer has the real predictor's classes and shapes (`CLIPVisionModelWithProjection`
projecting to 768 dims, L2-normalised, into `AestheticMLP` 768 -> 1024 -> 128 -> 64 -> 16 -> 1),
so the serving path is the one a GPU uses with ViT-L/14; only the tower is small (64x64 input,
8x8 patches). Its target is `reward_services.tiny_aesthetic` (the `aesthetic_gold` reward) on
freshly drawn tiny-world images, a fraction of them degraded (noise, blur, blends with another
image) so the scorer also sees the off-world images a diffusion model makes. The weights ship
in fp16 (a few MB); held-out Spearman correlation with the gold is written to training.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ddpo_ray.tiny.world import IMAGE_SIZE, make_batch
from reward_services.aesthetic_model import EMBEDDING_DIM, AestheticMLP, CLIPImageProcessor
from reward_services.tiny_aesthetic import tiny_aesthetic

log = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).parent / "assets" / "aesthetic"
MLP_FILE = "mlp.safetensors"


def tiny_clip_config() -> CLIPVisionConfig:
    """The trained tower: 3 layers, 64 wide, 64x64 images in 8x8 patches, projecting to 768 like ViT-L/14."""
    return CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8, projection_dim=EMBEDDING_DIM,
    )


def tiny_clip_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def degrade(images: np.ndarray, rng: np.random.Generator, fraction: float = 0.4) -> np.ndarray:
    """A `fraction` of the images made off-world: pixel noise, blur, or a blend of two images."""
    out = images.copy()
    for i in np.nonzero(rng.uniform(size=len(images)) < fraction)[0]:
        kind = rng.integers(3)
        if kind == 0:
            noisy = out[i].astype(np.float64) + rng.normal(0, rng.uniform(5, 60), out[i].shape)
            out[i] = np.clip(noisy, 0, 255).astype(np.uint8)
        elif kind == 1:
            blurred = Image.fromarray(out[i]).filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5))))
            out[i] = np.asarray(blurred)
        else:
            other = images[rng.integers(len(images))].astype(np.float64)
            alpha = rng.uniform(0.2, 0.8)
            out[i] = np.clip(alpha * out[i] + (1 - alpha) * other, 0, 255).astype(np.uint8)
    return out


def world_batch(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, gold tiny-aesthetic scores) of freshly drawn, partly degraded world images."""
    images, _ = make_batch(rng, size)
    images = degrade(images, rng)
    return images, tiny_aesthetic(images)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (no ties expected in continuous scores)."""
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


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
    parser = argparse.ArgumentParser(prog="python -m ddpo_ray.tiny.aesthetic_trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = train(args.out, args.steps, args.batch_size, args.seed, args.lr)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
