"""What a run prints at the end: the training and held-out gains, per prompt group (pure)."""

from ddpo_ray.config import build_config
from ddpo_ray.records.console import format_summary
from ddpo_ray.training.evaluation import EvalTracker


def test_summary_says_the_gains_in_base_spreads_and_per_prompt_group():
    cfg = build_config()
    tracker = EvalTracker.for_config(cfg)
    evals = []
    for version, (train, held_out) in enumerate([(-3.0, -3.2), (-2.6, -3.0)]):
        row = {"policy_version": version, "eval_reward_mean": (train + held_out) / 2, "eval_reward_std": 0.5,
               "eval_reward_train_mean": train, "eval_reward_tiny_shapes_held_out_mean": held_out}
        evals.append({**row, **tracker.update(version, row)})
    history = [{"reward_mean": -2.8, "reward_std": 0.2}, {"reward_mean": -2.5, "reward_std": 0.3}]
    text = format_summary(history, evals, "outputs/r")
    assert "training reward -2.8000 -> -2.5000 (+0.3000; epoch-0 spread 0.2000)" in text
    assert "(+0.3000 = +0.60 base spreads; by prompt group: train +0.80, tiny_shapes_held_out +0.40)" in text
    assert "best v1" in text and "run directory outputs/r" in text
    assert format_summary([], [], "outputs/r") == "done: nothing to do; run directory outputs/r"
