"""Trains the `alignment_gold` attribute model: a small CNN that reads a tiny-world image's attributes.

    python -m ddpo_ray.tiny.attribute_trainer                 # writes ddpo_ray/tiny/assets/attributes
    python -m ddpo_ray.tiny.attribute_trainer --out DIR --steps 1500 --seed 1

The gold must be independent of the proxy it checks: this is a CNN (the captioner is a CLIP
tower and a Llama decoder), trained from another seed on its own stream of freshly drawn images,
half of them degraded (noise, blur: attributes stay true) so it reads the policy's imperfect
samples too. Held-out accuracy per attribute (images from seeds never trained on) goes to
training.json.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddpo_ray.tiny import ASSETS
from ddpo_ray.tiny.augment import degrade
from ddpo_ray.tiny.trainer_cli import run_trainer, trainer_parser
from ddpo_ray.tiny.world import ATTRIBUTES, make_batch, scene_attributes
from reward_services.attribute_model import AttributeNet, save_attribute_net, to_pixels

log = logging.getLogger(__name__)

DEFAULT_OUT = ASSETS / "attributes"
HELD_OUT_SEED = 30_000


def labelled_batch(rng: np.random.Generator, size: int, degraded: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(pixels, {attribute: class index}) of freshly drawn images, `degraded` of them noisy or blurred."""
    images, scenes = make_batch(rng, size)
    images = degrade(images, rng, degraded, kinds=("noise", "blur"))
    truth = [scene_attributes(scene) for scene in scenes]
    labels = {name: torch.tensor([values.index(t[name]) for t in truth]) for name, values in ATTRIBUTES.items()}
    return to_pixels(images), labels


@torch.no_grad()
def held_out_accuracy(net: AttributeNet, pixels: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy per attribute, and `all` (every attribute right)."""
    net.eval()
    logits = net(pixels)
    right = {name: logits[name].argmax(-1) == labels[name] for name in ATTRIBUTES}
    accuracy = {name: float(r.float().mean()) for name, r in right.items()}
    accuracy["all"] = float(torch.stack(list(right.values())).all(0).float().mean())
    net.train()
    return accuracy


def train(out: Path, steps: int, batch_size: int, seed: int, lr: float) -> dict:
    """Train, evaluate on clean and degraded held-out images, write the weights; returns the summary."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = AttributeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    clean = labelled_batch(np.random.default_rng(HELD_OUT_SEED + seed), 1024, degraded=0.0)
    noisy = labelled_batch(np.random.default_rng(HELD_OUT_SEED + 1 + seed), 1024, degraded=1.0)
    start, losses = time.perf_counter(), []
    net.train()
    for step in range(steps):
        pixels, labels = labelled_batch(rng, batch_size)
        logits = net(pixels)
        loss = sum(torch.nn.functional.cross_entropy(logits[name], labels[name]) for name in ATTRIBUTES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step == steps - 1:
            accuracy = held_out_accuracy(net, *clean)
            log.info("step %d/%d  loss %.4f  held-out all-correct %.3f  (%.0f s)", step + 1, steps,
                     np.mean(losses[-100:]), accuracy["all"], time.perf_counter() - start)
    net.eval()
    summary = {
        "steps": steps, "batch_size": batch_size, "seed": seed, "learning_rate": lr,
        "seconds": round(time.perf_counter() - start, 1), "final_train_loss": float(np.mean(losses[-100:])),
        "held_out_images": len(clean[0]),
        "held_out_accuracy_clean": held_out_accuracy(net, *clean),
        "held_out_accuracy_degraded": held_out_accuracy(net, *noisy),
    }
    save_attribute_net(net, out)
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = trainer_parser("ddpo_ray.tiny.attribute_trainer", __doc__, DEFAULT_OUT,
                            steps=2000, batch_size=64, seed=1, lr=3e-3)
    return run_trainer(train, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
