"""Trains the `tiny` captioner: a small LLaVA that answers DDPO's question about tiny-world images.

    python -m ddpo_ray.tiny.captioner_trainer                 # writes ddpo_ray/tiny/assets/captioner
    python -m ddpo_ray.tiny.captioner_trainer --out DIR --tower-steps 2800 --steps 800 --seed 0

The model is `LlavaForConditionalGeneration` with its processor (reward_services/captioner.py
builds the architecture), trained in two stages, as LLaVA starts from a pretrained CLIP:
1. the vision tower alone learns to see the world, through linear heads that are then dropped:
   attribute classification (colour, shape, count, ...) from its pooled features, and, per
   image token, what its 8x8 patch shows (`patch_targets`: which of its pixels are object, the
   shape it belongs to, whether an object's centre lies in it). Trained end to end through the
   language model only, a from-scratch ViT learns colours at once but shapes barely (31% after
   1000 steps, measured); pretrained this way the pooled heads read the shape of 91% of held-out
   images and the count of 87-88% (half of them degraded; 85% and 79% with the pooled heads
   alone, the dense targets teach the tokens where the objects are).
2. the language model and projector learn to caption, the tower frozen, with teacher forcing
   (a trained tower at 0.2x the rate lost most of its shape reading: 40% of captions, measured;
   frozen, 96%): the input is exactly what the reward
   service feeds it at inference - LLaVA-1.5's prompt around "Answer concisely: what is going on
   in this image?", image tokens expanded by the processor - then the scene's full caption ("a
   small red circle on the left on a striped blue background") and the end token; the loss is
   the caption's tokens only.
Half of the images are degraded (noise, blur) so it also captions the policy's imperfect
samples. It is saved with `save_pretrained` (fp16), so the service loads it like any HF
checkpoint. Held-out accuracy per attribute, by parsing the greedy captions of images from seeds
never trained on, goes to training.json.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ddpo_ray.tiny import ASSETS
from ddpo_ray.tiny.augment import degrade
from ddpo_ray.tiny.trainer_cli import run_trainer, trainer_parser
from ddpo_ray.tiny.world import (
    ATTRIBUTES,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    Scene,
    make_batch,
    object_mask,
    object_prompt,
    parse_caption,
    scene_attributes,
)
from reward_services.alignment import references_for
from reward_services.captioner import PATCH_SIZE, Captioner, build_tiny_random_llava

log = logging.getLogger(__name__)

DEFAULT_OUT = ASSETS / "captioner"
HELD_OUT_SEED = 40_000
# Stage 2: the pretrained tower's learning rate, relative to the language model's. 0 freezes it:
# with a 4 x 128 tower, training it at 0.2x let the fresh language model's first gradients wash
# out what stage 1 taught (held-out captions named the shape 40% of the time, measured), frozen
# the captions name it 96%.
TOWER_LR_FACTOR = 0.0
SCORED = ("count", "colour", "shape", "background", "texture")  # what a caption is checked for


def caption_accuracy(captions: list[str], scenes: list[Scene]) -> dict[str, float]:
    """Per attribute, the share of captions that name it correctly (an unparseable caption is wrong)."""
    right = {name: 0 for name in SCORED}
    both = 0
    for caption, scene in zip(captions, scenes):
        try:
            named = parse_caption(caption)
        except ValueError:
            named = {}
        truth = scene_attributes(scene)
        for name in SCORED:
            right[name] += named.get(name) == truth[name]
        both += named.get("colour") == truth["colour"] and named.get("shape") == truth["shape"]
    accuracy = {name: right[name] / len(scenes) for name in SCORED}
    accuracy["colour_and_shape"] = both / len(scenes)
    return accuracy


def describing_prompt_wins(
    captions: Sequence[str], scenes: Sequence[Scene], bertscore: Callable, rng: np.random.Generator
) -> np.ndarray:
    """Does `llava_bertscore` prefer the prompt that describes the image? Two pairs per image.

    The image's own object prompt ("two red circles") against one with another colour, then one
    with another shape (each drawn from `rng`); True where the BERTScore recall of the caption
    against the true prompt's reference is the higher. Even entries: colour pairs; odd: shape.
    """
    true_prompts, wrong_prompts, pair_captions = [], [], []
    for caption, scene in zip(captions, scenes):
        other_colour = str(rng.choice([c for c in COLOURS if c != scene.colour]))
        other_shape = str(rng.choice([s for s in SHAPES if s != scene.shape]))
        for wrong in (object_prompt(scene.count, other_colour, scene.shape), object_prompt(scene.count, scene.colour, other_shape)):
            true_prompts.append(object_prompt(scene.count, scene.colour, scene.shape))
            wrong_prompts.append(wrong)
            pair_captions.append(caption)
    right = bertscore(pair_captions, references_for(true_prompts))[1]
    wrong = bertscore(pair_captions, references_for(wrong_prompts))[1]
    return np.asarray(right) > np.asarray(wrong)


def teacher_forcing(captioner: Captioner, images: np.ndarray, captions: list[str]) -> dict[str, torch.Tensor]:
    """Model inputs and labels: the service's prompt (`captioner.inputs`), then caption + end token.

    The prompts are identical, so they need no padding; the answers are padded on the right and
    the padding is masked out of attention and loss.
    """
    prompt = captioner.inputs(list(images))
    tokenizer = captioner.processor.tokenizer
    answers = [tokenizer.encode(c, add_special_tokens=False) + [tokenizer.sep_token_id] for c in captions]
    width = max(len(a) for a in answers)
    answer_ids = torch.tensor([a + [tokenizer.pad_token_id] * (width - len(a)) for a in answers])
    answer_mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers])
    return {
        "input_ids": torch.cat([prompt["input_ids"], answer_ids], 1),
        "attention_mask": torch.cat([prompt["attention_mask"], answer_mask], 1),
        "pixel_values": prompt["pixel_values"],
        "labels": torch.cat([torch.full_like(prompt["input_ids"], -100), answer_ids.masked_fill(answer_mask == 0, -100)], 1),
    }


def patch_targets(scenes: Sequence[Scene], patch: int = PATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What each image token's patch shows, in raster order like the tower's patch tokens.

    Returns (mask (N, P, patch*patch) float: which of the patch's pixels are object; shape (N, P)
    long: 0 for a patch with fewer than 4 object pixels, else 1 + the index of the scene's shape;
    centre (N, P) float: 1 where an object's centre lies in the patch).
    """
    side = IMAGE_SIZE // patch
    masks, shapes, centres = [], [], []
    for scene in scenes:
        mask = torch.from_numpy(object_mask(scene)).float()
        mask = mask.view(side, patch, side, patch).permute(0, 2, 1, 3).reshape(side * side, patch * patch)
        masks.append(mask)
        shapes.append(torch.where(mask.sum(1) >= 4, SHAPES.index(scene.shape) + 1, 0))
        centre = torch.zeros(side * side)
        for cx, cy in scene.centres:
            centre[min(int(cy) // patch, side - 1) * side + min(int(cx) // patch, side - 1)] = 1
        centres.append(centre)
    return torch.stack(masks), torch.stack(shapes), torch.stack(centres)


def dense_patch_loss(tokens: torch.Tensor, head: torch.nn.Linear, scenes: Sequence[Scene]) -> torch.Tensor:
    """The patch tokens' loss against `patch_targets`: mask pixels, patch shape, object centre."""
    mask, shape, centre = patch_targets(scenes)
    out = head(tokens)
    pixels = mask.shape[-1]
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    return (
        bce(out[..., :pixels], mask)
        + torch.nn.functional.cross_entropy(out[..., pixels:-1].reshape(-1, len(SHAPES) + 1), shape.reshape(-1))
        + bce(out[..., -1], centre)
    )


def pretrain_vision_tower(captioner: Captioner, steps: int, batch_size: int, rng: np.random.Generator, lr: float) -> None:
    """Stage 1: the tower's [CLS, mean of patches] features -> one linear head per attribute,
    and each patch token -> what its patch shows (`dense_patch_loss`)."""
    tower = captioner.model.model.vision_tower
    width = tower.config.hidden_size
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(2 * width, len(values)) for name, values in ATTRIBUTES.items()})
    dense = torch.nn.Linear(width, PATCH_SIZE * PATCH_SIZE + len(SHAPES) + 1 + 1)  # pixels, shape or none, centre
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters(), *dense.parameters()], lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        images, scenes = make_batch(rng, batch_size)
        images = degrade(images, rng, 0.25, kinds=("noise", "blur"))
        hidden = tower(pixel_values=captioner.inputs(images)["pixel_values"]).last_hidden_state
        features = torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], -1)
        truth = [scene_attributes(scene) for scene in scenes]
        loss = sum(
            torch.nn.functional.cross_entropy(heads[name](features), torch.tensor([values.index(t[name]) for t in truth]))
            for name, values in ATTRIBUTES.items()
        ) + dense_patch_loss(hidden[:, 1:], dense, scenes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step == steps - 1:
            log.info("tower step %d/%d  attribute loss %.4f  (%.0f s)", step + 1, steps, np.mean(losses[-100:]),
                     time.perf_counter() - start)


def train(out: Path, tower_steps: int, steps: int, batch_size: int, seed: int, lr: float,
          tower_lr_factor: float = TOWER_LR_FACTOR, tower_from: Path | None = None) -> dict:
    """Both stages, caption held-out images, write the model and processor; returns the summary.

    With `tower_from` (a captioner this trainer wrote) stage 1 is skipped and its vision tower
    is taken instead, to try stage 2 alone.
    """
    if not tower_lr_factor >= 0:
        raise ValueError(f"--tower-lr-factor={tower_lr_factor}: expected >= 0 (0 freezes the tower in stage 2)")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, processor = build_tiny_random_llava(seed)
    captioner = Captioner.around(model, processor)  # the service's input path and decoding
    model.train()
    started = time.perf_counter()
    if tower_from is None:
        pretrain_vision_tower(captioner, tower_steps, 64, rng, lr)
    else:
        trained = type(model).from_pretrained(tower_from, dtype=torch.float32)
        model.model.vision_tower.load_state_dict(trained.model.vision_tower.state_dict())
        tower_steps = 0
    tower_seconds = time.perf_counter() - started
    # The pretrained tower stays frozen (or moves slower than the fresh language model), so the
    # language model's first, large gradients do not wash out what stage 1 taught it.
    if tower_lr_factor == 0:
        model.model.vision_tower.requires_grad_(False)
    tower = set(map(id, model.model.vision_tower.parameters()))
    groups = [
        {"params": [p for p in model.parameters() if id(p) in tower], "lr": lr * tower_lr_factor},
        {"params": [p for p in model.parameters() if id(p) not in tower], "lr": lr},
    ]
    groups = [group for group in groups if group["lr"] > 0]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.05
    )
    held_out_images, held_out_scenes = make_batch(np.random.default_rng(HELD_OUT_SEED + seed), 512)
    start, losses = time.perf_counter(), []
    model.train()
    for step in range(steps):
        images, scenes = make_batch(rng, batch_size)
        images = degrade(images, rng, 0.5, kinds=("noise", "blur"))
        loss = model(**teacher_forcing(captioner, images, [scene.caption() for scene in scenes])).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step == steps - 1:
            log.info("caption step %d/%d  loss %.4f  (%.0f s)", step + 1, steps, np.mean(losses[-100:]), time.perf_counter() - start)
        if (step + 1) % 500 == 0 or step == steps - 1:
            model.eval()
            accuracy = caption_accuracy(captioner(held_out_images[:128]), held_out_scenes[:128])
            model.train()
            log.info("  held-out (128 images): %s", "  ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
    model.eval()
    captions = captioner(held_out_images)
    summary = {
        "tower_steps": tower_steps, "steps": steps, "batch_size": batch_size, "seed": seed, "learning_rate": lr,
        "tower_lr_factor": tower_lr_factor, "tower_seconds": round(tower_seconds, 1),
        "tower_from": None if tower_from is None else str(tower_from),
        "seconds": round(time.perf_counter() - started, 1), "final_train_loss": float(np.mean(losses[-100:])),
        "held_out_images": len(held_out_scenes),
        "held_out_accuracy": caption_accuracy(captions, held_out_scenes),
        "examples": [{"caption": c, "truth": s.caption()} for c, s in zip(captions[:8], held_out_scenes[:8])],
    }
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = trainer_parser("ddpo_ray.tiny.captioner_trainer", __doc__, DEFAULT_OUT,
                            steps=800, batch_size=48, seed=0, lr=1e-3)
    parser.add_argument("--tower-steps", type=int, default=2800, help="stage 1: vision tower pretraining")
    parser.add_argument("--tower-lr-factor", type=float, default=TOWER_LR_FACTOR,
                        help="stage 2: the tower's learning rate relative to the language model's (0 freezes it)")
    parser.add_argument("--tower-from", type=Path, default=None,
                        help="skip stage 1: take the vision tower of a captioner this trainer wrote")
    return run_trainer(train, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
