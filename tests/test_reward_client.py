"""The sampler-side client on real Serve: weighting, order, retries after a replica dies,
timeouts, and deploying only what is missing.

Where a test needs requests to stay in flight (submit does not wait, a replica dies mid-stream,
a timeout), a stand-in for `jpeg_incompressibility` holds every request at a gate until the test
opens it, so nothing depends on how fast this machine scores images.
"""

import asyncio

import numpy as np
import pytest
import ray
from ray import serve

from ddpo_ray.config import RewardConfig
from reward_services.client import (
    RewardClient,
    RewardTimeoutError,
    ensure_reward_apps,
    shutdown_reward_apps,
)
from reward_services.jpeg import jpeg_sizes_kb
from reward_services.registry import build_reward_app
from tests.helpers import TEST_APP_ARGS, replica_actor_names, running_replicas, sample_images, wait_for

pytestmark = pytest.mark.ray

GATED = "jpeg_incompressibility"  # the application the gated stand-in replaces during a test


def make_gate():
    """An actor that holds every `wait` until `open`, and records which replica sent each.
    (Classes made in a function travel to the workers by value: no test module is imported there.)"""

    @ray.remote(num_cpus=0)
    class Gate:
        def __init__(self):
            self._opened = asyncio.Event()
            self._arrivals: list[str] = []

        async def wait(self, replica: str) -> None:
            self._arrivals.append(replica)
            await self._opened.wait()

        async def open(self) -> None:
            self._opened.set()

        async def arrivals(self) -> list[str]:
            return list(self._arrivals)

    return Gate.remote()


def gated_jpeg_app(gate, num_replicas: int):
    """`jpeg_incompressibility`'s answers (+kB per image), each given only once `gate` opens."""

    @serve.deployment(num_replicas=num_replicas, max_ongoing_requests=4, ray_actor_options={"num_cpus": 0.5})
    class GatedJpeg:
        def __init__(self, gate):
            self.gate = gate

        async def score(self, images, prompts, metadata=None):
            await self.gate.wait.remote(ray.get_runtime_context().get_actor_name())
            sizes = jpeg_sizes_kb(np.asarray(images))
            return {"rewards": sizes.tolist(), "info": {"jpeg_kb": sizes.tolist()}}

    return GatedJpeg.bind(gate)


@pytest.fixture
def gated_app(reward_apps):
    """deploy(num_replicas) puts the gated stand-in in place of `jpeg_incompressibility` and
    returns its gate (closed); afterwards the gates open and the real application is back."""
    gates = []

    def deploy(num_replicas: int = 1):
        gate = make_gate()
        gates.append(gate)
        serve.run(gated_jpeg_app(gate, num_replicas), name=GATED, route_prefix=f"/{GATED}")
        wait_for(lambda: len(replica_actor_names(GATED, "GatedJpeg")) == num_replicas,
                 what=f"{num_replicas} gated replicas")
        return gate

    try:
        yield deploy
    finally:
        for gate in gates:
            ray.get(gate.open.remote())  # let held requests finish, so the replicas stop at once
        serve.run(build_reward_app(GATED, TEST_APP_ARGS[GATED]), name=GATED, route_prefix=f"/{GATED}")
        for gate in gates:
            ray.kill(gate)


def test_weighted_sum_components_and_info_in_order(reward_apps):
    images = sample_images(5)
    prompts = [f"prompt {i}" for i in range(5)]
    client = RewardClient(
        RewardConfig(
            name=None, weights={"jpeg_compressibility": 0.5, "aesthetic": 2.0, "llava_bertscore": 1.0}
        ),
        max_images_per_call=2,
    )  # 3 chunks per reward, reassembled in order
    result = client.submit(images, prompts).result()
    kb = jpeg_sizes_kb(images)
    np.testing.assert_array_equal(result.components["jpeg_compressibility"], -kb)
    expected = (
        0.5 * result.components["jpeg_compressibility"]
        + 2.0 * result.components["aesthetic"]
        + result.components["llava_bertscore"]
    )
    np.testing.assert_allclose(result.rewards, expected)
    assert result.info["jpeg_compressibility"]["jpeg_kb"] == kb.tolist()
    llava = result.info["llava_bertscore"]
    assert len(llava["captions"]) == 5
    np.testing.assert_array_equal(llava["bertscore_recall"], result.components["llava_bertscore"])
    # Each chunk's answer equals scoring that image alone: nothing was shifted between chunks.
    alone = RewardClient({"llava_bertscore": 1.0})(images[3:4], prompts[3:4])
    assert alone.info["llava_bertscore"]["captions"] == llava["captions"][3:4]


