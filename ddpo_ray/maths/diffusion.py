"""DDIM sampling as a policy: each denoising step is a Gaussian action with a log-probability.

DDPO treats x_{t-1} ~ N(mean(x_t, t, c), std_t^2 I) as the action taken at state (x_t, t, c).
`ddim_step_with_logprob` is diffusers' DDIM step that also returns log p(x_{t-1} | x_t),
`sample_trajectories` records every (x_t, t, x_{t-1}, log p) of a batch, and
`trajectory_log_prob` recomputes log p under the current weights for the PPO ratio. No Ray here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from ddpo_ray.models.prompt_embeddings import encode_prompts

_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) so it broadcasts against a (B, C, H, W) tensor."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def _schedule_on(scheduler: DDIMScheduler, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas_cumprod, final_alpha_cumprod) as fp32 on `device`, copied there once per scheduler
    and device, not at every step (a host-to-device copy and a sync per UNet call on a GPU)."""
    source = scheduler.alphas_cumprod
    cache = getattr(scheduler, "_ddpo_schedule_cache", None)
    if cache is None or cache[0] is not source:  # a new schedule replaces the cache
        cache = (source, {})
        scheduler._ddpo_schedule_cache = cache
    if device not in cache[1]:
        cache[1][device] = (
            source.to(device=device, dtype=torch.float32),
            torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).to(device),
        )
    return cache[1][device]


def ddim_step_mean(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian policy of one DDIM step x_t -> x_{t-1}: its mean and std, in fp32.

    x_{t-1} ~ N(mean, std^2 I). With eta = 0, std is 0 and `mean` is diffusers' deterministic
    DDIM step. `timestep` is an int or a (B,) tensor. The std depends only on the schedule and
    eta, never on the weights, so two policies' step distributions differ only in their means
    (which makes their KL ||mean_1 - mean_2||^2 / (2 std^2), see `ddpo_ray.maths.ppo.step_kl`).
    Returns (mean (B, C, H, W), std broadcastable to it).
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.num_inference_steps is None: call scheduler.set_timesteps() first")
    if scheduler.config.thresholding:
        raise ValueError("DDIMScheduler(thresholding=True) is not supported by ddim_step_with_logprob")
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")

    device = sample.device
    batch = sample.shape[0]
    t = torch.as_tensor(timestep, device=device, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timestep has shape {tuple(t.shape)}; expected () or ({batch},)")
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps

    alphas_cumprod, final_alpha = _schedule_on(scheduler, device)
    alpha_t = _per_sample(alphas_cumprod[t], sample)
    alpha_prev = _per_sample(
        torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final_alpha), sample
    )
    beta_t = 1 - alpha_t

    x_t = sample.float()
    out = model_output.float()
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_x0 = (x_t - beta_t.sqrt() * out) / alpha_t.sqrt()
        pred_eps = out
    elif prediction_type == "sample":
        pred_x0 = out
        pred_eps = (x_t - alpha_t.sqrt() * pred_x0) / beta_t.sqrt()
    elif prediction_type == "v_prediction":
        pred_x0 = alpha_t.sqrt() * x_t - beta_t.sqrt() * out
        pred_eps = alpha_t.sqrt() * out + beta_t.sqrt() * x_t
    else:
        raise ValueError(
            f"scheduler prediction_type={prediction_type!r}; expected epsilon, sample or v_prediction"
        )
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_x0 = pred_x0.clamp(-limit, limit)

    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - std**2).sqrt() * pred_eps
    return mean, std


