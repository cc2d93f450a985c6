"""Faults in the distributed system: each one is recovered from, or stops the run with an error
that names the component and the batch, within a bounded time (issue 15). Real Ray, real actors.

Faults that cannot be produced for real on a CPU are injected, and each test says how: a sampler
whose `sample` raises is a task whose prompt count is wrong (the same path a CUDA OOM or a full
object store takes: an exception inside `sample`).

Each test runs the call under test on a thread and gives it a generous deadline: before the
fixes these calls never returned, so a deadline is how "hangs" fails; nothing here asserts speed.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import ray
import torch

from ddpo_ray.config import build_config
from ddpo_ray.distributed.sampler import Sampler, SampleTask, SamplingError
from ddpo_ray.distributed.weight_transport import InProcessTransport, ObjectStoreTransport, PolicyWeights
from tests.helpers import SMALL, wait_for

DEADLINE_S = 120.0  # far beyond the few seconds these take; only a hang reaches it
CFG = [*SMALL, "sample.batch_size=2", "sample.num_steps=2", "metrics=false"]
NO_WEIGHTS = PolicyWeights(version=0, num_bytes=0, payload=None)  # never fetched: sample fails first


def finishes(call, what: str):
    """call() on a thread: its result, or the exception it raised; fails if it is still running at the deadline."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    assert not thread.is_alive(), f"{what}: still waiting after {DEADLINE_S:.0f} s (a hang)"
    return outcome


def _raises(call, errors) -> bool:
    try:
        call()
    except errors:
        return True
    return False


def killed(actor) -> None:
    """ray.kill, and wait until the actor is gone (ray.kill only asks for it)."""
    ray.kill(actor)
    wait_for(lambda: _raises(lambda: ray.get(actor.__ray_ready__.remote(), timeout=5),
                             (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError)),
             timeout_s=DEADLINE_S, interval_s=0.1, what=f"{actor} to die after ray.kill")


def lost_for_good(ref) -> None:
    """Wait until `ref`, whose owner was killed, is gone (the node frees it a moment later)."""
    wait_for(lambda: _raises(lambda: ray.get(ref, timeout=5), ray.exceptions.ObjectLostError),
             timeout_s=DEADLINE_S, interval_s=0.1, what="the object to go with its owner")


def bad_task(epoch: int = 0, batch_index: int = 3) -> SampleTask:
    return SampleTask(epoch=epoch, batch_index=batch_index, prompts=("a red circle",))  # batch_size is 2


def test_a_sample_that_raises_fails_the_batchs_rewards_call_instead_of_hanging_it():
    """In one process: the `rewards` call paired with a failed `sample` used to wait forever."""
    sampler = Sampler(build_config(overrides=CFG), sampler_id=7, transport=InProcessTransport(),
                      reward_client=object())  # never reached: sample fails before submitting
    task = bad_task()
    with pytest.raises(ValueError, match="expected sample.batch_size=2"):
        sampler.sample(task, NO_WEIGHTS)
    outcome = finishes(lambda: sampler.rewards(task), "rewards of a failed batch")
    error = outcome.get("error")
    assert isinstance(error, SamplingError), outcome
    assert "sampler 7: batch 3 of epoch 0 failed while sampling: ValueError" in str(error)


@pytest.mark.ray
def test_a_sampler_whose_sample_raises_stops_the_epoch_with_an_error_naming_it(reward_apps):
    from ddpo_ray.distributed.sampler_pool import SamplerPool

    pool = SamplerPool(build_config(overrides=CFG), name_prefix="fault-raises")
    try:
        outcome = finishes(lambda: pool.sample_epoch([bad_task()], NO_WEIGHTS), "sample_epoch")
    finally:
        pool.shutdown()
    error = outcome.get("error")
    assert isinstance(error, SamplingError), outcome
    assert "fault-raises-0, batch 3 of epoch 0" in str(error) and "expected sample.batch_size=2" in str(error)


@pytest.mark.ray
def test_when_every_sampler_is_dead_the_epoch_stops_with_an_error(reward_apps):
    """Used to re-issue the batch to the dead samplers forever."""
    from ddpo_ray.distributed.sampler_pool import SamplerPool

    cfg = build_config(overrides=[*CFG, "cluster.num_samplers=1", "cluster.sampler_max_restarts=0"])
    pool = SamplerPool(cfg, name_prefix="fault-dead")
    ray.kill(pool.actors[0], no_restart=True)
    task = SampleTask(epoch=0, batch_index=1, prompts=("a red circle", "a blue square"))
    try:
        outcome = finishes(lambda: pool.sample_epoch([task], NO_WEIGHTS), "sample_epoch")
    finally:
        pool.shutdown()
    error = outcome.get("error")
    assert isinstance(error, SamplingError), outcome
    assert "batch 1 of epoch 0: every sampler was lost on it" in str(error) and "fault-dead-0" in str(error)


