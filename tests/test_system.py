"""The actor–learner system on real Ray: samplers, Serve rewards, the Ray Train learner.

Most tests drive `run_distributed` from this process on the session's cluster (the reward
applications of deploy/serve.yaml are running there, so runs attach to them). The CLI tests
run `python -m ddpo_ray.run` in a subprocess against the same cluster (RAY_ADDRESS; token auth
is on, and `ray.init` put RAY_AUTH_MODE=token in this process's environment, which they
inherit). Everything is the tiny model on CPU, at small sizes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import ray

from ddpo_ray.config import build_config
from ddpo_ray.distributed.driver import run_distributed
from ddpo_ray.models.pipelines import load_tiny_pipeline
from tests.helpers import ALL_REWARDS, REPO, SMALL, TEST_APP_ARGS, train_worker_pids, wait_for

pytestmark = pytest.mark.ray


def metrics_of(run_root: Path) -> list[dict]:
    return [json.loads(line) for line in (run_root / "metrics.jsonl").read_text().splitlines()]


def run_cli(args: list[str], instance, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": instance.gcs_address}
    return subprocess.run(
        [sys.executable, "-m", "ddpo_ray.run", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_cli_run_with_two_samplers_writes_the_run_directory(reward_apps, tmp_path):
    from ray import serve

    result = run_cli([*SMALL, "num_epochs=2", "cluster.num_samplers=2", f"output_dir={tmp_path}", "run_name=cli"],
                     reward_apps)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "done: 2 epochs" in result.stdout
    root = tmp_path / "cli"
    lines = metrics_of(root)
    assert [m["epoch"] for m in lines] == [0, 1]
    assert all(m["samples"] == 8 for m in lines)
    assert [m["policy_version"] for m in lines] == [1, 2]
    # Staleness 0: the learner scores exactly what the samplers drew before its first update.
    assert all(m["ratio_dev_before_update"] < 1e-5 for m in lines), [m["ratio_dev_before_update"] for m in lines]
    for name in ("config.yaml", "reward_curve.png", "samples/epoch_0000.png", "samples/epoch_0001.png",
                 "checkpoints/epoch_0001/COMPLETE", "checkpoints/epoch_0001/pytorch_lora_weights.safetensors"):
        assert (root / name).is_file(), name
    # The run attached to the running JPEG application and left it there.
    assert "jpeg_compressibility" in serve.status().applications
    assert "deployed reward applications" not in result.stdout

    pipe = load_tiny_pipeline()
    pipe.load_lora_weights(root / "checkpoints" / "epoch_0001")
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_cli_rejects_a_bad_config_before_touching_ray(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ddpo_ray.run", "cluster.num_samplers=0", f"output_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"},  # nothing listens: it must not get that far
    )
    assert result.returncode == 2
    assert "cluster.num_samplers" in result.stderr
    assert not any(tmp_path.iterdir())


def test_cli_refuses_a_metrics_port_for_a_cluster_it_did_not_start(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ddpo_ray.run", "--metrics-export-port", "9999", f"output_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"},  # refused before connecting: nothing listens there
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--metrics-export-port is for a local cluster" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_guard_stops_the_distributed_run_at_staleness_one(reward_apps, tmp_path):
    """Guard = incompressibility (the exact opposite of the training reward), margin 0: the run
    stops at the guard's first fall; the epoch already handed to the learner is still recorded,
    but nothing after the stop is evaluated or becomes `best`."""
    cfg = build_config(overrides=[
        *SMALL, "num_epochs=8", "cluster.staleness=1", "train.learning_rate=1e-2", "train.clip_range=1e-2",
        "eval.every=1", "eval.prompts_per_group=2", "eval.guard_reward=jpeg_incompressibility",
        "eval.guard_margin=0.0", f"output_dir={tmp_path}", "run_name=guard"])
    history = run_distributed(cfg)
    rows = [json.loads(line) for line in (tmp_path / "guard" / "eval.jsonl").read_text().splitlines()]
    guard = [r["eval_jpeg_incompressibility_mean"] for r in rows]
    assert rows[-1]["eval_guard_stop"], f"the guard never fell in {cfg.num_epochs} epochs: {guard}"
    stop = rows[-1]["policy_version"]
    assert [r["policy_version"] for r in rows] == list(range(stop + 1))
    assert stop <= len(history) <= stop + 1 < cfg.num_epochs + 1
    best = json.loads((tmp_path / "guard" / "checkpoints" / "best" / "best.json").read_text())
    assert best["policy_version"] == int(np.argmax([r["eval_reward_mean"] for r in rows[:-1]])) < stop


@pytest.mark.slow
def test_staleness_one_samples_with_the_previous_version(reward_apps, tmp_path):
    cfg = build_config(overrides=[*SMALL, "num_epochs=3", "cluster.staleness=1", f"output_dir={tmp_path}",
                                  "run_name=stale"])
    history = run_distributed(cfg)
    assert [m["sampled_with_version"] for m in history] == [0, 0, 1]
    assert [m["policy_version"] for m in history] == [1, 2, 3]
    assert history[0]["ratio_dev_before_update"] < 1e-5  # epoch 0: trained with the version that sampled it
    assert history[1]["ratio_dev_before_update"] > 1e-6  # epoch 1: one version behind; the ratio corrects
    assert all(m["samples"] == 8 for m in history)


@pytest.mark.slow
def test_killed_sampler_mid_epoch_the_epoch_keeps_exact_counts(reward_apps, tmp_path):
    cfg = build_config(overrides=[
        *SMALL, "num_epochs=2", "sample.num_batches_per_epoch=6", "cluster.num_samplers=2",
        f"output_dir={tmp_path}", "run_name=kill",
    ])
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(history=run_distributed(cfg)))
    runner.start()

    def sampler_started() -> bool:
        try:
            return ray.get(ray.get_actor("sampler-kill-0").stats.remote(), timeout=5)["batches_sampled"] >= 1
        except Exception:  # noqa: BLE001 - not created or not loaded yet
            return False

    wait_for(sampler_started, timeout_s=120, interval_s=0.05, what="sampler 0's first batch")
    ray.kill(ray.get_actor("sampler-kill-0"), no_restart=False)  # dies with queued work; restarts
    runner.join(300)
    assert not runner.is_alive()
    history = result["history"]
    assert [m["samples"] for m in history] == [24, 24]
    assert history[0]["sampler_reissued"] >= 1
    lines = metrics_of(tmp_path / "kill")
    assert [m["epoch"] for m in lines] == [0, 1]


THREE_EPOCHS = [*SMALL, "num_epochs=3"]


@pytest.fixture(scope="module")
def uninterrupted(yaml_apps, tmp_path_factory):
    """Metrics of a 3-epoch run nothing interrupts: what the crash tests must reproduce."""
    from reward_services.client import ensure_reward_apps

    ensure_reward_apps(ALL_REWARDS, TEST_APP_ARGS)
    out = tmp_path_factory.mktemp("uninterrupted")
    return run_distributed(build_config(overrides=[*THREE_EPOCHS, f"output_dir={out}", "run_name=reference"]))


def assert_same_run(lines: list[dict], reference: list[dict]) -> None:
    assert [m["epoch"] for m in lines] == [0, 1, 2]
    assert [m["samples"] for m in lines] == [m["samples"] for m in reference]
    for got, want in zip(lines, reference, strict=True):
        for key in ("reward_mean", "loss", "approx_kl", "policy_version"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-7, err_msg=f"epoch {got['epoch']} {key}")


@pytest.mark.slow
def test_killed_driver_resumes_with_an_identical_continuation(reward_apps, uninterrupted, tmp_path):
    common = [*THREE_EPOCHS, f"output_dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": reward_apps.gcs_address}
    driver = subprocess.Popen(
        [sys.executable, "-m", "ddpo_ray.run", *common, "run_name=killed"], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: (tmp_path / "killed/checkpoints/epoch_0000/COMPLETE").is_file(), timeout_s=240,
                 what="the first checkpoint")
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    resumed = run_cli([*common, "run_name=killed", "resume_from=latest"], reward_apps)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    assert_same_run(metrics_of(tmp_path / "killed"), uninterrupted)


@pytest.mark.slow
def test_killed_learner_worker_restarts_from_its_checkpoint(reward_apps, uninterrupted, tmp_path):
    """Ray Train's FailureConfig restarts the worker group; it resumes from the last learner
    checkpoint and pulls the epochs after it again, so the run continues exactly."""
    cfg = build_config(overrides=[*THREE_EPOCHS, "save_freq=1", f"output_dir={tmp_path}", "run_name=crash"])
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(history=run_distributed(cfg)))
    runner.start()
    wait_for(lambda: (tmp_path / "crash/checkpoints/epoch_0000/COMPLETE").is_file(), timeout_s=240,
             interval_s=0.05, what="the first checkpoint")
    workers = train_worker_pids()
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)  # a worker crash, not a clean exit
    runner.join(300)
    assert not runner.is_alive()
    assert "history" in result, "run_distributed raised; see the log above"
    assert_same_run(metrics_of(tmp_path / "crash"), uninterrupted)
    assert [m["learner_restarts"] for m in result["history"]] == [0, 1, 1]
