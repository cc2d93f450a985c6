"""The clipped PPO objective and one training epoch."""

import pytest
import torch

from ddpo_ray.config import ConfigError, TrainConfig, build_config
from ddpo_ray.maths.diffusion import sample_trajectories, trajectory_log_prob
from ddpo_ray.maths.ppo import make_optimizer, ppo_loss, scheduled_learning_rate, train_epoch
from ddpo_ray.models.lora import add_lora
from tests.helpers import randomize_lora

CLIP = 0.1


def loss_and_grad(ratio: float, advantage: float, adv_clip_max: float = 5.0):
    old = torch.zeros(1)
    log_prob = torch.log(torch.tensor([ratio])).requires_grad_(True)
    loss, stats = ppo_loss(log_prob, old, torch.tensor([advantage]), CLIP, adv_clip_max)
    loss.backward()
    return loss.item(), log_prob.grad.item(), stats


@pytest.mark.parametrize(
    "ratio, advantage, clipped",
    [
        (1.5, 1.0, True),    # good action already made much likelier: no further push
        (0.5, 1.0, False),   # good action made less likely: the unclipped term pulls it back
        (0.5, -1.0, True),   # bad action already made much less likely: no further push
        (1.5, -1.0, False),  # bad action made likelier: the unclipped term pushes it down
        (1.05, 1.0, False),  # inside the trust region: plain importance-weighted objective
    ],
)
def test_clipped_branch_taken_when_it_should_be(ratio, advantage, clipped):
    loss, grad, stats = loss_and_grad(ratio, advantage)
    if clipped:
        bound = 1 + CLIP if ratio > 1 else 1 - CLIP
        assert loss == pytest.approx(-advantage * bound)
        assert grad == 0.0
    else:
        assert loss == pytest.approx(-advantage * ratio)
        # d(-A r)/d(log r) = -A r: the gradient's sign is opposite the advantage's
        assert grad == pytest.approx(-advantage * ratio)
    assert stats["clipfrac"].item() == (1.0 if abs(ratio - 1) > CLIP else 0.0)


def test_gradient_sign_follows_advantage():
    _, grad_pos, _ = loss_and_grad(1.0, 2.0)
    _, grad_neg, _ = loss_and_grad(1.0, -2.0)
    assert grad_pos < 0 < grad_neg  # descent raises log p for A > 0, lowers it for A < 0


def test_advantages_are_clipped():
    loss, _, _ = loss_and_grad(1.0, 100.0, adv_clip_max=5.0)
    assert loss == pytest.approx(-5.0)


def test_statistics():
    log_prob = torch.tensor([0.0, 0.2, -0.2])
    _, stats = ppo_loss(log_prob, torch.zeros(3), torch.ones(3), 0.1, 5.0)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (0.04 + 0.04) / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["ratio_max_dev"].item() == pytest.approx(torch.exp(torch.tensor(0.2)).item() - 1)


def test_train_epoch_moves_log_probs_with_the_advantage_and_only_lora(tiny_pipe):
    params = add_lora(tiny_pipe.unet, rank=4)
    randomize_lora(tiny_pipe.unet)
    base_before = {n: p.clone() for n, p in tiny_pipe.unet.named_parameters() if "lora_" not in n}
    prompts = ["a cat", "a cat"]
    traj = sample_trajectories(
        tiny_pipe, prompts, num_steps=3, guidance_scale=1.0, eta=1.0, resolution=64,
        generator=torch.Generator().manual_seed(0),
    )
    # A wide clip range so the ratio is never clipped, and a step small enough for first-order
    # behaviour: Adam's first step moves every weight by ~lr (sign descent), and at lr 3e-3 that
    # overshoots on this pair of same-prompt samples (measured: both log-probs fell). At 1e-4
    # the changes are ~1e-3, well above float noise.
    train = TrainConfig(batch_size=2, learning_rate=1e-4, clip_range=10.0, adam_weight_decay=0.0)
    advantages = torch.tensor([1.0, -1.0])
    metrics = train_epoch(
        tiny_pipe.unet, tiny_pipe.scheduler, make_optimizer(params, train), params, traj, advantages,
        train, guidance_scale=1.0, eta=1.0, generator=torch.Generator().manual_seed(0),
    )
    assert set(metrics) >= {"loss", "approx_kl", "clipfrac", "grad_norm", "optimizer_steps"}
    tiny_pipe.scheduler.set_timesteps(traj.num_steps)
    with torch.no_grad():
        new = torch.stack([
            trajectory_log_prob(
                tiny_pipe.unet, tiny_pipe.scheduler, traj.latents[:, j], traj.timesteps[:, j],
                traj.next_latents[:, j], traj.prompt_embeds, traj.negative_prompt_embeds,
                guidance_scale=1.0, eta=1.0,
            ) for j in range(traj.num_steps)
        ], dim=1)
    change = (new - traj.log_probs).sum(dim=1)
    assert float(advantages @ change) > 0, change  # the surrogate objective rose
    assert change[0] > 0 > change[1], change  # A>0 became likelier, A<0 less likely
    for name, param in tiny_pipe.unet.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name]), f"frozen weight {name} changed"


