"""Checkpoints: the policy in diffusers' format plus everything needed for an exact resume.

checkpoints/epoch_NNNN/
    pytorch_lora_weights.safetensors  (use_lora) `pipe.load_lora_weights(dir)` loads it
    unet/                             (full fine-tune) `UNet2DConditionModel.from_pretrained`
    trainer_state.pt                  trainable weights, optimizer, advantage tracker, epoch,
                                      policy version, RNG state
    COMPLETE                          written last; a checkpoint without it is ignored
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ddpo_ray.advantages import AdvantageEstimator
from ddpo_ray.models import lora_state_dict, load_lora_state_dict, save_lora
from ddpo_ray.run_dir import RunDirectory

TRAINER_STATE = "trainer_state.pt"


def save_checkpoint(
    run_dir: RunDirectory,
    epoch: int,
    unet: UNet2DConditionModel,
    use_lora: bool,
    optimizer: torch.optim.Optimizer,
    advantages: AdvantageEstimator,
    policy_version: int,
) -> Path:
    """Write the checkpoint for the end of `epoch`; returns its directory."""
    directory = run_dir.checkpoint_path(epoch)
    directory.mkdir(parents=True, exist_ok=True)
    if use_lora:
        save_lora(unet, directory)
        weights = lora_state_dict(unet)
    else:
        unet.save_pretrained(directory / "unet")
        weights = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    state = {
        "epoch": epoch,
        "policy_version": policy_version,
        "use_lora": use_lora,
        "weights": weights,
        "optimizer": optimizer.state_dict(),
        "advantages": advantages.state_dict(),
        "torch_rng": torch.random.get_rng_state(),
    }
    torch.save(state, directory / TRAINER_STATE)
    run_dir.mark_checkpoint_complete(epoch)
    return directory


def resolve_resume_path(resume_from: str, run_dir: RunDirectory) -> Path:
    """`resume_from` as a checkpoint directory: "latest" (this run's), a run dir, or a checkpoint."""
    if resume_from == "latest":
        latest = run_dir.latest_checkpoint()
        if latest is None:
            raise FileNotFoundError(f"resume_from='latest': no complete checkpoint under {run_dir.checkpoints_dir}")
        return latest
    path = Path(resume_from).expanduser()
    if (path / TRAINER_STATE).is_file():
        return path
    if (path / "checkpoints").is_dir():
        latest = RunDirectory(path).latest_checkpoint()
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"resume_from={resume_from!r}: expected 'latest', a run directory with complete checkpoints, "
        f"or a checkpoint directory containing {TRAINER_STATE}"
    )


def load_checkpoint(
    path: Path,
    unet: UNet2DConditionModel,
    use_lora: bool,
    optimizer: torch.optim.Optimizer,
    advantages: AdvantageEstimator,
) -> dict[str, Any]:
    """Restore weights, optimizer and tracker in place; returns the saved state (epoch, ...)."""
    state = torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=False)
    if state["use_lora"] != use_lora:
        raise ValueError(f"checkpoint {path} has use_lora={state['use_lora']}, the config has {use_lora}")
    if use_lora:
        load_lora_state_dict(unet, state["weights"])
    else:
        unet.load_state_dict(state["weights"])
    optimizer.load_state_dict(state["optimizer"])
    advantages.load_state_dict(state["advantages"])
    torch.random.set_rng_state(state["torch_rng"])
    return state
