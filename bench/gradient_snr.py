"""How much of DDPO's policy gradient is signal? Cosine between independent epochs' gradients.

For each arm (a set of config overrides: an advantage estimator, a sampling layout, an epoch
size), this samples several epochs with the base policy (version 0, the same weights every
time), scores them, computes their advantages and the policy gradient each epoch gives (the
first optimizer step's gradient, not applied), and reports the mean cosine between the
gradients of different epochs. Two estimates g1, g2 of one expected gradient m with noise of
size s each have E[cos] ~ |m|^2 / (|m|^2 + s^2): 1 for a noise-free estimator, 0 for pure noise.
Per denoising step too (each step's own term of the gradient), to show which steps carry signal.
Much cheaper than learning runs over seeds: minutes for every arm, not an hour.

    python bench/gradient_snr.py --preset tiny_aesthetic --epochs 6
    python bench/gradient_snr.py --preset tiny_compressibility --arm tree sample.initial_noise=tree advantage.mode=tree
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ddpo_ray.config import build_config
from ddpo_ray.maths.advantages import AdvantageEstimator
from ddpo_ray.prompts import PromptSampler, get_prompts
from ddpo_ray.training.local_loop import LocalBackend
from ddpo_ray.training.steps import train_inner_epochs

# Arms compared by default (each on top of the preset).
ARMS = {
    "group": [],
    "group_shared_x_T": ["sample.initial_noise=per_group"],
    "tree": ["sample.initial_noise=tree", "advantage.mode=tree"],
}


def epoch_gradients(cfg, epochs: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(epochs, P) whole gradients, (epochs, T, P) per-step gradients, seconds per epoch."""
    backend = LocalBackend(cfg)
    backend.start(run_dir=None, first_epoch=0, resume_path=None)
    prompts = PromptSampler(get_prompts(cfg.prompts.name), cfg.sample.samples_per_prompt, cfg.seed)
    estimator = AdvantageEstimator(cfg.advantage.mode, cfg.advantage.buffer_size, cfg.advantage.min_count,
                                   cfg.sample.samples_per_prompt, cfg.sample.num_steps)
    steps = cfg.sample.num_steps
    captured: list[torch.Tensor] = []
    backend.optimizer.step = lambda *a, **k: captured.append(
        torch.cat([p.grad.flatten().clone() for p in backend.params]))
    whole, per_step = [], []
    start = time.perf_counter()
    try:
        for epoch in range(epochs):
            scored = backend.sample(epoch, prompts.epoch_prompts(epoch, cfg.samples_per_epoch), 0)
            advantages = torch.as_tensor(estimator(scored.prompts, scored.rewards), dtype=torch.float32)
            if advantages.ndim == 1:
                advantages = advantages[:, None].expand(-1, steps).clone()
            grads = []
            for j in range(steps):  # each step's term alone; they add up to the whole gradient
                only = torch.zeros_like(advantages)
                only[:, j] = advantages[:, j]
                captured.clear()
                train_inner_epochs(backend.pipe.unet, backend.pipe.scheduler, backend.optimizer, backend.params,
                                   scored.trajectories, only, cfg, epoch)
                grads.append(torch.stack(captured).sum(0))
            per_step.append(torch.stack(grads).numpy())
            whole.append(per_step[-1].sum(0))
    finally:
        backend.close()
    return np.stack(whole), np.stack(per_step), (time.perf_counter() - start) / epochs


def mean_cosine(vectors: np.ndarray) -> float:
    """Mean cosine over all pairs of rows (nan if a row is zero)."""
    cosines = []
    for a, b in itertools.combinations(range(len(vectors)), 2):
        na, nb = np.linalg.norm(vectors[a]), np.linalg.norm(vectors[b])
        cosines.append(float(vectors[a] @ vectors[b] / (na * nb)) if na > 0 and nb > 0 else float("nan"))
    return float(np.mean(cosines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny_aesthetic")
    parser.add_argument("--epochs", type=int, default=6, help="independent epochs per arm (pairs: n(n-1)/2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--arm", nargs="+", action="append", default=None, metavar=("NAME", "OVERRIDE"),
                        help="an arm of your own: a name, then its overrides (repeatable); default: the built-in arms")
    parser.add_argument("--out", default="bench/results/gradient_snr.json")
    parser.add_argument("overrides", nargs="*", help="config overrides for every arm")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = {a[0]: a[1:] for a in args.arm} if args.arm else ARMS
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in arms.items():
            cfg = build_config(args.preset, overrides=[
                f"seed={args.seed}", "metrics=false", "eval.every=0", "eval.guard_reward=null", "save_freq=0",
                f"output_dir={tmp}", f"run_name={name}", "train.max_grad_norm=1e9", *args.overrides, *overrides,
            ])
            whole, per_step, seconds = epoch_gradients(cfg, args.epochs)
            results[name] = {
                "overrides": overrides, "samples_per_epoch": cfg.samples_per_epoch,
                "cosine": mean_cosine(whole),
                "cosine_per_step": [mean_cosine(per_step[:, j]) for j in range(per_step.shape[1])],
                "norm_per_step": np.linalg.norm(per_step, axis=2).mean(0).tolist(),
                "seconds_per_epoch": round(seconds, 2),
            }
            r = results[name]
            print(f"{args.preset:22s} {name:18s} {r['samples_per_epoch']:4d} samples  cosine {r['cosine']:+.3f}  per step "
                  + " ".join(f"{c:+.3f}" for c in r["cosine_per_step"])
                  + f"  | {seconds:.1f} s/epoch", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "seed": args.seed, "epochs": args.epochs,
                               "overrides": args.overrides, "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