@pytest.mark.ray
def test_samplers_no_node_can_hold_stop_with_an_error_naming_what_they_ask_for(reward_apps):
    """Used to wait for placement forever (a resource key no node has, or num_samplers=64)."""
    from ddpo_ray.distributed.sampler_pool import SamplerPlacementError, SamplerPool

    cfg = build_config(overrides=[*CFG, "cluster.sampler_resources={no_such_node: 1}",
                                  "cluster.placement_timeout_s=2"])
    outcome = finishes(lambda: SamplerPool(cfg, name_prefix="fault-unplaceable"), "SamplerPool")
    error = outcome.get("error")
    assert isinstance(error, SamplerPlacementError), outcome
    assert "1 of cluster.num_samplers=1 samplers were not placed" in str(error)
    assert "'no_such_node': 1.0" in str(error) and "cluster.placement_timeout_s=2" in str(error)
    assert not [a for a in ray.util.list_named_actors() if a.startswith("fault-unplaceable")]


@pytest.mark.ray
def test_learner_workers_no_node_can_hold_stop_the_run_with_an_error_naming_what_they_ask_for(serve_instance, tmp_path):
    """Ray Train retries a worker group it cannot place forever (it used to end only after
    cluster.learner_timeout_s, an hour); now the first start is bounded like the samplers'."""
    from ddpo_ray.distributed.learner import Learner, LearnerError
    from ddpo_ray.records.run_dir import RunDirectory

    cfg = build_config(overrides=[*CFG, "cluster.cpus_per_learner_worker=64", "cluster.placement_timeout_s=2",
                                  f"output_dir={tmp_path}", "run_name=unplaceable-learner"])
    learner = Learner(cfg, RunDirectory(tmp_path / "unplaceable-learner"), first_epoch=0, resume_path=None)
    try:
        error = finishes(lambda: learner.policy(0), "the driver's wait for the learner's first version").get("error")
    finally:
        learner.abort()
    assert isinstance(error, LearnerError), error
    assert "LearnerPlacementError" in str(error) and "cluster.placement_timeout_s=2" in str(error)
    assert "1 workers (cluster.learner_workers) x {'CPU': 64.0}" in str(error)


@pytest.mark.ray
def test_the_drivers_waits_on_the_exchange_end_with_an_error_naming_what_never_came(serve_instance):
    """A learner that never publishes (stuck, or its workers never placed): the driver's wait
    ends after cluster.learner_timeout_s with an error, not never."""
    from ddpo_ray.distributed.exchange import EpochExchange

    assert build_config().cluster.learner_timeout_s < float("inf")
    exchange = EpochExchange.remote()
    try:
        for call, what in ((exchange.get_policy.remote(1, 1.0), "policy version 1"),
                           (exchange.get_checkpoint.remote(0, 1.0), "checkpoint of epoch 0")):
            outcome = finishes(lambda call=call: ray.get(call), what)
            error = outcome.get("error")
            assert isinstance(error, ray.exceptions.RayTaskError), outcome
            assert what in str(error) and "cluster.learner_timeout_s" in str(error)
    finally:
        ray.kill(exchange)


@pytest.mark.ray
def test_a_dead_exchange_stops_the_run_naming_it_and_the_learner_stops_instead_of_restarting(reward_apps, tmp_path):
    """Killed after epoch 0 (ray.kill: what a lost node or an OOM kill does to it). Used to surface
    as a bare RayActorError while Ray Train restarted the learner's workers against an exchange
    that can never answer, reloading the pipeline each time (here: forever, learner_max_failures=-1)."""
    from ddpo_ray.distributed.driver import RayBackend
    from ddpo_ray.distributed.learner import ExchangeLostError
    from ddpo_ray.training.epoch_loop import EpochLoop

    cfg = build_config(overrides=[*CFG, "num_epochs=4", "eval.every=0", "cluster.learner_max_failures=-1",
                                  f"output_dir={tmp_path}", "run_name=dead-exchange"])
    backend = RayBackend(cfg)

    def kill_exchange_after_epoch_0(metrics: dict) -> None:
        if metrics["epoch"] == 0:
            ray.kill(backend.learner.exchange)

    loop = EpochLoop(cfg, backend, exporter="ray", on_epoch=kill_exchange_after_epoch_0)
    error = finishes(loop.run, "a run whose exchange died").get("error")
    assert isinstance(error, ExchangeLostError), error
    assert "the epoch exchange (the actor between the driver and the learner) died" in str(error)
    assert "resume_from=latest" in str(error)
    backend.learner._thread.join(DEADLINE_S)  # fit() returns: its workers stopped, none restarted
    assert not backend.learner._thread.is_alive(), "Ray Train kept restarting the learner's workers"
    assert backend.learner.error is None


