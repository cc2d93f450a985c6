"""`sample.initial_noise: per_group`: a prompt's K samples share x_T and differ in step noise."""

import pytest
import torch

from ddpo_ray.config import build_config
from ddpo_ray.maths.diffusion import sample_trajectories
from ddpo_ray.training.steps import epoch_batches, sample_batch

# 2 sampling batches of 4, one prompt group of 8 split over both.
SMALL = ["model.pretrained=tiny-random", "sample.num_steps=2", "sample.resolution=32",
         "sample.batch_size=4", "sample.num_batches_per_epoch=4", "sample.samples_per_prompt=8",
         "sample.initial_noise=per_sample", "advantage.mode=group", "train.batch_size=16"]


def _first_latents(pipe, cfg, epoch=0):
    prompts = ["a red circle"] * 8 + ["a blue square"] * 8
    batches = [sample_batch(pipe, cfg, b, epoch, i, 0) for i, b in enumerate(epoch_batches(cfg, prompts))]
    return torch.cat([t.latents for t in batches])


def test_a_group_shares_x_t_across_batches_and_differs_in_step_noise(tiny_pipe):
    cfg = build_config(overrides=[*SMALL, "sample.initial_noise=per_group"])
    latents = _first_latents(tiny_pipe, cfg)
    x_t, after_one_step = latents[:, 0], latents[:, 1]
    for group in (slice(0, 8), slice(8, 16)):
        assert torch.equal(x_t[group], x_t[group][:1].expand_as(x_t[group])), "a group (split over two batches) shares x_T"
        steps = after_one_step[group]
        assert all(not torch.equal(steps[0], steps[i]) for i in range(1, 8)), "step noise differs"
    assert not torch.equal(x_t[0], x_t[8]), "two groups start from different x_T"
    # The same draw for the same (seed, epoch, group), whichever batch or call makes it.
    assert torch.equal(latents, _first_latents(tiny_pipe, cfg))
    assert not torch.equal(x_t, _first_latents(tiny_pipe, cfg, epoch=1)[:, 0])


def test_per_sample_noise_gives_every_sample_its_own_x_t(tiny_pipe):
    x_t = _first_latents(tiny_pipe, build_config(overrides=SMALL))[:, 0]
    assert all(not torch.equal(x_t[0], x_t[i]) for i in range(1, 16))


def test_per_group_noise_needs_group_advantages():
    with pytest.raises(ValueError, match="initial_noise='per_group'.*advantage.mode"):
        build_config(overrides=[*SMALL, "sample.initial_noise=per_group", "advantage.mode=batch"])


def test_initial_noise_of_the_wrong_shape_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="initial_noise has shape"):
        sample_trajectories(tiny_pipe, ["a red circle"] * 2, num_steps=1, guidance_scale=1.0, eta=1.0,
                            resolution=32, initial_noise=torch.zeros(3, 4, 4, 4))
