"""Which policy version samples which epoch, and when a trajectory is too old to train on. No Ray.

Policy version v is the weights after v epochs of training, so the learner trains epoch e with
version e (the weights it has after epochs 0..e-1) and publishes e + 1.
- staleness 0 (exact DDPO): epoch e is sampled with version e; sampling waits for training.
- staleness 1: epoch e is sampled with version e - 1 while the learner trains epoch e - 1. PPO's
  ratio uses the log-probs stored at sampling time as the "old" ones, so the importance weight
  corrects for the one-version lag (and the clip range bounds it).
A trajectory sampled with a version older than (training version - staleness) is stale: it is
dropped, counted and sampled again, never trained on.
"""

from __future__ import annotations


def sampling_version(epoch: int, staleness: int, first_version: int = 0) -> int:
    """The version epoch `epoch` is sampled with (never older than the run's first version)."""
    if staleness < 0:
        raise ValueError(f"staleness={staleness}; expected >= 0")
    return max(first_version, epoch - staleness)


def training_version(epoch: int) -> int:
    """The version the learner holds when it trains epoch `epoch`."""
    return epoch


def is_stale(sampled_with: int, epoch: int, staleness: int) -> bool:
    """True if a trajectory sampled with `sampled_with` is too old to train in `epoch`."""
    return sampled_with < training_version(epoch) - staleness
