"""The output directory of one training run.

outputs/<run_name>/
    config.yaml            the resolved config, so a run can be reproduced from its directory
    run.log                everything the run logged (the console shows a summary of it)
    metrics.jsonl          one JSON object per line, one line per epoch (append-only, fsynced)
    samples/epoch_NNNN.png a grid of the epoch's images with their prompts and rewards
    eval.jsonl             one line per held-out evaluation, keyed by policy_version (0: base)
    eval/version_NNNN.png  the eval images of a policy version: same prompts, same noise, so
                           one cell shows one image evolving over the run
    reward_curve.png       reward_mean (and eval_reward_mean) against epoch
    checkpoints/epoch_NNNN/  written by ddpo_ray.records.checkpoint; a `COMPLETE` marker, written last,
                             says the checkpoint is whole and may be resumed from
    checkpoints/best/      the policy weights of the best evaluation (eval.best_metric), + best.json

Everything here is plain files and plain Python values, so it imports no Ray or torch: the
driver, the learner and a notebook reading a finished run can all use it. Files that are
rewritten (config, truncated metrics, images) are replaced atomically, so a run killed at any
moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import yaml
from PIL import Image

from ddpo_ray.records.curves import save_reward_curve
from ddpo_ray.records.files import atomic_write, to_plain
from ddpo_ray.records.grids import write_image_grid
from ddpo_ray.records.jsonl import JsonLines

CONFIG_FILE = "config.yaml"
LOG_FILE = "run.log"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
EVAL_DIR = "eval"
BEST_DIR = "best"
REWARD_CURVE_FILE = "reward_curve.png"
SAMPLES_DIR = "samples"
CHECKPOINTS_DIR = "checkpoints"
if TYPE_CHECKING:
    from ddpo_ray.config import DDPOConfig

COMPLETE_MARKER = "COMPLETE"

CHECKPOINT_NAME = re.compile(r"epoch_(\d{4,})")  # checkpoints/epoch_NNNN; group 1 is the epoch


class RunDirectoryExistsError(FileExistsError):
    """A new run (no resume_from) was pointed at the directory of an earlier run."""


def check_new_run(root: str | os.PathLike, resume_from: str | None) -> None:
    """Refuse to start a fresh run where an earlier run left its records.

    Without this, a second run with the same name appended its epochs to the old metrics.jsonl
    (epochs 0, 1, 2, 0, 1), left `latest` pointing at the old run's checkpoint and deleted its
    best. A resumed run (resume_from set) continues the directory, so it passes.
    """
    if resume_from:
        return
    root = Path(root)
    left = [name for name in (CONFIG_FILE, METRICS_FILE, EVAL_FILE) if (root / name).exists()]
    checkpoints = root / CHECKPOINTS_DIR
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        left.append(CHECKPOINTS_DIR)
    if left:
        raise RunDirectoryExistsError(
            f"run directory {root} already holds a run ({', '.join(left)}); pass resume_from=latest to "
            "continue it, or a new run_name (or output_dir) to start another"
        )


def new_run_root(cfg: "DDPOConfig") -> Path:
    """The run's directory, `output_dir/run_name`, refused if an earlier run left records there.

    Fixes the default (time-stamped) run name on `cfg` the first time, so the entry point, which
    checks before Ray or a model starts, and the epoch loop name the same directory.
    """
    if cfg.run_name is None:
        cfg.run_name = cfg.resolved_run_name()
    root = Path(f"{cfg.output_dir}/{cfg.run_name}")
    check_new_run(root, cfg.resume_from)
    return root


class RunDirectory:
    """Names, writes and reads the files of one run; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        # The run's experiment trackers (ddpo_ray.records.trackers): they get every metrics row
        # and grid written here. None until the epoch path attaches them (readers never do).
        self.trackers: Any = None
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.root)!r})"

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self.root / LOG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def samples_dir(self) -> Path:
        return self.root / SAMPLES_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def eval_path(self) -> Path:
        return self.root / EVAL_FILE

    @property
    def best_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR / BEST_DIR

    @property
    def reward_curve_path(self) -> Path:
        return self.root / REWARD_CURVE_FILE

    # --- config ---------------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """Write the resolved config as YAML, keys in the config's own order."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config: expected a mapping, got {type(config).__name__}")
        plain = to_plain(config, "config", nonfinite_to_none=False)
        text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)
        atomic_write(self.config_path, text.encode("utf-8"))
        return self.config_path

    # --- metrics.jsonl and eval.jsonl (ddpo_ray.records.jsonl) ---------------------------

    @property
    def _metrics_file(self) -> JsonLines:
        return JsonLines(self.metrics_path, "metrics")

    @property
    def _eval_file(self) -> JsonLines:
        return JsonLines(self.eval_path, "eval row")

    def append_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Append one epoch's metrics as a JSON line, fsynced so a killed run keeps every finished epoch."""
        self._metrics_file.append(metrics)
        if self.trackers:
            self.trackers.log_metrics(metrics)

    def read_metrics(self) -> list[dict]:
        """All metric rows in file order; [] before the first epoch (a cut last line is skipped)."""
        return self._metrics_file.read()

    def truncate_metrics(self, after_epoch: int) -> None:
        """Keep only rows with "epoch" <= after_epoch, so a resumed run does not repeat epochs.

        Rows without an epoch are dropped too. The file is rewritten atomically.
        """
        self._metrics_file.keep(
            lambda row: isinstance(row.get("epoch"), (int, float)) and row["epoch"] <= after_epoch
        )

    def append_eval(self, row: Mapping[str, Any]) -> None:
        """Append one evaluation (a mapping with "policy_version") to eval.jsonl, as append_metrics."""
        if not isinstance(row, Mapping) or not isinstance(row.get("policy_version"), int):
            raise ValueError("eval row: expected a mapping with an integer 'policy_version'")
        self._eval_file.append(row)

    def read_evals(self) -> list[dict]:
        """All evaluations in file order (as read_metrics); [] before the first."""
        return self._eval_file.read()

    def truncate_evals(self, max_version: int) -> None:
        """Keep only evaluations of policy versions <= max_version (a resumed run redoes the rest)."""
        self._eval_file.keep(lambda row: row.get("policy_version", math.inf) <= max_version)

    # --- samples --------------------------------------------------------------------------

    def save_sample_grid(
        self,
        epoch: int,
        images: np.ndarray | Sequence[Image.Image | np.ndarray],
        prompts: Sequence[str],
        rewards: Sequence[float],
        max_images: int = 16,
    ) -> Path:
        """Save up to `max_images` samples as one captioned grid, to see what the policy makes.

        images: uint8 (N, H, W, 3), or a list of PIL images / uint8 (H, W, 3) arrays of one size.
        """
        path = self.samples_dir / f"epoch_{_check_epoch(epoch):04d}.png"
        write_image_grid(path, images, prompts, rewards, max_images)
        if self.trackers:
            self.trackers.log_sample_grid(epoch, path)
        return path

    def save_eval_grid(
        self,
        policy_version: int,
        images: np.ndarray | Sequence[Image.Image | np.ndarray],
        prompts: Sequence[str],
        rewards: Sequence[float],
    ) -> Path:
        """eval/version_NNNN.png: every eval image of `policy_version`, in eval-set order."""
        path = self.root / EVAL_DIR / f"version_{_check_epoch(policy_version):04d}.png"
        write_image_grid(path, images, prompts, rewards, max_images=len(prompts))
        if self.trackers:
            self.trackers.log_eval_grid(policy_version, path)
        return path

    # --- reward curve (ddpo_ray.records.curves) ---------------------------------------

    def save_reward_curve(
        self,
        metrics: Sequence[Mapping[str, Any]] | None = None,
        key: str = "reward_mean",
        std_key: str = "reward_std",
    ) -> Path:
        """reward_curve.png: `key` of `metrics` (default: metrics.jsonl) and eval_<key> of eval.jsonl."""
        rows = self.read_metrics() if metrics is None else list(metrics)
        return save_reward_curve(self.reward_curve_path, rows, self.read_evals(), self.root.name, key, std_key)

    # --- checkpoints ----------------------------------------------------------------------

    def checkpoint_path(self, epoch: int) -> Path:
        """checkpoints/epoch_NNNN for `epoch`; not created here (the checkpoint writer does that)."""
        return self.checkpoints_dir / f"epoch_{_check_epoch(epoch):04d}"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """(epoch, directory) of every complete checkpoint, oldest first.

        Only directories holding the COMPLETE marker count, so a checkpoint cut short by a
        killed run is never resumed from.
        """
        found = []
        for entry in self.checkpoints_dir.iterdir():
            match = CHECKPOINT_NAME.fullmatch(entry.name)
            if match and entry.is_dir() and (entry / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None if there is none yet."""
        checkpoints = self.list_checkpoints()
        return checkpoints[-1][1] if checkpoints else None

    def prune_checkpoints(self, keep_last_n: int) -> list[Path]:
        """Delete all but the newest `keep_last_n` complete epoch checkpoints (0: keep all); returns the deleted.

        checkpoints/best and checkpoints still being written (no COMPLETE yet, e.g. the learner's
        next one at staleness 1) are never touched, and the newest complete one, which
        `resume_from=latest` takes, is always kept. COMPLETE goes first, so a deletion cut short
        leaves a directory that is ignored, never a damaged checkpoint that counts.
        """
        if keep_last_n < 0:
            raise ValueError(f"keep_last_n: expected >= 0 (0 keeps every checkpoint), got {keep_last_n}")
        if keep_last_n == 0:
            return []
        doomed = [path for _, path in self.list_checkpoints()[:-keep_last_n]]
        for path in doomed:
            (path / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(path)
        return doomed

    def mark_checkpoint_complete(self, epoch: int) -> None:
        """Write the COMPLETE marker; call it after every other file of the checkpoint is written."""
        directory = self.checkpoint_path(epoch)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"checkpoint for epoch {epoch}: expected the directory {directory} to exist "
                "(write the checkpoint before marking it complete)"
            )
        atomic_write(directory / COMPLETE_MARKER, f"epoch {epoch}\n".encode("utf-8"))


def _check_epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch: expected a non-negative integer, got {epoch!r}")
    return int(epoch)
