"""Learning quality (issue 7): held-out evaluation, KL to the reference, the guard, DDPO-SF, the CLI.

All on the shipped `tiny` model in this process (the Ray path's evaluation is compared with this
one in tests/test_system.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddpo_ray.config import ConfigError, TrainConfig, build_config
from ddpo_ray.evaluate import main as evaluate_main
from ddpo_ray.maths.diffusion import generate_images, policy_step_mean, sample_trajectories, trajectory_log_prob
from ddpo_ray.maths.ppo import make_optimizer, ppo_loss, score_function_loss, step_kl, train_epoch
from ddpo_ray.models.lora import add_lora, load_trainable_state_dict, reference_policy
from ddpo_ray.models.pipelines import load_tiny_pipeline
from ddpo_ray.records.checkpoint import load_policy_weights
from ddpo_ray.training.evaluation import (
    EvalSet, EvalTracker, evaluate, generate_eval_images, initial_latents, step_noise,
)
from ddpo_ray.training.local_loop import run_local
from reward_services.functions import compute_rewards
from tests.helpers import PLAIN

SMALL = [
    *PLAIN,
    "sample.num_steps=3", "sample.batch_size=4", "sample.num_batches_per_epoch=2", "train.batch_size=8",
    "sample.samples_per_prompt=4", "advantage.mode=group", "train.learning_rate=1e-2", "train.clip_range=1e-2",
    "eval.every=1", "eval.prompts_per_group=2", "metrics=false",
]


def jpeg_scores(cfg):
    weights = {name: 1.0 for name in cfg.eval_reward_names()}
    return lambda images, prompts: compute_rewards(weights, images, prompts)[1]


def fresh_policy(cfg):
    pipe = load_tiny_pipeline()
    pipe.unet.requires_grad_(False)
    add_lora(pipe.unet, cfg.model.lora_rank, seed=cfg.seed)
    return pipe


# --- the eval set and its noise -------------------------------------------------------------


def test_eval_noise_depends_only_on_seed_and_position():
    shape = (4, 8, 8)
    assert torch.equal(initial_latents(0, shape, 3)[1], initial_latents(0, shape, 5)[1])
    assert not torch.equal(initial_latents(0, shape, 2)[0], initial_latents(0, shape, 2)[1])
    assert not torch.equal(initial_latents(0, shape, 1), initial_latents(1, shape, 1))


def test_eval_set_has_train_and_held_out_groups():
    cfg = build_config("tiny", overrides=["eval.prompts_per_group=3"])
    eval_set = EvalSet.from_config(cfg)
    assert eval_set.group_names() == ["train", "tiny_shapes_held_out"]
    assert len(eval_set) == 6 and all("diamond" in p for p in eval_set.prompts[3:])
    sd15 = EvalSet.from_config(build_config("sd15_compressibility"))
    assert sd15.group_names() == ["train", "held_out_animals", "inanimate_objects"]


@pytest.mark.slow
def test_a_run_evaluates_the_same_base_images_as_a_fresh_model(tmp_path):
    """Version 0 of a run is the base model from the fixed noise: a fresh pipeline gives the same
    images and rewards, and so does the run's own evaluation of it (eval.jsonl)."""
    cfg = build_config(overrides=[*SMALL, "num_epochs=2", f"output_dir={tmp_path}", "run_name=r"])
    run_local(cfg)
    rows = [json.loads(line) for line in (tmp_path / "r" / "eval.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [0, 1, 2]
    for name in ("eval/version_0000.png", "eval/version_0002.png", "checkpoints/best/best.json"):
        assert (tmp_path / "r" / name).is_file(), name

    eval_set = EvalSet.from_config(cfg)
    first = generate_eval_images(fresh_policy(cfg), cfg, eval_set)
    second = generate_eval_images(fresh_policy(cfg), cfg, eval_set)
    assert np.array_equal(first, second)  # same noise, deterministic sampling
    metrics, _, _ = evaluate(fresh_policy(cfg), cfg, eval_set, jpeg_scores(cfg))
    assert metrics["eval_reward_mean"] == rows[0]["eval_reward_mean"]
    assert rows[2]["eval_reward_mean"] != rows[0]["eval_reward_mean"]  # the trained weights differ


def test_stochastic_eval_has_its_step_noise_fixed_per_image():
    """eval.eta=1 evaluates the policy DDPO samples from, still with nothing random left: the
    same weights give the same images, which differ from deterministic DDIM's; an image's noise
    does not depend on how many eval images there are."""
    cfg = build_config(overrides=[*SMALL, "eval.prompts_per_group=2", "eval.eta=1.0"])
    eval_set = EvalSet.from_config(cfg)
    pipe = fresh_policy(cfg)
    first = generate_eval_images(pipe, cfg, eval_set)
    assert np.array_equal(first, generate_eval_images(pipe, cfg, eval_set))
    deterministic = generate_eval_images(pipe, cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"eta": 0.0})}), eval_set)
    assert not np.array_equal(first, deterministic)
    assert torch.equal(step_noise(0, 3, (4, 8, 8), 5)[2], step_noise(0, 3, (4, 8, 8), 3)[2])
    with pytest.raises(ValueError, match="needs step_noise of shape"):
        generate_images(pipe, ["a red circle"], torch.zeros(1, 4, 8, 8), num_steps=3, guidance_scale=5.0, eta=1.0)