@ray.remote(num_cpus=0)
class _Publisher:
    """Publishes weights the way learner rank 0 does (`ray.put` in its own process, so it owns them)."""

    def publish(self, state, version: int) -> PolicyWeights:
        return ObjectStoreTransport().publish(state, version)


def _adapter_state(cfg) -> dict:
    from ddpo_ray.models.lora import trainable_parameters, trainable_state_dict
    from ddpo_ray.models.pipelines import load_pipeline

    unet = load_pipeline(cfg.model).unet
    trainable_parameters(unet, cfg.model.use_lora, cfg.model.lora_rank, seed=cfg.seed)
    return trainable_state_dict(unet, cfg.model.use_lora)


@pytest.mark.ray
def test_a_batch_whose_weights_died_with_their_owner_is_sampled_again_with_the_republished_copy(reward_apps):
    """Real: the weights' owner is killed before the samplers fetch them, what a learner rank 0
    killed at staleness 0 does to the version the samplers are about to load (bench/faults.py
    found that run stopping with OwnerDiedError). With `republished` the batches are sampled
    again with the restarted learner's copy; without it the error names the lost weights."""
    from ddpo_ray.distributed.sampler import WeightsLostError
    from ddpo_ray.distributed.sampler_pool import SamplerPool

    cfg = build_config(overrides=CFG)
    state = _adapter_state(cfg)
    publisher = _Publisher.remote()
    lost = ray.get(publisher.publish.remote(state, 1))
    killed(publisher)
    lost_for_good(lost.payload[0])
    asked = []

    def republished(weights: PolicyWeights) -> PolicyWeights:
        asked.append(weights)
        return ObjectStoreTransport().publish(state, weights.version)

    tasks = [SampleTask(epoch=1, batch_index=b, prompts=("a red circle", "a blue square")) for b in range(2)]
    pool = SamplerPool(cfg, name_prefix="fault-lost-weights")
    try:
        without = finishes(lambda: pool.sample_epoch(tasks[:1], lost), "sample_epoch without republished")
        outcome = finishes(lambda: pool.sample_epoch(tasks, lost, republished=republished), "sample_epoch")
    finally:
        pool.shutdown()
    sampled = outcome.get("result")
    assert sampled is not None, outcome
    assert [b.task.batch_index for b in sampled.batches] == [0, 1]
    assert all(b.policy_version == 1 for b in sampled.batches)
    assert asked == [lost], "one republished copy for the epoch, not one per batch"
    assert sampled.reissued == 2 and all("weights were lost with their owner" in e for e in sampled.events)
    error = without.get("error")
    assert isinstance(error, SamplingError), without
    assert "batch 0 of epoch 1: policy v1's weights were lost with their owner" in str(error)
    assert issubclass(WeightsLostError, SamplingError)


@ray.remote(num_cpus=0)
class _Holder:
    """Owns an object it put, as a sampler owns nothing but its node's store holds its batches."""

    def put(self, value):
        return [ray.put(value)]  # in a list: returned as a ref, not resolved


@pytest.mark.ray
def test_trajectories_lost_with_their_node_stop_the_learner_with_an_error_naming_the_epoch(serve_instance):
    """Real lost objects (their owner killed). bench/faults.py found a removed sampler node
    failing the learner's shard fetch on every Ray Train restart, each reloading the pipeline;
    now the fetch names the epoch and the parts, and the loop does not retry it."""
    from ddpo_ray.distributed.learner import TrajectoriesLostError, assemble_shard
    from ddpo_ray.maths.sharding import EpochShard

    holder = _Holder.remote()
    # Large enough for the shared object store (a small object would travel inline with the ref).
    (ref,) = ray.get(holder.put.remote(np.zeros(1 << 20)))
    killed(holder)
    lost_for_good(ref)
    shard = EpochShard(epoch=5, parts=[(ref, 0, 4)], advantages=np.zeros(4, dtype=np.float32))
    error = finishes(lambda: assemble_shard(shard, torch.device("cpu")), "assemble_shard").get("error")
    assert isinstance(error, TrajectoriesLostError), error
    assert "epoch 5: the trajectories of parts [0] of 1" in str(error) and "resume_from=latest" in str(error)


