"""The single-process loop end to end: run directory, checkpoints, exact resume."""

import json

import numpy as np
import pytest
import torch

from ddpo_ray.config import build_config
from ddpo_ray.local import main
from ddpo_ray.maths.diffusion import sample_trajectories
from ddpo_ray.models.pipelines import load_tiny_pipeline
from ddpo_ray.training.local_loop import run_local as run
from reward_services.functions import compute_rewards
from tests.helpers import PLAIN

SMALL = [
    *PLAIN,
    "sample.num_steps=3", "sample.batch_size=4", "sample.num_batches_per_epoch=2",
    "train.batch_size=4", "train.gradient_accumulation_steps=2", "save_freq=1",
    "advantage.mode=per_prompt", "advantage.buffer_size=4", "advantage.min_count=2",
]


@pytest.mark.slow
def test_loop_writes_the_run_directory_and_a_loadable_lora(tmp_path):
    cfg = build_config(overrides=SMALL + ["num_epochs=2", "run_name=r", f"output_dir={tmp_path}", "keep_last_n=1"])
    history = run(cfg)
    root = tmp_path / "r"
    assert [m["epoch"] for m in history] == [0, 1]
    lines = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1]
    assert lines[0]["samples"] == 8 and lines[1]["policy_version"] == 2
    assert lines[0]["ratio_dev_before_update"] < 1e-5  # the PPO ratio starts at exactly 1
    for name in ("config.yaml", "reward_curve.png", "samples/epoch_0000.png", "samples/epoch_0001.png",
                 "checkpoints/epoch_0001/COMPLETE", "checkpoints/epoch_0001/learner_state.pt",
                 "checkpoints/epoch_0001/run_state.pt"):
        assert (root / name).is_file(), name
    assert sorted(p.name for p in (root / "checkpoints").glob("epoch_*")) == ["epoch_0001"]  # keep_last_n=1

    pipe = load_tiny_pipeline()
    kwargs = dict(num_steps=3, guidance_scale=5.0, eta=1.0, resolution=64)
    base = sample_trajectories(pipe, ["a cat"], generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(root / "checkpoints" / "epoch_0001")
    tuned = sample_trajectories(pipe, ["a cat"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not torch.equal(base, tuned)  # the trained LoRA loads and changes the images


@pytest.mark.slow
def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path):
    straight = run(build_config(overrides=SMALL + ["num_epochs=3", "run_name=a", f"output_dir={tmp_path}"]))
    run(build_config(overrides=SMALL + ["num_epochs=2", "run_name=b", f"output_dir={tmp_path}"]))
    resumed = run(build_config(overrides=SMALL + ["num_epochs=3", "run_name=b", f"output_dir={tmp_path}",
                                                  "resume_from=latest"]))
    assert [m["epoch"] for m in resumed] == [0, 1, 2]
    for key in ("reward_mean", "loss", "approx_kl", "advantage_mean", "policy_version"):
        assert resumed[2][key] == straight[2][key], key


def test_cli_rejects_a_bad_config_before_doing_anything(tmp_path, capsys):
    assert main([f"output_dir={tmp_path}", "train.timestep_fraction=2"]) == 2
    assert "train.timestep_fraction" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_training_rewards_can_be_replaced_while_evaluation_scores_the_configs(tmp_path):
    """`run_local(training_rewards=)` trains on the given rewards (controls such as
    `bench/learning.py --no-signal`); evaluation still scores the config's reward."""
    cfg = build_config(overrides=SMALL + ["num_epochs=1", "run_name=c", f"output_dir={tmp_path}", "save_freq=0",
                                          "eval.every=1", "eval.prompts_per_group=2"])
    seen = []

    def constant(images, prompts):
        seen.append(list(prompts))
        return np.full(len(images), 7.0), {"jpeg_compressibility": np.full(len(images), 7.0)}

    history = run(cfg, training_rewards=constant)
    assert history[0]["reward_mean"] == 7.0 and len(seen) == 1 and len(seen[0]) == 8
    evals = [json.loads(line) for line in (tmp_path / "c" / "eval.jsonl").read_text().splitlines()]
    assert all(e["eval_reward_mean"] < 0 for e in evals)  # the real JPEG reward (minus kB)


def test_no_signal_rewards_keep_each_prompts_rewards_and_drop_their_link_to_the_samples():
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("bench_learning", REPO / "bench" / "learning.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = build_config("tiny")  # jpeg_compressibility, groups of 8
    k = cfg.sample.samples_per_prompt
    rng = np.random.default_rng(0)
    images = np.stack([  # from plain to noisy: every image compresses to another size
        np.clip(128 + rng.normal(0, s, size=(64, 64, 3)), 0, 255).astype(np.uint8) for s in np.linspace(0, 80, 3 * k)
    ])
    prompts = [p for p in ("a", "b", "c") for _ in range(k)]
    true, _ = compute_rewards(cfg.reward.components(), images, prompts)
    shuffled, info = bench.rewards_without_signal(cfg, seed=0)(images, prompts)
    for g in range(3):
        group = slice(g * k, (g + 1) * k)
        assert sorted(shuffled[group]) == sorted(true[group])  # each prompt keeps its rewards
    assert not np.array_equal(shuffled, true)
    np.testing.assert_array_equal(info["jpeg_compressibility"], shuffled)
    with pytest.raises(ValueError, match="several prompts"):
        bench.rewards_without_signal(cfg, seed=0)(images, ["a", "b"] * (3 * k // 2))
