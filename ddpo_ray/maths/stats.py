"""Summary statistics: of an epoch's per-sample values (the keys of its metrics row), and rank correlation."""

from __future__ import annotations

import numpy as np


def summary(name: str, values: np.ndarray, extremes: bool = True) -> dict[str, float]:
    """{name_mean, name_std[, name_min, name_max]} of an epoch's values."""
    values = np.asarray(values, dtype=np.float64)
    out = {f"{name}_mean": float(np.mean(values)), f"{name}_std": float(np.std(values))}
    if extremes:
        out.update({f"{name}_min": float(np.min(values)), f"{name}_max": float(np.max(values))})
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equal-length score vectors (ties get distinct ranks)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"spearman: expected two 1-d arrays of one length >= 2, got {a.shape} and {b.shape}")
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])
