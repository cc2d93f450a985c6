"""The one epoch path: the single-process loop and the Ray driver write the same records.

Both loops are backends of `ddpo_ray.training.epoch_loop.EpochLoop`; this runs both on one
config (real Ray, real Serve rewards, the tiny model) and compares every record they write:
metrics rows, evaluations, the best version, checkpoints (a guard stop included), files and
what goes to the trackers (TensorBoard event files, read back).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ddpo_ray.config import build_config
from ddpo_ray.distributed.driver import run_distributed
from ddpo_ray.records.checkpoint import LEARNER_STATE, RUN_STATE, load_policy_weights
from ddpo_ray.training.local_loop import run_local
from tests.helpers import SMALL

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# What only the distributed backend measures (ScoredEpoch.extra and the learner's restarts).
RAY_ONLY = {"time_weight_sync", "time_waiting_for_learner", "sampler_reissued", "sampler_nodes", "learner_restarts"}
# Wall-clock keys: both loops write them, with their own values.
TIMES = {"time_sampling", "time_reward", "time_training", "time_epoch", "time_eval"}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_values(got: dict, want: dict, where: str) -> None:
    for key, value in want.items():
        if key in TIMES:
            continue
        if isinstance(value, float) or isinstance(got[key], float):
            np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6, err_msg=f"{where}: {key}")
        else:
            assert got[key] == value, f"{where}: {key}: {got[key]!r} != {value!r}"


@pytest.fixture(scope="module")
def both_runs(yaml_apps, tmp_path_factory):
    """The same 4-epoch config on both loops; a margin-0 guard on the opposite reward stops it early."""
    from reward_services.client import ensure_reward_apps
    from tests.helpers import ALL_REWARDS, TEST_APP_ARGS

    ensure_reward_apps(ALL_REWARDS, TEST_APP_ARGS)
    out = tmp_path_factory.mktemp("epoch_path")
    overrides = [
        *SMALL, "num_epochs=4", "save_freq=2", "train.learning_rate=1e-2", "train.clip_range=1e-2",
        "eval.every=1", "eval.prompts_per_group=2", "eval.guard_reward=jpeg_incompressibility",
        "eval.guard_margin=0.0", "trackers=[tensorboard]", f"output_dir={out}",
        "cluster.torch_threads=1",  # the reference below runs one thread too (auto would give 2 here)
    ]
    ray_history = run_distributed(build_config(overrides=[*overrides, "run_name=ray"]))
    # Ray's sampler and learner run one torch thread each; so does the reference here, else
    # reductions round differently and a few uint8 pixels flip.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local_history = run_local(build_config(overrides=[*overrides, "run_name=local"]))
    finally:
        torch.set_num_threads(threads)
    return {"ray": (out / "ray", ray_history), "local": (out / "local", local_history)}


def test_metrics_rows_are_the_same_in_both_loops(both_runs):
    (ray_root, ray_history), (local_root, local_history) = both_runs["ray"], both_runs["local"]
    ray_rows, local_rows = rows(ray_root / "metrics.jsonl"), rows(local_root / "metrics.jsonl")
    assert ray_rows == json.loads(json.dumps(ray_history)) and local_rows == json.loads(json.dumps(local_history))
    assert [r["epoch"] for r in ray_rows] == [r["epoch"] for r in local_rows]
    for ray_row, local_row in zip(ray_rows, local_rows, strict=True):
        assert set(ray_row) - RAY_ONLY == set(local_row), "the loops write different keys"
        assert_same_values(ray_row, local_row, f"epoch {local_row['epoch']}")
        assert local_row["time_reward"] >= 0 and ray_row["time_reward"] >= 0


def test_evaluations_and_best_are_the_same_in_both_loops(both_runs):
    (ray_root, _), (local_root, _) = both_runs["ray"], both_runs["local"]
    ray_evals, local_evals = rows(ray_root / "eval.jsonl"), rows(local_root / "eval.jsonl")
    assert [r["policy_version"] for r in ray_evals] == [r["policy_version"] for r in local_evals]
    for ray_row, local_row in zip(ray_evals, local_evals, strict=True):
        assert set(ray_row) == set(local_row)
        assert_same_values(ray_row, local_row, f"eval v{local_row['policy_version']}")
    ray_best = json.loads((ray_root / "checkpoints/best/best.json").read_text())
    local_best = json.loads((local_root / "checkpoints/best/best.json").read_text())
    assert ray_best["policy_version"] == local_best["policy_version"]
    _, ray_weights = load_policy_weights(ray_root / "checkpoints/best")
    _, local_weights = load_policy_weights(local_root / "checkpoints/best")
    assert ray_weights.keys() == local_weights.keys()
    for name in local_weights:
        torch.testing.assert_close(ray_weights[name], local_weights[name], rtol=1e-3, atol=1e-5)


def test_a_guard_stop_checkpoints_in_both_loops(both_runs):
    """save_freq=2 would write epoch 1 and the last epoch (3); the guard stops earlier, and both
    loops checkpoint the epoch they stopped after, so `resume_from=latest` starts there."""
    for name, (root, history) in both_runs.items():
        evals = rows(root / "eval.jsonl")
        assert evals[-1]["eval_guard_stop"], f"{name}: the guard never fell: {[r.get('eval_guard_drop') for r in evals]}"
        last_epoch = history[-1]["epoch"]
        assert last_epoch < 3, f"{name}: ran to the end although the guard stopped it"
        assert (root / f"checkpoints/epoch_{last_epoch:04d}/COMPLETE").is_file(), name
    checkpoints = {name: sorted(p.name for p in (root / "checkpoints").glob("epoch_*"))
                   for name, (root, _) in both_runs.items()}
    assert checkpoints["ray"] == checkpoints["local"]


def test_checkpoints_hold_the_same_state_in_both_loops(both_runs):
    (ray_root, _), (local_root, _) = both_runs["ray"], both_runs["local"]
    for directory in sorted((local_root / "checkpoints").glob("epoch_*")):
        twin = ray_root / "checkpoints" / directory.name
        local_run = torch.load(directory / RUN_STATE, weights_only=True)
        ray_run = torch.load(twin / RUN_STATE, weights_only=True)
        assert (local_run["epoch"], local_run["policy_version"]) == (ray_run["epoch"], ray_run["policy_version"])
        assert local_run["advantages"].keys() == ray_run["advantages"].keys()
        local_learner = torch.load(directory / LEARNER_STATE, weights_only=True)
        ray_learner = torch.load(twin / LEARNER_STATE, weights_only=True)
        for name, tensor in local_learner["weights"].items():
            torch.testing.assert_close(ray_learner["weights"][name], tensor, rtol=1e-3, atol=1e-5)
        assert (twin / "pytorch_lora_weights.safetensors").is_file()


def test_each_checkpoint_is_stored_once(both_runs):
    """Ray Train used to keep a copy of every reported checkpoint under <run>/ray_train that nothing read."""
    ray_root, _ = both_runs["ray"]
    copies = [p for p in ray_root.rglob("*") if p.is_file() and "ray_train" in p.relative_to(ray_root).parts
              and p.name in (LEARNER_STATE, "pytorch_lora_weights.safetensors")]
    assert copies == []


def test_both_loops_write_the_same_files(both_runs):
    (ray_root, _), (local_root, _) = both_runs["ray"], both_runs["local"]

    def files(root: Path) -> set[str]:
        skip = ("checkpoints/", "ray_train/", "tensorboard/")  # event file names carry a time and a pid
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not str(p.relative_to(root)).startswith(skip)}

    assert files(ray_root) == files(local_root)
    assert {"config.yaml", "metrics.jsonl", "eval.jsonl", "reward_curve.png", "run.log"} <= files(local_root)
    ray_config, local_config = (yaml.safe_load((root / "config.yaml").read_text()) for root in (ray_root, local_root))
    assert {**ray_config, "run_name": None} == {**local_config, "run_name": None}


def test_both_loops_send_the_same_rows_and_grids_to_the_trackers(both_runs):
    """The trackers hang off the one epoch path: the Ray driver logs what the local loop logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = {}
    for name, (root, _) in both_runs.items():
        events = EventAccumulator(str(root / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        logged[name] = events
        metrics = rows(root / "metrics.jsonl")
        got = [(e.step, e.value) for e in events.Scalars("reward_mean")]
        assert got == [(r["epoch"], pytest.approx(r["reward_mean"], rel=1e-6)) for r in metrics], name
        assert [e.step for e in events.Images("samples")] == [r["epoch"] for r in metrics], name
    ray_tags, local_tags = logged["ray"].Tags(), logged["local"].Tags()
    assert set(ray_tags["scalars"]) - RAY_ONLY == set(local_tags["scalars"])
    assert set(ray_tags["images"]) == set(local_tags["images"]) == {"samples", "eval", "eval_base"}
    for name, (root, _) in both_runs.items():  # and every saved LoRA has its model card
        for checkpoint in (root / "checkpoints").iterdir():
            assert (checkpoint / "README.md").read_text().startswith("---\n"), (name, checkpoint.name)