def _shard(epoch: int):
    from ddpo_ray.maths.sharding import EpochShard

    return EpochShard(epoch=epoch, parts=[(ray.put(np.zeros(4)), 0, 4)], advantages=np.zeros(4, dtype=np.float32))


def _weights(version: int) -> PolicyWeights:
    return PolicyWeights(version=version, num_bytes=0, payload=None)


def test_the_exchange_never_imports_torch():
    """What the exchange actor loads and unpickles (its module, a policy version, an epoch shard,
    a learner state as bytes) pulls in no torch: a process that imports torch holds ~0.2 GB."""
    import pickle
    import subprocess
    import sys

    from ddpo_ray.maths.sharding import EpochShard
    from ddpo_ray.records.checkpoint import state_bytes

    held = pickle.dumps([PolicyWeights(version=3, num_bytes=12, payload=("a ref",)),
                         EpochShard(epoch=0, parts=[], advantages=np.zeros(4, dtype=np.float32)),
                         state_bytes({"weights": {"w": torch.ones(2)}})])
    child = ("import pickle, sys; import ddpo_ray.distributed.exchange; "
             "pickle.loads(sys.stdin.buffer.read()); print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", child], input=held, capture_output=True, check=True)
    assert out.stdout.decode().strip() == "[]"


def test_without_checkpoints_the_exchange_holds_one_epoch_in_flight_not_every_epoch(serve_instance):
    """save_freq=0 (issue 15, item 8): the shards held every epoch's trajectories in the object
    store until the run ended (~1.8 GB per epoch at SD1.5 size). Now each epoch goes once trained,
    and a restarted worker group that asks for one is told why it cannot continue."""
    from ddpo_ray.distributed.exchange import EpochExchange, EpochReleasedError

    exchange = EpochExchange.remote(checkpointed=False, staleness=0)
    try:
        ray.get(exchange.put_policy.remote(_weights(0), {}))
        for epoch in range(4):
            ray.get(exchange.put_epoch.remote(epoch, [_shard(epoch)]))
            assert ray.get(exchange.get_shard.remote(epoch, 0)).epoch == epoch
            ray.get(exchange.put_policy.remote(_weights(epoch + 1), {}))  # epoch trained
        held = ray.get(exchange.held.remote())
        assert held == {"shard_epochs": [], "policy_versions": [3, 4], "checkpoint_epochs": []}
        with pytest.raises(EpochReleasedError, match=r"epoch 0's shards were released .* save_freq > 0"):
            ray.get(exchange.get_shard.remote(0, 0, 1.0))
    finally:
        ray.kill(exchange)


def test_with_checkpoints_the_exchange_keeps_shards_until_a_checkpoint_covers_them(serve_instance):
    """A restarted worker group pulls the epochs after the newest checkpoint again, so those stay;
    at staleness 1 the driver may still ask for one version more."""
    from ddpo_ray.distributed.exchange import EpochExchange

    exchange = EpochExchange.remote(checkpointed=True, staleness=1)
    try:
        ray.get(exchange.put_policy.remote(_weights(0), {}))
        for epoch in range(4):
            ray.get(exchange.put_epoch.remote(epoch, [_shard(epoch)]))
            ray.get(exchange.put_policy.remote(_weights(epoch + 1), {}))
        assert ray.get(exchange.held.remote()) == {"shard_epochs": [0, 1, 2, 3], "policy_versions": [2, 3, 4],
                                                   "checkpoint_epochs": []}
        ray.get(exchange.put_checkpoint.remote(1, b"state 1"))
        ray.get(exchange.put_checkpoint.remote(2, b"state 2"))  # before the driver took epoch 1's
        assert ray.get(exchange.held.remote()) == {"shard_epochs": [3], "policy_versions": [2, 3, 4],
                                                   "checkpoint_epochs": [1, 2]}
        assert ray.get(exchange.get_checkpoint.remote(1)) == b"state 1"
        assert ray.get(exchange.get_checkpoint.remote(2)) == b"state 2"
        assert ray.get(exchange.latest_checkpoint.remote()) == (2, b"state 2")  # the restart point stays
        assert ray.get(exchange.held.remote())["checkpoint_epochs"] == [2]
        assert ray.get(exchange.get_shard.remote(3, 0)).epoch == 3
    finally:
        ray.kill(exchange)


