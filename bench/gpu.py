"""Throughput on one GPU (issue 16): sampler images/s, learner (sample, timestep) pairs/s, their
achieved TFLOP/s and MFU, peak GPU memory per phase, and the weight-sync latency, as a table.

    python bench/gpu.py                          # one CUDA GPU, offline, well under 8 minutes on an H100
    python bench/gpu.py --device cpu --tiny      # the same code on the tiny model (CPU smoke test)
    python bench/gpu.py --peak-tflops 989        # a GPU the peak table below does not know

Offline: the `sd15_random` preset (SD1.5's UNet/VAE/CLIP text-encoder shapes at random init) at
512 px, 50 DDIM steps, CFG (guidance 5), bf16, LoRA rank 4 with B given random values. One process
holds a sampler and a learner, each built as the product builds them, and times them with the
product's own code:
  sampler  `ddpo_ray.distributed.sampler.Sampler.sample` (what the sampler actor calls: weights,
           `MergedLora.merged_for_sampling`, `sample_batch`, the CPU copy sent to the learner), its
           reward client replaced by one that scores nothing; one counted warm-up batch, then
           `--batches` timed batches of `--batch` images;
  learner  `load_pipeline` + `drop_sampling_modules` + `make_trainer_state` + `train_inner_epochs`
           (what each learner worker runs, one worker so no DDP) on `--train-samples` of the timed
           trajectories, one optimizer step over them; a counted warm-up call on one minibatch
           first. In bf16 this includes `train.recompute_old_log_probs` (on in sd15_*): one no-grad
           forward per stored step;
  sync     learner `transport.publish(trainable_state_dict(unet))`, sampler `apply_weights` (fetch
           + load into its UNet), then the re-merge (entering and leaving `merged_for_sampling`;
           nothing to merge for a bf16 UNet, which samples unmerged). Median of `--sync-repeats`.
           The transport is `InProcessTransport` (no Ray here): the object store's put/get of the
           ~3 MB LoRA is not in the figure.

FLOPs are counted from the shapes the real modules see, with forward hooks on every Conv2d, Linear
and diffusers `Attention` module (2 FLOPs per multiply-accumulate, biases, norms and elementwise
ops left out): Linear = output elements x in_features; Conv2d = output elements x in_channels /
groups x kernel area; Attention = Q K^T plus A V = 2 x batch x query tokens x key tokens x inner
dim. The text encoder's Linear layers are counted (its own 77x77 attention matmuls are not, <1%).
  sampling per image = (steps x one CFG UNet forward of 2 x batch rows + VAE decode) / batch,
           counted on the warm-up batch as it ran. The text encoder is left out: a sampler encodes
           each distinct prompt once (`ddpo_ray.models.prompt_embeddings`), so the timed batches,
           which repeat the warm-up's prompts, encode none; its count per new prompt is reported;
  training per pair = forward with CFG (train.cfg) x (1 + backward/forward) + the recompute's
           no-grad forward (bf16). The backward is not assumed 2x the forward: the base UNet is
           frozen, so autograd computes input gradients but no weight gradients outside the LoRA
           (about 1x). The ratio is measured with torch's FlopCounterMode on one training step
           (on the CPU that counter leaves attention out of both halves).
MFU = achieved / peak dense bf16 TFLOP/s of the GPU (PEAK_TFLOPS by device name, or --peak-tflops);
"n/a" on the CPU. Peak memory: torch.cuda.max_memory_allocated above what the phase started with
(reset between phases), next to what each model holds resident; "n/a" on the CPU.
Budget, by the count above (SD1.5: 0.80 TFLOP per UNet row at 64x64 latents, 2.5 TFLOP per 512 px VAE
decode): 5 sampling batches of 8 are ~3.3 PFLOP, training 32 + 4 samples x 50 steps ~8.4 PFLOP, so
~12 PFLOP: 2 minutes at 10% MFU of an H100, plus building two random-init pipelines on the CPU.
Exit status: 0 measured, 2 no CUDA device (and --device cpu not given). Figures also go to --out.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import sys
import time
from pathlib import Path

EXIT_NO_CUDA = 2
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core TFLOP/s (no sparsity), from the vendors' data sheets; the first name
# contained in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
)
GB = 2**30


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return tflops
    return None


# --- FLOPs from the modules' shapes -----------------------------------------------------------


def linear_macs(module, output) -> int:
    return output.numel() * module.in_features


def conv2d_macs(module, output) -> int:
    kh, kw = module.kernel_size
    return output.numel() * (module.in_channels // module.groups) * kh * kw


def _tokens(x) -> int:
    return x.shape[2] * x.shape[3] if x.ndim == 4 else x.shape[1]


def attention_macs(module, hidden_states, encoder_hidden_states) -> int:
    """Q K^T and A V of one diffusers Attention call: 2 x B x Lq x Lk x inner_dim."""
    keys = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    return 2 * hidden_states.shape[0] * _tokens(hidden_states) * _tokens(keys) * module.inner_dim


class FlopCounter:
    """Inside the block, forward hooks count the MACs of every Conv2d, Linear and Attention module
    of the named components, per (component, grad mode): `flops("unet", grad=False)`."""

    def __init__(self, **components):
        self.components = components
        self.macs: collections.Counter = collections.Counter()

    def __enter__(self) -> "FlopCounter":
        import torch
        from diffusers.models.attention_processor import Attention

        self._handles = []
        for name, root in self.components.items():
            for module in root.modules():
                if isinstance(module, torch.nn.Linear):
                    hook = functools.partial(self._layer, name, linear_macs)
                    self._handles.append(module.register_forward_hook(hook))
                elif isinstance(module, torch.nn.Conv2d):
                    hook = functools.partial(self._layer, name, conv2d_macs)
                    self._handles.append(module.register_forward_hook(hook))
                elif isinstance(module, Attention):
                    hook = functools.partial(self._attention, name)
                    self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _layer(self, name, macs, module, args, output) -> None:
        import torch

        self.macs[name, torch.is_grad_enabled()] += macs(module, output)

    def _attention(self, name, module, args, kwargs, output) -> None:
        import torch

        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.macs[name, torch.is_grad_enabled()] += attention_macs(module, hidden, context)

    def flops(self, component: str | None = None, grad: bool | None = None) -> int:
        return 2 * sum(m for (name, g), m in self.macs.items()
                       if component in (None, name) and grad in (None, g))


def backward_forward_ratio(step) -> float:
    """FLOPs of the backward / FLOPs of the forward of `step()` (which returns a scalar loss),
    both counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as forward:
        loss = step()
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    return backward.get_total_flops() / forward.get_total_flops()


