"""Which policy version samples which epoch, and so how far sampling may run ahead of training. No Ray.

Policy version v is the weights after v epochs of training, so the learner trains epoch e with
version e (the weights it has after epochs 0..e-1) and publishes e + 1.
- staleness 0 (exact DDPO): epoch e is sampled with version e; sampling waits for training.
- staleness 1: epoch e is sampled with version e - 1 while the learner trains epoch e - 1. PPO's
  ratio uses the log-probs stored at sampling time as the "old" ones, so the importance weight
  corrects for the one-version lag (and the clip range bounds it).
Every sampling task carries the weights it must be sampled with, so no trajectory is ever older
than the bound: the epoch path (`ddpo_ray.training.epoch_loop`) asks this module which version
to sample with and how many sampled epochs may wait for training, and that is the whole policy.
"""

from __future__ import annotations


def _check(staleness: int) -> int:
    if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
        raise ValueError(f"staleness={staleness!r}; expected an integer >= 0")
    return staleness


def sampling_version(epoch: int, staleness: int, first_version: int = 0) -> int:
    """The version epoch `epoch` is sampled with (never older than the run's first version)."""
    return max(first_version, epoch - _check(staleness))


def epochs_awaiting_training(staleness: int) -> int:
    """How many sampled epochs may be in training while the next one is sampled: `staleness`.

    0: each epoch is trained (and recorded) before the next is sampled; 1: the sampler samples
    epoch e + 1 while the learner trains epoch e.
    """
    return _check(staleness)