# --- KL to the reference policy -------------------------------------------------------------


def _sampled_batch(pipe):
    prompts = ["a red circle"] * 4 + ["two blue squares"] * 4
    return sample_trajectories(pipe, prompts, num_steps=4, guidance_scale=5.0, eta=1.0, resolution=64,
                               generator=torch.Generator().manual_seed(0))


def _kl_to_reference(pipe, traj) -> float:
    """Mean per-step KL(policy || base) over the batch's visited states."""
    pipe.scheduler.set_timesteps(traj.num_steps)
    values = []
    with torch.no_grad():
        for j in range(traj.num_steps):
            args = (pipe.scheduler, traj.latents[:, j], traj.timesteps[:, j], traj.prompt_embeds, traj.negative_prompt_embeds)
            mean, std = policy_step_mean(pipe.unet, *args, guidance_scale=5.0, eta=1.0)
            with reference_policy(pipe.unet) as reference:
                reference_mean, _ = policy_step_mean(reference, *args, guidance_scale=5.0, eta=1.0)
            values.append(step_kl(mean, reference_mean, std).mean())
    return float(torch.stack(values).mean())


def _train(kl_coef: float) -> tuple[float, float, dict]:
    cfg = build_config(overrides=PLAIN)
    pipe = fresh_policy(cfg)
    params = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    traj = _sampled_batch(pipe)
    at_init = _kl_to_reference(pipe, traj)
    train = TrainConfig(batch_size=8, learning_rate=1e-2, clip_range=1.0, kl_coef=kl_coef)
    optimizer = make_optimizer(params, train)
    advantages = torch.tensor([1.0, -1.0] * 4)
    for i in range(4):
        metrics = train_epoch(pipe.unet, pipe.scheduler, optimizer, params, traj, advantages, train,
                              guidance_scale=5.0, eta=1.0, generator=torch.Generator().manual_seed(i))
    return at_init, _kl_to_reference(pipe, traj), metrics


@pytest.mark.slow
def test_kl_is_zero_at_init_grows_with_updates_and_the_penalty_holds_it_down():
    at_init, free, free_metrics = _train(kl_coef=0.0)
    _, penalised, metrics = _train(kl_coef=10.0)
    assert at_init == 0.0  # LoRA B starts at zero: the policy is the reference
    # Measured: 20.4 without the penalty, 0.17 with kl_coef 10 (4 steps at lr 1e-2).
    assert free > 1.0, free
    assert penalised < 0.05 * free, (penalised, free)
    assert "kl_ref" in metrics and "kl_ref" not in free_metrics
    assert metrics["kl_ref"] > 0


@pytest.mark.slow
def test_reference_policy_switches_the_adapter_back_on():
    cfg = build_config(overrides=PLAIN)
    pipe = fresh_policy(cfg)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
    traj = _sampled_batch(pipe)
    before = _kl_to_reference(pipe, traj)
    assert before > 0
    with pytest.raises(RuntimeError, match="inside"), reference_policy(pipe.unet):
        raise RuntimeError("inside")
    assert _kl_to_reference(pipe, traj) == before


def test_kl_penalty_needs_lora():
    with pytest.raises(ConfigError, match="train.kl_coef > 0 needs model.use_lora=true"):
        build_config(overrides=["train.kl_coef=0.1", "model.use_lora=false"])


# --- DDPO-SF ----------------------------------------------------------------------------------


