"""Checkpoints: the policy in diffusers' format plus everything needed for an exact resume.

checkpoints/epoch_NNNN/
    pytorch_lora_weights.safetensors  (use_lora) `pipe.load_lora_weights(dir)` loads it
    policy_weights.safetensors        (full fine-tune) the UNet's state dict
    learner_state.pt                  trainable weights and optimizer (the learner's state)
    run_state.pt                      epoch, policy version, advantage tracker, RNG state
                                      (written by whoever runs the epoch loop)
    COMPLETE                          written last, removed first when the checkpoint is rewritten;
                                      a checkpoint without it is ignored (and refused as resume_from)
checkpoints/best/
    pytorch_lora_weights.safetensors  (use_lora) the best evaluated policy version, in the same
                                      diffusers format: `pipe.load_lora_weights(dir)` loads it
    policy_weights.safetensors        (full fine-tune) its trainable weights (UNet state dict)
    README.md                         the model card (ddpo_ray.records.model_card), also in epoch dirs
    best.json                         which version, and its eval.best_metric value (written last)

The two state files are separate because, in the distributed system, the learner (a Ray Train
worker) owns the weights and optimizer while the driver owns the tracker and the epoch count.
The learner hands its state over as values (`learner_state`) and the driver writes every file
(`write_learner_state`), so no other node needs to see the run directory. The single-process
loop writes both with `save_checkpoint`.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import UNet2DConditionModel

from ddpo_ray.maths.advantages import AdvantageEstimator
from ddpo_ray.models.lora import (
    LORA_WEIGHTS_FILE,
    load_trainable_state_dict,
    read_lora_weights,
    save_lora_weights,
    trainable_state_dict,
)
from ddpo_ray.records.files import atomic_write, to_plain
from ddpo_ray.records.run_dir import COMPLETE_MARKER, RunDirectory

LEARNER_STATE = "learner_state.pt"
RUN_STATE = "run_state.pt"
POLICY_WEIGHTS = "policy_weights.safetensors"
BEST_INFO = "best.json"
MODEL_CARD = "README.md"


def _begin_rewrite(directory: Path) -> None:
    """Create `directory`, and take its COMPLETE away first: a checkpoint being (re)written is not whole."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / COMPLETE_MARKER).unlink(missing_ok=True)


def state_bytes(state: Mapping[str, Any]) -> bytes:
    """A state as the bytes of its .pt file (torch.save): how the learner hands its state to the
    driver through the epoch exchange, which then holds bytes and never imports torch."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def _atomic_torch_save(state: Mapping[str, Any], path: Path) -> None:
    """torch.save, but the file is replaced atomically and fsynced (a kill leaves old or new, never half)."""
    atomic_write(path, state_bytes(state))


def state_from_bytes(data: bytes, where: str) -> dict[str, Any]:
    """A state from `state_bytes` or a state file's contents, unpickled with weights_only=True:
    tensors, numbers, strings and containers only.

    A checkpoint is read from `resume_from` and `evaluate --checkpoint`, so it may come from
    anyone; full unpickling would run whatever code a crafted file names.
    """
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{where}: refused to load; a checkpoint state may hold only tensors, numbers, strings "
            f"and containers (loaded with torch.load(weights_only=True)), this one names other objects: {exc}"
        ) from None


def _load_state(path: Path) -> dict[str, Any]:
    return state_from_bytes(Path(path).read_bytes(), str(path))


def learner_state(unet: UNet2DConditionModel, use_lora: bool, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The learner's half as values on the CPU (a copy): trainable weights and optimizer state."""
    return {
        "use_lora": use_lora,
        "weights": trainable_state_dict(unet, use_lora),
        "optimizer": _on_cpu(optimizer.state_dict()),
    }


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def write_learner_state(directory: Path, state: Mapping[str, Any]) -> None:
    """Write the learner's half (`learner_state`): the policy in a loadable format, plus the state.

    Each file is replaced atomically; the checkpoint's COMPLETE goes first, so a rewrite cut
    short is never taken for a whole checkpoint.
    """
    _begin_rewrite(directory)
    _write_policy_weights(directory, state["weights"], bool(state["use_lora"]))
    _atomic_torch_save(state, directory / LEARNER_STATE)


def save_learner_state(
    directory: Path, unet: UNet2DConditionModel, use_lora: bool, optimizer: torch.optim.Optimizer
) -> None:
    """The learner's half, from the live model (the single-process loop)."""
    write_learner_state(directory, learner_state(unet, use_lora, optimizer))


def _write_policy_weights(directory: Path, weights: Mapping[str, torch.Tensor], use_lora: bool) -> None:
    """A LoRA in diffusers' format (`pipe.load_lora_weights(dir)`), or a full UNet's state dict as
    policy_weights.safetensors; the other format's file, left by an earlier write, goes."""
    from safetensors.torch import save

    if use_lora:
        save_lora_weights(weights, directory, save_function=_atomic_safetensors)
        stale = directory / POLICY_WEIGHTS
    else:
        plain = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        atomic_write(directory / POLICY_WEIGHTS, save(plain, metadata={"use_lora": "false"}))
        stale = directory / LORA_WEIGHTS_FILE
    stale.unlink(missing_ok=True)


def save_run_state(
    directory: Path, epoch: int, policy_version: int, advantages: Mapping[str, Any], **extra: Any
) -> None:
    """The loop's half: where the run is (epoch, policy version) and the advantage tracker.

    Plain values only (numpy strings and scalars become Python ones), so it loads with
    torch.load(weights_only=True).
    """
    _begin_rewrite(directory)
    state = {
        "epoch": int(epoch),
        "policy_version": int(policy_version),
        "advantages": to_plain(dict(advantages), "advantages", nonfinite_to_none=False),
        "torch_rng": torch.random.get_rng_state(),
        **extra,
    }
    _atomic_torch_save(state, directory / RUN_STATE)


