"""Summary statistics of an epoch's per-sample values, as the keys of its metrics row."""

from __future__ import annotations

import numpy as np


def summary(name: str, values: np.ndarray, extremes: bool = True) -> dict[str, float]:
    """{name_mean, name_std[, name_min, name_max]} of an epoch's values."""
    values = np.asarray(values, dtype=np.float64)
    out = {f"{name}_mean": float(np.mean(values)), f"{name}_std": float(np.std(values))}
    if extremes:
        out.update({f"{name}_min": float(np.min(values)), f"{name}_max": float(np.max(values))})
    return out
