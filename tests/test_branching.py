"""Branched sampling (`sample.initial_noise: tree`, `advantage.mode: tree`): a prompt's K = 2^b
samples are the leaves of a binary tree over the first b denoising steps, and each branching
step gets its own advantage (child subtree mean minus parent subtree mean)."""

import numpy as np
import pytest
import torch

from ddpo_ray.config import TrainConfig, build_config
from ddpo_ray.maths.advantages import AdvantageEstimator, tree_advantages
from ddpo_ray.maths.branching import step_node, tree_depth
from ddpo_ray.maths.diffusion import sample_trajectories
from ddpo_ray.maths.ppo import make_optimizer, train_epoch
from ddpo_ray.models.lora import add_lora
from ddpo_ray.training.steps import epoch_batches, sample_batch
from tests.helpers import randomize_lora

# 4 sampling batches of 4: two trees of 8 leaves (3 branching steps of 4), each split over two batches.
SMALL = ["model.pretrained=tiny-random", "sample.num_steps=4", "sample.resolution=32",
         "sample.batch_size=4", "sample.num_batches_per_epoch=4", "sample.samples_per_prompt=8",
         "sample.initial_noise=tree", "advantage.mode=tree", "train.batch_size=16"]
PROMPTS = ["a red circle"] * 8 + ["a blue square"] * 8


def test_tree_advantages_by_hand():
    rewards = np.array([1.0, 3.0, 5.0, 7.0, 0.0, 0.0, 2.0, 2.0])
    adv = tree_advantages(["a"] * 4 + ["b"] * 4, rewards, samples_per_prompt=4, num_steps=3)
    std_a, std_b = np.std([1, 3, 5, 7]), np.std([0, 0, 2, 2])
    # step 0 splits {0,1} from {2,3}: child means 2 and 6 against the root's 4
    np.testing.assert_allclose(adv[:4, 0], np.array([-2, -2, 2, 2]) / (std_a + 1e-6))
    # step 1 splits each pair: leaf minus its pair's mean
    np.testing.assert_allclose(adv[:4, 1], np.array([-1, 1, -1, 1]) / (std_a + 1e-6))
    np.testing.assert_allclose(adv[4:, 0], np.array([-1, -1, 1, 1]) / (std_b + 1e-6))
    np.testing.assert_allclose(adv[4:, 1], 0.0)  # 0, 0 and 2, 2: nothing to tell apart in step 1
    np.testing.assert_allclose(adv[:, 2], 0.0)  # after the last branch: one leaf each, no signal


def test_tree_advantages_sum_to_the_group_advantage_and_ignore_a_shift():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=16)
    adv = tree_advantages(["p"] * 16, rewards, samples_per_prompt=16, num_steps=5)
    # the steps' advantages telescope: leaf reward minus the group mean, over the group std
    np.testing.assert_allclose(adv.sum(1), (rewards - rewards.mean()) / (rewards.std() + 1e-6), atol=1e-12)
    np.testing.assert_allclose(tree_advantages(["p"] * 16, rewards + 100.0, 16, 5), adv, atol=1e-9)


def test_tree_layout_and_refusals():
    assert tree_depth(8, 5) == 3
    # leaf 5 = 0b101: node 1 after step 0, 2 after step 1, 5 after step 2, then its own
    assert [step_node(5, s, 3) for s in range(5)] == [1, 2, 5, 5, 5]
    with pytest.raises(ValueError, match="power of two"):
        tree_depth(6, 5)
    with pytest.raises(ValueError, match="num_steps=2"):
        tree_depth(8, 2)
    with pytest.raises(ValueError, match="one prompt's tree"):
        tree_advantages(["a", "a", "b", "a"], np.zeros(4), 4, 2)
    with pytest.raises(ValueError, match="groups of"):
        tree_advantages(["a"] * 6, np.zeros(6), 4, 2)
    estimator = AdvantageEstimator("tree", samples_per_prompt=4, num_steps=3)
    assert estimator(["a"] * 4, np.arange(4.0)).shape == (4, 3)


def test_config_checks_the_tree():
    build_config(overrides=SMALL)
    build_config(overrides=[*SMALL, "advantage.mode=group"])  # trees with plain group advantages: valid
    with pytest.raises(ValueError, match="advantage.mode='tree' compares the branches.*got 'per_group'"):
        build_config(overrides=[*SMALL, "sample.initial_noise=per_group"])
    with pytest.raises(ValueError, match="initial_noise='tree' shares noise.*got 'batch'"):
        build_config(overrides=[*SMALL, "advantage.mode=batch"])
    with pytest.raises(ValueError, match="samples_per_prompt=8 needs 3 branching steps"):
        build_config(overrides=[*SMALL, "sample.num_steps=2"])