def test_train_epoch_rejects_shapes_that_do_not_split(tiny_pipe):
    params = add_lora(tiny_pipe.unet, rank=4)
    traj = sample_trajectories(
        tiny_pipe, ["a", "b", "c"], num_steps=2, guidance_scale=1.0, eta=1.0, resolution=64,
        generator=torch.Generator().manual_seed(0),
    )
    train = TrainConfig(batch_size=2)
    kwargs = dict(guidance_scale=1.0, eta=1.0, generator=torch.Generator())
    optimizer = make_optimizer(params, train)
    with pytest.raises(ValueError, match="train.batch_size=2"):
        train_epoch(tiny_pipe.unet, tiny_pipe.scheduler, optimizer, params, traj, torch.zeros(3), train, **kwargs)
    with pytest.raises(ValueError, match="advantages has shape"):
        train_epoch(tiny_pipe.unet, tiny_pipe.scheduler, optimizer, params, traj, torch.zeros(2), train, **kwargs)


def test_cosine_learning_rate_falls_from_the_rate_to_its_final_fraction():
    train = build_config(overrides=["train.learning_rate=1e-2", "train.lr_schedule=cosine",
                                    "train.lr_final_fraction=0.1"]).train
    rates = [scheduled_learning_rate(train, epoch, 11) for epoch in range(11)]
    assert rates[0] == pytest.approx(1e-2) and rates[-1] == pytest.approx(1e-3)
    assert rates[5] == pytest.approx(5.5e-3)  # halfway: the mean of the two ends
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert scheduled_learning_rate(train, 40, 11) == pytest.approx(1e-3)  # past the end: the floor
    constant = build_config(overrides=["train.learning_rate=1e-2", "train.lr_schedule=constant"]).train
    assert {scheduled_learning_rate(constant, epoch, 11) for epoch in range(11)} == {1e-2}
    with pytest.raises(ConfigError, match="lr_final_fraction"):
        build_config(overrides=["train.lr_final_fraction=2"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_step_score_scale_is_the_slope_of_the_step_mean_over_its_std(prediction_type):
    from diffusers import DDIMScheduler

    from ddpo_ray.maths.diffusion import ddim_step_mean, step_score_scale

    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # as SD: every step has a std > 0
    scheduler.set_timesteps(5)
    timesteps = scheduler.timesteps
    # The slope by autograd at a random point (the mean is affine in the model output).
    output = torch.randn(len(timesteps), 1, 1, 1, requires_grad=True)
    sample = torch.randn(len(timesteps), 1, 1, 1)
    mean, std = ddim_step_mean(scheduler, output, timesteps, sample, eta=1.0)
    (slope,) = torch.autograd.grad(mean.sum(), output)
    expected = (slope.abs() / std).flatten()
    assert torch.allclose(step_score_scale(scheduler, timesteps, eta=1.0), expected, rtol=1e-3)
    with pytest.raises(ValueError, match="eta=0"):
        step_score_scale(scheduler, timesteps, eta=0.0)
    with pytest.raises(ValueError, match=r"timesteps \[0\] have a deterministic step"):
        step_score_scale(scheduler, torch.tensor([0]), eta=1.0)


def test_score_scale_weights_average_one_over_the_schedule_and_shrink_low_noise_steps():
    from diffusers import DDIMScheduler

    from ddpo_ray.maths.diffusion import step_score_scale
    from ddpo_ray.maths.ppo import step_weights

    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(5)
    uniform = TrainConfig()  # the schema default
    assert step_weights(scheduler, scheduler.timesteps, uniform, eta=1.0) is None
    train = build_config(overrides=["train.step_weighting=score_scale"]).train
    weights = step_weights(scheduler, scheduler.timesteps, train, eta=1.0)
    assert float(weights.mean()) == pytest.approx(1.0)
    scales = step_score_scale(scheduler, scheduler.timesteps, eta=1.0)
    assert int(weights.argmin()) == int(scales.argmax())  # the largest score gets the smallest weight
    # Weighted, every step's score has the same size: weight x scale is one constant.
    assert torch.allclose(weights * scales, (weights * scales)[0].expand(5), rtol=1e-4)
    with pytest.raises(ConfigError, match="step_weighting"):
        build_config(overrides=["train.step_weighting=snr"])


def test_ppo_loss_weights_scale_each_samples_term():
    log_probs = torch.tensor([0.1, -0.2, 0.0])
    old = torch.zeros(3)
    advantages = torch.tensor([1.0, -2.0, 0.5])
    weights = torch.tensor([2.0, 0.5, 1.0])
    plain, _ = ppo_loss(log_probs, old, advantages, clip_range=10.0, adv_clip_max=5.0)
    weighted, _ = ppo_loss(log_probs, old, advantages, clip_range=10.0, adv_clip_max=5.0, weights=weights)
    terms = -advantages * torch.exp(log_probs)
    assert plain.item() == pytest.approx(terms.mean().item())
    assert weighted.item() == pytest.approx((weights * terms).mean().item())
    with pytest.raises(ValueError, match="weights has shape"):
        ppo_loss(log_probs, old, advantages, clip_range=10.0, adv_clip_max=5.0, weights=torch.ones(2))


def test_train_epoch_with_score_scale_weights_keeps_ratio_one_before_the_update(tiny_pipe):
    params = add_lora(tiny_pipe.unet, rank=4)
    randomize_lora(tiny_pipe.unet)
    traj = sample_trajectories(
        tiny_pipe, ["a cat", "a dog"], num_steps=3, guidance_scale=1.0, eta=1.0, resolution=64,
        generator=torch.Generator().manual_seed(0),
    )
    grads = {}
    for weighting in ("uniform", "score_scale"):
        train = build_config(overrides=[f"train.step_weighting={weighting}", "train.batch_size=2",
                                        "train.learning_rate=1e-9"]).train
        optimizer = make_optimizer(params, train)
        captured = []
        optimizer.step = lambda *a, **k: captured.append(torch.cat([p.grad.flatten().clone() for p in params]))
        metrics = train_epoch(
            tiny_pipe.unet, tiny_pipe.scheduler, optimizer, params, traj, torch.tensor([1.0, -1.0]),
            train, guidance_scale=1.0, eta=1.0, generator=torch.Generator().manual_seed(0),
        )
        assert metrics["ratio_dev_before_update"] < 1e-5
        grads[weighting] = captured[0]
    # Same samples, same shuffle: the weighting alone changes the gradient.
    assert not torch.allclose(grads["uniform"], grads["score_scale"])


def test_micro_batches_give_the_minibatchs_gradient_and_statistics_with_smaller_forwards(tiny_pipe):
    """`train.micro_batch_size` bounds the samples per UNet call (memory): the minibatch of 5 in
    micro-batches of 2 (2 + 2 + 1, an uneven last one) gives the gradient and the statistics of
    computing it at once, with the KL penalty and per-step weights on."""
    params = add_lora(tiny_pipe.unet, rank=4)
    randomize_lora(tiny_pipe.unet)
    traj = sample_trajectories(
        tiny_pipe, ["a cat", "a dog", "a cow", "a fox", "a hen"], num_steps=3, guidance_scale=1.0, eta=1.0,
        resolution=64, generator=torch.Generator().manual_seed(0),
    )
    advantages = torch.tensor([[1.0, 0.5, -0.2], [-1.0, 0.3, 0.1], [0.4, -0.6, 2.0], [0.0, 1.2, -1.5], [0.8, 0.2, 0.3]])
    batch_sizes = []
    hook = tiny_pipe.unet.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))

    def gradient(micro_batch_size: int | None) -> tuple[torch.Tensor, dict]:
        train = TrainConfig(batch_size=5, learning_rate=1e-9, step_weighting="score_scale", kl_coef=0.1,
                            micro_batch_size=micro_batch_size)
        optimizer = make_optimizer(params, train)
        captured = []
        optimizer.step = lambda *a, **k: captured.append(torch.cat([p.grad.flatten().clone() for p in params]))
        batch_sizes.clear()
        metrics = train_epoch(tiny_pipe.unet, tiny_pipe.scheduler, optimizer, params, traj, advantages, train,
                              guidance_scale=1.0, eta=1.0, generator=torch.Generator().manual_seed(0))
        return captured[0], {**metrics, "largest_forward": max(batch_sizes)}

    try:
        whole, whole_metrics = gradient(None)
        chunked, chunked_metrics = gradient(2)
    finally:
        hook.remove()
    assert (whole_metrics["largest_forward"], chunked_metrics["largest_forward"]) == (5, 2)
    assert whole.abs().sum() > 0
    assert ((chunked - whole).norm() / whole.norm()).item() < 1e-5
    for key in ("loss", "approx_kl", "kl_ref", "ratio_mean", "ratio_max_dev", "optimizer_steps"):
        assert chunked_metrics[key] == pytest.approx(whole_metrics[key], rel=1e-5, abs=1e-6), key
    with pytest.raises(ConfigError, match="micro_batch_size"):
        build_config(overrides=["train.micro_batch_size=0"])
