"""LoRA on the UNet: add it, read and write its weights, switch it off for the reference policy.

DDPO trains a LoRA adapter on the attention projections of the frozen UNet (or, with
`model.use_lora: false`, the whole UNet: "trainable" below means whichever it is). The
learner broadcasts `trainable_state_dict` to the samplers; checkpoints save it in diffusers'
format so `pipe.load_lora_weights(dir)` loads it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

# The projections DDPO's LoRA trains: attention queries, keys, values and outputs.
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
# diffusers' file name for LoRA weights (`LORA_WEIGHT_NAME_SAFE`): what `load_lora_weights(dir)` reads.
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


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
    """What PPO trains: LoRA parameters, or every UNet weight when use_lora is False.

    A full fine-tune keeps the UNet in fp32 (its master weights) whatever model.mixed_precision
    says; autocast still computes in bf16/fp16. In bf16 most AdamW updates (lr x ~1) fall
    below the weights' resolution (2^-8 relative) and would be lost; in fp16 AdamW's eps
    rounds to 0 and the loss scaler cannot unscale fp16 gradients.
    """
    if use_lora:
        return add_lora(unet, rank, seed)
    unet.float()
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


def save_lora(
    unet: UNet2DConditionModel,
    directory: str | Path,
    save_function: Callable[[dict[str, torch.Tensor], str], None] | None = None,
) -> Path:
    """Write the UNet's LoRA in diffusers' format: `pipe.load_lora_weights(directory)` loads it."""
    return save_lora_weights(get_peft_model_state_dict(unet), directory, save_function)


def save_lora_weights(
    peft_state_dict: Mapping[str, torch.Tensor],
    directory: str | Path,
    save_function: Callable[[dict[str, torch.Tensor], str], None] | None = None,
) -> Path:
    """Write a LoRA state dict (PEFT keys, as `lora_state_dict` gives) in diffusers' format.

    The one writer of LORA_WEIGHTS_FILE (`unet.`-prefixed keys), for epoch checkpoints and
    checkpoints/best alike, so every LoRA a run saves loads with `pipe.load_lora_weights(dir)`.
    `save_function(weights, filename)`: how the file is written (diffusers' default otherwise).
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers({k: v.detach().to("cpu").contiguous() for k, v in peft_state_dict.items()})
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=layers, safe_serialization=True, weight_name=LORA_WEIGHTS_FILE,
        save_function=save_function,
    )
    return directory


def read_lora_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The PEFT-keyed LoRA state dict of a diffusers LoRA file (the inverse of `save_lora_weights`)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    path = Path(directory) / LORA_WEIGHTS_FILE
    raw = load_file(str(path))
    prefix = f"{StableDiffusionPipeline.unet_name}."
    foreign = [k for k in raw if not k.startswith(prefix)]
    if foreign:
        raise ValueError(f"{path}: expected only UNet LoRA keys (prefix {prefix!r}); found {foreign[:3]}")
    return convert_unet_state_dict_to_peft({k[len(prefix):]: v for k, v in raw.items()})


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


def trainable_state_dict(unet: UNet2DConditionModel, use_lora: bool) -> dict[str, torch.Tensor]:
    """What trains (and what samplers need): the LoRA weights, or the whole UNet."""
    if use_lora:
        return lora_state_dict(unet)
    return {k: v.detach().to("cpu", copy=True) for k, v in unet.state_dict().items()}


def load_trainable_state_dict(
    unet: UNet2DConditionModel, use_lora: bool, state_dict: Mapping[str, torch.Tensor]
) -> None:
    if use_lora:
        load_lora_state_dict(unet, dict(state_dict))
    else:
        unet.load_state_dict(state_dict)
