"""The rendezvous between the driver and the learner: epochs go in, policy versions come out.

Ray Train is pull-based: nothing calls into a running training function. So the driver puts
each epoch's shards here (object refs to the samplers' trajectories, plus the advantages, one
shard per learner worker) and every learner worker pulls its own; learner rank 0 puts each new
policy version (a `PolicyWeights`, one object-store copy) and its training metrics here and the
driver pulls them.

Shards stay until the epoch is covered by a learner checkpoint: a Ray Train worker group that
restarts after a failure resumes from the newest checkpoint recorded here and pulls the epochs
after it again. (Not from `ray.train.get_checkpoint()`: Ray Train's controller collects reports
by polling, so a worker that dies right after reporting can leave it one checkpoint behind,
whose shards are already gone. Measured here: a kill just after the epoch-0 report restarted
the group with no checkpoint at all.)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import ray

from ddpo_ray.distributed.weight_transport import PolicyWeights
from ddpo_ray.maths.sharding import EpochShard


@dataclass
class PublishedPolicy:
    weights: PolicyWeights
    metrics: dict[str, Any] = field(default_factory=dict)  # the training metrics of the epoch that made it


@ray.remote(num_cpus=0)
class EpochExchange:
    """An async actor; every wait is an asyncio wait, so one call never blocks another."""

    def __init__(self) -> None:
        self._shards: dict[int, list[EpochShard]] = {}
        self._policies: dict[int, PublishedPolicy] = {}
        self._checkpointed: dict[int, str] = {}  # epoch -> checkpoint directory
        self._changed = asyncio.Condition()
        self._stopped = False
        self._final_checkpoint: int | None = None
        self._error: str | None = None
        self._group_starts = 0

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait_for(self, predicate, timeout_s: float | None, what: str = "the learner"):
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"waited {timeout_s:g} s for {what} (cluster.learner_timeout_s); the learner is stuck, "
                "or its workers could not be placed"
            ) from None

    # --- driver -> learner ---------------------------------------------------------------
    async def put_epoch(self, epoch: int, shards: list[EpochShard]) -> None:
        self._shards[epoch] = shards
        await self._notify()

    async def get_shard(self, epoch: int, rank: int, timeout_s: float | None = None) -> EpochShard | None:
        """Worker `rank`'s shard of `epoch`, waiting for it; None when the run is stopping."""
        await self._wait_for(lambda: epoch in self._shards or self._stopped, timeout_s)
        if epoch not in self._shards:
            return None
        return self._shards[epoch][rank]

    async def stop(self, checkpoint_epoch: int | None = None) -> None:
        """No more epochs: workers waiting for one get None and finish (after checkpointing
        `checkpoint_epoch`, when the driver asks for it: a run stopped by its guard)."""
        if checkpoint_epoch is not None:
            self._final_checkpoint = checkpoint_epoch
        self._stopped = True
        await self._notify()

    async def final_checkpoint_epoch(self) -> int | None:
        return self._final_checkpoint

    # --- learner -> driver ---------------------------------------------------------------
    async def group_started(self) -> int:
        """Rank 0 of a (re)started worker group checks in; returns the restarts so far."""
        self._group_starts += 1
        await self._notify()
        return self._group_starts - 1

    async def wait_group_started(self, timeout_s: float) -> bool:
        """Whether a worker group checked in within `timeout_s` (False: never placed or loaded)."""
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._group_starts > 0), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def put_policy(self, weights: PolicyWeights, metrics: dict[str, Any]) -> None:
        # A worker group restarted from a checkpoint publishes versions again: keep the newest,
        # whose object-store copy has a live owner (the old group's copies died with it).
        self._policies[weights.version] = PublishedPolicy(weights, metrics)
        await self._notify()

    async def get_policy(
        self, version: int, timeout_s: float | None = None, replacing: PolicyWeights | None = None
    ) -> PublishedPolicy:
        """Policy `version`, waiting for it; raises if the learner failed first. With `replacing`
        (a copy whose owner died), waits for the version to be published anew by a restarted
        worker group."""

        def published() -> bool:
            return version in self._policies and self._policies[version].weights != replacing

        await self._wait_for(lambda: published() or self._error is not None, timeout_s,
                             f"policy version {version}" + (" published anew" if replacing is not None else ""))
        if version not in self._policies:
            raise RuntimeError(f"the learner failed before publishing policy version {version}: {self._error}")
        return self._policies[version]

    async def put_checkpoint(self, epoch: int, directory: str) -> None:
        """The learner's half of checkpoint `epoch` is written; older shards are no longer needed."""
        self._checkpointed[epoch] = directory
        for old in [e for e in self._shards if e <= epoch]:
            del self._shards[old]
        for old in [v for v in self._policies if v < epoch]:
            del self._policies[old]  # drops the last reference to old weights in the object store
        await self._notify()

    async def latest_checkpoint(self) -> tuple[int, str] | None:
        """(epoch, directory) of the newest learner checkpoint of this session, for a restarted
        worker group: every shard after it is still here."""
        if not self._checkpointed:
            return None
        epoch = max(self._checkpointed)
        return epoch, self._checkpointed[epoch]

    async def get_checkpoint(self, epoch: int, timeout_s: float | None = None) -> str:
        await self._wait_for(lambda: epoch in self._checkpointed or self._error is not None, timeout_s,
                             f"the learner's checkpoint of epoch {epoch}")
        if epoch not in self._checkpointed:
            raise RuntimeError(f"the learner failed before checkpointing epoch {epoch}: {self._error}")
        return self._checkpointed[epoch]

    async def fail(self, error: str) -> None:
        """The learner gave up (its fit() raised): wake every waiter with the reason."""
        self._error = error
        await self._notify()
