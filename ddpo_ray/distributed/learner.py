"""The PPO learner as a Ray Train `TorchTrainer`: workers pull epochs, rank 0 publishes weights.

Each worker holds the frozen pipeline and the trainable LoRA (DDP over the LoRA parameters when
there are several workers). Per epoch it pulls its shard from the `EpochExchange`, runs the
PPO passes of `ddpo_ray.training.steps.train_inner_epochs` (the single-process loop's code), and reports
metrics with `ray.train.report`; rank 0 publishes the new policy version through the weight
transport and hands the learner's half of checkpoints (`ddpo_ray.records.checkpoint.learner_state`)
to the exchange, from which the driver writes it into the run directory, the one copy (none is
reported to Ray Train): the workers never touch the run directory, so a cluster needs no
filesystem shared between nodes. A worker group that Ray Train restarts after a failure
(`FailureConfig`) resumes from the newest of those states, as the exchange holds them, and pulls
the following epochs again (`learner_restarts` in the metrics counts restarts).

The driver side is `Learner`: it runs `TorchTrainer.fit()` on a background thread (fit blocks
until training ends) and talks to the workers only through the exchange.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ddpo_ray.config import DDPOConfig
from ddpo_ray.distributed.exchange import EpochExchange, EpochReleasedError, PublishedPolicy
from ddpo_ray.distributed.weight_transport import PolicyWeights, make_transport
from ddpo_ray.infra.torch_thread import match_torch_threads_to_cpus
from ddpo_ray.maths.diffusion import Trajectories
from ddpo_ray.maths.sharding import EpochShard
from ddpo_ray.models.lora import trainable_state_dict
from ddpo_ray.models.pipelines import drop_sampling_modules, load_pipeline
from ddpo_ray.records.checkpoint import (
    learner_state,
    read_learner_state,
    restore_learner_state,
    state_bytes,
    state_from_bytes,
)
from ddpo_ray.records.run_dir import RunDirectory
from ddpo_ray.training.epoch_loop import checkpoint_due
from ddpo_ray.training.collectives import mean_over_ranks, reduction_device
from ddpo_ray.training.steps import make_trainer_state, train_inner_epochs


class TrajectoriesLostError(RuntimeError):
    """An epoch's trajectories left the object store with the node that sampled them."""


def assemble_shard(shard: EpochShard, device: torch.device) -> tuple[Trajectories, torch.Tensor]:
    """Fetch a shard's trajectory rows from the object store: (trajectories, advantages)."""
    refs = [ref for ref, _, _ in shard.parts]
    try:
        batches = ray.get(refs)
    except ray.exceptions.ObjectLostError as exc:
        lost = [i for i, ref in enumerate(refs) if _is_lost(ref)]
        raise TrajectoriesLostError(
            f"epoch {shard.epoch}: the trajectories of parts {lost} of {len(refs)} in this learner's shard "
            f"were lost ({type(exc).__name__}: the node that sampled them left the cluster); they cannot be "
            "fetched again, so the run stops here, and resume_from=latest samples the epoch anew"
        ) from None
    rows = [batch.select(range(start, stop)) for batch, (_, start, stop) in zip(batches, shard.parts)]
    trajectories = Trajectories.concat(rows).to(device)
    advantages = torch.tensor(np.array(shard.advantages, dtype=np.float32), device=device)  # own, writable copy
    if advantages.shape not in ((len(trajectories),), (len(trajectories), trajectories.num_steps)):
        raise ValueError(
            f"shard of epoch {shard.epoch}: advantages of shape {tuple(advantages.shape)} for "
            f"{len(trajectories)} samples of {trajectories.num_steps} steps"
        )
    return trajectories, advantages


def _is_lost(ref: Any) -> bool:
    try:
        ray.get(ref, timeout=10)
        return False
    except (ray.exceptions.ObjectLostError, ray.exceptions.GetTimeoutError):
        return True


