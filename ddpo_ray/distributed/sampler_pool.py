"""The driver's view of the samplers: hand out an epoch's tasks, get back every batch exactly once.

Tasks go round-robin to the sampler actors, all at once: each actor samples its tasks in order
while the rewards of earlier ones are computed on Serve. A task whose sampler died (the actor
restarts, `cluster.sampler_max_restarts`) is re-issued to the next sampler; since a batch's noise
is keyed by (seed, epoch, batch), the re-issued batch is the same batch. Every task carries the
weights it is sampled with, so a batch is never older than asked. So an epoch always has exactly
`sample.num_batches_per_epoch` batches, none lost, none doubled.

Or it stops with a `SamplingError` naming the sampler and the batch: when a sampler's `sample`
raises (it is alive, so re-issuing would only fail again), or when a batch has been tried once
per life of every sampler (`cluster.sampler_max_restarts`). Samplers that cannot be placed stop
the pool's start after `cluster.placement_timeout_s`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from ddpo_ray.config import DDPOConfig
from ddpo_ray.distributed.sampler import SamplerActor, SampleTask, SamplingError, ScoredBatch, WeightsLostError
from ddpo_ray.distributed.weight_transport import PolicyWeights

_SAMPLER_LOST = (RayActorError, ActorUnavailableError)
_MAX_WEIGHT_REFRESHES = 3  # per epoch: each is a learner restart while the epoch was sampling
_MAX_UNAVAILABLE = 120  # x the back-off: how long an epoch waits out samplers Ray calls unavailable
_UNAVAILABLE_BACKOFF_S = 1.0


class SamplerPlacementError(RuntimeError):
    """The samplers could not all be placed on the cluster (and loaded) in time."""


@dataclass
class SampledEpoch:
    """An epoch's batches in batch order: trajectory refs (for the learner) and scored batches."""

    trajectories: list[Any]  # ObjectRef[Trajectories], one per batch
    batches: list[ScoredBatch]
    time_sampling: float  # until the last trajectory was ready
    time_reward_wait: float  # from then until the last reward arrived
    reissued: int = 0  # tasks sent again: their sampler died, or their weights were lost
    events: list[str] = field(default_factory=list)


