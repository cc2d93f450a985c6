"""Cutting an epoch into equal, contiguous shards, one per learner worker. No Ray.

A shard names rows of the samplers' trajectory batches (object refs, carried opaquely) and
carries their advantages, so a learner worker fetches exactly its rows and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class EpochShard:
    """One learner worker's part of an epoch: rows of the samplers' trajectory batches.

    `parts` holds (ObjectRef to a Trajectories batch, first row, end row); the refs sit inside
    a list so Ray passes them by reference and the worker fetches them itself.
    """

    epoch: int
    parts: list[tuple[Any, int, int]]
    advantages: np.ndarray  # (rows,) or per step (rows, T) float32, in the order of the parts' rows

    @property
    def num_samples(self) -> int:
        return sum(stop - start for _, start, stop in self.parts)


def split_epoch(
    batches: list[tuple[Any, int]], advantages: np.ndarray, num_workers: int, epoch: int
) -> list[EpochShard]:
    """Cut an epoch (trajectory refs with their row counts, in order) into equal contiguous shards."""
    total = sum(rows for _, rows in batches)
    if total != len(advantages):
        raise ValueError(f"epoch {epoch}: {len(advantages)} advantages for {total} samples")
    if total % num_workers:
        raise ValueError(f"epoch {epoch}: {total} samples do not split over {num_workers} learner workers")
    per_worker = total // num_workers
    shards = []
    row_starts = np.cumsum([0] + [rows for _, rows in batches])
    for worker in range(num_workers):
        lo, hi = worker * per_worker, (worker + 1) * per_worker
        parts = []
        for (ref, rows), start in zip(batches, row_starts[:-1]):
            a, b = max(lo, start), min(hi, start + rows)
            if a < b:
                parts.append((ref, int(a - start), int(b - start)))
        shards.append(EpochShard(epoch, parts, np.asarray(advantages[lo:hi], dtype=np.float32)))
    return shards