def learner_loop(config: dict[str, Any]) -> None:
    """The training function every Ray Train worker runs (`train_loop_per_worker`).

    A worker that finds the exchange gone (it died, or the driver dropped it) returns instead of
    raising: an error would make Ray Train restart the group, reloading the pipeline each time,
    against an exchange that can never answer again. The driver's next wait on the exchange
    raises `ExchangeLostError`. Lost trajectories end the same way (a restart would find them
    lost too), after telling the exchange, so the driver's wait names them; so do the released
    shards a restart of a run without checkpoints asks for.
    """
    try:
        _learn(config)
    except ray.exceptions.ActorDiedError as exc:  # the only actor a worker calls is the exchange
        print(f"learner: the epoch exchange is gone ({type(exc).__name__}); this worker stops", flush=True)
    except (TrajectoriesLostError, EpochReleasedError) as exc:  # a restart would find the same: not retried
        print(f"learner: {exc}", flush=True)
        try:
            ray.get(config["exchange"].fail.remote(f"{type(exc).__name__}: {exc}"))
        except ray.exceptions.RayActorError:
            pass  # the exchange went too: the driver's next wait says so


def _learn(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = DDPOConfig.model_validate(config["cfg"])
    exchange = config["exchange"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    match_torch_threads_to_cpus(cfg.cluster.torch_threads_here())  # cluster.torch_threads
    device = ray.train.torch.get_device()

    pipe = drop_sampling_modules(load_pipeline(cfg.model, device, seed=cfg.seed))
    trainer = make_trainer_state(pipe, cfg)
    params, optimizer = trainer.params, trainer.optimizer

    # Where to start: the exchange's newest checkpoint (this session's, when Ray Train restarted the
    # worker group, else the state the run resumed from), else epoch 0 (see
    # ddpo_ray.distributed.exchange for why not Ray Train's).
    first_epoch = config["first_epoch"]
    restart_point = ray.get(exchange.latest_checkpoint.remote())
    if restart_point is not None:
        last_epoch, packed = restart_point
        where = f"checkpoint of epoch {last_epoch}"
        restore_learner_state(state_from_bytes(packed, where), pipe.unet, cfg.model.use_lora, optimizer, where=where)
        first_epoch = last_epoch + 1

    restarts = ray.get(exchange.group_started.remote()) if rank == 0 else 0
    if restarts:
        print(f"learner: worker group restart {restarts}, continuing at epoch {first_epoch}", flush=True)

    unet = ray.train.torch.prepare_model(pipe.unet)  # DDP when world_size > 1
    no_sync = unet.no_sync if isinstance(unet, torch.nn.parallel.DistributedDataParallel) else contextlib.nullcontext
    transport = make_transport(cfg.cluster.weight_transport)
    metrics_device = (
        reduction_device(torch.distributed.get_backend(), device) if torch.distributed.is_initialized() else device
    )

    def publish(version: int, metrics: dict[str, Any]) -> None:
        if rank == 0:
            weights = transport.publish(trainable_state_dict(pipe.unet, cfg.model.use_lora), version)
            ray.get(exchange.put_policy.remote(weights, metrics))

    publish(first_epoch, {})  # policy version == epochs trained
    last_trained = first_epoch - 1
    # Until the driver stops it (after the last epoch, or early): a worker that returned on its
    # own after the last epoch would take the object-store copies of its weights with it while
    # the driver may still evaluate and save them (seen as OwnerDiedError on a loaded machine).
    for epoch in itertools.count(first_epoch):
        shard = ray.get(exchange.get_shard.remote(epoch, rank))
        if shard is None:
            break  # the driver stopped the run
        start = time.perf_counter()
        trajectories, advantages = assemble_shard(shard, device)
        metrics = train_inner_epochs(
            unet, pipe.scheduler, optimizer, params, trajectories, advantages, cfg, epoch, rank, no_sync,
            grad_scaler=trainer.grad_scaler,
        )
        if world_size > 1:
            metrics = mean_over_ranks(metrics, metrics_device)
        metrics["time_training"] = time.perf_counter() - start
        metrics["learner_restarts"] = restarts
        publish(epoch + 1, metrics)
        last_trained = epoch

        saved = learner_state(pipe.unet, cfg.model.use_lora, optimizer) if checkpoint_due(cfg, epoch) and rank == 0 else None
        # No checkpoint goes to Ray Train: a restart reads the exchange's (above), so Ray Train's
        # copy under <run>/ray_train was a second copy of every checkpoint that nothing read.
        ray.train.report({"epoch": epoch, **metrics})  # a barrier for all ranks
        if saved is not None:
            ray.get(exchange.put_checkpoint.remote(epoch, state_bytes(saved)))

    # A run stopped early (the guard) asks for a checkpoint of the last epoch it recorded.
    final = ray.get(exchange.final_checkpoint_epoch.remote())
    if rank == 0 and final is not None and final == last_trained and not checkpoint_due(cfg, final):
        state = learner_state(pipe.unet, cfg.model.use_lora, optimizer)
        ray.get(exchange.put_checkpoint.remote(final, state_bytes(state)))


class LearnerPlacementError(RuntimeError):
    """The learner's worker group was not placed and loaded within cluster.placement_timeout_s."""


class LearnerError(RuntimeError):
    """A driver's wait on the learner ended in an error: a deadline, or the learner's own failure."""


class ExchangeLostError(RuntimeError):
    """The EpochExchange actor died: the epochs and versions it held are gone, so the run stops."""


_EXCHANGE_SLACK_S = 60.0  # beyond a wait's own deadline, for the exchange to answer at all


class Learner:
    """The driver's handle on the learner: start it, feed it epochs, read back policies."""

    def __init__(self, cfg: DDPOConfig, run_dir: RunDirectory, first_epoch: int, resume_path: Path | None):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        # On the driver's node: it holds every epoch in flight, so it must not share the fate
        # of a sampler's or a learner's node (measured: a removed sampler node took it along).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        cluster = cfg.cluster
        self.exchange = EpochExchange.options(scheduling_strategy=here).remote(
            checkpointed=cfg.save_freq > 0, staleness=cluster.staleness
        )
        if resume_path is not None:  # read here, on the driver: the workers start from the exchange's copy
            state = read_learner_state(Path(resume_path))  # checked here, before any worker reads it
            ray.get(self.exchange.put_checkpoint.remote(first_epoch - 1, state_bytes(state), written=True))
        self.timeout_s = cluster.learner_timeout_s
        use_gpu = cluster.gpus_per_learner_worker > 0
        resources = {"CPU": cluster.cpus_per_learner_worker}
        if use_gpu:
            resources["GPU"] = cluster.gpus_per_learner_worker
        self.trainer = TorchTrainer(
            learner_loop,
            train_loop_config={
                "cfg": cfg.to_dict(),
                "exchange": self.exchange,
                "first_epoch": first_epoch,
            },
            scaling_config=ScalingConfig(
                num_workers=cluster.learner_workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                # A fresh Ray Train run per driver session: its checkpoints are for restarts within
                # this session; resuming a killed run goes through the run directory.
                name=f"learner-{time.strftime('%Y%m%d-%H%M%S')}-{id(self):x}",
                storage_path=str((run_dir.root / "ray_train").resolve()),
                failure_config=FailureConfig(max_failures=cluster.learner_max_failures),
            ),
        )
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._fit, name="learner-fit", daemon=True)
        self._thread.start()
        # Ray Train retries a worker group no node can hold forever; this bounds the first start.
        self._asked = (f"{cluster.learner_workers} workers (cluster.learner_workers) x {resources} "
                       "(cluster.cpus_per_learner_worker, gpus_per_learner_worker)")
        self._placement_timeout_s = cluster.placement_timeout_s
        threading.Thread(target=self._watch_placement, name="learner-placement", daemon=True).start()

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the driver through the exchange
            self.error = exc
            try:
                ray.get(self.exchange.fail.remote(f"{type(exc).__name__}: {exc}"))
            except ray.exceptions.RayActorError:
                pass  # the exchange is gone too: the driver's next wait says so (ExchangeLostError)

    def _watch_placement(self) -> None:
        """Fail the run (through the exchange, so the driver's next wait raises) when no worker
        group has checked in within cluster.placement_timeout_s: placed, pipeline loaded."""
        timeout_s = self._placement_timeout_s
        try:
            started = ray.get(self.exchange.wait_group_started.remote(timeout_s), timeout=timeout_s + _EXCHANGE_SLACK_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return  # the exchange is gone or stuck: the driver's own waits say so
        if started or self.error is not None:
            return
        self.error = LearnerPlacementError(
            f"the learner's worker group was not placed and ready within cluster.placement_timeout_s={timeout_s:g}; "
            f"it asks for {self._asked}, the cluster has {ray.cluster_resources()}"
        )
        try:
            ray.get(self.exchange.fail.remote(f"LearnerPlacementError: {self.error}"))
        except ray.exceptions.RayActorError:
            pass

    def _get(self, ref: Any, timeout_s: float, what: str) -> Any:
        """ray.get with a deadline: the exchange answers waits itself; this covers an exchange that
        hangs, and one that died (its epochs and policy versions went with it)."""
        try:
            return ray.get(ref, timeout=timeout_s + _EXCHANGE_SLACK_S)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"the epoch exchange did not answer {what} within {timeout_s + _EXCHANGE_SLACK_S:g} s") from None
        except ray.exceptions.RayTaskError as exc:  # the exchange's answer: the learner failed, or a deadline passed
            raise LearnerError(f"{what}: {exc.cause}") from None
        except ray.exceptions.ActorDiedError as exc:
            raise ExchangeLostError(
                f"the epoch exchange (the actor between the driver and the learner) died during {what}: "
                f"{type(exc).__name__}; the run stops here, and resume_from=latest continues it from its "
                "last checkpoint"
            ) from exc

    def put_epoch(self, epoch: int, shards: list[EpochShard]) -> None:
        self._get(self.exchange.put_epoch.remote(epoch, shards), 0.0, f"put_epoch({epoch})")

    def policy(self, version: int, timeout_s: float | None = None) -> PublishedPolicy:
        """Policy `version` (waits for the learner to publish it, at most cluster.learner_timeout_s)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        return self._get(self.exchange.get_policy.remote(version, timeout_s), timeout_s, f"policy({version})")

    def republished(self, lost: PolicyWeights) -> PolicyWeights:
        """The same policy version as `lost` (whose owner, rank 0 of a worker group that died,
        took its object-store copy along), once the restarted group has published it again."""
        ref = self.exchange.get_policy.remote(lost.version, self.timeout_s, replacing=lost)
        return self._get(ref, self.timeout_s, f"policy({lost.version}) published anew").weights

    def checkpoint(self, epoch: int, timeout_s: float | None = None) -> dict[str, Any]:
        """The learner's state after `epoch` (`records.checkpoint.learner_state`) once it has
        handed it over (same deadline), for the driver to write."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        packed = self._get(self.exchange.get_checkpoint.remote(epoch, timeout_s), timeout_s, f"checkpoint({epoch})")
        return state_from_bytes(packed, f"the learner's checkpoint of epoch {epoch}")

    def stop(self, checkpoint_epoch: int | None = None) -> None:
        """No more epochs; with `checkpoint_epoch`, rank 0 first checkpoints that (last trained) epoch."""
        self._get(self.exchange.stop.remote(checkpoint_epoch), 0.0, "stop")

    def finish(self, timeout_s: float = 300.0) -> None:
        """Stop the workers (they finish their loop) and wait for fit() to return."""
        ray.get(self.exchange.stop.remote())
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the learner did not finish within {timeout_s} s")
        if self.error is not None:
            raise RuntimeError(f"the learner failed: {self.error}") from self.error

    def abort(self) -> None:
        """Best effort on the way out (also after finish): stop waiting workers, drop the exchange."""
        try:
            ray.get(self.exchange.stop.remote(), timeout=10)
            if not isinstance(self.error, LearnerPlacementError):  # else fit() is still retrying placement
                self._thread.join(30)
            ray.kill(self.exchange)
        except Exception:  # noqa: BLE001 - the cluster may be going away; nothing to save here
            pass