class SamplerPool:
    """`cluster.num_samplers` SamplerActors, created and loaded up front.

    With `wait=False` the actors start loading and `wait_until_ready()` is the caller's to call:
    the driver starts the learner meanwhile, so the two start-ups overlap.
    """

    def __init__(self, cfg: DDPOConfig, name_prefix: str = "ddpo-sampler", wait: bool = True):
        cluster = cfg.cluster
        options = dict(
            num_cpus=cluster.cpus_per_sampler,
            num_gpus=cluster.gpus_per_sampler,
            resources=dict(cluster.sampler_resources),
            max_restarts=cluster.sampler_max_restarts,
            max_task_retries=0,  # re-issuing is ours: a lost task goes to another sampler
        )
        self.actor_names = [f"{name_prefix}-{i}" for i in range(cluster.num_samplers)]
        self.actors = [
            SamplerActor.options(name=name, **options).remote(cfg.to_dict(), i)
            for i, name in enumerate(self.actor_names)
        ]
        self._options, self._placement_timeout_s = options, cluster.placement_timeout_s
        if wait:
            self.wait_until_ready()
        self.reward_timeout_s = cfg.reward.timeout_s
        # A batch is tried at most once per life of every sampler; after that each of them died
        # on it, or is dead for good, and re-issuing again would loop forever.
        lives = cluster.sampler_max_restarts + 1 if cluster.sampler_max_restarts >= 0 else 10
        self.max_attempts = cluster.num_samplers * lives
        self.max_restarts = cluster.sampler_max_restarts

    def wait_until_ready(self) -> None:
        """Every sampler placed and loaded, or an error: an actor no node can hold waits forever."""
        options, timeout_s = self._options, self._placement_timeout_s
        refs = [actor.ready.remote() for actor in self.actors]
        try:
            ray.get(refs, timeout=timeout_s)  # also fails fast if a pipeline cannot load
        except ray.exceptions.GetTimeoutError:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            self.shutdown()
            asked = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options["resources"]}
            raise SamplerPlacementError(
                f"{len(refs) - len(ready)} of cluster.num_samplers={len(refs)} samplers were not placed and "
                f"ready within cluster.placement_timeout_s={timeout_s:g}; each asks for "
                f"{ {k: v for k, v in asked.items() if v} } (cluster.cpus_per_sampler, gpus_per_sampler, "
                f"sampler_resources), the cluster has {ray.cluster_resources()}"
            ) from None

    def _dispatch(self, task: SampleTask, index: int, weights: PolicyWeights) -> tuple[Any, Any]:
        actor = self.actors[index % len(self.actors)]
        trajectories = actor.sample.remote(task, weights)
        # Its own concurrency group: it waits for this task's rewards while the actor samples on.
        scored = actor.rewards.remote(task, None)
        return trajectories, scored

    def sample_epoch(
        self,
        tasks: Sequence[SampleTask],
        weights: PolicyWeights,
        republished: Callable[[PolicyWeights], PolicyWeights] | None = None,
    ) -> SampledEpoch:
        """Sample and score every task with `weights`; returns them in `batch_index` order.

        A batch whose weights were lost (`WeightsLostError`: the learner rank that published them
        died) is sampled again with `republished(weights)`, the same version published anew by
        the restarted learner; without `republished` it is an error."""
        start = time.perf_counter()
        # scored ref -> (task, sampler index, trajectories ref, the weights this try was sent with)
        in_flight: dict[Any, tuple[SampleTask, int, Any, PolicyWeights]] = {}
        events: list[str] = []  # one per re-issued try

        def send(task: SampleTask, index: int, weights: PolicyWeights) -> None:
            trajectories, scored = self._dispatch(task, index, weights)
            in_flight[scored] = (task, index, trajectories, weights)

        def reissue(task: SampleTask, index: int, weights: PolicyWeights, why: str) -> None:
            events.append(f"batch {task.batch_index}: {why}")
            send(task, index, weights)

        for i, task in enumerate(tasks):
            send(task, i, weights)

        # Phase 1: wait until every first-try trajectory is ready (or failed), without fetching.
        ray.wait([t for _, _, t, _ in in_flight.values()], num_returns=len(in_flight), fetch_local=False)
        time_sampling = time.perf_counter() - start

        # Phase 2: collect scored batches; re-issue lost ones.
        done: dict[int, tuple[Any, ScoredBatch]] = {}
        attempts: dict[int, int] = {}  # batch_index -> tries so far, for those tried more than once
        unavailable = 0  # ActorUnavailableError answers this epoch (transient, so not a spent life)
        refreshes = 0
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            task, index, trajectories, sent_with = in_flight.pop(ready[0])
            sampler = self.actor_names[index % len(self.actors)]
            try:
                scored: ScoredBatch = ray.get(ready[0])
            except _SAMPLER_LOST as exc:
                if isinstance(exc, ActorUnavailableError):  # reachable again soon (Ray says): wait, bounded
                    unavailable += 1
                    if unavailable > _MAX_UNAVAILABLE:
                        raise SamplingError(
                            f"batch {task.batch_index} of epoch {task.epoch}: Ray answered that a sampler was "
                            f"unavailable {unavailable} times this epoch ({_UNAVAILABLE_BACKOFF_S:g} s apart); "
                            f"last: {sampler}"
                        ) from None
                    time.sleep(_UNAVAILABLE_BACKOFF_S)
                else:  # the actor died: one of its lives is spent on this batch
                    attempts[task.batch_index] = attempts.get(task.batch_index, 1) + 1
                if attempts.get(task.batch_index, 1) > self.max_attempts:
                    raise SamplingError(
                        f"batch {task.batch_index} of epoch {task.epoch}: every sampler was lost on it "
                        f"({self.max_attempts} attempts over {len(self.actors)} samplers, "
                        f"cluster.sampler_max_restarts={self.max_restarts}); last: "
                        f"{sampler} ({type(exc).__name__})"
                    ) from None
                reissue(task, index + 1, weights, f"{sampler} lost ({type(exc).__name__}); re-issued")
                continue
            except RayTaskError as exc:  # the sampler is alive but its sample (or rewards) raised
                lost = isinstance(exc.cause, WeightsLostError)
                if lost and republished is not None and refreshes < _MAX_WEIGHT_REFRESHES:
                    if sent_with == weights:  # the first try to find these weights gone
                        weights = republished(weights)
                        refreshes += 1
                    reissue(task, index, weights, f"policy v{weights.version}'s weights were lost with their owner; "
                            "re-issued with the learner's republished copy")
                    continue
                why = ""
                if lost:
                    why = (f"policy v{weights.version}'s weights were lost with their owner and "
                           + ("no republished copy can be asked for here; " if republished is None else
                              f"{refreshes} republished copies were lost too; "))
                raise SamplingError(f"{sampler}, batch {task.batch_index} of epoch {task.epoch}: {why}{exc.cause}") from None
            if scored.policy_version != weights.version:
                raise RuntimeError(f"batch {task.batch_index} of epoch {task.epoch} was sampled with policy "
                                   f"v{scored.policy_version}, not the v{weights.version} it was sent with")
            if task.batch_index in done:
                raise RuntimeError(f"batch {task.batch_index} of epoch {task.epoch} arrived twice")
            done[task.batch_index] = (trajectories, scored)
        order = sorted(done)
        expected = sorted(task.batch_index for task in tasks)
        if order != expected:
            raise RuntimeError(f"epoch {tasks[0].epoch}: got batches {order}, expected {expected}")
        return SampledEpoch(
            trajectories=[done[b][0] for b in order],
            batches=[done[b][1] for b in order],
            time_sampling=time_sampling,
            time_reward_wait=time.perf_counter() - start - time_sampling,
            reissued=len(events),
            events=events,
        )

    def generate_eval(self, weights: PolicyWeights) -> Any:
        """The held-out eval images of `weights`, from the first sampler that answers."""
        errors = []
        for actor in self.actors:
            try:
                return ray.get(actor.generate_eval.remote(weights))
            except _SAMPLER_LOST as exc:
                errors.append(f"{type(exc).__name__}")
        raise RuntimeError(f"no sampler could generate the eval images: {errors}")

    def stats(self) -> list[dict[str, Any]]:
        return ray.get([actor.stats.remote() for actor in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