def save_checkpoint(
    run_dir: RunDirectory,
    epoch: int,
    unet: UNet2DConditionModel,
    use_lora: bool,
    optimizer: torch.optim.Optimizer,
    advantages: AdvantageEstimator,
    policy_version: int,
) -> Path:
    """Write the whole checkpoint for the end of `epoch` (single process); returns its directory."""
    directory = run_dir.checkpoint_path(epoch)
    save_learner_state(directory, unet, use_lora, optimizer)
    save_run_state(directory, epoch, policy_version, advantages.state_dict())
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
    if (path / RUN_STATE).is_file() or (path / LEARNER_STATE).is_file():
        if not (path / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(
                f"resume_from={resume_from!r}: checkpoint {path} has no {COMPLETE_MARKER} marker, so it was "
                "cut short while being written; resume from an earlier checkpoint, or pass the run "
                "directory to take its newest complete one"
            )
        return path
    if (path / "checkpoints").is_dir():
        latest = RunDirectory(path).latest_checkpoint()
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"resume_from={resume_from!r}: expected 'latest', a run directory with complete checkpoints, "
        f"or a checkpoint directory containing {LEARNER_STATE} and {RUN_STATE}"
    )


def read_learner_state(path: Path) -> dict[str, Any]:
    """learner_state.pt of checkpoint `path` (tensors and numbers only; see _load_state)."""
    return _load_state(Path(path) / LEARNER_STATE)


def load_learner_state(
    path: Path, unet: UNet2DConditionModel, use_lora: bool, optimizer: torch.optim.Optimizer
) -> None:
    """Restore the trainable weights and the optimizer in place from checkpoint `path`."""
    restore_learner_state(read_learner_state(path), unet, use_lora, optimizer, where=f"checkpoint {path}")


def restore_learner_state(
    state: Mapping[str, Any], unet: UNet2DConditionModel, use_lora: bool, optimizer: torch.optim.Optimizer,
    where: str = "the learner state",
) -> None:
    """Restore the trainable weights and the optimizer in place from `learner_state` values."""
    if state["use_lora"] != use_lora:
        raise ValueError(f"{where} has use_lora={state['use_lora']}, the config has {use_lora}")
    load_trainable_state_dict(unet, use_lora, state["weights"])
    optimizer.load_state_dict(state["optimizer"])


def load_run_state(path: Path, advantages: AdvantageEstimator) -> dict[str, Any]:
    """Restore the tracker and the RNG in place; returns the saved state (epoch, policy_version, ...)."""
    state = _load_state(Path(path) / RUN_STATE)
    advantages.load_state_dict(state["advantages"])
    torch.random.set_rng_state(state["torch_rng"])
    return state


def load_checkpoint(
    path: Path,
    unet: UNet2DConditionModel,
    use_lora: bool,
    optimizer: torch.optim.Optimizer,
    advantages: AdvantageEstimator,
) -> dict[str, Any]:
    """Restore everything in place (single process); returns the run state (epoch, ...)."""
    load_learner_state(path, unet, use_lora, optimizer)
    return load_run_state(path, advantages)


def _atomic_safetensors(weights: dict[str, torch.Tensor], filename: str) -> None:
    """diffusers' safetensors writer (`{"format": "pt"}` metadata), replacing the file atomically."""
    from safetensors.torch import save

    atomic_write(Path(filename), save(weights, metadata={"format": "pt"}))


def save_best(
    run_dir: RunDirectory,
    weights: Mapping[str, torch.Tensor],
    use_lora: bool,
    info: Mapping[str, Any],
    model_card: str | None = None,
) -> Path:
    """Replace checkpoints/best with `weights` (trainable state dict), the card and `info` (best.json).

    A LoRA is written as the epoch checkpoints write it (diffusers' format), so
    `pipe.load_lora_weights("checkpoints/best")` works. Every file is replaced atomically and
    best.json goes last, so best.json never names weights that are not there.
    """
    directory = run_dir.best_dir
    directory.mkdir(parents=True, exist_ok=True)
    _write_policy_weights(directory, weights, use_lora)
    if model_card is not None:
        atomic_write(directory / MODEL_CARD, model_card.encode("utf-8"))
    atomic_write(directory / BEST_INFO, (json.dumps(dict(info), indent=1) + "\n").encode("utf-8"))
    return directory


def read_best_info(run_dir: RunDirectory) -> dict[str, Any] | None:
    path = run_dir.best_dir / BEST_INFO
    return json.loads(path.read_text()) if path.is_file() else None


def load_policy_weights(path: str | Path) -> tuple[bool, dict[str, torch.Tensor]]:
    """(use_lora, trainable weights) from a checkpoint directory, checkpoints/best, or any
    diffusers LoRA folder (an `export`ed one, one downloaded from the Hub)."""
    path = Path(path)
    if (path / POLICY_WEIGHTS).is_file():
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path / POLICY_WEIGHTS), framework="pt") as f:
            use_lora = (f.metadata() or {}).get("use_lora", "true") == "true"
        return use_lora, load_file(str(path / POLICY_WEIGHTS))
    if (path / LEARNER_STATE).is_file():
        state = read_learner_state(path)
        return bool(state["use_lora"]), state["weights"]
    if (path / LORA_WEIGHTS_FILE).is_file():
        return True, read_lora_weights(path)
    raise FileNotFoundError(
        f"{path}: expected a checkpoint directory with {LEARNER_STATE}, {LORA_WEIGHTS_FILE} or "
        f"{POLICY_WEIGHTS} (checkpoints/epoch_NNNN or checkpoints/best of a run, or a diffusers LoRA folder)"
    )