def _epoch(pipe, cfg, epoch=0):
    batches = [sample_batch(pipe, cfg, b, epoch, i, 0) for i, b in enumerate(epoch_batches(cfg, PROMPTS))]
    return torch.cat([t.latents for t in batches]), torch.cat([t.next_latents for t in batches])


def test_leaves_share_exactly_the_steps_before_their_paths_part(tiny_pipe):
    cfg = build_config(overrides=SMALL)
    latents, next_latents = _epoch(tiny_pipe, cfg)
    for first in (0, 8):  # each tree is split over two sampling batches
        for a in range(8):
            for b in range(8):
                # leaves a and b take the same step s while they are in one node after it
                for s in range(4):
                    same = a == b or (s < 3 and a >> (2 - s) == b >> (2 - s))
                    assert torch.equal(next_latents[first + a, s], next_latents[first + b, s]) == same, (a, b, s)
                assert torch.equal(latents[first + a, 0], latents[first + b, 0]), "one x_T per tree"
    assert not torch.equal(latents[0, 0], latents[8, 0]), "two trees, two x_T"
    again, _ = _epoch(tiny_pipe, build_config(overrides=[*SMALL, "sample.batch_size=8",
                                                           "sample.num_batches_per_epoch=2"]))
    # the same tree whichever batches it is sampled in (up to the UNet's batch-size rounding)
    torch.testing.assert_close(latents, again, rtol=1e-4, atol=1e-4)


def test_per_step_advantages_train_their_own_steps(tiny_pipe):
    """(B, T) advantages: equal columns give the per-sample gradient; a column of zeros trains nothing."""
    params = add_lora(tiny_pipe.unet, rank=4)
    randomize_lora(tiny_pipe.unet)
    traj = sample_trajectories(tiny_pipe, ["a cat", "a dog"], num_steps=3, guidance_scale=1.0, eta=1.0,
                               resolution=64, generator=torch.Generator().manual_seed(0))
    train = TrainConfig(batch_size=2, learning_rate=1e-9, clip_range=10.0)

    def gradient(advantages: torch.Tensor) -> tuple[torch.Tensor, dict]:
        optimizer = make_optimizer(params, train)
        captured = []
        optimizer.step = lambda *a, **k: captured.append(torch.cat([p.grad.flatten().clone() for p in params]))
        metrics = train_epoch(tiny_pipe.unet, tiny_pipe.scheduler, optimizer, params, traj, advantages, train,
                              guidance_scale=1.0, eta=1.0, generator=torch.Generator().manual_seed(0))
        return captured[0], metrics

    per_sample, _ = gradient(torch.tensor([1.0, -1.0]))
    per_step, metrics = gradient(torch.tensor([[1.0] * 3, [-1.0] * 3]))
    assert metrics["ratio_dev_before_update"] < 1e-5
    torch.testing.assert_close(per_step, per_sample)
    only_first, _ = gradient(torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]))
    only_rest, _ = gradient(torch.tensor([[0.0, 1.0, 1.0], [0.0, -1.0, -1.0]]))
    assert only_first.abs().sum() > 0 and only_rest.abs().sum() > 0
    torch.testing.assert_close(only_first + only_rest, per_sample)  # the steps' terms add up
    with pytest.raises(ValueError, match=r"expected \(2,\) per sample or \(2, 3\) per step"):
        gradient(torch.zeros(2, 2))


