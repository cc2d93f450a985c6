"""The sampler-side client on real Serve: weighting, order, retries after a replica dies,
timeouts, and deploying only what is missing."""

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
from tests.ray_fixtures import (  # noqa: F401
    TEST_APP_ARGS,
    replica_actor_names,
    reward_apps,
    running_replicas,
    sample_images,
    serve_instance,
    wait_for,
    yaml_apps,
)


def test_weighted_sum_components_and_info_in_order(reward_apps):  # noqa: F811
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


def test_submit_does_not_block_the_caller(reward_apps):  # noqa: F811
    client = RewardClient({"llava_bertscore": 1.0})
    pending = client.submit(sample_images(8, seed=2), ["a cat"] * 8)
    assert not pending.done()  # 8 captions of 64 tokens take far longer than submitting
    wait_for(pending.done, timeout_s=120, interval_s=0.05, what="rewards")
    assert pending.result(timeout_s=0).rewards.shape == (8,)


def test_killed_replica_mid_stream_every_reward_returns_in_order(reward_apps):  # noqa: F811
    """Two replicas; one is killed while a stream of batches is in flight on both."""
    args = {"deployment_options": {"JpegReward": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}}}}
    serve.run(
        build_reward_app("jpeg_incompressibility", args),
        name="jpeg_incompressibility",
        route_prefix="/jpeg_incompressibility",
    )
    try:
        replicas = wait_for(
            lambda: (
                (names := replica_actor_names("jpeg_incompressibility", "JpegReward"))
                and len(names) == 2
                and names
            ),
            what="2 replicas",
        )
        client = RewardClient({"jpeg_incompressibility": 1.0}, max_images_per_call=8, max_retries=3)
        batches = [sample_images(16, size=384, seed=seed) for seed in range(24)]
        pending = [client.submit(batch, ["p"] * len(batch)) for batch in batches]
        wait_for(pending[0].done, interval_s=0.01, what="the first batch")  # both replicas are busy now
        assert not pending[-1].done()
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
        for batch, p in zip(batches, pending, strict=True):
            np.testing.assert_array_equal(p.result().rewards, jpeg_sizes_kb(batch))
        assert client.retries.count >= 1, "no request was in flight on the killed replica"
        assert all(
            "ActorDiedError" in e or "RayActorError" in e or "Unavailable" in e for e in client.retries.errors
        )
    finally:
        serve.run(
            build_reward_app("jpeg_incompressibility", TEST_APP_ARGS["jpeg_incompressibility"]),
            name="jpeg_incompressibility",
            route_prefix="/jpeg_incompressibility",
        )


def test_timeout_is_a_clear_error(reward_apps):  # noqa: F811
    client = RewardClient({"llava_bertscore": 1.0}, timeout_s=0.05)
    pending = client.submit(sample_images(8, seed=3), ["a cat"] * 8)
    with pytest.raises(
        RewardTimeoutError,
        match=r"reward 'llava_bertscore' \(Serve application 'llava_bertscore'.*"
        r"did not answer images 0\.\.7 in time",
    ):
        pending.result()


def test_input_errors_are_raised_before_sending(serve_instance):  # noqa: F811
    with pytest.raises(ValueError, match="unknown reward 'clip_score'"):
        RewardClient({"clip_score": 1.0})
    with pytest.raises(ValueError, match="weights is empty"):
        RewardClient({})


def test_client_checks_the_batch(reward_apps):  # noqa: F811
    client = RewardClient({"jpeg_compressibility": 1.0})
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        client.submit(sample_images(3), ["a", "b"])
    with pytest.raises(ValueError, match=r"expected uint8 \(N, H, W, 3\)"):
        client.submit(sample_images(2).astype(np.float32), ["a", "b"])


def test_ensure_attaches_to_running_apps_and_starts_only_missing_ones(reward_apps):  # noqa: F811
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
