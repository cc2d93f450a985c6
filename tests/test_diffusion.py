"""ddim_step_with_logprob against diffusers' DDIMScheduler and an independent Gaussian density."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from ddpo_ray.maths.diffusion import ddim_step_with_logprob


def make_scheduler(prediction_type: str = "epsilon", steps: int = 50) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    scheduler.set_timesteps(steps)
    return scheduler


def inputs(seed: int = 0, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 8, 8, generator=g)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_eta_zero_equals_diffusers_step(prediction_type):
    scheduler = make_scheduler(prediction_type)
    model_output, sample = inputs()
    # every timestep, including the last one whose previous alpha is final_alpha_cumprod
    for t in scheduler.timesteps:
        ours, _ = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=0.0)
        theirs = scheduler.step(model_output, t, sample, eta=0.0).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_eta_one_with_same_noise_equals_diffusers_step():
    scheduler = make_scheduler()
    model_output, sample = inputs()
    for t in scheduler.timesteps[::7]:
        ours, _ = ddim_step_with_logprob(
            scheduler, model_output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(5)
        )
        theirs = scheduler.step(
            model_output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(5)
        ).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_log_prob_equals_independent_gaussian_density(eta):
    scheduler = make_scheduler()
    model_output, sample = inputs(seed=1)
    for t in scheduler.timesteps[::5]:
        prev, log_prob = ddim_step_with_logprob(
            scheduler, model_output, t, sample, eta=eta, generator=torch.Generator().manual_seed(0)
        )
        # Independent mean: diffusers' step with zero noise; std from the scheduler's variance.
        mean = scheduler.step(
            model_output, t, sample, eta=eta, variance_noise=torch.zeros_like(sample)
        ).prev_sample
        prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        std = eta * math.sqrt(float(scheduler._get_variance(int(t), prev_t)))
        expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
        assert log_prob.shape == (sample.shape[0],)
        torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-4)


def test_given_prev_sample_is_scored_not_drawn():
    scheduler = make_scheduler()
    model_output, sample = inputs()
    t = scheduler.timesteps[10]
    drawn, log_prob = ddim_step_with_logprob(scheduler, model_output, t, sample, generator=torch.Generator().manual_seed(3))
    again, log_prob_again = ddim_step_with_logprob(scheduler, model_output, t, sample, prev_sample=drawn)
    assert again is drawn
    torch.testing.assert_close(log_prob_again, log_prob)
    # a point far from the mean is less likely than the sample drawn from the Gaussian
    _, far = ddim_step_with_logprob(scheduler, model_output, t, sample, prev_sample=drawn + 3.0)
    assert torch.all(far < log_prob)


def test_batched_timesteps_equal_one_call_per_sample():
    scheduler = make_scheduler()
    model_output, sample = inputs(batch=4)
    next_latents = torch.randn_like(sample)
    timesteps = scheduler.timesteps[torch.tensor([0, 13, 30, 49])]
    _, batched = ddim_step_with_logprob(scheduler, model_output, timesteps, sample, prev_sample=next_latents)
    for i in range(4):
        _, single = ddim_step_with_logprob(
            scheduler, model_output[i:i + 1], int(timesteps[i]), sample[i:i + 1], prev_sample=next_latents[i:i + 1]
        )
        torch.testing.assert_close(batched[i:i + 1], single)


def test_bad_arguments_are_named():
    scheduler = DDIMScheduler()
    model_output, sample = inputs()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(scheduler, model_output, 10, sample)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep has shape"):
        ddim_step_with_logprob(scheduler, model_output, torch.tensor([1, 2]), sample)
    with pytest.raises(ValueError, match="prev_sample has shape"):
        ddim_step_with_logprob(scheduler, model_output, 1, sample, prev_sample=sample[:1])