def test_steps_after_the_last_branch_are_skipped_with_the_gradient_they_would_give(tiny_pipe):
    """The tree's steps after the last branch have advantage 0: training does not compute them
    (fewer UNet calls) and the gradient is the one computing them gives; refused where a
    skipped step would have mattered."""
    params = add_lora(tiny_pipe.unet, rank=4)
    randomize_lora(tiny_pipe.unet)
    traj = sample_trajectories(tiny_pipe, ["a cat", "a dog", "a cow", "a fox"], num_steps=5, guidance_scale=1.0,
                               eta=1.0, resolution=64, generator=torch.Generator().manual_seed(0))
    advantages = torch.tensor(np.random.default_rng(0).normal(size=(4, 5)), dtype=torch.float32)
    advantages[:, 3:] = 0.0  # 3 branching steps of 5
    train = TrainConfig(batch_size=2, learning_rate=1e-9, clip_range=10.0, gradient_accumulation_steps=2)
    calls = []
    hook = tiny_pipe.unet.register_forward_hook(lambda *args: calls.append(1))

    def gradient(train: TrainConfig, **options) -> tuple[torch.Tensor, dict]:
        optimizer = make_optimizer(params, train)
        captured = []
        optimizer.step = lambda *a, **k: captured.append(torch.cat([p.grad.flatten().clone() for p in params]))
        calls.clear()
        metrics = train_epoch(tiny_pipe.unet, tiny_pipe.scheduler, optimizer, params, traj, advantages, train,
                              guidance_scale=1.0, eta=1.0, generator=torch.Generator().manual_seed(0), **options)
        return captured[0], {**metrics, "unet_calls": len(calls)}

    try:
        every_step, every_metrics = gradient(train)
        skipping, skip_metrics = gradient(train, steps_with_signal=3)
        assert (every_metrics["unet_calls"], skip_metrics["unet_calls"]) == (2 * 5, 2 * 3)
        assert every_step.abs().sum() > 0
        # the same (sample, step) pairs batched otherwise: equal up to float rounding
        assert ((skipping - every_step).norm() / every_step.norm()).item() < 1e-5
        with pytest.raises(ValueError, match=r"steps_with_signal with train.kl_coef=0.1: the KL penalty"):
            gradient(TrainConfig(batch_size=2, kl_coef=0.1), steps_with_signal=3)
        with pytest.raises(ValueError, match=r"steps_with_signal=2, but advantages after step 2 are not 0"):
            gradient(train, steps_with_signal=2)
    finally:
        hook.remove()
    from ddpo_ray.training.steps import steps_with_signal

    assert steps_with_signal(build_config(overrides=SMALL)) == 3
    assert steps_with_signal(build_config(overrides=[*SMALL, "train.kl_coef=0.1"])) is None
    # a random subset of steps trained: skipping would favour the signal steps, so none is skipped
    assert steps_with_signal(build_config(overrides=[*SMALL, "train.timestep_fraction=0.5"])) is None
    assert steps_with_signal(build_config("tiny")) == 3  # of 5: the recipe computes 3 steps in 5


@pytest.mark.ray
@pytest.mark.slow
def test_the_distributed_run_trains_the_same_trees_as_the_local_loop(reward_apps, tmp_path):
    """Real Ray and Serve: samplers draw the trees (a tree split over two batches), the driver's
    per-step advantages go through the shards to the Ray Train learner, and every figure of the
    two loops' metrics rows agrees."""
    from ddpo_ray.distributed.driver import run_distributed
    from ddpo_ray.training.local_loop import run_local
    from tests.helpers import SMALL as SMALL_RUN

    overrides = [*SMALL_RUN, "num_epochs=2", "save_freq=0", "eval.every=0", "sample.samples_per_prompt=8",
                 "sample.initial_noise=tree", "advantage.mode=tree", "train.batch_size=8",
                 "train.learning_rate=1e-2", "cluster.torch_threads=1", f"output_dir={tmp_path}"]
    ray_rows = run_distributed(build_config(overrides=[*overrides, "run_name=ray"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray actors run, so reductions round alike
    try:
        local_rows = run_local(build_config(overrides=[*overrides, "run_name=local"]))
    finally:
        torch.set_num_threads(threads)
    for ray_row, local_row in zip(ray_rows, local_rows, strict=True):
        assert ray_row["samples"] == 8 and ray_row["ratio_dev_before_update"] < 1e-5
        for key in ("reward_mean", "reward_std", "advantage_mean", "advantage_std", "loss", "grad_norm"):
            np.testing.assert_allclose(ray_row[key], local_row[key], rtol=1e-4, atol=1e-6,
                                       err_msg=f"epoch {local_row['epoch']}: {key}")
    assert ray_rows[0]["advantage_std"] > 0 and ray_rows[1]["reward_mean"] != ray_rows[0]["reward_mean"]


def test_step_noise_of_the_wrong_shape_is_refused(tiny_pipe):
    from ddpo_ray.maths.diffusion import ddim_step_with_logprob

    # 32 px through the tiny VAE: 4 x 8 x 8 latents; one step's noise given for two steps
    with pytest.raises(ValueError, match=r"step_noise has shape \(2, 1, 4, 8, 8\); expected \(2, 2, 4, 8, 8\)"):
        sample_trajectories(tiny_pipe, ["a red circle"] * 2, num_steps=2, guidance_scale=1.0, eta=1.0,
                            resolution=32, step_noise=torch.zeros(2, 1, 4, 8, 8))
    tiny_pipe.scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match=r"noise has shape \(1, 4, 4, 4\); expected \(2, 4, 4, 4\)"):
        ddim_step_with_logprob(tiny_pipe.scheduler, torch.zeros(2, 4, 4, 4), tiny_pipe.scheduler.timesteps[0],
                               torch.zeros(2, 4, 4, 4), noise=torch.zeros(1, 4, 4, 4))
