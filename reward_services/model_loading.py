"""Loading reward models by Hugging Face id or local directory, with errors that say what to do.

Every reward model has two sources: "tiny" (built in code, offline, random weights: exercises
the service end to end on a CPU) and a real checkpoint (an HF id, resolved from the local
cache when HF_HUB_OFFLINE=1, or a directory written by `save_pretrained`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")

TINY = "tiny"


class RewardModelNotFoundError(FileNotFoundError):
    """A configured reward model names nothing loadable here."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def load_pretrained(loader: Callable[..., T], name: str, field: str, **kwargs: Any) -> T:
    """`loader(name_or_dir, **kwargs)`, turning "not found" into one clear error naming `field`."""
    local = Path(name).expanduser()
    if local.exists() and not (local / "config.json").is_file() and not any(local.glob("*config.json")):
        raise RewardModelNotFoundError(
            f"{field}={name!r} is a local path without a config.json; expected a directory written "
            "by save_pretrained"
        )
    try:
        return loader(str(local) if local.exists() else name, **kwargs)
    except (OSError, ValueError) as exc:
        where = (
            "the local Hugging Face cache (HF_HUB_OFFLINE is set)"
            if hub_offline()
            else "the Hugging Face Hub or cache"
        )
        raise RewardModelNotFoundError(
            f"{field}={name!r}: not a local directory and not loadable from {where}: {exc}. "
            f'Use "{TINY}" for the built-in offline model, or a directory saved with save_pretrained.'
        ) from exc


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype={name!r}; expected one of {list(DTYPES)}") from None