def step_score_scale(scheduler: DDIMScheduler, timesteps: torch.Tensor, eta: float) -> torch.Tensor:
    """|d mean / d model output| / std of the DDIM step at each of `timesteps` (B,): how large a
    step's log-prob gradient is per unit of change in the UNet's output.

    log N(x; mean, std^2) has gradient (x - mean) / std^2 * d mean, i.e. (noise / std) times
    d mean, so low-noise steps (small std) give scores many times larger than high-noise ones.
    The mean is affine in the model output, so the slope is read off two evaluations at a
    small output (small enough that clip_sample never clips). Depends only on the schedule.
    """
    if eta <= 0:
        raise ValueError(f"eta={eta}: the step score scale needs a stochastic step (eta > 0)")
    timesteps = torch.as_tensor(timesteps)
    zeros = torch.zeros(timesteps.shape[0], 1, 1, 1)
    delta = 1e-3
    mean_0, std = ddim_step_mean(scheduler, zeros, timesteps.cpu(), zeros, eta)
    mean_d, _ = ddim_step_mean(scheduler, zeros + delta, timesteps.cpu(), zeros, eta)
    slope = ((mean_d - mean_0) / delta).abs()
    if bool((std == 0).any()):
        raise ValueError(f"timesteps {timesteps[std.flatten() == 0].tolist()} have a deterministic step (std 0): "
                         "no log-prob to weight; schedule them with a std > 0 (e.g. steps_offset=1)")
    return (slope / std).flatten().to(timesteps.device)


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} and its log-density, per sample.

    `timestep` is an int or a (B,) tensor (training sees a different timestep per sample).
    If `prev_sample` is given it is scored, not drawn; else x_{t-1} = mean + std * z with z the
    standard normal `noise` if given (branched sampling chooses it), else drawn from
    `generator`. The maths runs in fp32 whatever the input dtype, because the PPO clip range
    (1e-4) is below bf16's resolution.
    Returns (prev_sample in `sample`'s dtype, log_prob of shape (B,)).
    """
    mean, std = ddim_step_mean(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        if noise is None:
            noise = randn_tensor(mean.shape, generator=generator, device=sample.device, dtype=torch.float32)
        elif noise.shape != mean.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {tuple(mean.shape)}")
        noise = noise.to(device=sample.device, dtype=torch.float32)
        prev_sample = (mean + std * noise).to(sample.dtype)
    elif prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample has shape {tuple(prev_sample.shape)}; expected {tuple(sample.shape)}")

    # Score the value actually returned/stored (after any cast), so sampling and training agree.
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I), averaged over all non-batch dimensions: (B,), fp32.

    The mean, not the sum, over pixels: the sum is ~1e4 times larger and overflows the 1e-4
    PPO clip range.
    """
    log_prob = -((x.float() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


@dataclass
class Trajectories:
    """A batch of denoising trajectories: B samples (rows) x T denoising steps (columns).

    Everything PPO needs to recompute a step's log-probability under new weights, plus the
    decoded images the reward models score and the policy version that sampled each row.
    """

    prompts: list[str]
    prompt_embeds: torch.Tensor  # (B, L, D) text embeddings of the prompts
    negative_prompt_embeds: torch.Tensor  # (B, L, D) empty-prompt embeddings, for CFG
    timesteps: torch.Tensor  # (B, T) int64, the timestep t of each step
    latents: torch.Tensor  # (B, T, C, h, w) x_t, the UNet input at each step
    next_latents: torch.Tensor  # (B, T, C, h, w) x_{t-1}, the action drawn at each step
    log_probs: torch.Tensor  # (B, T) log p(x_{t-1} | x_t) under the sampling policy
    images: torch.Tensor  # (B, H, W, 3) uint8, decoded final latents
    policy_versions: torch.Tensor  # (B,) int64, the weights version that sampled each row

    _TENSORS = (
        "prompt_embeds", "negative_prompt_embeds", "timesteps", "latents",
        "next_latents", "log_probs", "images", "policy_versions",
    )

    def __post_init__(self) -> None:
        batch = len(self.prompts)
        for name in self._TENSORS:
            value = getattr(self, name)
            if value.shape[0] != batch:
                raise ValueError(f"Trajectories.{name} has {value.shape[0]} rows; expected {batch} (one per prompt)")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    def select(self, index: torch.Tensor | Sequence[int]) -> "Trajectories":
        """The rows at `index`, in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        values = {name: getattr(self, name)[index.to(getattr(self, name).device)] for name in self._TENSORS}
        return Trajectories(prompts=[self.prompts[i] for i in index.tolist()], **values)

    def for_transport(self, keep_images: bool = True) -> "Trajectories":
        """Compact CPU copies of every tensor, for pickling to another process.

        Ray pickles a tensor with its device (a CUDA tensor deserialises onto that GPU index in
        the receiver, or fails where there is none) and with its whole storage (a slice such as
        `images[:, :0, :0]` would carry every pixel). Without `keep_images` the rows keep an
        empty (B, 0, 0, 3) image.
        """
        values = {}
        for name in self._TENSORS:
            value = getattr(self, name)
            if name == "images" and not keep_images:
                value = value[:, :0, :0]
            values[name] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        return Trajectories(prompts=list(self.prompts), **values)

    def to(self, device: torch.device | str) -> "Trajectories":
        values = {name: getattr(self, name).to(device) for name in self._TENSORS}
        return Trajectories(prompts=list(self.prompts), **values)

    @staticmethod
    def concat(parts: Sequence["Trajectories"]) -> "Trajectories":
        if not parts:
            raise ValueError("Trajectories.concat needs at least one batch")
        values = {name: torch.cat([getattr(p, name) for p in parts]) for name in Trajectories._TENSORS}
        return Trajectories(prompts=[q for p in parts for q in p.prompts], **values)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for UNet calls; a no-op in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def predict_noise(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    guidance_scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The UNet's (classifier-free guided) noise prediction, in fp32.

    eps = eps_uncond + w (eps_cond - eps_uncond) when w > 1; one conditional pass otherwise.
    Sampling and training both call this, so they compute the same policy.
    """
    with autocast(latents.device, compute_dtype):
        if guidance_scale > 1.0:
            both = unet(
                torch.cat([latents, latents]),
                torch.cat([timesteps, timesteps]),
                encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
            ).sample
            eps_uncond, eps_cond = both.float().chunk(2)
            return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        return unet(latents, timesteps, encoder_hidden_states=prompt_embeds).sample.float()


@torch.no_grad()
def decode_images(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """Final latents -> (B, H, W, 3) uint8 images on the CPU (as the pipeline's "np" output)."""
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def sample_trajectories(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    resolution: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    policy_version: int = 0,
    initial_noise: torch.Tensor | None = None,
    step_noise: torch.Tensor | None = None,
) -> Trajectories:
    """Run DDIM with log-probs for `prompts`, recording every step, and decode the images.

    Latents stay fp32 between steps (the UNet itself may run in `compute_dtype`). x_T is drawn
    from `generator` unless `initial_noise` (standard normal, one latent per prompt) is given;
    the step noise likewise, unless `step_noise` (B, T, C, h, w) gives every step's z.
    """
    if not prompts:
        raise ValueError("sample_trajectories needs at least one prompt")
    unet, scheduler = pipe.unet, pipe.scheduler
    device = unet.device
    batch = len(prompts)
    prompt_embeds, negative_prompt_embeds = encode_prompts(pipe, prompts)

    scheduler.set_timesteps(num_steps, device=device)
    latent_size = resolution // pipe.vae_scale_factor
    shape = (batch, unet.config.in_channels, latent_size, latent_size)
    if initial_noise is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    elif tuple(initial_noise.shape) != shape:
        raise ValueError(f"initial_noise has shape {tuple(initial_noise.shape)}; expected {shape}")
    else:
        latents = initial_noise.to(device=device, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    if step_noise is not None and tuple(step_noise.shape) != (batch, num_steps, *shape[1:]):
        raise ValueError(f"step_noise has shape {tuple(step_noise.shape)}; expected {(batch, num_steps, *shape[1:])}")

    all_latents, all_next, all_log_probs = [], [], []
    for j, t in enumerate(scheduler.timesteps):
        timesteps = t.expand(batch).to(device)
        eps = predict_noise(
            unet, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale, compute_dtype
        )
        next_latents, log_prob = ddim_step_with_logprob(
            scheduler, eps, timesteps, latents, eta=eta, generator=generator,
            noise=None if step_noise is None else step_noise[:, j],
        )
        all_latents.append(latents)
        all_next.append(next_latents)
        all_log_probs.append(log_prob)
        latents = next_latents

    return Trajectories(
        prompts=list(prompts),
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        timesteps=scheduler.timesteps.to(device).long().unsqueeze(0).expand(batch, -1).clone(),
        latents=torch.stack(all_latents, dim=1),
        next_latents=torch.stack(all_next, dim=1),
        log_probs=torch.stack(all_log_probs, dim=1),
        images=decode_images(pipe, latents),
        policy_versions=torch.full((batch,), policy_version, dtype=torch.long),
    )


@torch.no_grad()
def generate_images(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    initial_latents: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float,
    compute_dtype: torch.dtype = torch.float32,
    eta: float = 0.0,
    step_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM from given initial latents, with no randomness of its own: (B, H, W, 3) uint8 images.

    For evaluation: with the noise fixed, the image depends only on the weights, so the same
    cell of an eval grid shows one image evolving over a run. eta 0: deterministic DDIM. eta > 0
    (the policy DDPO trains): step k adds std_k * step_noise[:, k], so `step_noise` (B, num_steps,
    *latent shape) is required and fixed by the caller.
    """
    if len(prompts) != initial_latents.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but {initial_latents.shape[0]} initial latents")
    if eta > 0 and (step_noise is None or tuple(step_noise.shape) != (len(prompts), num_steps, *initial_latents.shape[1:])):
        raise ValueError(
            f"eta={eta} needs step_noise of shape {(len(prompts), num_steps, *initial_latents.shape[1:])}, got "
            f"{None if step_noise is None else tuple(step_noise.shape)}"
        )
    unet, scheduler = pipe.unet, pipe.scheduler
    device = unet.device
    prompt_embeds, negative_prompt_embeds = encode_prompts(pipe, prompts)
    scheduler.set_timesteps(num_steps, device=device)
    latents = initial_latents.to(device, torch.float32) * scheduler.init_noise_sigma
    for k, t in enumerate(scheduler.timesteps):
        timesteps = t.expand(len(prompts)).to(device)
        latents, std = policy_step_mean(
            unet, scheduler, latents, timesteps, prompt_embeds, negative_prompt_embeds,
            guidance_scale=guidance_scale, eta=eta, compute_dtype=compute_dtype,
        )
        if eta > 0:
            latents = latents + std * step_noise[:, k].to(device, torch.float32)
    return decode_images(pipe, latents)


def policy_step_mean(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    *,
    guidance_scale: float,
    eta: float,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the policy's step from `latents` under the UNet's current weights.

    Differentiable in the UNet's weights. One step per sample: latents (B, C, h, w),
    timesteps (B,). The scheduler must be set to the sampling number of steps.
    """
    eps = predict_noise(
        unet, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale, compute_dtype
    )
    return ddim_step_mean(scheduler, eps, timesteps, latents, eta)


def trajectory_log_prob(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    next_latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    *,
    guidance_scale: float,
    eta: float,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """log p(next_latents | latents) under the UNet's current weights; differentiable.

    One step per sample: latents/next_latents (B, C, h, w), timesteps (B,). The scheduler
    must have been set to the sampling number of steps (`set_timesteps(num_steps)`).
    """
    if next_latents.shape != latents.shape:
        raise ValueError(f"next_latents has shape {tuple(next_latents.shape)}; expected {tuple(latents.shape)}")
    mean, std = policy_step_mean(
        unet, scheduler, latents, timesteps, prompt_embeds, negative_prompt_embeds,
        guidance_scale=guidance_scale, eta=eta, compute_dtype=compute_dtype,
    )
    return gaussian_log_prob(next_latents, mean, std)