# --- the benchmark ----------------------------------------------------------------------------


class NoRewards:
    """The reward client's `submit`, scoring nothing: the sampler is timed, not the rewards."""

    def submit(self, images, prompts):
        return None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: the smoke test)")
    parser.add_argument("--tiny", action="store_true", help="the tiny-random model at 64x64 instead of sd15-random")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; 2 on the CPU)")
    parser.add_argument("--batch", type=int, default=None, help="images per sampling batch (default 8; 2 on the CPU)")
    parser.add_argument("--batches", type=int, default=None, help="timed sampling batches (default 4; 2 on the CPU)")
    parser.add_argument("--train-samples", type=int, default=None,
                        help="trajectories trained on, all steps, one optimizer step (default 32, one sd15_* "
                        "worker's step; 2 on the CPU)")
    parser.add_argument("--sync-repeats", type=int, default=5, help="timed weight syncs (after one untimed)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own on a GPU machine, 1 with --device cpu, "
                        "where a shared CPU made more threads many times slower)")
    parser.add_argument("--out", default="bench/results/gpu.json")
    return parser.parse_args(argv)


def overrides_for(args, cpu: bool) -> list[str]:
    steps = args.steps or (2 if cpu else 50)
    batch = args.batch or (2 if cpu else 8)
    train_batch = 1 if cpu else 4  # sd15_*'s train.batch_size
    out = [f"sample.num_steps={steps}", f"sample.batch_size={batch}", f"train.batch_size={train_batch}",
           "metrics=false"]
    if args.tiny:
        out += ["model.pretrained=tiny-random", "sample.resolution=64"]
    if cpu:  # bf16 is a GPU question (and CPU bf16 kernels are slow): fp32, so the LoRA merges
        out += ['model.mixed_precision="no"']  # quoted: YAML reads a bare no as False
    return out


