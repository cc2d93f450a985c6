"""The `tiny` reward models: how good they are, what they say about the policy's images, how fast.

(a) Quality on held-out tiny-world renders (seeds no trainer drew), clean and degraded (noise,
    blur): captioner accuracy per attribute and caption examples; `llava_bertscore` preferring
    the describing prompt over one with another colour or shape; aesthetic scorer vs its gold
    (Spearman); `alignment_gold` reading the true attributes.
(b) On samples of the base `tiny` pipeline (the images DDPO starts from): proxy vs gold
    (Spearman of aesthetic vs aesthetic_gold, llava_bertscore vs alignment_gold).
(c) images/s of each model reward in-process (one torch thread) and on Ray Serve (1 replica,
    1 CPU, through the sampler-side RewardClient), measured in alternating windows.
(d) One PNG: base-model samples with their captions and scores, to judge at a glance.

    python bench/tiny_rewards.py                     # writes bench/results/tiny_rewards.{json,png}
    python bench/tiny_rewards.py --seconds 3 --skip-serve
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rewards import deploy, in_process_rate, serve_rate  # bench/rewards.py, this folder

from ddpo_ray.maths.stats import spearman
from ddpo_ray.tiny.augment import degrade
from ddpo_ray.tiny.world import make_batch, scene_attributes

MODEL_REWARDS = ("aesthetic", "llava_bertscore", "aesthetic_gold", "alignment_gold")
HELD_OUT = 91_000


def quality(n: int) -> dict:
    from ddpo_ray.tiny.aesthetic_trainer import world_batch
    from ddpo_ray.tiny.captioner_trainer import caption_accuracy, describing_prompt_wins
    from reward_services.aesthetic_model import AestheticPredictor
    from reward_services.attribute_model import AttributeModel
    from reward_services.bertscore import BertScore
    from reward_services.captioner import Captioner

    rng = np.random.default_rng(HELD_OUT)
    clean, scenes = make_batch(rng, n)
    noisy = degrade(clean, rng, 1.0, kinds=("noise", "blur"))
    captioner, bertscore, attributes = Captioner(device="cpu"), BertScore(device="cpu"), AttributeModel(device="cpu")
    out: dict = {"images": n}
    for name, images in (("clean", clean), ("degraded", noisy)):
        captions = captioner(images)
        out[f"captioner_{name}"] = caption_accuracy(captions, scenes)
        read = attributes.attributes(images)
        out[f"alignment_gold_all_attributes_{name}"] = float(np.mean([r == scene_attributes(s) for r, s in zip(read, scenes)]))
        if name == "clean":
            out["caption_examples"] = [{"caption": c, "truth": s.caption()} for c, s in zip(captions[:6], scenes[:6])]
            wins = describing_prompt_wins(captions, scenes, bertscore, rng)
            out["llava_bertscore_describing_prompt_wins"] = float(wins.mean())
            out["llava_bertscore_wins_against_other_colour"] = float(wins[0::2].mean())
            out["llava_bertscore_wins_against_other_shape"] = float(wins[1::2].mean())
    images, gold = world_batch(np.random.default_rng(HELD_OUT + 1), n)
    out["aesthetic_spearman_vs_gold"] = spearman(AestheticPredictor(device="cpu")(images), gold)
    return out


def base_model_samples(n: int, steps: int) -> tuple[np.ndarray, list[str]]:
    import torch

    from ddpo_ray.config import ModelConfig
    from ddpo_ray.models.pipelines import load_pipeline
    from ddpo_ray.prompts.sets import TINY_SHAPES, TINY_SHAPES_HELD_OUT

    pipe = load_pipeline(ModelConfig(pretrained="tiny"))
    prompts = [list(TINY_SHAPES + TINY_SHAPES_HELD_OUT)[i] for i in np.random.default_rng(0).permutation(96)[:n]]
    generator = torch.Generator().manual_seed(0)
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, eta=1.0, generator=generator, output_type="np").images
    return (np.clip(images * 255, 0, 255).round()).astype(np.uint8), prompts


def proxy_vs_gold(images: np.ndarray, prompts: list[str]) -> tuple[dict, dict]:
    from reward_services.functions import reward_function

    scores = {name: np.asarray(reward_function(name)(images, prompts)) for name in MODEL_REWARDS}
    figures = {
        "images": len(images),
        "spearman_aesthetic_vs_aesthetic_gold": spearman(scores["aesthetic"], scores["aesthetic_gold"]),
        "spearman_llava_bertscore_vs_alignment_gold": spearman(scores["llava_bertscore"], scores["alignment_gold"]),
        **{f"{name}_mean": float(values.mean()) for name, values in scores.items()},
        **{f"{name}_std": float(values.std()) for name, values in scores.items()},
    }
    return figures, scores


def throughput(images: np.ndarray, prompts: list[str], seconds: float, rounds: int) -> dict:
    import ray
    import torch
    from ray import serve

    from reward_services.client import RewardClient
    from reward_services.functions import reward_function

    torch.set_num_threads(1)
    out = {}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for name in MODEL_REWARDS:
            function = reward_function(name)
            deploy(name, replicas=1, max_batch_size=16)
            client = RewardClient({name: 1.0}, max_images_per_call=len(images))
            local, served = [], []
            for _ in range(rounds):
                local.append(in_process_rate(function, images, prompts, seconds))
                served.append(serve_rate(client, images, prompts, 3, seconds))
            out[name] = {"in_process": float(np.median(local)), "serve_1_replica": float(np.median(served))}
            print(f"  {name:16s} {out[name]['in_process']:8.1f} img/s in-process   {out[name]['serve_1_replica']:8.1f} img/s on Serve")
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def write_png(path: Path, images: np.ndarray, prompts: list[str], scores: dict, captions: list[str]) -> None:
    from ddpo_ray.records.grids import write_image_grid

    n = len(captions)
    labels = [
        f"{p} | says: {c} | aes {scores['aesthetic'][i]:.1f} gold {scores['aesthetic_gold'][i]:.1f} "
        f"| align gold {scores['alignment_gold'][i]:.2f}"
        for i, (p, c) in enumerate(zip(prompts[:n], captions))
    ]
    write_image_grid(path, images[:n], labels, scores["llava_bertscore"][:n], columns=4, prompt_lines=9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="held-out renders for the quality figures")
    parser.add_argument("--samples", type=int, default=64, help="base-model samples for proxy vs gold")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of the base-model samples")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/tiny_rewards.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.perf_counter()
    results: dict = {"quality": quality(args.images)}
    print(json.dumps(results["quality"], indent=1))
    images, prompts = base_model_samples(args.samples, args.steps)
    results["base_model_samples"], scores = proxy_vs_gold(images, prompts)
    print(json.dumps(results["base_model_samples"], indent=1))
    from reward_services.captioner import Captioner

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_png(args.out.with_suffix(".png"), images, prompts, scores, Captioner(device="cpu")(images[:12]))
    if not args.skip_serve:
        batch = images[:32]
        results["images_per_second_batch32"] = throughput(batch, prompts[:32], args.seconds, args.rounds)
    results["seconds"] = round(time.perf_counter() - start, 1)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
