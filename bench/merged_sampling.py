"""Sampling speed with the LoRA merged into the base weights, beside the adapter and no adapter.

One `sample_batch` of the tiny preset (or `--steps/--batch` overrides) three ways, interleaved
so the machine's noise hits all alike: through the peft adapter (base + B A x on every call),
merged (`ddpo_ray.models.merged_lora`, what samplers do), and adapter-free (the base UNet: the
speed a merge can reach). Median of `--repeats` each; prints the ratios and the largest
log-prob difference between merged and adapter sampling (0 up to fp32 rounding). Writes JSON.

    python bench/merged_sampling.py                       # tiny preset, ~1 minute
    python bench/merged_sampling.py --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ddpo_ray.config import build_config
from ddpo_ray.models.lora import trainable_parameters
from ddpo_ray.models.merged_lora import MergedLora
from ddpo_ray.models.pipelines import load_pipeline
from ddpo_ray.training.steps import sample_batch

WAYS = ("adapter", "merged", "adapter-free")


def measure(cfg, repeats: int = 7, threads: int = 1) -> dict:
    """Median seconds of one `sample_batch` through the adapter, merged and adapter-free, and ratios."""
    torch.set_num_threads(threads)
    pipe = load_pipeline(cfg.model, "cpu", seed=cfg.seed)
    params = trainable_parameters(pipe.unet, True, cfg.model.lora_rank, seed=cfg.seed)
    with torch.no_grad():  # a trained-looking adapter (B = 0 would make every way the same)
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    pipe.unet.requires_grad_(False)
    merger = MergedLora(pipe.unet)
    prompts = ["two red circles"] * cfg.sample.batch_size

    def timed(way: str):
        start = time.perf_counter()
        if way == "merged":
            with merger.merged_for_sampling():
                out = sample_batch(pipe, cfg, prompts, 0, 0, 0)
        elif way == "adapter-free":
            pipe.unet.disable_adapters()
            out = sample_batch(pipe, cfg, prompts, 0, 0, 0)
            pipe.unet.enable_adapters()
        else:
            out = sample_batch(pipe, cfg, prompts, 0, 0, 0)
        return time.perf_counter() - start, out

    for way in WAYS:  # warm-up
        timed(way)
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(repeats):
        for way in WAYS:
            seconds[way].append(timed(way)[0])
    median = {way: statistics.median(v) for way, v in seconds.items()}
    dlogp = (timed("merged")[1].log_probs - timed("adapter")[1].log_probs).abs().max().item()
    return {
        "num_steps": cfg.sample.num_steps, "batch_size": cfg.sample.batch_size, "threads": threads,
        "seconds": median, "adapter_over_adapter_free": median["adapter"] / median["adapter-free"],
        "merged_over_adapter_free": median["merged"] / median["adapter-free"],
        "merged_over_adapter": median["merged"] / median["adapter"], "max_log_prob_difference": dlogp,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="sample.num_steps (default: the preset's)")
    parser.add_argument("--batch", type=int, default=None, help="sample.batch_size (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/merged_sampling.json"))
    args = parser.parse_args()
    overrides = [f"sample.num_steps={args.steps}"] * (args.steps is not None)
    overrides += [f"sample.batch_size={args.batch}"] * (args.batch is not None)
    cfg = build_config(overrides=overrides)
    result = measure(cfg, args.repeats, args.threads)
    median, dlogp = result["seconds"], result["max_log_prob_difference"]
    print(f"{cfg.sample.batch_size} prompts x {cfg.sample.num_steps} steps, {args.threads} thread(s), "
          f"median of {args.repeats}:")
    for way in WAYS:
        print(f"  {way:13s} {median[way]:.3f} s")
    print(f"  adapter / adapter-free {result['adapter_over_adapter_free']:.3f}   merged / adapter-free "
          f"{result['merged_over_adapter_free']:.3f}   merged / adapter {result['merged_over_adapter']:.3f}")
    print(f"  largest |log-prob| difference, merged vs adapter: {dlogp:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
