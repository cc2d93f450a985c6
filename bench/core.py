"""Core benchmark: what recording log-probs and PPO cost over plain diffusers/UNet work.

(a) trajectory sampling (`sample_trajectories`) vs the plain `StableDiffusionPipeline.__call__`
    with the same prompts, steps, CFG, eta and batch (target: <= 5% extra);
(b) one PPO epoch (`train_epoch`) vs a bare UNet forward+backward over the same
    sample-timesteps, batch and CFG (target: <= 10% extra);
(c) peak memory (CPU: peak RSS; CUDA: max allocated) and the size of the stored trajectories;
(d) the single-process loop's epoch time and reward per epoch on `tiny` (32 samples, 20 steps).

Both sides of each ratio run interleaved, in one process, on the same inputs, and the
medians are compared, so machine noise hits both alike. Prints figures; writes JSON.

    python bench/core.py                                   # tiny, CPU
    python bench/core.py --preset sd15_random --device cuda --mixed-precision bf16 \
        --resolution 512 --steps 50 --batch 8 --skip-loop    # true-size UNet on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddpo_ray.config import build_config
from ddpo_ray.infra.hf_loading import compute_dtype
from ddpo_ray.maths.diffusion import sample_trajectories
from ddpo_ray.maths.ppo import make_grad_scaler, make_optimizer, train_epoch
from ddpo_ray.models.lora import trainable_parameters
from ddpo_ray.models.pipelines import load_pipeline
from ddpo_ray.prompts.sets import SIMPLE_ANIMALS
from ddpo_ray.training.local_loop import run_local as run_local_loop


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved_medians(fn_a, fn_b, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median times of a and b, run alternately after one warm-up each (noise hits both)."""
    fn_a(), fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(timed(fn_a, device))
        times_b.append(timed(fn_b, device))
    return statistics.median(times_a), statistics.median(times_b)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-epochs", type=int, default=3)
    parser.add_argument("--skip-loop", action="store_true", help="skip (d), the single-process loop")
    parser.add_argument("--out", default="bench/results/core.json")
    args = parser.parse_args()

    overrides = [f"sample.num_steps={args.steps}", f"sample.batch_size={args.batch}",
                 f"train.batch_size={args.batch}", "sample.num_batches_per_epoch=1"]
    if args.mixed_precision:
        overrides.append(f"model.mixed_precision={args.mixed_precision}")
    if args.resolution:
        overrides.append(f"sample.resolution={args.resolution}")
    cfg = build_config(preset=args.preset, overrides=overrides)
    device = torch.device(args.device)
    dtype = compute_dtype(cfg.model.mixed_precision)
    print(f"device={device} threads={torch.get_num_threads()} preset={cfg.preset} dtype={dtype} "
          f"batch={args.batch} steps={args.steps} resolution={cfg.sample.resolution} "
          f"guidance={cfg.sample.guidance_scale} eta={cfg.sample.eta}", flush=True)

    pipe = load_pipeline(cfg.model, device)
    params = trainable_parameters(pipe.unet, cfg.model.use_lora, cfg.model.lora_rank)
    prompts = [SIMPLE_ANIMALS[i % len(SIMPLE_ANIMALS)] for i in range(args.batch)]  # --batch may exceed 45
    results: dict = {"device": str(device), "preset": cfg.preset, "dtype": str(dtype), "batch": args.batch,
                     "steps": args.steps, "resolution": cfg.sample.resolution}

    # (a) sampling with log-probs vs the plain pipeline call
    def ours():
        return sample_trajectories(
            pipe, prompts, num_steps=args.steps, guidance_scale=cfg.sample.guidance_scale, eta=cfg.sample.eta,
            resolution=cfg.sample.resolution, generator=torch.Generator(device).manual_seed(0), compute_dtype=dtype,
        )

    def plain():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pipe(prompts, num_inference_steps=args.steps, guidance_scale=cfg.sample.guidance_scale,
                 eta=cfg.sample.eta, height=cfg.sample.resolution, width=cfg.sample.resolution,
                 generator=torch.Generator(device).manual_seed(0), output_type="np")

    t_ours, t_plain = interleaved_medians(ours, plain, args.repeats, device)
    a_ratio = t_ours / t_plain
    results["sampling"] = {"ours_s": t_ours, "diffusers_s": t_plain, "ratio": a_ratio,
                           "samples_per_s": args.batch / t_ours}
    print(f"(a) sampling {args.batch} x {args.steps} steps: ours {t_ours:.3f}s, diffusers pipeline "
          f"{t_plain:.3f}s, ratio {a_ratio:.3f} ({100 * (a_ratio - 1):+.1f}%), "
          f"{args.batch / t_ours:.2f} samples/s", flush=True)

    # (b) one PPO epoch vs bare UNet forward+backward over the same sample-timesteps
    traj = ours()
    storage = sum(t.numel() * t.element_size() for t in (traj.latents, traj.next_latents, traj.log_probs,
                                                          traj.prompt_embeds, traj.negative_prompt_embeds))
    optimizer = make_optimizer(params, cfg.train)
    grad_scaler = make_grad_scaler(dtype, device)  # fp16 refuses to train without one
    advantages = torch.randn(args.batch)
    steps_trained = cfg.num_train_timesteps

    def ppo():
        train_epoch(pipe.unet, pipe.scheduler, optimizer, params, traj, advantages, cfg.train,
                    guidance_scale=cfg.sample.guidance_scale, eta=cfg.sample.eta,
                    generator=torch.Generator().manual_seed(0), compute_dtype=dtype, grad_scaler=grad_scaler)

    def bare():
        pipe.unet.train()
        for j in range(steps_trained):
            latents = traj.latents[:, j]
            t = traj.timesteps[:, j]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = pipe.unet(torch.cat([latents, latents]), torch.cat([t, t]),
                                encoder_hidden_states=torch.cat([traj.negative_prompt_embeds, traj.prompt_embeds])).sample
            out.float().mean().backward()
        pipe.unet.zero_grad(set_to_none=True)
        pipe.unet.eval()

    t_ppo, t_bare = interleaved_medians(ppo, bare, args.repeats, device)
    b_ratio = t_ppo / t_bare
    results["ppo_epoch"] = {"ours_s": t_ppo, "bare_unet_fwd_bwd_s": t_bare, "ratio": b_ratio}
    print(f"(b) PPO epoch over {args.batch} samples x {steps_trained} timesteps: ours {t_ppo:.3f}s, "
          f"bare UNet fwd+bwd {t_bare:.3f}s, ratio {b_ratio:.3f} ({100 * (b_ratio - 1):+.1f}%)",
          flush=True)

    # (c) memory
    results["memory"] = {"peak_mb": peak_memory_mb(device), "trajectory_mb_per_sample": storage / args.batch / 2**20}
    print(f"(c) peak memory {results['memory']['peak_mb']:.0f} MB "
          f"({'CUDA max allocated' if device.type == 'cuda' else 'peak RSS'}); stored trajectory "
          f"{results['memory']['trajectory_mb_per_sample']:.3f} MB per sample", flush=True)

    # (d) the single-process loop on tiny: 32 samples, 20 steps per epoch
    if not args.skip_loop:
        loop_cfg = build_config(preset="tiny", overrides=[
            f"num_epochs={args.loop_epochs}", "sample.num_steps=20", "sample.batch_size=8",
            "sample.num_batches_per_epoch=4", "run_name=bench-core", "save_freq=0",
        ])
        with tempfile.TemporaryDirectory() as tmp:
            loop_cfg = loop_cfg.model_copy(update={"output_dir": tmp})
            history = run_local_loop(loop_cfg, device)
        results["loop"] = [{k: m[k] for k in ("epoch", "reward_mean", "reward_std", "time_epoch", "time_sampling",
                                             "time_reward", "time_training")} for m in history]
        for m in results["loop"]:
            print(f"(d) epoch {m['epoch']}: {m['time_epoch']:.1f}s (sample {m['time_sampling']:.1f}, reward "
                  f"{m['time_reward']:.2f}, train {m['time_training']:.1f}), reward {m['reward_mean']:+.4f} "
                  f"+- {m['reward_std']:.4f}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