def test_score_function_and_importance_sampling_agree_on_the_first_gradient():
    """At the sampling weights the ratio is 1: both estimators give one gradient."""
    cfg = build_config(overrides=PLAIN)
    pipe = fresh_policy(cfg)
    with torch.no_grad():  # a non-trivial adapter, so the gradient reaches both LoRA matrices
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    params = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    traj = _sampled_batch(pipe)
    pipe.scheduler.set_timesteps(traj.num_steps)
    advantages = torch.tensor([1.0, -0.5, 0.2, -1.0, 2.0, 0.0, -0.3, 0.8])

    def gradient(loss_fn):
        for p in params:
            p.grad = None
        log_prob = trajectory_log_prob(
            pipe.unet, pipe.scheduler, traj.latents[:, 1], traj.timesteps[:, 1], traj.next_latents[:, 1],
            traj.prompt_embeds, traj.negative_prompt_embeds, guidance_scale=5.0, eta=1.0)
        loss_fn(log_prob, traj.log_probs[:, 1])[0].backward()
        return torch.cat([p.grad.flatten() for p in params])

    is_grad = gradient(lambda lp, old: ppo_loss(lp, old, advantages, 1e-4, 5.0))
    sf_grad = gradient(lambda lp, old: score_function_loss(lp, old, advantages, 5.0))
    assert is_grad.norm() > 0
    cosine = torch.nn.functional.cosine_similarity(is_grad, sf_grad, dim=0)
    assert cosine > 0.9999, float(cosine)
    torch.testing.assert_close(sf_grad, is_grad, rtol=1e-3, atol=1e-9)


@pytest.mark.slow
def test_ddpo_sf_takes_one_step_per_epoch(tmp_path):
    with pytest.raises(ConfigError, match="ddpo_sf.*exactly one optimizer step"):
        build_config(overrides=["train.algorithm=ddpo_sf", "train.batch_size=8"])  # 8 minibatches of 8
    with pytest.raises(ConfigError, match="num_inner_epochs=2"):
        build_config(overrides=["train.algorithm=ddpo_sf", "train.batch_size=64", "train.num_inner_epochs=2"])
    with pytest.raises(ConfigError, match="ddpo_sf.*needs cluster.staleness=0"):
        build_config(overrides=["train.algorithm=ddpo_sf", "train.batch_size=64", "cluster.staleness=1"])
    losses = {}
    for algorithm in ("ddpo_sf", "ddpo_is"):
        cfg = build_config(overrides=[*SMALL, f"train.algorithm={algorithm}", "num_epochs=1", "eval.every=0",
                                      f"output_dir={tmp_path}", f"run_name={algorithm}"])
        (metrics,) = run_local(cfg)
        assert metrics["optimizer_steps"] == 1 and metrics["clipfrac"] == 0.0
        losses[algorithm] = metrics["loss"]
    # At ratio 1 the IS loss is -mean(A) = 0 (group-normalised); SF's -mean(A log p) is not.
    assert abs(losses["ddpo_is"]) < 1e-6 and abs(losses["ddpo_sf"]) > 1e-5, losses


# --- the guard and the best checkpoint --------------------------------------------------------


def test_tracker_keeps_the_best_and_stops_when_the_guard_falls_past_the_margin():
    cfg = build_config(overrides=["eval.rewards=[aesthetic]", "eval.guard_reward=aesthetic", "eval.guard_margin=0.1"])
    tracker = EvalTracker.for_config(cfg)
    evals = [(-3.0, 1.0), (-2.5, 1.2), (-2.0, 1.15), (-1.0, 0.9)]  # (objective, guard) per version
    out = [tracker.update(v, {"eval_reward_mean": r, "eval_aesthetic_mean": g}) for v, (r, g) in enumerate(evals)]
    assert [o["eval_guard_stop"] for o in out] == [False, False, False, True]  # drop 0.05 then 0.3
    assert [o["eval_is_best"] for o in out] == [True, True, True, False]  # a tripped version never is
    assert out[-1]["eval_best_version"] == 2 and tracker.stopped
    assert out[-1]["eval_guard_drop"] == pytest.approx(0.3)


def test_tracker_writes_gains_in_base_spreads_per_reward_and_prompt_group():
    cfg = build_config(overrides=["eval.rewards=[aesthetic]"])
    groups = EvalSet.from_config(cfg).group_names()
    assert groups == ["train", "tiny_shapes_held_out"]

    def row(reward, train, held_out, aesthetic):
        return {"eval_reward_mean": reward, "eval_reward_std": 0.5, "eval_reward_train_mean": train,
                "eval_reward_tiny_shapes_held_out_mean": held_out, "eval_aesthetic_mean": aesthetic,
                "eval_aesthetic_std": 2.0}

    tracker = EvalTracker.for_config(cfg)
    base = tracker.update(0, row(-3.0, -2.8, -3.2, 4.0))
    assert base["eval_reward_gain"] == 0.0 and base["eval_reward_tiny_shapes_held_out_gain"] == 0.0
    later = tracker.update(1, row(-2.5, -2.0, -3.1, 5.0))
    assert later["eval_reward_gain"] == pytest.approx(1.0)  # 0.5 up, base spread 0.5
    assert later["eval_reward_train_gain"] == pytest.approx(1.6)
    assert later["eval_reward_tiny_shapes_held_out_gain"] == pytest.approx(0.2)
    assert later["eval_aesthetic_gain"] == pytest.approx(0.5)  # in its own base spread
    replayed = EvalTracker.for_config(cfg)  # a resumed run rebuilds the base from eval.jsonl
    replayed.replay([{"policy_version": 0, **row(-3.0, -2.8, -3.2, 4.0)}])
    assert replayed.update(1, row(-2.5, -2.0, -3.1, 5.0))["eval_reward_gain"] == pytest.approx(1.0)


