"""The reward curve PNG: training reward per epoch and held-out reward per policy version."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ddpo_ray.records.files import atomic_write


def save_reward_curve(
    path: Path,
    rows: Sequence[Mapping[str, Any]],
    evals: Sequence[Mapping[str, Any]],
    title: str,
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

    # A Figure with an Agg canvas, not pyplot: no global backend switch, no GUI, thread-safe.
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    # One x axis for both: the policy version. The training reward of epoch e was sampled by
    # version e; an evaluation (eval.jsonl, or eval_* keys of a metrics row whose policy
    # version says which) is of its own version, 0 being the base model.
    evals = [{**row, "epoch": row.get("policy_version", row.get("epoch"))}
             for row in (evals or rows)]
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
    ax.set_title(f"{key} per epoch: {title}")
    ax.grid(alpha=0.3)
    fig.tight_layout()

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


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