def synchronize(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Memory:
    """torch.cuda memory of a phase: what it started with and its peak above that (None on CPU)."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def allocated(self) -> float | None:
        return self.torch.cuda.memory_allocated() / GB if self.cuda else None

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self._base = self.torch.cuda.memory_allocated()

    def peak_above_start(self) -> float | None:
        if not self.cuda:
            return None
        self.torch.cuda.synchronize()
        return (self.torch.cuda.max_memory_allocated() - self._base) / GB


def randomize_lora_b(torch, unet, seed: int = 0) -> None:
    """LoRA B starts at zero (the adapter does nothing); give it values, as a trained one has."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param.device) * 0.02)


def run(args) -> dict:
    import torch

    from ddpo_ray.config import build_config
    from ddpo_ray.distributed.sampler import Sampler, SampleTask
    from ddpo_ray.distributed.weight_transport import InProcessTransport
    from ddpo_ray.infra.hf_loading import compute_dtype
    from ddpo_ray.maths.diffusion import Trajectories, gaussian_log_prob, policy_step_mean, predict_noise
    from ddpo_ray.models.lora import trainable_state_dict
    from ddpo_ray.models.pipelines import drop_sampling_modules, load_pipeline
    from ddpo_ray.training.steps import make_trainer_state, train_guidance_scale, train_inner_epochs

    started = time.perf_counter()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if args.threads or cpu:
        torch.set_num_threads(args.threads or 1)
    if not cpu:  # "cuda" names no index, which torch.cuda.set_device refuses
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    overrides = overrides_for(args, cpu)
    cfg = build_config(preset="sd15_random", overrides=overrides)
    sample, train = cfg.sample, cfg.train
    dtype = compute_dtype(cfg.model.mixed_precision)
    batch, steps = sample.batch_size, sample.num_steps
    num_batches = args.batches or (2 if cpu else 4)
    train_samples = args.train_samples or (2 if cpu else 32)
    if train_samples > batch * num_batches or train_samples % train.batch_size:
        raise SystemExit(f"--train-samples={train_samples} must be a multiple of train.batch_size={train.batch_size} "
                         f"and at most the {batch * num_batches} sampled (--batch x --batches)")
    # One optimizer step over the trained samples (sd15_*: 8 minibatches of 4 per worker and step).
    train_cfg = build_config(preset="sd15_random", overrides=[
        *overrides, f"train.gradient_accumulation_steps={train_samples // train.batch_size}"])
    warm_cfg = build_config(preset="sd15_random", overrides=[*overrides, "train.gradient_accumulation_steps=1"])
    memory = Memory(torch, device)
    gpu = torch.cuda.get_device_name(device) if not cpu else None
    peak = peak_tflops(gpu, args.peak_tflops) if gpu else None
    results: dict = {
        "device": str(device), "gpu": gpu, "peak_tflops": peak, "torch": torch.__version__,
        "model": cfg.model.pretrained, "resolution": sample.resolution, "steps": steps, "batch": batch,
        "guidance_scale": sample.guidance_scale, "mixed_precision": cfg.model.mixed_precision,
        "train_batch_size": train.batch_size, "train_cfg": train.cfg, "train_samples": train_samples,
        "recompute_old_log_probs": cfg.recompute_old_log_probs, "overrides": overrides,
    }

    # The sampler and the learner, each as the product builds it.
    before = memory.allocated()
    sampler = Sampler(cfg, device=device, transport=InProcessTransport(), reward_client=NoRewards())
    sampler_resident = None if cpu else memory.allocated() - before
    before = memory.allocated()
    pipe = drop_sampling_modules(load_pipeline(cfg.model, device, seed=cfg.seed))
    trainer = make_trainer_state(pipe, train_cfg)
    learner_resident = None if cpu else memory.allocated() - before
    randomize_lora_b(torch, pipe.unet)
    transport = InProcessTransport()
    weights = transport.publish(trainable_state_dict(pipe.unet, cfg.model.use_lora), version=0)
    results["merged_sampling"] = bool(sampler.merged_lora.layers)
    print(f"{cfg.model.pretrained} sampler and learner ready in {time.perf_counter() - started:.0f} s", flush=True)

    # --- sampling
    prompts = tuple(f"a photo of animal number {i}" for i in range(batch))
    tasks = [SampleTask(epoch=0, batch_index=b, prompts=prompts) for b in range(num_batches + 1)]
    spipe = sampler.pipe
    with FlopCounter(unet=spipe.unet, vae=spipe.vae, text_encoder=spipe.text_encoder) as counted:
        first = sampler.sample(tasks[0], weights)  # warm-up, loads the weights, counted
    with sampler.merged_lora.merged_for_sampling(), torch.no_grad(), FlopCounter(unet=spipe.unet) as one:
        predict_noise(spipe.unet, first.latents[:, 0].to(device), first.timesteps[:, 0].to(device),
                      first.prompt_embeds.to(device), first.negative_prompt_embeds.to(device),
                      sample.guidance_scale, dtype)
    memory.start()
    start = time.perf_counter()
    sampled = [sampler.sample(task, weights) for task in tasks[1:]]
    synchronize(torch, device)
    sampling_s = time.perf_counter() - start
    sampling_peak = memory.peak_above_start()
    images_per_s = batch * num_batches / sampling_s
    flops_image = (counted.flops("unet") + counted.flops("vae")) / batch  # the timed batches encode no text
    print(f"sampling: {batch * num_batches} images in {sampling_s:.1f} s", flush=True)

    # --- training
    trajectories = Trajectories.concat(sampled).select(range(train_samples)).to(device)  # as assemble_shard
    advantages = torch.randn(train_samples, generator=torch.Generator().manual_seed(0)).to(device)
    size = train.batch_size
    with FlopCounter(unet=pipe.unet) as warm:  # warm-up: one minibatch, every step, counted
        train_inner_epochs(pipe.unet, pipe.scheduler, trainer.optimizer, trainer.params,
                           trajectories.select(range(size)), advantages[:size], warm_cfg, epoch=0,
                           grad_scaler=trainer.grad_scaler)
    warm_pairs = size * warm_cfg.num_train_timesteps * train.num_inner_epochs
    forward_pair = warm.flops(grad=True) / warm_pairs
    recompute_row_step = warm.flops(grad=False) / (size * steps)  # 0 unless recomputing

    def one_training_step():
        minibatch = trajectories.select(range(size))
        pipe.scheduler.set_timesteps(steps, device=device)
        pipe.unet.train()
        mean, std = policy_step_mean(
            pipe.unet, pipe.scheduler, minibatch.latents[:, 0], minibatch.timesteps[:, 0],
            minibatch.prompt_embeds, minibatch.negative_prompt_embeds,
            guidance_scale=train_guidance_scale(cfg), eta=sample.eta, compute_dtype=dtype)
        return gaussian_log_prob(minibatch.next_latents[:, 0], mean, std).mean()

    with FlopCounter(unet=pipe.unet) as train_forward:
        ratio = backward_forward_ratio(one_training_step)
    trainer.optimizer.zero_grad(set_to_none=True)
    pipe.unet.eval()
    memory.start()
    start = time.perf_counter()
    metrics = train_inner_epochs(pipe.unet, pipe.scheduler, trainer.optimizer, trainer.params, trajectories,
                                 advantages, train_cfg, epoch=0, grad_scaler=trainer.grad_scaler)
    synchronize(torch, device)
    training_s = time.perf_counter() - start
    training_peak = memory.peak_above_start()
    pairs = train_samples * train_cfg.num_train_timesteps * train.num_inner_epochs
    flops_pair = forward_pair * (1 + ratio) + recompute_row_step * train_samples * steps / pairs
    pairs_per_s = pairs / training_s
    print(f"training: {pairs} pairs in {training_s:.1f} s ({metrics['optimizer_steps']:.0f} optimizer step)",
          flush=True)

    # --- weight sync: publish on the learner, load (and re-merge) on the sampler
    parts = collections.defaultdict(list)
    for version in range(1, args.sync_repeats + 2):
        synchronize(torch, device)
        t0 = time.perf_counter()
        weights = transport.publish(trainable_state_dict(pipe.unet, cfg.model.use_lora), version)
        t1 = time.perf_counter()
        sampler.apply_weights(weights)
        synchronize(torch, device)
        t2 = time.perf_counter()
        with sampler.merged_lora.merged_for_sampling():
            synchronize(torch, device)
        t3 = time.perf_counter()
        if version > 1:  # the first is the warm-up
            parts["publish"].append(t1 - t0)
            parts["apply"].append(t2 - t1)
            parts["merge"].append(t3 - t2)
            parts["total"].append(t3 - t0)
    sync = {name: statistics.median(values) for name, values in parts.items()}

    def tflops(flops_per_unit, units_per_s):
        return flops_per_unit * units_per_s / 1e12

    def mfu(achieved):
        return None if peak is None else achieved / peak

    sampler_tflops = tflops(flops_image, images_per_s)
    learner_tflops = tflops(flops_pair, pairs_per_s)
    results["flops"] = {
        "sampling_per_image": flops_image,
        "sampling_unet_per_image": counted.flops("unet") / batch,
        "sampling_vae_per_image": counted.flops("vae") / batch,
        "text_per_new_prompt": counted.flops("text_encoder") / (len(set(prompts)) + 1),  # + the empty prompt
        "unet_cfg_forward_sampling_batch": one.flops(),  # one CFG UNet call at the sampling batch
        "unet_cfg_forward_train_minibatch": train_forward.flops(),  # one at the training minibatch, with grad
        "train_forward_per_pair": forward_pair,
        "train_recompute_per_row_step": recompute_row_step,
        "backward_forward_ratio": ratio,
        "train_per_pair": flops_pair,
    }
    results["metrics"] = {
        "sampler_images_per_s": images_per_s,
        "sampler_tflops": sampler_tflops,
        "sampler_mfu": mfu(sampler_tflops),
        "sampler_peak_memory_gb": sampling_peak,
        "sampler_resident_memory_gb": sampler_resident,
        "learner_pairs_per_s": pairs_per_s,
        "learner_tflops": learner_tflops,
        "learner_mfu": mfu(learner_tflops),
        "learner_peak_memory_gb": training_peak,
        "learner_resident_memory_gb": learner_resident,
        "sync_latency_s": sync["total"],
        "sync_publish_s": sync["publish"],
        "sync_apply_s": sync["apply"],
        "sync_merge_s": sync["merge"],
    }
    results["seconds"] = {"sampling": sampling_s, "training": training_s,
                          "total": time.perf_counter() - started}
    return results


def table_rows(results: dict) -> list[tuple[str, str, str]]:
    m, f = results["metrics"], results["flops"]

    def value(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    merged = "merged" if results["merged_sampling"] else "unmerged"
    recompute = " + recompute" if results["recompute_old_log_probs"] else ""
    return [
        ("sampler throughput", value(m["sampler_images_per_s"], ".3g"), "images/s"),
        ("sampling FLOPs per image (UNet + VAE)", value(f["sampling_per_image"] / 1e12, ".4g"), "TFLOP"),
        ("  of which UNet / VAE decode", f"{f['sampling_unet_per_image'] / 1e12:.4g} / "
         f"{f['sampling_vae_per_image'] / 1e12:.4g}", "TFLOP"),
        ("sampler achieved", value(m["sampler_tflops"], ".3g"), "TFLOP/s"),
        ("sampler MFU", value(m["sampler_mfu"], ".1%"), ""),
        ("sampler peak memory above the phase's start", value(m["sampler_peak_memory_gb"], ".2f"), "GB"),
        ("sampler model resident", value(m["sampler_resident_memory_gb"], ".2f"), "GB"),
        ("learner throughput", value(m["learner_pairs_per_s"], ".3g"), "(sample, timestep) pairs/s"),
        (f"training FLOPs per pair (fwd x (1 + bwd/fwd){recompute})", value(f["train_per_pair"] / 1e12, ".4g"),
         "TFLOP"),
        ("  backward / forward FLOPs (FlopCounterMode)", value(f["backward_forward_ratio"], ".3f"), ""),
        ("learner achieved", value(m["learner_tflops"], ".3g"), "TFLOP/s"),
        ("learner MFU", value(m["learner_mfu"], ".1%"), ""),
        ("learner peak memory above the phase's start", value(m["learner_peak_memory_gb"], ".2f"), "GB"),
        ("learner model + trainer resident", value(m["learner_resident_memory_gb"], ".2f"), "GB"),
        (f"sync latency (publish + apply + re-merge, {merged})", value(m["sync_latency_s"] * 1e3, ".3g"), "ms"),
        ("  publish / apply / re-merge", f"{m['sync_publish_s'] * 1e3:.3g} / {m['sync_apply_s'] * 1e3:.3g} / "
         f"{m['sync_merge_s'] * 1e3:.3g}", "ms"),
        ("elapsed", f"{results['seconds']['total']:.0f}", "s"),
    ]


def print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"\n{'metric':<{width}}  {'value':>{vwidth}}  unit")
    for metric, value, unit in rows:
        print(f"{metric:<{width}}  {value:>{vwidth}}  {unit}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False). "
              "Nothing was measured. Run it on one GPU, or `--device cpu --tiny` for the CPU smoke test of the "
              "script itself.", file=sys.stderr)
        return EXIT_NO_CUDA
    results = run(args)
    rows = table_rows(results)
    results["rows"] = [{"metric": m, "value": v, "unit": u} for m, v, u in rows]
    print(f"\n{results['model']} at {results['resolution']} px, {results['steps']} steps, CFG "
          f"{results['guidance_scale']}, {results['mixed_precision'].replace('no', 'fp32')}, "
          f"sampling batch {results['batch']}, "
          f"training minibatch {results['train_batch_size']}, on {results['gpu'] or results['device']}"
          + (f" (peak {results['peak_tflops']:g} TFLOP/s)" if results["peak_tflops"] else ""))
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