def test_tracker_stops_on_a_guard_it_cannot_score_and_names_missing_keys():
    cfg = build_config(overrides=["eval.rewards=[aesthetic]", "eval.guard_reward=aesthetic"])
    tracker = EvalTracker.for_config(cfg)
    assert tracker.update(0, {"eval_reward_mean": -3.0, "eval_aesthetic_mean": None})["eval_guard_stop"]
    with pytest.raises(ValueError, match="no 'eval_aesthetic_mean'"):
        EvalTracker.for_config(cfg).update(0, {"eval_reward_mean": -3.0})


@pytest.mark.slow
def test_a_falling_guard_stops_the_run_and_best_is_the_best_epoch(tmp_path):
    """Optimise compressibility, guard incompressibility (exactly its opposite), margin 0: the run
    stops at the guard's first fall, which is an objective high that must not become `best`."""
    cfg = build_config(overrides=[
        *SMALL, "num_epochs=8", "save_freq=0", "eval.best_metric=eval_reward_mean",
        "eval.guard_reward=jpeg_incompressibility", "eval.guard_margin=0.0", f"output_dir={tmp_path}", "run_name=g",
    ])
    history = run_local(cfg)
    rows = [json.loads(line) for line in (tmp_path / "g" / "eval.jsonl").read_text().splitlines()]
    guard = [r["eval_jpeg_incompressibility_mean"] for r in rows]
    falls = [i for i in range(1, len(guard)) if guard[i] < max(guard[:i])]
    assert falls, f"the guard never fell in {cfg.num_epochs} epochs: {guard}"
    first_fall = falls[0]
    assert len(history) == first_fall < cfg.num_epochs  # stopped after the epoch that made the fall
    assert rows[-1]["eval_guard_stop"] and not any(r["eval_guard_stop"] for r in rows[:-1])
    assert history[-1]["eval_guard_stop"] is True
    objective = [r["eval_reward_mean"] for r in rows]
    assert objective[-1] > max(objective[:-1])  # the stopping version had the best objective ...
    best = int(np.argmax(objective[:-1]))  # ... and is not `best`
    info = json.loads((tmp_path / "g" / "checkpoints" / "best" / "best.json").read_text())
    assert info["policy_version"] == best and info["eval_reward_mean"] == objective[best]
    # The best weights are that version's: evaluating them gives its recorded objective.
    pipe = fresh_policy(cfg)
    use_lora, weights = load_policy_weights(tmp_path / "g" / "checkpoints" / "best")
    load_trainable_state_dict(pipe.unet, use_lora, weights)
    metrics, _, _ = evaluate(pipe, cfg, EvalSet.from_config(cfg), jpeg_scores(cfg))
    assert metrics["eval_reward_mean"] == pytest.approx(objective[best], abs=1e-9)
    # The stop checkpoint exists, so the run can be inspected (and a resume stops at once).
    assert (tmp_path / "g" / "checkpoints" / f"epoch_{first_fall - 1:04d}" / "COMPLETE").is_file()


