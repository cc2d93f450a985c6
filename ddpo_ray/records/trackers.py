"""Experiment trackers (`trackers` in the config): TensorBoard and Weights & Biases.

ddpo-pytorch and TRL users watch runs in these, so a run sends them what it writes itself: every
numeric value of each metrics.jsonl row (step = the row's epoch, the same key names) and the
grids it saves (`samples` at the epoch's step; `eval` for an evaluated policy version, at the
step of the epoch that produced it, and `eval_base` for version 0). The hook is `RunDirectory`
(append_metrics, save_sample_grid, save_eval_grid), so the local loop and the Ray driver log the
same things from one place.

Each tracker is an optional extra, imported only when the config names it:
- "tensorboard" (`pip install 'ddpo-ray[tensorboard]'`): event files in <run>/tensorboard
  (`tensorboard --logdir outputs`). A resumed run purges the events after its checkpoint.
- "wandb" (`pip install 'ddpo-ray[wandb]'`): a W&B run named after the run directory, its id kept
  in <run>/wandb_run_id so a resume continues it. Files go to $WANDB_DIR, else the run directory.
  W&B's own variables apply (WANDB_PROJECT, default "ddpo-ray"; WANDB_ENTITY; WANDB_MODE); with
  no WANDB_MODE and no API key it logs offline (`wandb sync <dir>` uploads later).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import netrc
import os
import secrets
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
from PIL import Image

from ddpo_ray.config.schema import TRACKER_EXTRAS
from ddpo_ray.records.files import atomic_write

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
WANDB_DEFAULT_PROJECT = "ddpo-ray"
# The module whose absence means the extra is not installed.
_REQUIRED_MODULE = {"tensorboard": "tensorboard", "wandb": "wandb"}


class TrackerNotInstalledError(ImportError):
    """A tracker the config names is not installed; the message says which extra installs it."""


def missing_tracker_message(name: str) -> str:
    return (f"trackers: {name!r} needs the {_REQUIRED_MODULE[name]!r} package; install it with "
            f"pip install 'ddpo-ray[{TRACKER_EXTRAS[name]}]'")


def check_trackers_installed(names: Sequence[str]) -> None:
    """Raise TrackerNotInstalledError for the first tracker whose package is missing (before a run
    starts anything), without importing it."""
    for name in names:
        try:
            found = importlib.util.find_spec(_REQUIRED_MODULE[name]) is not None
        except ValueError:  # a module set to None in sys.modules
            found = False
        if not found:
            raise TrackerNotInstalledError(missing_tracker_message(name))


def _import(name: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TrackerNotInstalledError(f"{missing_tracker_message(name)} ({exc})") from exc


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics row (bools as 0/1; None, text and the epoch left out)."""
    out = {}
    for key, value in row.items():
        if key == "epoch" or value is None or isinstance(value, (str, list, dict)):
            continue
        if isinstance(value, (bool, int, float, np.integer, np.floating)):
            out[key] = float(value)
    return out


class Tracker(Protocol):
    def log_scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def log_image(self, tag: str, step: int, path: Path) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files through torch's SummaryWriter (which needs the `tensorboard` package)."""

    def __init__(self, run_root: Path, first_epoch: int):
        _import("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = run_root / TENSORBOARD_DIR
        # A resumed run drops the events of epochs it redoes, as metrics.jsonl drops their rows.
        self.writer = SummaryWriter(str(self.logdir), purge_step=first_epoch if first_epoch else None)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_image(self, tag: str, step: int, path: Path) -> None:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, array, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbTracker:
    """A W&B run (see the module docstring for names, ids, directories and offline mode)."""

    def __init__(self, run_root: Path, config: Mapping[str, Any]):
        self.wandb = _import("wandb", "wandb")
        id_file = run_root / WANDB_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(6)  # W&B ids: lowercase letters and digits
            atomic_write(id_file, (run_id + "\n").encode("utf-8"))
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
        directory = os.environ.get("WANDB_DIR") or str(run_root)
        self.run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", WANDB_DEFAULT_PROJECT), name=run_root.name, id=run_id,
            resume="allow", config=dict(config), dir=directory, mode=mode,
            settings=self.wandb.Settings(console="off", silent=True),  # the run's console stays ours
        )
        if mode == "offline":
            log.info("W&B: logging offline to %s (upload later with `wandb sync %s`)", self.run.dir,
                     Path(self.run.dir).parent)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def log_image(self, tag: str, step: int, path: Path) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers of a run, as one; an empty one does nothing (and imports nothing)."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_metrics(self, row: Mapping[str, Any]) -> None:
        """One metrics.jsonl row, at step = its epoch."""
        values = scalars(row)
        for tracker in self.trackers:
            tracker.log_scalars(int(row["epoch"]), values)

    def log_sample_grid(self, epoch: int, path: Path) -> None:
        for tracker in self.trackers:
            tracker.log_image("samples", epoch, path)

    def log_eval_grid(self, policy_version: int, path: Path) -> None:
        """Version v > 0 at the step of the epoch that made it (v - 1, beside its eval_* scalars)."""
        tag, step = ("eval_base", 0) if policy_version == 0 else ("eval", policy_version - 1)
        for tracker in self.trackers:
            tracker.log_image(tag, step, path)

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception:  # closing one must not keep the others open, nor hide the run's own error
                log.exception("closing tracker %s failed", type(tracker).__name__)
        self.trackers = []


def open_trackers(names: Sequence[str], run_root: Path, config: Mapping[str, Any], first_epoch: int) -> Trackers:
    """Start the trackers `names` (the config's `trackers`) for the run in `run_root`."""
    check_trackers_installed(names)
    opened: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(run_root, first_epoch))
            elif name == "wandb":
                opened.append(WandbTracker(run_root, config))
            else:  # the config refuses other names; a new entry in TRACKER_EXTRAS needs one here
                raise ValueError(f"trackers: no tracker called {name!r}; expected any of {list(TRACKER_EXTRAS)}")
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)