def test_a_copy_being_replaced_is_not_returned_when_the_learner_fails_instead(serve_instance):
    """The driver waits for a version to be published anew (its copy died with its owner); when
    the learner fails instead, the wait raises with the learner's reason, not the dead copy."""
    from ddpo_ray.distributed.exchange import EpochExchange

    exchange = EpochExchange.remote()
    try:
        lost = _weights(2)
        ray.get(exchange.put_policy.remote(lost, {}))
        waiting = exchange.get_policy.remote(2, 60.0, replacing=lost)
        ray.get(exchange.fail.remote("EpochReleasedError: the reason"))
        outcome = finishes(lambda: ray.get(waiting), "the replacement wait")
        assert "the learner failed before publishing policy version 2: EpochReleasedError: the reason" in str(
            outcome.get("error")), outcome
    finally:
        ray.kill(exchange)


@pytest.mark.ray
@pytest.mark.slow
def test_a_learner_worker_killed_in_a_run_without_checkpoints_stops_it_naming_why(reward_apps, tmp_path):
    """A run with save_freq=0 has nothing a restarted worker group could resume from: it stops
    with the reason (the shards it asks for were released) instead of retraining or waiting."""
    import os
    import signal

    from ddpo_ray.distributed.driver import RayBackend
    from ddpo_ray.distributed.learner import LearnerError
    from ddpo_ray.training.epoch_loop import EpochLoop
    from tests.helpers import train_worker_pids

    cfg = build_config(overrides=[*CFG, "num_epochs=5", "save_freq=0", "eval.every=0", f"output_dir={tmp_path}",
                                  "run_name=no-checkpoints"])
    backend = RayBackend(cfg)
    held: list[dict] = []

    def after_each_epoch(metrics: dict) -> None:
        held.append(ray.get(backend.learner.exchange.held.remote()))
        if metrics["epoch"] == 1:
            (worker,) = train_worker_pids()
            os.kill(worker, signal.SIGKILL)

    loop = EpochLoop(cfg, backend, exporter="ray", on_epoch=after_each_epoch)
    error = finishes(loop.run, "a run whose learner worker died").get("error")
    assert held[:2] == [{"shard_epochs": [], "policy_versions": [0, 1], "checkpoint_epochs": []},
                        {"shard_epochs": [], "policy_versions": [1, 2], "checkpoint_epochs": []}], held
    assert isinstance(error, (LearnerError, RuntimeError)), error
    assert "EpochReleasedError" in str(error) and "save_freq > 0" in str(error), error


def _raising_jpeg_app():
    """A stand-in for `jpeg_incompressibility` whose replica raises on every request (injected:
    what a replica whose model fails, say CUDA OOM, returns)."""
    from ray import serve

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.5})
    class RaisingJpeg:
        async def score(self, images, prompts, metadata=None):
            raise RuntimeError("injected: this replica's model failed")

    return RaisingJpeg.bind()


@pytest.mark.ray
def test_a_reward_replica_that_raises_stops_the_epoch_with_an_error_naming_the_reward_and_batch(reward_apps):
    """The replica is alive and answers with an error: not retried (it would fail again), and the
    epoch stops at once with the sampler, the batch, the reward application and the cause."""
    from ray import serve

    from ddpo_ray.distributed.sampler_pool import SamplerPool
    from ddpo_ray.distributed.weight_transport import INITIAL_POLICY
    from reward_services.registry import build_reward_app
    from tests.helpers import TEST_APP_ARGS

    app = "jpeg_incompressibility"
    serve.run(_raising_jpeg_app(), name=app, route_prefix=f"/{app}")
    cfg = build_config(overrides=[*CFG, f"reward.name={app}", "cluster.num_samplers=1"])
    pool = SamplerPool(cfg, name_prefix="fault-reward")
    task = SampleTask(epoch=0, batch_index=0, prompts=("a red circle", "a blue square"))
    try:
        outcome = finishes(lambda: pool.sample_epoch([task], INITIAL_POLICY), "sample_epoch")
    finally:
        pool.shutdown()
        serve.run(build_reward_app(app, TEST_APP_ARGS[app]), name=app, route_prefix=f"/{app}")
    error = outcome.get("error")
    assert isinstance(error, SamplingError), outcome
    message = str(error)
    assert "fault-reward-0, batch 0 of epoch 0" in message, message
    assert "injected: this replica's model failed" in message and app in message, message