# --- python -m ddpo_ray.evaluate ----------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_cli_on_a_two_epoch_run_writes_the_table_and_grid(tmp_path, capsys):
    run_local(build_config(overrides=[*SMALL, "num_epochs=2", f"output_dir={tmp_path}", "run_name=two"]))
    run = tmp_path / "two"
    assert evaluate_main(["--run", str(run), "eval.rewards=[aesthetic]"]) == 0
    printed = capsys.readouterr().out
    table = json.loads((run / "evaluation" / "eval_table.json").read_text())
    assert [m["model"] for m in table["models"]] == ["base", "best", "epoch_0001"]
    assert "aesthetic (mean+-std)" in printed and "epoch_0001" in printed
    evals = {r["policy_version"]: r for r in map(json.loads, (run / "eval.jsonl").read_text().splitlines())}
    base, _, last = table["models"]
    assert base["eval_reward_mean"] == evals[0]["eval_reward_mean"]
    assert last["eval_reward_mean"] == evals[2]["eval_reward_mean"]
    for row in table["models"]:
        assert {"eval_aesthetic_mean", "eval_reward_train_mean", "eval_reward_tiny_shapes_held_out_mean"} <= set(row)
    from PIL import Image

    grid = Image.open(run / "evaluation" / "eval_grid.png")
    assert grid.width > 3 * 128 and grid.height > len(table["eval_prompts"]) * 128
    # A LoRA checkpoint under a full fine-tune config is refused, naming both sides.
    assert evaluate_main(["--run", str(run), "--no-base", "model.use_lora=false"]) == 2
    assert "has use_lora=True; the config has model.use_lora=False" in capsys.readouterr().err


def test_evaluate_cli_rejects_what_it_cannot_evaluate(tmp_path, capsys):
    assert evaluate_main(["--run", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert evaluate_main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert evaluate_main(["--checkpoint", str(tmp_path)]) == 2
    assert "expected a checkpoint directory" in capsys.readouterr().err


@pytest.mark.slow
def test_a_resumed_run_keeps_its_evaluations_and_does_not_repeat_them(tmp_path):
    common = [*SMALL, "save_freq=1", f"output_dir={tmp_path}", "run_name=res"]
    run_local(build_config(overrides=[*common, "num_epochs=2"]))
    run_local(build_config(overrides=[*common, "num_epochs=3", "resume_from=latest"]))
    rows = [json.loads(line) for line in (tmp_path / "res" / "eval.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [0, 1, 2, 3]
    uninterrupted = tmp_path / "straight"
    run_local(build_config(overrides=[*SMALL, "num_epochs=3", f"output_dir={uninterrupted}", "run_name=s"]))
    straight = [json.loads(line) for line in (uninterrupted / "s" / "eval.jsonl").read_text().splitlines()]
    assert [r["eval_reward_mean"] for r in rows] == [r["eval_reward_mean"] for r in straight]
    assert [r["eval_best_version"] for r in rows] == [r["eval_best_version"] for r in straight]

    # Back to the first checkpoint (version 1): later evaluations, and a `best` among them, go.
    run_local(build_config(overrides=[*common, "num_epochs=3",
                                      f"resume_from={tmp_path / 'res' / 'checkpoints' / 'epoch_0000'}"]))
    again = [json.loads(line) for line in (tmp_path / "res" / "eval.jsonl").read_text().splitlines()]
    assert [r["eval_reward_mean"] for r in again] == [r["eval_reward_mean"] for r in straight]
    best = json.loads((tmp_path / "res" / "checkpoints" / "best" / "best.json").read_text())
    assert best["policy_version"] == straight[-1]["eval_best_version"]


def test_bad_eval_settings_name_the_field():
    with pytest.raises(ConfigError, match="eval.best_metric='eval_aesthetic_mean' is not written by evaluation"):
        build_config(overrides=["eval.best_metric=eval_aesthetic_mean"])
    with pytest.raises(ConfigError, match="eval.guard_reward is evaluated on held-out images; set eval.every >= 1"):
        build_config(overrides=["eval.every=0", "eval.guard_reward=aesthetic"])
    with pytest.raises(ConfigError, match="eval reward 'beauty' is unknown"):
        build_config(overrides=["eval.rewards=[beauty]"])
    cfg = build_config(overrides=["eval.rewards=[aesthetic]", "eval.prompts_per_group=1"])
    eval_set = EvalSet.from_config(cfg)
    from ddpo_ray.training.evaluation import summarise

    with pytest.raises(ValueError, match=r"eval rewards missing from the scores: \['aesthetic'\]"):
        summarise(cfg, eval_set, {"jpeg_compressibility": np.zeros(len(eval_set))})
    with pytest.raises(ValueError, match="eval reward 'jpeg_compressibility': 1 values for 2 images"):
        summarise(cfg, eval_set, {"jpeg_compressibility": np.zeros(1), "aesthetic": np.zeros(2)})


def test_an_eval_row_needs_its_policy_version(tmp_path):
    from ddpo_ray.records.run_dir import RunDirectory

    with pytest.raises(ValueError, match="integer 'policy_version'"):
        RunDirectory(tmp_path).append_eval({"eval_reward_mean": 1.0})


def test_evaluate_cli_with_nothing_to_evaluate(capsys):
    assert evaluate_main(["--no-base"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
