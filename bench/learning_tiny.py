"""Does DDPO learn on the offline `tiny` model? Reward per epoch for both JPEG tasks.

Runs the single-process loop for each task with its `tiny_*` preset (the learning recipe:
5 steps, 4 prompts x 8 samples, group advantages, one full-batch step per epoch at lr 1e-2
falling to 1e-3; README, "Learning on tiny"),
prints the training reward per epoch and the held-out eval reward per policy version, and writes
one PNG: for each task, rows of images from the base model and from the checkpoints after 5 and
10 epochs, same prompts and same initial noise, so what changed in the images is visible.
Writes JSON beside it. (bench/learning.py covers all four tasks over seeds 0-4.)

    python bench/learning_tiny.py                   # 10 epochs per task, a few minutes each
    python bench/learning_tiny.py --epochs 4 --out-dir /tmp/learning
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ddpo_ray.config import build_config
from ddpo_ray.maths.diffusion import sample_trajectories
from ddpo_ray.models.pipelines import load_tiny_pipeline
from ddpo_ray.records.run_dir import RunDirectory
from ddpo_ray.training.local_loop import run_local as run_local_loop
from reward_services.jpeg import jpeg_sizes_kb

GRID_PROMPTS = ["a red circle", "two blue squares", "three yellow triangles", "a white square",
                "two black circles", "a purple triangle", "three green squares", "an orange circle"]


def grid_row(checkpoint: Path | None, cfg) -> np.ndarray:
    pipe = load_tiny_pipeline()
    if checkpoint is not None:
        pipe.load_lora_weights(checkpoint)
    traj = sample_trajectories(
        pipe, GRID_PROMPTS, num_steps=cfg.sample.num_steps, guidance_scale=cfg.sample.guidance_scale,
        eta=cfg.sample.eta, resolution=cfg.sample.resolution, generator=torch.Generator().manual_seed(1234),
    )
    return traj.images.numpy()


def labelled(rows: list[tuple[str, np.ndarray]], scale: int = 2) -> Image.Image:
    """Stack image rows with a text label on the left of each."""
    label_width, size = 260, 64 * scale
    width = label_width + size * len(GRID_PROMPTS)
    canvas = Image.new("RGB", (width, size * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        draw.text((6, r * size + size // 2 - 12), label, fill="black")
        for c, image in enumerate(images):
            canvas.paste(Image.fromarray(image).resize((size, size), Image.NEAREST), (label_width + c * size, r * size))
    return canvas


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="bench/results")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for both runs")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    half = max(1, args.epochs // 2)

    results, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for task in ("jpeg_compressibility", "jpeg_incompressibility"):
            cfg = build_config("tiny_" + task.removeprefix("jpeg_"), overrides=[
                f"num_epochs={args.epochs}", f"save_freq={half}", f"seed={args.seed}", "metrics=false",
                "eval.guard_margin=null",  # record, never stop: this bench shows the plain curve
                f"output_dir={tmp}", f"run_name={task}", *args.overrides,
            ])
            start = time.perf_counter()
            history = run_local_loop(cfg)
            elapsed = time.perf_counter() - start
            checkpoints = Path(tmp) / task / "checkpoints"
            stages = [("base", None), (f"after {half} epochs", checkpoints / f"epoch_{half - 1:04d}"),
                      (f"after {args.epochs} epochs", checkpoints / f"epoch_{args.epochs - 1:04d}")]
            grid = []
            for name, checkpoint in stages:
                images = grid_row(checkpoint, cfg)
                sizes = jpeg_sizes_kb(images)
                grid.append({"stage": name, "jpeg_kb": sizes.round(3).tolist()})
                rows.append((f"{task}\n{name}\nmean JPEG {sizes.mean():.2f} kB", images))
            evals = RunDirectory(Path(tmp) / task).read_evals()
            results[task] = {
                "eval_reward_per_version": [r["eval_reward_mean"] for r in evals],
                "reward_per_epoch": [m["reward_mean"] for m in history],
                "reward_std_per_epoch": [m["reward_std"] for m in history],
                "seconds": elapsed, "grid": grid,
            }
            rewards = results[task]["reward_per_epoch"]
            print(f"{task}: reward per epoch " + " ".join(f"{r:+.3f}" for r in rewards)
                  + f" | epoch-0 std {history[0]['reward_std']:.3f} | {elapsed:.0f}s", flush=True)
            print(f"{task}: held-out eval per version " + " ".join(
                f"{r:+.3f}" for r in results[task]["eval_reward_per_version"]), flush=True)

    png = out_dir / "learning_tiny.png"
    labelled(rows).save(png)
    (out_dir / "learning_tiny.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {png} and {out_dir / 'learning_tiny.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
