"""Pretrain the `tiny` text-to-image model on the procedural world, on a CPU, in minutes.

    python -m ddpo_ray.tiny.base_trainer                       # writes ddpo_ray/tiny/assets/base (shipped)
    python -m ddpo_ray.tiny.base_trainer --out /tmp/tiny --vae-steps 100 --unet-steps 200

Two stages, as Stable Diffusion was built:
1. the VAE (AutoencoderKL) learns to squeeze 64x64 world images into 16x16x4 latents;
   its latent std sets `scaling_factor` so diffusion sees unit-variance latents;
2. the UNet (UNet2DConditionModel) learns epsilon-prediction on those latents,
   cross-attending to the frozen MiniLM embeddings of full, partial and empty captions
   (the empty ones train the unconditional branch CFG needs).
The UNet's weights are an exponential moving average, which gives cleaner samples after a
short run. Everything is seeded; the output is diffusers-format UNet/VAE/scheduler folders
(fp16 safetensors, a few MB) that `load_tiny_pipeline` assembles with the MiniLM encoder.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from ddpo_ray.models.pipelines import (
    TINY_TEXT_MAX_LENGTH,
    minilm_text_encoder,
    minilm_tokenizer,
    sd_scheduler,
    tiny_unet_and_vae,
)
from ddpo_ray.tiny.world import make_batch, sample_caption

DEFAULT_OUT = Path(__file__).parent / "assets" / "base"


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _log(stage: str, step: int, total: int, start: float, **values: float) -> None:
    text = " ".join(f"{k} {v:.4f}" for k, v in values.items())
    print(f"[{stage}] step {step:5d}/{total} {text} | {time.perf_counter() - start:6.1f}s", flush=True)


def random_crops(images: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One random size x size crop of each image."""
    n, height, width, _ = images.shape
    ys = rng.integers(0, height - size + 1, n)
    xs = rng.integers(0, width - size + 1, n)
    return np.stack([im[y:y + size, x:x + size] for im, y, x in zip(images, ys, xs)])


def train_vae(
    vae: AutoencoderKL, steps: int, batch_size: int, lr: float, seed: int, log_every: int,
    crop_fraction: float = 0.85, crop_size: int = 32,
) -> None:
    """Reconstruction (MSE + L1) with a light KL, on freshly drawn world images each step.

    The VAE is fully convolutional, so the first `crop_fraction` of the steps train on
    32x32 crops (4x cheaper per image); the rest on full 64x64 images.
    """
    rng = np.random.default_rng([seed, 1])
    # Start the posterior narrow (log-variance -8): with the default 0 the decoder first sees
    # latents drowned in unit noise and needs hundreds of steps just to learn to shrink it.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, warmup=20))
    vae.train()
    start = time.perf_counter()
    for step in range(steps):
        images, _ = make_batch(rng, batch_size)
        if step < crop_fraction * steps:
            images = random_crops(images, crop_size, rng)
        x = to_model_space(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps - 1:
            _log("vae", step, steps, start, mse=mse.item(), loss=loss.item())
    vae.eval()


@torch.no_grad()
def vae_reconstruction_mse(vae: AutoencoderKL, num_images: int = 256, seed: int = 12345) -> float:
    """Mean squared error in [-1, 1] pixel space on world images the VAE never saw."""
    images, _ = make_batch(np.random.default_rng([seed, 99]), num_images)
    x = to_model_space(images)
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    return F.mse_loss(recon, x).item()


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, num_images: int, seed: int, captions_per_image: int):
    """A fixed training set: posterior mean/std of each image, and some captions of each."""
    rng = np.random.default_rng([seed, 2])
    means, stds, captions = [], [], []
    for start in range(0, num_images, 256):
        images, scenes = make_batch(rng, min(256, num_images - start))
        posterior = vae.encode(to_model_space(images)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += [[sample_caption(s, rng) for _ in range(captions_per_image)] for s in scenes]
    return torch.cat(means), torch.cat(stds), captions


@torch.no_grad()
def embed_captions(captions: list[str], tokenizer, text_encoder, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """MiniLM embeddings (fp16, to save memory) of every distinct caption."""
    unique = sorted(set(captions))
    table: dict[str, torch.Tensor] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start:start + batch_size]
        tokens = tokenizer(chunk, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        hidden = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        table.update(zip(chunk, hidden.half()))
    return table


def train_unet(
    unet: UNet2DConditionModel,
    means: torch.Tensor,
    stds: torch.Tensor,
    captions: list[list[str]],
    embeddings: dict[str, torch.Tensor],
    scaling_factor: float,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    ema_decay: float,
    log_every: int,
) -> UNet2DConditionModel:
    """Epsilon-prediction with min-SNR-5 loss weights; returns the EMA copy of the UNet."""
    generator = torch.Generator().manual_seed(seed)
    noise_scheduler = DDPMScheduler.from_config(sd_scheduler().config)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5, epsilon prediction
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, warmup=50))
    unet.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(means), (batch_size,), generator=generator)
        which = torch.randint(0, len(captions[0]), (batch_size,), generator=generator)
        latents = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=generator)
        latents = latents * scaling_factor
        text = torch.stack([embeddings[captions[i][w]] for i, w in zip(idx.tolist(), which.tolist())]).float()
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text).sample
        per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if step % log_every == 0 or step == steps - 1:
            _log("unet", step, steps, start, loss=loss.item(), mse=per_sample.mean().item())
    unet.eval()
    return ema.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpo_ray.tiny.base_trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--dataset-images", type=int, default=8000)
    parser.add_argument("--captions-per-image", type=int, default=2)
    parser.add_argument("--unet-steps", type=int, default=1000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    tokenizer, text_encoder = minilm_tokenizer(TINY_TEXT_MAX_LENGTH), minilm_text_encoder()
    unet, vae = tiny_unet_and_vae(text_encoder.config.hidden_size)
    print(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
          f"VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params", flush=True)

    train_vae(vae, args.vae_steps, args.vae_batch, args.vae_lr, args.seed, args.log_every)
    vae.requires_grad_(False)
    recon_mse = vae_reconstruction_mse(vae)
    print(f"VAE held-out reconstruction MSE {recon_mse:.4f} ([-1, 1] pixels) "
          f"after {time.perf_counter() - started:.0f}s", flush=True)

    means, stds, captions = encode_dataset(vae, args.dataset_images, args.seed, args.captions_per_image)
    scaling_factor = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    embeddings = embed_captions([c for per_image in captions for c in per_image], tokenizer, text_encoder)
    print(f"dataset: {len(means)} images, {len(embeddings)} distinct captions, latent scaling factor "
          f"{scaling_factor:.4f}, after {time.perf_counter() - started:.0f}s", flush=True)

    ema_unet = train_unet(unet, means, stds, captions, embeddings, scaling_factor, args.unet_steps,
                          args.unet_batch, args.unet_lr, args.seed, args.ema_decay, args.log_every)

    args.out.mkdir(parents=True, exist_ok=True)
    ema_unet.to(torch.float16).save_pretrained(args.out / "unet")
    vae.to(torch.float16).save_pretrained(args.out / "vae")
    sd_scheduler().save_pretrained(args.out / "scheduler")
    total = time.perf_counter() - started
    report = {"seed": args.seed, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
              "dataset_images": args.dataset_images, "vae_heldout_mse": recon_mse,
              "scaling_factor": scaling_factor, "train_seconds": round(total, 1),
              "threads": args.threads, "text_max_length": TINY_TEXT_MAX_LENGTH}
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} in {total:.0f}s total", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
