"""Did a run learn? The held-out gain of one run, in units of its base model's spread. No Ray.

A run is chaotic (one seed's trajectory depends on floating-point detail), so a claim that a
recipe learns is a claim about statistics over seeds, each measured against its own base:
`gain` = (held-out eval mean of a version - that of version 0) / the eval std of version 0 (the
spread of the base model's rewards over the eval images). A run has "learned" when its gain is
at least 1 and has "collapsed" when it ends below where it started. The bench, the tests and
the README's table all read runs through `LearningGain`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any


def in_spreads(value: float, base: float, spread: float) -> float:
    """(value - base) in units of the base's spread (a zero spread counts as tiny, not as zero)."""
    return (value - base) / max(spread, 1e-12)


@dataclass(frozen=True)
class LearningGain:
    """One run's held-out record for one eval key (default: the training reward on eval images)."""

    key: str
    versions: tuple[int, ...]
    values: tuple[float, ...]
    base_std: float

    @classmethod
    def from_evals(
        cls, evals: Sequence[Mapping[str, Any]], key: str = "eval_reward_mean", std_key: str | None = None
    ) -> LearningGain:
        """From a run's eval.jsonl rows (version 0 first). The spread is version 0's `std_key`
        (default: `key` with `_mean` -> `_std`; for a group's key pass the overall one)."""
        if not key.endswith("_mean"):
            raise ValueError(f"key {key!r}: expected an eval key ending in '_mean'")
        std_key = std_key or key.removesuffix("_mean") + "_std"
        rows = [row for row in evals if row.get(key) is not None]
        if not rows or rows[0].get("policy_version") != 0:
            raise ValueError(f"{key!r}: the evals hold no row of policy version 0 to measure a gain from")
        if rows[0].get(std_key) is None:
            raise ValueError(f"std_key {std_key!r}: not in the version-0 eval row")
        return cls(
            key=key,
            versions=tuple(int(row["policy_version"]) for row in rows),
            values=tuple(float(row[key]) for row in rows),
            base_std=float(rows[0][std_key]),
        )

    @property
    def base(self) -> float:
        return self.values[0]

    @property
    def final(self) -> float:
        return self.values[-1]

    @property
    def best(self) -> float:
        return max(self.values)

    @property
    def best_version(self) -> int:
        return self.versions[self.values.index(self.best)]

    def in_spreads(self, value: float) -> float:
        """(value - base) in units of the base spread."""
        return in_spreads(value, self.base, self.base_std)

    @property
    def gain_final(self) -> float:
        return self.in_spreads(self.final)

    @property
    def gain_best(self) -> float:
        return self.in_spreads(self.best)

    @property
    def mean_gain(self) -> float:
        """The gain averaged over every evaluated version after the base: a statistic over epochs."""
        later = self.values[1:]
        return self.in_spreads(sum(later) / len(later)) if later else 0.0

    @property
    def learned(self) -> bool:
        return self.gain_final >= 1.0

    @property
    def collapsed(self) -> bool:
        return self.final < self.base

    def row(self) -> dict[str, Any]:
        """A JSON-ready summary (base/best/final, gains in base spreads, learned/collapsed)."""
        out = asdict(self)
        out.update(base=self.base, best=self.best, final=self.final, best_version=self.best_version,
                   gain_best=self.gain_best, gain_final=self.gain_final, mean_gain=self.mean_gain,
                   learned=self.learned, collapsed=self.collapsed)
        return out
