"""The GPU path's checks in one command (issue 18): what only a GPU can show, as a pass/fail table.

    python bench/gpu_checks.py                         # one CUDA GPU, offline, a few minutes
    python bench/gpu_checks.py --device cpu --tiny     # the same code on the tiny model (CPU smoke test)

Offline: the `sd15_random` preset (SD1.5's UNet/VAE/text-encoder shapes at random init, LoRA
B given random values so the adapter matters) and a random-init CLIP ViT-L/14 + LAION MLP.
Checks, by issue-18 item:
  1  the metrics all-reduce runs on NCCL with the tensors on `reduction_device` (and the old
     CPU-tensor reduction fails there, as the issue said);
  3  trajectories leave the sampler as CPU tensors whose pickle is their own bytes;
  5  LoRA gradient cosine vs fp32: fp16 with and without the loss scaler, bf16;
  6  |ratio - 1| between sampling and training kernels, per timestep (quantiles), for bf16,
     fp16 and fp32 with TF32 on/off, a same-shape control (sampling's shape, no grad) and bf16
     with the old log-probs recomputed by the learner (train.recompute_old_log_probs);
  8  DDP all-reduces per optimizer step (a comm hook counts them);
  memory: peak of a training minibatch (with and without gradient checkpointing), of a
     sampling batch with VAE decode, and of an aesthetic replica (ViT-L/14 fp16).
Exit status: 0 all pass, 1 a check failed, 2 no CUDA device (and --device cpu not given).
Figures also go to --out (JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

EXIT_NO_CUDA = 2
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass
class Row:
    item: str
    check: str
    value: str
    passed: bool | None  # None: a measurement with no bar

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "info"}[self.passed]


def print_table(rows: list[Row]) -> None:
    width = max(len(r.check) for r in rows)
    print(f"\n{'item':<6} {'check':<{width}}  {'result':<6} value")
    for r in rows:
        print(f"{r.item:<6} {r.check:<{width}}  {r.verdict:<6} {r.value}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: the smoke test)")
    parser.add_argument("--tiny", action="store_true", help="the tiny-random model at 64x64 instead of sd15-random")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 10; 2 with --tiny)")
    parser.add_argument("--out", default="bench/results/gpu_checks.json")
    return parser.parse_args(argv)


class Bench:
    """Shared state: the config, a base pipeline (fp32, LoRA), trajectories per precision."""

    def __init__(self, args, torch):
        from ddpo_ray.config import build_config
        from ddpo_ray.models.lora import add_lora
        from ddpo_ray.models.pipelines import load_pipeline

        self.torch = torch
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and self.device.index is None:  # torch.cuda.set_device needs an index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.tiny = args.tiny
        steps = args.steps or (2 if args.tiny else 10)
        overrides = [f"sample.num_steps={steps}", "sample.batch_size=4" if args.tiny else "sample.batch_size=8",
                     "train.batch_size=2" if args.tiny else "train.batch_size=4"]
        if args.tiny:
            overrides += ["model.pretrained=tiny-random", "sample.resolution=64"]
        if self.device.type == "cpu":  # the smoke test: the smallest shapes that run every check
            overrides += ["sample.batch_size=2", "train.batch_size=1", "sample.guidance_scale=1.0"]
        # Half precision and TF32 are GPU questions (CPU kernels measured 0 deviation, and run slowly).
        self.half = self.device.type == "cuda"
        self.cfg = build_config(preset="sd15_random", overrides=overrides)
        self.clip_range = self.cfg.train.clip_range
        start = time.perf_counter()
        self.base = load_pipeline(self.cfg.model.model_copy(update={"mixed_precision": "no"}), self.device, seed=0)
        add_lora(self.base.unet, self.cfg.model.lora_rank, seed=0)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in self.base.unet.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator).to(param.device) * 0.02)
        print(f"pipeline {self.cfg.model.pretrained} ready in {time.perf_counter() - start:.0f} s", flush=True)
        self.prompts = [f"a photo of animal number {i}" for i in range(self.cfg.sample.batch_size)]

    def pipe(self, dtype):
        """A copy of the base pipeline in `dtype` (frozen weights), the LoRA kept fp32."""
        pipe = copy.deepcopy(self.base)
        if dtype != self.torch.float32:
            pipe.to(dtype=dtype)
            for name, param in pipe.unet.named_parameters():
                if "lora_" in name:
                    param.data = param.data.float()
        return pipe

    def sample(self, pipe, dtype, seed=0):
        from ddpo_ray.maths.diffusion import sample_trajectories

        sample = self.cfg.sample
        return sample_trajectories(
            pipe, self.prompts, num_steps=sample.num_steps, guidance_scale=sample.guidance_scale, eta=sample.eta,
            resolution=sample.resolution, generator=self.torch.Generator(self.device).manual_seed(seed),
            compute_dtype=dtype,
        )

    def set_tf32(self, on: bool) -> None:
        if self.device.type == "cuda":
            self.torch.backends.cuda.matmul.allow_tf32 = on
            self.torch.backends.cudnn.allow_tf32 = on


# --- 6: sampling vs training kernels ----------------------------------------------------------


def ratio_deviation(bench: Bench, dtype, tf32: bool, mode: str) -> dict:
    """|ratio - 1| per timestep index: mode "train" (training's shape, grad on), "control"
    (sampling's shape, no grad) or "recompute" (old log-probs rescored first, then training)."""
    torch = bench.torch
    from ddpo_ray.maths.diffusion import gaussian_log_prob, policy_step_mean
    from ddpo_ray.maths.ppo import recompute_log_probs, shuffle_for_training

    bench.set_tf32(tf32)
    pipe = bench.pipe(dtype)
    traj = bench.sample(pipe, dtype)
    cfg = bench.cfg
    steps = traj.num_steps
    scheduler, unet = pipe.scheduler, pipe.unet
    options = {"guidance_scale": cfg.sample.guidance_scale, "eta": cfg.sample.eta, "compute_dtype": dtype}
    per_step: dict[int, list] = {j: [] for j in range(steps)}
    scheduler.set_timesteps(steps, device=bench.device)
    if mode == "control":
        with torch.no_grad():
            for j in range(steps):
                mean, std = policy_step_mean(unet, scheduler, traj.latents[:, j], traj.timesteps[:, j],
                                             traj.prompt_embeds, traj.negative_prompt_embeds, **options)
                new = gaussian_log_prob(traj.next_latents[:, j], mean, std)
                per_step[j].append((torch.exp(new - traj.log_probs[:, j]) - 1).abs())
    else:
        if mode == "recompute":
            traj.log_probs = recompute_log_probs(unet, scheduler, traj, cfg.train.batch_size, **options)
        step_index = {int(t): j for j, t in enumerate(traj.timesteps[0].tolist())}
        shuffled, _ = shuffle_for_training(traj, torch.zeros(len(traj)), torch.Generator().manual_seed(0))
        unet.train()
        size = cfg.train.batch_size
        for start in range(0, len(traj), size):
            rows = slice(start, start + size)
            for j in range(steps):
                with torch.enable_grad():  # the training kernels (the LoRA requires grad)
                    mean, std = policy_step_mean(
                        unet, scheduler, shuffled.latents[rows, j], shuffled.timesteps[rows, j],
                        shuffled.prompt_embeds[rows], shuffled.negative_prompt_embeds[rows], **options)
                    new = gaussian_log_prob(shuffled.next_latents[rows, j], mean, std).detach()
                dev = (torch.exp(new - shuffled.log_probs[rows, j]) - 1).abs()
                for t, d in zip(shuffled.timesteps[rows, j].tolist(), dev):
                    per_step[step_index[int(t)]].append(d.reshape(1))
    quantiles = {}
    for j, values in per_step.items():
        v = torch.cat(values).float().cpu()
        quantiles[j] = {"p50": float(v.quantile(0.5)), "p90": float(v.quantile(0.9)), "max": float(v.max())}
    del pipe
    bench.set_tf32(False)
    return quantiles


def item6(bench: Bench, rows: list[Row], results: dict) -> None:
    torch = bench.torch
    cuda = bench.device.type == "cuda"
    low, low_name = (torch.bfloat16, "bf16") if bench.half else (torch.float32, "fp32")
    runs = [  # (label, dtype, tf32, mode, bar): bar is the max the check must stay under, None: measured
        ("fp32, TF32 off", torch.float32, False, "train", 1e-5),
        ("fp32, TF32 on", torch.float32, True, "train", None),
        ("fp16", torch.float16, False, "train", None),
        ("bf16", torch.bfloat16, False, "train", None),
        (f"{low_name}, same-shape control", low, False, "control", 1e-6),
        (f"{low_name}, old log-probs recomputed", low, False, "recompute", 0.1 * bench.clip_range),
    ]
    results["ratio_dev"] = {}
    for label, dtype, tf32, mode, bar in runs:
        if (tf32 and not cuda) or (dtype != torch.float32 and not bench.half):
            rows.append(Row("6", f"|ratio-1| {label}", "n/a on CPU", None))
            continue
        start = time.perf_counter()
        q = ratio_deviation(bench, dtype, tf32, mode)
        results["ratio_dev"][label] = q
        worst = max(q.values(), key=lambda s: s["max"])
        median = max(s["p50"] for s in q.values())
        value = (f"max {worst['max']:.1e}, worst step p90 {worst['p90']:.1e}, p50 <= {median:.1e} "
                 f"(clip {bench.clip_range:.0e}; {time.perf_counter() - start:.0f} s)")
        rows.append(Row("6", f"|ratio-1| {label}", value, None if bar is None else worst["max"] < bar))
        print(f"  {label}: " + ", ".join(f"t{j} {s['p90']:.1e}/{s['max']:.1e}" for j, s in q.items()), flush=True)


# --- 5: gradients vs fp32 ---------------------------------------------------------------------


def lora_gradient(bench: Bench, traj, dtype, scaler: str):
    """The score-function LoRA gradient of one minibatch over every step (no ratio, so the
    log-prob error of item 6 stays out of it); scaler "on", "off" or "none" (fp32/bf16)."""
    torch = bench.torch
    from ddpo_ray.maths.diffusion import gaussian_log_prob, policy_step_mean
    from ddpo_ray.maths.ppo import make_grad_scaler

    pipe = bench.pipe(dtype)
    unet, scheduler = pipe.unet, pipe.scheduler
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    grad_scaler = {"on": make_grad_scaler(dtype, bench.device), "force": torch.amp.GradScaler(bench.device.type)}.get(scaler)
    size = bench.cfg.train.batch_size
    advantages = torch.randn(size, generator=torch.Generator().manual_seed(1)).to(bench.device)
    scheduler.set_timesteps(traj.num_steps, device=bench.device)
    unet.train()
    for j in range(traj.num_steps):
        mean, std = policy_step_mean(
            unet, scheduler, traj.latents[:size, j], traj.timesteps[:size, j], traj.prompt_embeds[:size],
            traj.negative_prompt_embeds[:size], guidance_scale=bench.cfg.sample.guidance_scale,
            eta=bench.cfg.sample.eta, compute_dtype=dtype)
        loss = (-advantages * gaussian_log_prob(traj.next_latents[:size, j], mean, std)).mean() / traj.num_steps
        (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
    scale = grad_scaler.get_scale() if grad_scaler is not None else 1.0
    flat = torch.cat([p.grad.float().flatten() for p in params]) / scale
    del pipe
    return flat


def item5(bench: Bench, rows: list[Row], results: dict) -> None:
    torch = bench.torch
    traj = bench.sample(bench.pipe(torch.float32), torch.float32, seed=1)
    reference = lora_gradient(bench, traj, torch.float32, "none")
    results["gradients"] = {"fp32_norm": float(reference.norm()), "fp32_zero_fraction": float((reference == 0).float().mean())}
    runs = (("fp16 + GradScaler", torch.float16, "on", 0.99),
            ("fp16 without a scaler (the old path)", torch.float16, "off", None),
            ("bf16", torch.bfloat16, "none", 0.99))
    if not bench.half:  # the scale/unscale code path only
        runs = (("fp32 + GradScaler (CPU: the code path only)", torch.float32, "force", 0.9999),)
    for label, dtype, scaler, bar in runs:
        grad = lora_gradient(bench, traj, dtype, scaler)
        cosine = float(torch.nn.functional.cosine_similarity(grad, reference, dim=0))
        zeros = float((grad == 0).float().mean())
        results["gradients"][label] = {"cosine": cosine, "norm_ratio": float(grad.norm() / reference.norm()),
                                       "zero_fraction": zeros}
        rows.append(Row("5", f"grad cosine vs fp32, {label}",
                        f"{cosine:.4f} (norm x{float(grad.norm() / reference.norm()):.3f}, {zeros:.1%} zeros; "
                        f"fp32 norm {float(reference.norm()):.1e})", None if bar is None else cosine >= bar))


# --- 1 and 8: the process group ----------------------------------------------------------------


def item1(bench: Bench, rows: list[Row], results: dict) -> None:
    torch = bench.torch
    import torch.distributed as dist

    from ddpo_ray.training.collectives import mean_over_ranks, reduction_device

    backend = dist.get_backend()
    device = reduction_device(backend, bench.device)
    metrics = {"loss": 0.5, "ratio_max_dev": 1e-3}
    try:
        reduced = mean_over_ranks(metrics, device)
        rows.append(Row("1", f"metrics all-reduce on {backend} ({device})", str(reduced), reduced == metrics))
    except Exception as exc:  # noqa: BLE001 - the table reports it
        rows.append(Row("1", f"metrics all-reduce on {backend} ({device})", f"{type(exc).__name__}: {exc}", False))
    if backend == "nccl":
        try:
            dist.all_reduce(torch.zeros(2, dtype=torch.float64))
            rows.append(Row("1", "old path (CPU tensor on nccl) fails", "it did not fail", None))
        except Exception as exc:  # noqa: BLE001 - expected
            rows.append(Row("1", "old path (CPU tensor on nccl) fails", f"{type(exc).__name__}", None))
    results["reduce_backend"] = backend


def item8(bench: Bench, rows: list[Row], results: dict) -> None:
    torch = bench.torch
    from ddpo_ray.config import TrainConfig
    from ddpo_ray.maths.ppo import make_grad_scaler, make_optimizer, train_epoch
    from ddpo_ray.training.collectives import count_all_reduces

    dtype = torch.bfloat16 if bench.device.type == "cuda" else torch.float32
    pipe = bench.pipe(dtype)
    traj = bench.sample(pipe, dtype, seed=2)
    params = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    ids = [bench.device.index or 0] if bench.device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(pipe.unet, device_ids=ids)
    buckets = count_all_reduces(ddp)
    train = TrainConfig(batch_size=bench.cfg.train.batch_size, gradient_accumulation_steps=len(traj) // bench.cfg.train.batch_size)
    metrics = train_epoch(
        ddp, pipe.scheduler, make_optimizer(params, train), params, traj, torch.randn(len(traj)).to(bench.device),
        train, guidance_scale=bench.cfg.sample.guidance_scale, eta=bench.cfg.sample.eta,
        generator=torch.Generator().manual_seed(0), compute_dtype=dtype, no_sync=ddp.no_sync,
        grad_scaler=make_grad_scaler(dtype, bench.device),
    )
    steps, per_sync = metrics["optimizer_steps"], len(set(buckets))
    backwards = traj.num_steps * train.gradient_accumulation_steps
    results["all_reduce"] = {"calls": len(buckets), "buckets": per_sync, "optimizer_steps": steps, "backwards": backwards}
    rows.append(Row("8", "DDP all-reduces per optimizer step",
                    f"{len(buckets) / max(per_sync, 1) / steps:.0f} per step ({len(buckets)} bucket calls, "
                    f"{per_sync} bucket(s), {backwards} backwards per step)",
                    len(buckets) == steps * per_sync))
    del ddp, pipe


# --- 3: what the sampler sends --------------------------------------------------------------


def item3(bench: Bench, rows: list[Row], results: dict) -> None:
    torch = bench.torch
    dtype = torch.bfloat16 if bench.device.type == "cuda" else torch.float32
    traj = bench.sample(bench.pipe(dtype), dtype, seed=3)
    old_view = pickle.dumps(traj.images[:, :0, :0])
    sent = traj.for_transport(keep_images=False)
    devices = {getattr(sent, name).device.type for name in sent._TENSORS}
    own = sum(getattr(sent, name).numel() * getattr(sent, name).element_size() for name in sent._TENSORS)
    size = len(pickle.dumps(sent))
    results["transport"] = {"devices": sorted(devices), "pickle_bytes": size, "tensor_bytes": own,
                            "old_image_view_pickle_bytes": len(old_view)}
    rows.append(Row("3", "trajectories sent as CPU tensors", ",".join(sorted(devices)), devices == {"cpu"}))
    rows.append(Row("3", "pickle = own bytes (no image storage)",
                    f"{size / 2**20:.2f} MB pickled for {own / 2**20:.2f} MB of tensors; the old image view "
                    f"pickled {len(old_view) / 2**20:.2f} MB", size < own * 1.01 + 65536))


# --- memory -----------------------------------------------------------------------------------


def memory(bench: Bench, rows: list[Row], results: dict) -> None:
    torch = bench.torch
    if bench.device.type != "cuda":
        rows.append(Row("mem", "peak memory", "n/a on CPU", None))
        return
    from ddpo_ray.config import TrainConfig
    from ddpo_ray.maths.ppo import make_optimizer, train_epoch

    dtype = torch.bfloat16
    results["memory_gb"] = {}
    pipe = bench.pipe(dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    traj = bench.sample(pipe, dtype, seed=4)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    results["memory_gb"]["sampling_batch"] = peak
    rows.append(Row("mem", f"sampling batch of {len(traj)} (CFG, VAE decode) above the weights", f"{peak:.1f} GB", None))
    size = bench.cfg.train.batch_size
    minibatch = traj.select(range(size))
    params = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    for checkpointing in (False, True):
        if checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        train = TrainConfig(batch_size=size, timestep_fraction=1.0 / minibatch.num_steps)  # one step per minibatch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_epoch(pipe.unet, pipe.scheduler, make_optimizer(params, train), params, minibatch, torch.randn(size).to(bench.device),
                    train, guidance_scale=bench.cfg.sample.guidance_scale, eta=bench.cfg.sample.eta,
                    generator=torch.Generator().manual_seed(0), compute_dtype=dtype)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        label = "with" if checkpointing else "without"
        results["memory_gb"][f"train_minibatch_{label}_checkpointing"] = peak
        rows.append(Row("mem", f"training minibatch of {size} (CFG, bf16, LoRA) {label} checkpointing", f"{peak:.1f} GB", None))
    total = torch.cuda.get_device_properties(bench.device).total_memory / 2**30
    results["memory_gb"]["device_total"] = total
    del pipe, traj, minibatch
    torch.cuda.empty_cache()
    # An aesthetic replica: CLIP ViT-L/14 + the LAION MLP at random init, fp16, a batch of 16.
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from reward_services.aesthetic_model import AestheticMLP

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14, projection_dim=768)).to(bench.device, torch.float16).eval()
    mlp = AestheticMLP().to(bench.device, torch.float16).eval()
    with torch.no_grad():
        embeds = clip(pixel_values=torch.randn(16, 3, 224, 224, device=bench.device, dtype=torch.float16)).image_embeds
        mlp(torch.nn.functional.normalize(embeds, dim=-1))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    results["memory_gb"]["aesthetic_replica"] = peak
    rows.append(Row("mem", "aesthetic replica (ViT-L/14 fp16, batch 16) fits 0.25 of a 24 GB GPU", f"{peak:.2f} GB",
                    peak < 6.0))


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu_checks.py needs a CUDA GPU and this machine has none (torch.cuda.is_available() is "
              "False). Nothing was measured. Run it on one GPU, or `--device cpu --tiny` for the CPU smoke test "
              "of the script itself.", file=sys.stderr)
        return EXIT_NO_CUDA
    import torch.distributed as dist

    start = time.perf_counter()
    bench = Bench(args, torch)
    rows: list[Row] = []
    results: dict = {"device": str(bench.device), "model": bench.cfg.model.pretrained,
                     "steps": bench.cfg.sample.num_steps, "torch": torch.__version__}
    if bench.device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(bench.device)
        torch.cuda.set_device(bench.device)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if bench.device.type == "cuda" else "gloo",
                                init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            for check in (item1, item8):
                check(bench, rows, results)
        finally:
            dist.destroy_process_group()
    for check in (item3, item5, item6, memory):
        print(f"{check.__name__} ...", flush=True)
        check(bench, rows, results)
    results["seconds"] = time.perf_counter() - start
    results["rows"] = [asdict(r) | {"verdict": r.verdict} for r in rows]
    print_table(rows)
    failed = [r for r in rows if r.passed is False]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} rows pass or measured, {len(failed)} failed; "
          f"{results['seconds']:.0f} s on {results.get('gpu', bench.device)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"figures: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
