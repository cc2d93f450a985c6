"""The rendezvous between the driver and the learner: epochs go in, policy versions come out.

Ray Train is pull-based: nothing calls into a running training function. So the driver puts
each epoch's shards here (object refs to the samplers' trajectories, plus the advantages, one
shard per learner worker) and every learner worker pulls its own; learner rank 0 puts each new
policy version (a `PolicyWeights`, one object-store copy) and its training metrics here and the
driver pulls them.

The learner's checkpoints come here too, as values (its weights and optimizer state, as the bytes
of their .pt file: `records.checkpoint.state_bytes`): the driver writes them into the run
directory, so no other node needs to see it. Nothing held here is a tensor, so this actor never
imports torch (0.2 GB and a second of CPU at start-up otherwise).

Shards stay until the epoch is covered by a learner checkpoint: a Ray Train worker group that
restarts after a failure resumes from the newest checkpoint held here (or from the state a
resumed run started from) and pulls the epochs after it again. Not from
`ray.train.get_checkpoint()`: Ray Train's controller collects reports by polling, so a worker
that dies right after reporting can leave it one checkpoint behind, whose shards are already
gone (measured here: a kill just after the epoch-0 report restarted the group with no
checkpoint at all).

A run that checkpoints only at its end (`save_freq=0`) has no restart point, so its shards go as soon
as their epoch is trained: the object store holds one epoch in flight, not every epoch of the
run; a restarted worker group then stops with `EpochReleasedError` instead of waiting for
shards that are gone. Policy versions go once no one can ask for them (more than 1 + staleness
behind the newest), or once checkpointed.
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


class EpochReleasedError(RuntimeError):
    """A worker asked for an epoch whose shards were released after training (`save_freq=0`)."""


@ray.remote(num_cpus=0)
class EpochExchange:
    """An async actor; every wait is an asyncio wait, so one call never blocks another.

    `checkpointed`: the learner checkpoints during the run (`save_freq > 0`), so shards are kept until
    one covers them. `staleness`: how far behind the newest version the driver samples, so how
    many versions it may still ask for.
    """

    def __init__(self, checkpointed: bool = True, staleness: int = 0) -> None:
        self._checkpointed_run = checkpointed
        self._versions_behind = 1 + staleness  # the driver evaluates version v while v + staleness trains
        self._released_through = -1  # epochs up to this one were trained and dropped (no checkpoints)
        self._shards: dict[int, list[EpochShard]] = {}
        self._policies: dict[int, PublishedPolicy] = {}
        self._checkpointed: dict[int, bytes] = {}  # epoch -> the learner's state after it (state_bytes)
        self._fetched_through = -1  # the driver has taken the states up to this epoch to write
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
        if epoch <= self._released_through and epoch not in self._shards:
            raise EpochReleasedError(
                f"epoch {epoch}'s shards were released once it was trained: with save_freq=0 the learner "
                "checkpoints only at the end, so a restarted worker group has nothing to resume from and the run "
                "stops here; set save_freq > 0 for a learner that survives a worker failure"
            )
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
        newest = max(self._policies)
        for old in [v for v in self._policies if v < newest - self._versions_behind]:
            del self._policies[old]  # the driver is past it: drops its object-store copy
        if not self._checkpointed_run:  # version v is epoch v - 1 trained: no restart will read it again
            for old in [e for e in self._shards if e < weights.version]:
                del self._shards[old]
            self._released_through = max(self._released_through, weights.version - 1)
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
        if not published():  # (a copy being replaced is not an answer: its owner is dead)
            raise RuntimeError(f"the learner failed before publishing policy version {version}: {self._error}")
        return self._policies[version]

    async def put_checkpoint(self, epoch: int, state: bytes, written: bool = False) -> None:
        """The learner's state after `epoch` (`learner_state` as `state_bytes`): the driver writes
        it into the run directory, and a restarted worker group starts from the newest one, so
        older shards are no longer needed. `written`: already on disk (a resumed run's start)."""
        self._checkpointed[epoch] = state
        if written:
            self._fetched_through = max(self._fetched_through, epoch)
        self._drop_old_states()
        for old in [e for e in self._shards if e <= epoch]:
            del self._shards[old]
        for old in [v for v in self._policies if v < epoch]:
            del self._policies[old]  # drops the last reference to old weights in the object store
        await self._notify()

    def _drop_old_states(self) -> None:
        """Keep the newest state (the restart point) and those the driver has yet to write."""
        newest = max(self._checkpointed)
        for old in [e for e in self._checkpointed if e < newest and e <= self._fetched_through]:
            del self._checkpointed[old]

    async def held(self) -> dict[str, list[int]]:
        """The epochs whose shards or learner states, and the versions whose weights, it holds."""
        return {"shard_epochs": sorted(self._shards), "policy_versions": sorted(self._policies),
                "checkpoint_epochs": sorted(self._checkpointed)}

    async def latest_checkpoint(self) -> tuple[int, bytes] | None:
        """(epoch, learner state) of the newest checkpoint of this session, or the run's resume
        point, for a (re)started worker group: every shard after it is still here (save_freq > 0)."""
        if not self._checkpointed:
            return None
        epoch = max(self._checkpointed)
        return epoch, self._checkpointed[epoch]

    async def get_checkpoint(self, epoch: int, timeout_s: float | None = None) -> bytes:
        """The learner's state after `epoch`, for the driver to write (waits for it)."""
        await self._wait_for(lambda: epoch in self._checkpointed or self._error is not None, timeout_s,
                             f"the learner's checkpoint of epoch {epoch}")
        if epoch not in self._checkpointed:
            raise RuntimeError(f"the learner failed before checkpointing epoch {epoch}: {self._error}")
        state = self._checkpointed[epoch]
        self._fetched_through = max(self._fetched_through, epoch)
        self._drop_old_states()
        return state

    async def fail(self, error: str) -> None:
        """The learner gave up (its fit() raised): wake every waiter with the reason."""
        self._error = error
        await self._notify()