def test_submit_does_not_block_the_caller(gated_app):
    gate = gated_app()
    client = RewardClient({GATED: 1.0})
    images = sample_images(8, seed=2)
    pending = client.submit(images, ["a cat"] * 8)  # returns although no answer can come yet
    # The request reached the replica, which holds it at the gate: submitted, in flight, not done.
    wait_for(lambda: ray.get(gate.arrivals.remote()), what="the request at the replica")
    assert not pending.done()
    ray.get(gate.open.remote())
    wait_for(pending.done, timeout_s=120, interval_s=0.05, what="rewards")
    result = pending.result(timeout_s=0)
    assert result.rewards.shape == (8,)
    np.testing.assert_array_equal(result.rewards, jpeg_sizes_kb(images))


def test_killed_replica_mid_stream_every_reward_returns_in_order(gated_app):
    """Two replicas; one is killed while a stream of batches is in flight on both."""
    gate = gated_app(num_replicas=2)
    replicas = replica_actor_names(GATED, "GatedJpeg")
    client = RewardClient({GATED: 1.0}, max_images_per_call=8, max_retries=3)
    batches = [sample_images(16, seed=seed) for seed in range(12)]
    pending = [client.submit(batch, ["p"] * len(batch)) for batch in batches]
    # The gate holds every request: both replicas have some in flight and none has answered.
    wait_for(lambda: set(ray.get(gate.arrivals.remote())) == set(replicas), what="requests on both replicas")
    assert not any(p.done() for p in pending)
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    ray.get(gate.open.remote())
    for batch, p in zip(batches, pending, strict=True):
        np.testing.assert_array_equal(p.result().rewards, jpeg_sizes_kb(batch))
    assert client.retries.count >= 1, "no request was in flight on the killed replica"
    assert all(
        "ActorDiedError" in e or "RayActorError" in e or "Unavailable" in e for e in client.retries.errors
    )


def test_timeout_is_a_clear_error(gated_app):
    gated_app()  # never opened: no answer comes in time, however fast this machine is
    client = RewardClient({GATED: 1.0}, timeout_s=0.05)
    pending = client.submit(sample_images(8, seed=3), ["a cat"] * 8)
    with pytest.raises(
        RewardTimeoutError,
        match=r"reward 'jpeg_incompressibility' \(Serve application 'jpeg_incompressibility'.*"
        r"did not answer images 0\.\.7 in time",
    ):
        pending.result()


def test_input_errors_are_raised_before_sending(serve_instance):
    with pytest.raises(ValueError, match="unknown reward 'clip_score'"):
        RewardClient({"clip_score": 1.0})
    with pytest.raises(ValueError, match="weights is empty"):
        RewardClient({})


def test_client_checks_the_batch(reward_apps):
    client = RewardClient({"jpeg_compressibility": 1.0})
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        client.submit(sample_images(3), ["a", "b"])
    with pytest.raises(ValueError, match=r"expected a uint8 array of shape \(N, H, W, 3\)"):
        client.submit(sample_images(2).astype(np.float32), ["a", "b"])


def test_ensure_attaches_to_running_apps_and_starts_only_missing_ones(reward_apps):
    assert ensure_reward_apps(["jpeg_compressibility", "aesthetic"]) == []  # all running: attach
    serve.delete("jpeg_incompressibility")
    started = ensure_reward_apps(
        ["jpeg_compressibility", "jpeg_incompressibility"],
        {"jpeg_incompressibility": TEST_APP_ARGS["jpeg_incompressibility"]},
    )
    assert started == ["jpeg_incompressibility"]
    assert RewardClient({"jpeg_incompressibility": 1.0})(sample_images(1), ["x"]).rewards.shape == (1,)
    shutdown_reward_apps(started)
    apps = serve.status().applications
    assert "jpeg_incompressibility" not in apps
    assert {"jpeg_compressibility", "aesthetic", "llava_bertscore"} <= set(apps)  # untouched
    assert running_replicas("jpeg_compressibility") == {"JpegReward": 1}


def test_a_real_model_run_refuses_to_deploy_tiny_reward_models(reward_apps):
    from reward_services.client import RewardServiceError

    real = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert ensure_reward_apps(["aesthetic", "jpeg_compressibility"], model_pretrained=real) == []  # deployed: attach
    serve.delete("aesthetic")
    serve.delete("jpeg_incompressibility")
    try:
        with pytest.raises(RewardServiceError, match="aesthetic: deploy aesthetic with model.clip_model=openai/clip-vit"):
            ensure_reward_apps(["jpeg_incompressibility", "aesthetic"], model_pretrained=real)
        apps = serve.status().applications
        assert "aesthetic" not in apps and "jpeg_incompressibility" not in apps  # nothing half-deployed
        # JPEG has no model, and the built-in models may use the tiny ones as before.
        started = ensure_reward_apps(["jpeg_incompressibility"], TEST_APP_ARGS, model_pretrained=real)
        started += ensure_reward_apps(["aesthetic"], TEST_APP_ARGS, model_pretrained="sd15-random")
        assert started == ["jpeg_incompressibility", "aesthetic"]
    finally:
        for name in ("aesthetic", "jpeg_incompressibility"):
            if name not in serve.status().applications:
                serve.run(build_reward_app(name, TEST_APP_ARGS[name]), name=name, route_prefix=f"/{name}")
