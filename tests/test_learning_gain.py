"""LearningGain: a run's held-out gain in base spreads, read from eval.jsonl rows (pure)."""

import pytest

from ddpo_ray.training.learning_gain import LearningGain


def rows(values, std=0.5, gold=None):
    out = []
    for version, value in enumerate(values):
        row = {"policy_version": version, "eval_reward_mean": value, "eval_reward_std": std,
               "eval_reward_train_mean": value + 0.1}
        if gold is not None:
            row.update(eval_alignment_gold_mean=gold[version], eval_alignment_gold_std=0.2)
        out.append(row)
    return out


def test_gain_is_measured_from_version_zero_in_its_spread():
    gain = LearningGain.from_evals(rows([-3.0, -2.0, -2.5]))
    assert (gain.base, gain.best, gain.final, gain.best_version) == (-3.0, -2.0, -2.5, 1)
    assert gain.gain_best == pytest.approx(2.0) and gain.gain_final == pytest.approx(1.0)
    assert gain.mean_gain == pytest.approx(1.5)  # versions 1 and 2: -2.25 on average
    assert gain.learned and not gain.collapsed
    collapsed = LearningGain.from_evals(rows([-3.0, -1.0, -3.2]))
    assert collapsed.collapsed and not collapsed.learned and collapsed.gain_best == pytest.approx(4.0)
    assert LearningGain.from_evals(rows([-3.0, -2.0]), "eval_reward_train_mean", "eval_reward_std").gain_final == pytest.approx(2.0)
    gold = LearningGain.from_evals(rows([-3.0, -2.0], gold=[0.5, 0.4]), "eval_alignment_gold_mean")
    assert gold.base_std == 0.2 and gold.gain_final == pytest.approx(-0.5)
    assert set(gain.row()) >= {"base", "best", "final", "gain_best", "gain_final", "learned", "collapsed"}


def test_bad_eval_records_name_what_is_missing():
    with pytest.raises(ValueError, match="policy version 0"):
        LearningGain.from_evals(rows([-3.0, -2.0])[1:])
    with pytest.raises(ValueError, match="ending in '_mean'"):
        LearningGain.from_evals(rows([-3.0]), "eval_reward_std")
    with pytest.raises(ValueError, match="std_key 'eval_reward_train_std'"):
        LearningGain.from_evals(rows([-3.0]), "eval_reward_train_mean")
