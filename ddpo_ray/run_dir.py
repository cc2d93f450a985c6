"""The output directory of one training run.

outputs/<run_name>/
    config.yaml            the resolved config, so a run can be reproduced from its directory
    metrics.jsonl          one JSON object per line, one line per epoch (append-only, fsynced)
    samples/epoch_NNNN.png a grid of the epoch's images with their prompts and rewards
    eval.jsonl             one line per held-out evaluation, keyed by policy_version (0: base)
    eval/version_NNNN.png  the eval images of a policy version: same prompts, same noise, so
                           one cell shows one image evolving over the run
    reward_curve.png       reward_mean (and eval_reward_mean) against epoch
    checkpoints/epoch_NNNN/  written by ddpo_ray.checkpoint; a `COMPLETE` marker, written last,
                             says the checkpoint is whole and may be resumed from
    checkpoints/best/      the policy weights of the best evaluation (eval.best_metric), + best.json

Everything here is plain files and plain Python values, so it imports no Ray or torch: the
driver, the learner and a notebook reading a finished run can all use it. Files that are
rewritten (config, truncated metrics, images) are replaced atomically, so a run killed at any
moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
EVAL_DIR = "eval"
BEST_DIR = "best"
REWARD_CURVE_FILE = "reward_curve.png"
SAMPLES_DIR = "samples"
CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"

_CHECKPOINT_NAME = re.compile(r"epoch_(\d{4,})")

# Sample grid layout, in pixels.
MIN_CELL_WIDTH = 128  # tiny 64x64 samples are upscaled (nearest) to at least this width
CAPTION_PADDING = 4
PROMPT_LINES = 2  # prompt lines in a caption; the reward goes on the line below
GRID_GAP = 2
GRID_BACKGROUND = (200, 200, 200)


class RunDirectory:
    """Names, writes and reads the files of one run; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.root)!r})"

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

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
        plain = _to_plain(config, "config", nonfinite_to_none=False)
        text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)
        atomic_write(self.config_path, text.encode("utf-8"))
        return self.config_path

    # --- metrics --------------------------------------------------------------------------

    def append_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Append one epoch's metrics as a JSON line, fsynced so a killed run keeps every finished epoch.

        numpy values and tensors become plain Python; nan and inf become null (JSON has neither).
        """
        self._append_row(self.metrics_path, metrics, "metrics")

    def append_eval(self, row: Mapping[str, Any]) -> None:
        """Append one evaluation (a mapping with "policy_version") to eval.jsonl, as append_metrics."""
        if not isinstance(row, Mapping) or not isinstance(row.get("policy_version"), int):
            raise ValueError("eval row: expected a mapping with an integer 'policy_version'")
        self._append_row(self.eval_path, row, "eval row")

    def read_evals(self) -> list[dict]:
        """All evaluations in file order (as read_metrics); [] before the first."""
        return self._read_rows(self.eval_path)

    def truncate_evals(self, max_version: int) -> None:
        """Keep only evaluations of policy versions <= max_version (a resumed run redoes the rest)."""
        if not self.eval_path.exists():
            return
        kept = [row for row in self.read_evals() if row.get("policy_version", math.inf) <= max_version]
        _write_rows(self.eval_path, kept)

    def _append_row(self, path: Path, row: Mapping[str, Any], what: str) -> None:
        if not isinstance(row, Mapping):
            raise TypeError(f"{what}: expected a mapping, got {type(row).__name__}")
        plain = _to_plain(row, what, nonfinite_to_none=True)
        line = json.dumps(plain, allow_nan=False) + "\n"  # ASCII only: a cut line cannot split a character
        self._drop_partial_last_line(path)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict]:
        """All metric rows in file order; [] before the first epoch.

        A corrupt last line is what a run killed mid-write leaves, so it is skipped (with a
        warning); a corrupt line anywhere else means the file was damaged, and is an error.
        """
        return self._read_rows(self.metrics_path)

    def _read_rows(self, path: Path) -> list[dict]:
        if not path.exists():
            return []
        lines = path.read_bytes().split(b"\n")
        numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
        rows = []
        for number, line in numbered:
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                if number == numbered[-1][0]:
                    warnings.warn(f"{path}: skipping truncated last line {number} "
                                  "(a run killed mid-write)", stacklevel=2)
                    break
                raise ValueError(
                    f"{path}: line {number} is not valid JSON ({err}); "
                    "expected one JSON object per line"
                ) from err
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}: line {number} is a JSON {type(row).__name__}; "
                    "expected one JSON object per line"
                )
            rows.append(row)
        return rows

    def truncate_metrics(self, after_epoch: int) -> None:
        """Keep only rows with "epoch" <= after_epoch, so a resumed run does not repeat epochs.

        Rows without an epoch are dropped too. The file is rewritten atomically.
        """
        if not self.metrics_path.exists():
            return
        kept = [
            row for row in self.read_metrics()
            if isinstance(row.get("epoch"), (int, float)) and row["epoch"] <= after_epoch
        ]
        _write_rows(self.metrics_path, kept)

    def _drop_partial_last_line(self, path: Path) -> None:
        """Before appending, remove a half-written last line left by a killed run.

        Appending after it would glue it to the new record and make a corrupt line in the
        middle of the file. A last line that is complete JSON and only lacks its newline is kept.
        """
        if not path.exists() or path.stat().st_size == 0:
            return
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            start = data.rfind(b"\n") + 1
            try:
                complete = isinstance(json.loads(data[start:].decode("utf-8")), dict)
            except (UnicodeDecodeError, json.JSONDecodeError):
                complete = False
            if complete:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                f.truncate(start)
            f.flush()
            os.fsync(f.fileno())

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
        return write_image_grid(path, images, prompts, rewards, max_images)

    def save_eval_grid(
        self,
        policy_version: int,
        images: np.ndarray | Sequence[Image.Image | np.ndarray],
        prompts: Sequence[str],
        rewards: Sequence[float],
    ) -> Path:
        """eval/version_NNNN.png: every eval image of `policy_version`, in eval-set order."""
        path = self.root / EVAL_DIR / f"version_{_check_epoch(policy_version):04d}.png"
        return write_image_grid(path, images, prompts, rewards, max_images=len(prompts))

    # --- reward curve ---------------------------------------------------------------------

    def save_reward_curve(
        self,
        metrics: Sequence[Mapping[str, Any]] | None = None,
        key: str = "reward_mean",
        std_key: str = "reward_std",
    ) -> Path:
        """Plot `key` against epoch (± `std_key` shaded) and the held-out `eval_<key>` if present.

        Rows missing the key, or whose value is null/nan, are skipped. With no points at all the
        plot still gets written and says "no data yet", so the file exists from the first epoch.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: only plotting needs it
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        rows = self.read_metrics() if metrics is None else list(metrics)
        # A Figure with an Agg canvas, not pyplot: no global backend switch, no GUI, thread-safe.
        fig = Figure(figsize=(6.4, 4.0), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()

        # One x axis for both: the policy version. The training reward of epoch e was sampled by
        # version e; an evaluation (eval.jsonl, or eval_* keys of a metrics row whose policy
        # version says which) is of its own version, 0 being the base model.
        evals = [{**row, "epoch": row.get("policy_version", row.get("epoch"))}
                 for row in (self.read_evals() or rows)]
        plotted = False
        for series_rows, series_key, series_std_key, label, style in (
            (rows, key, std_key, key, {"marker": "o", "linestyle": "-"}),
            (evals, f"eval_{key}", f"eval_{std_key}", f"eval_{key} (held-out)", {"marker": "s", "linestyle": "--"}),
        ):
            epochs, means, stds = _series(series_rows, series_key, series_std_key)
            if len(epochs) == 0:
                continue
            (line,) = ax.plot(epochs, means, label=label, **style)
            if np.isfinite(stds).any():
                ax.fill_between(epochs, means - stds, means + stds, color=line.get_color(), alpha=0.2,
                                label=f"± {series_std_key}")
            plotted = True

        if plotted:
            ax.legend(loc="best")
        else:
            ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("policy version (for the training reward: its epoch)")
        ax.set_ylabel(key)
        ax.set_title(f"{key} per epoch: {self.root.name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        atomic_write(self.reward_curve_path, buffer.getvalue())
        return self.reward_curve_path

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
            match = _CHECKPOINT_NAME.fullmatch(entry.name)
            if match and entry.is_dir() and (entry / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None if there is none yet."""
        checkpoints = self.list_checkpoints()
        return checkpoints[-1][1] if checkpoints else None

    def mark_checkpoint_complete(self, epoch: int) -> None:
        """Write the COMPLETE marker; call it after every other file of the checkpoint is written."""
        directory = self.checkpoint_path(epoch)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"checkpoint for epoch {epoch}: expected the directory {directory} to exist "
                "(write the checkpoint before marking it complete)"
            )
        atomic_write(directory / COMPLETE_MARKER, f"epoch {epoch}\n".encode("utf-8"))


# --- helpers ------------------------------------------------------------------------------


def write_image_grid(
    path: Path,
    images: np.ndarray | Sequence[Image.Image | np.ndarray],
    prompts: Sequence[str],
    rewards: Sequence[float],
    max_images: int = 16,
    columns: int | None = None,
) -> Path:
    """Write up to `max_images` images as one captioned grid (prompt, then r=reward) to `path`.

    `columns` defaults to a square-ish layout. Written atomically; returns `path`.
    """
    array = _images_to_array(images)
    n = len(array)
    if isinstance(prompts, str) or len(prompts) != n:
        got = "a single str" if isinstance(prompts, str) else f"{len(prompts)}"
        raise ValueError(f"prompts: expected {n} prompts (one per image), got {got}")
    if len(rewards) != n:
        raise ValueError(f"rewards: expected {n} rewards (one per image), got {len(rewards)}")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max_images: expected a positive integer, got {max_images!r}")

    count = min(n, max_images)
    cols = min(columns, count) if columns else math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    height, width = array.shape[1:3]
    scale = math.ceil(MIN_CELL_WIDTH / width) if width < MIN_CELL_WIDTH else 1
    cell_width, image_height = width * scale, height * scale

    font = ImageFont.load_default()
    line_height = font.getbbox("Agjy|")[3] + 2
    caption_height = 2 * CAPTION_PADDING + (PROMPT_LINES + 1) * line_height
    cell_height = image_height + caption_height
    grid = Image.new(
        "RGB",
        (cols * cell_width + (cols + 1) * GRID_GAP, rows * cell_height + (rows + 1) * GRID_GAP),
        GRID_BACKGROUND,
    )
    draw = ImageDraw.Draw(grid)
    text_width = cell_width - 2 * CAPTION_PADDING
    for i in range(count):
        x = GRID_GAP + (i % cols) * (cell_width + GRID_GAP)
        y = GRID_GAP + (i // cols) * (cell_height + GRID_GAP)
        image = Image.fromarray(array[i])
        if scale > 1:
            image = image.resize((cell_width, image_height), Image.Resampling.NEAREST)
        grid.paste(image, (x, y))
        draw.rectangle([x, y + image_height, x + cell_width - 1, y + cell_height - 1], fill="white")
        prompt = _drawable(str(prompts[i]), font)
        lines = _wrap(prompt, font, text_width, PROMPT_LINES) + ["r=%.3f" % float(rewards[i])]
        for j, text in enumerate(lines):
            draw.text((x + CAPTION_PADDING, y + image_height + CAPTION_PADDING + j * line_height),
                      text, fill="black", font=font)

    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


def _write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite a JSON-lines file with `rows` (already plain, as read back), atomically."""
    text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows)
    atomic_write(path, text.encode("utf-8"))


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file next to `path`, fsync, then rename over it (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _to_plain(value: Any, where: str, nonfinite_to_none: bool) -> Any:
    """`value` as plain Python (dict, list, str, int, float, bool, None) for JSON or safe YAML.

    numpy scalars and arrays, and tensors (anything with .tolist() or .item()) are converted;
    `where` names the value in errors, e.g. "metrics['loss']".
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):  # also np.str_, which safe YAML cannot represent
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):  # also np.float64, a float subclass
        value = float(value)
        return None if nonfinite_to_none and not math.isfinite(value) else value
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v, f"{where}[{k!r}]", nonfinite_to_none) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v, f"{where}[{i}]", nonfinite_to_none) for i, v in enumerate(value)]
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return _to_plain(value.tolist(), where, nonfinite_to_none)
    if hasattr(value, "item"):
        return _to_plain(value.item(), where, nonfinite_to_none)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(
        f"{where}: cannot store a {type(value).__name__}; expected a number, str, bool, None, "
        "list, mapping, numpy value or tensor"
    )


def _check_epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch: expected a non-negative integer, got {epoch!r}")
    return int(epoch)


def _images_to_array(images: np.ndarray | Sequence[Image.Image | np.ndarray]) -> np.ndarray:
    """Validate the images and stack them as uint8 (N, H, W, 3)."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images: expected at least one image, got an empty list")
        arrays = []
        for i, image in enumerate(images):
            array = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
                raise ValueError(
                    f"images[{i}]: expected a PIL image or a uint8 (H, W, 3) array, "
                    f"got dtype {array.dtype} shape {array.shape}"
                )
            if arrays and array.shape != arrays[0].shape:
                raise ValueError(
                    f"images[{i}]: expected the same size as images[0] {arrays[0].shape}, got {array.shape}"
                )
            arrays.append(array)
        return np.stack(arrays)
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(
            f"images: expected dtype uint8 (values 0-255), got {array.dtype}; "
            "convert with (x * 255).round().astype(np.uint8)"
        )
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"images: expected shape (N, H, W, 3), got {array.shape}")
    if len(array) == 0 or array.shape[1] == 0 or array.shape[2] == 0:
        raise ValueError(f"images: expected at least one non-empty image, got shape {array.shape}")
    return array


def _drawable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """The bitmap fallback font only has Latin-1; FreeType draws anything (missing glyphs as boxes)."""
    text = " ".join(text.split())  # newlines and tabs would break the caption layout
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _wrap(text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; words longer than a line are broken; overflow ends in "..."."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while font.getlength(current) > width and len(current) > 1:
            cut = _fitting_prefix(current, font, width)
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "..."]
    return lines


def _fitting_prefix(text: str, font: Any, width: int) -> int:
    """Length of the longest prefix of `text` that fits in `width` pixels (at least 1)."""
    cut = 1
    while cut < len(text) and font.getlength(text[: cut + 1]) <= width:
        cut += 1
    return cut


def _series(rows: Sequence[Mapping[str, Any]], key: str, std_key: str) -> tuple[np.ndarray, ...]:
    """(epochs, values, stds) of the rows that have a finite `key`, sorted by epoch; std nan if absent."""
    points = []
    for row in rows:
        epoch, value = row.get("epoch"), row.get(key)
        if epoch is None or value is None:
            continue
        value = float(value)
        if not math.isfinite(value):
            continue
        std = row.get(std_key)
        points.append((float(epoch), value, float("nan") if std is None else float(std)))
    points.sort(key=lambda point: point[0])
    table = np.array(points, dtype=np.float64).reshape(-1, 3)
    return table[:, 0], table[:, 1], table[:, 2]
