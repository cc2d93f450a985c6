"""Advantage estimators: per-prompt tracker, group and batch normalisation."""

import numpy as np
import pytest

from ddpo_ray.maths.advantages import (
    AdvantageEstimator,
    PerPromptStatTracker,
    batch_advantages,
    group_advantages,
    group_centred_advantages,
)


def test_buffer_is_bounded():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    for epoch in range(5):
        tracker.update(["a", "a"], np.array([epoch, epoch + 0.5]))
    assert list(tracker.buffers["a"]) == [3.5, 4.0, 4.5]


def test_min_count_falls_back_to_batch_statistics():
    tracker = PerPromptStatTracker(buffer_size=10, min_count=3)
    rewards = np.array([1.0, 2.0, 10.0, 20.0])
    adv = tracker.update(["a", "a", "b", "b"], rewards)
    # each prompt has 2 < 3 entries: the whole batch's mean/std is used
    np.testing.assert_allclose(adv, (rewards - rewards.mean()) / (rewards.std() + 1e-6))
    # second epoch: 4 >= 3 entries per prompt, so each prompt's own history is used
    adv = tracker.update(["a", "a", "b", "b"], np.array([3.0, 4.0, 30.0, 40.0]))
    a_hist = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(adv[:2], (np.array([3.0, 4.0]) - a_hist.mean()) / (a_hist.std() + 1e-6))
    b_hist = np.array([10.0, 20.0, 30.0, 40.0])
    np.testing.assert_allclose(adv[2:], (np.array([30.0, 40.0]) - b_hist.mean()) / (b_hist.std() + 1e-6))


def test_tracker_state_round_trip():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    tracker.update(["a", "b", "a"], np.array([1.0, 2.0, 3.0]))
    restored = PerPromptStatTracker(buffer_size=1, min_count=1)
    restored.load_state_dict(tracker.state_dict())
    assert restored.state_dict() == tracker.state_dict()
    nxt = (["a", "b"], np.array([5.0, 6.0]))
    np.testing.assert_array_equal(restored.update(*nxt), tracker.update(*nxt))
    assert restored.buffers["a"].maxlen == 4


def test_group_advantages_normalise_within_each_prompt():
    adv = group_advantages(["a", "a", "b", "b"], np.array([1.0, 3.0, 100.0, 300.0]))
    np.testing.assert_allclose(adv, [-1.0, 1.0, -1.0, 1.0], atol=1e-5)


def test_group_centred_advantages_keep_a_flat_groups_advantages_small():
    """Group b's rewards barely differ: per-group std makes them +-1 like a's; one epoch scale keeps
    them 100x smaller than a's, in proportion to the differences."""
    rewards = np.array([1.0, 3.0, 5.0, 5.02])
    per_group = group_advantages(["a", "a", "b", "b"], rewards)
    np.testing.assert_allclose(np.abs(per_group), 1.0, atol=1e-3)
    centred = group_centred_advantages(["a", "a", "b", "b"], rewards)
    scale = np.sqrt(np.mean(np.array([-1.0, 1.0, -0.01, 0.01]) ** 2))
    np.testing.assert_allclose(centred, np.array([-1.0, 1.0, -0.01, 0.01]) / scale, rtol=1e-5)
    assert np.mean(centred**2) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(AdvantageEstimator("group_centred")(["a", "a", "b", "b"], rewards), centred)


def test_batch_advantages():
    adv = batch_advantages(np.array([1.0, 2.0, 3.0]))
    assert adv.mean() == pytest.approx(0.0)
    assert adv.std() == pytest.approx(1.0, abs=1e-5)


def test_estimator_modes_and_state():
    est = AdvantageEstimator("per_prompt", buffer_size=4, min_count=2)
    est(["a", "a"], np.array([1.0, 2.0]))
    other = AdvantageEstimator("per_prompt", buffer_size=4, min_count=2)
    other.load_state_dict(est.state_dict())
    assert other.tracker.state_dict() == est.tracker.state_dict()
    with pytest.raises(ValueError, match="mode"):
        AdvantageEstimator("batch").load_state_dict(est.state_dict())
    with pytest.raises(ValueError, match="advantage.mode='nope'"):
        AdvantageEstimator("nope")


def test_bad_rewards_are_rejected():
    with pytest.raises(ValueError, match="2 prompts but 3 rewards"):
        batch_advantages_input = AdvantageEstimator("batch")
        batch_advantages_input(["a", "b"], np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="non-finite"):
        AdvantageEstimator("group")(["a", "a"], np.array([1.0, np.nan]))
