"""The key DDPO correctness property: recomputing log-probs from stored trajectories with the
same weights reproduces the sampled ones, so the PPO ratio is exactly 1 before any update."""

import pytest
import torch

from ddpo_ray.config import TrainConfig
from ddpo_ray.maths.diffusion import sample_trajectories, trajectory_log_prob
from ddpo_ray.maths.ppo import make_optimizer, train_epoch
from ddpo_ray.models.lora import add_lora
from tests.helpers import randomize_lora

PROMPTS = ["a cat", "a dog riding a bike", "a zebra", "an ant"]


def sample(pipe, guidance_scale: float, steps: int = 5):
    return sample_trajectories(
        pipe, PROMPTS, num_steps=steps, guidance_scale=guidance_scale, eta=1.0, resolution=64,
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["cfg_off", "cfg_on"])
def test_recomputed_log_probs_match_sampled_with_lora(tiny_pipe, guidance_scale):
    add_lora(tiny_pipe.unet, rank=4)
    randomize_lora(tiny_pipe.unet)
    traj = sample(tiny_pipe, guidance_scale)
    assert traj.latents.shape == (4, 5, 4, 16, 16)
    assert traj.images.shape == (4, 64, 64, 3) and traj.images.dtype == torch.uint8
    tiny_pipe.scheduler.set_timesteps(traj.num_steps)
    for j in range(traj.num_steps):
        log_prob = trajectory_log_prob(
            tiny_pipe.unet, tiny_pipe.scheduler, traj.latents[:, j], traj.timesteps[:, j],
            traj.next_latents[:, j], traj.prompt_embeds, traj.negative_prompt_embeds,
            guidance_scale=guidance_scale, eta=1.0,
        )
        ratio = torch.exp(log_prob - traj.log_probs[:, j])
        assert torch.all((ratio - 1).abs() < 1e-5), ratio


def test_lora_changes_the_policy(tiny_pipe):
    add_lora(tiny_pipe.unet, rank=4)
    base = sample(tiny_pipe, 5.0)  # LoRA B = 0: the base model
    randomize_lora(tiny_pipe.unet, std=0.2)
    tiny_pipe.scheduler.set_timesteps(base.num_steps)
    log_prob = trajectory_log_prob(
        tiny_pipe.unet, tiny_pipe.scheduler, base.latents[:, 0], base.timesteps[:, 0],
        base.next_latents[:, 0], base.prompt_embeds, base.negative_prompt_embeds,
        guidance_scale=5.0, eta=1.0,
    )
    assert (log_prob - base.log_probs[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("cfg", [True, False])
def test_first_inner_epoch_ratio_is_one_in_train_epoch(tiny_pipe, cfg):
    """Through the whole training path (shuffles, timestep permutations, minibatches)."""
    params = add_lora(tiny_pipe.unet, rank=4)
    randomize_lora(tiny_pipe.unet)
    guidance = 5.0 if cfg else 1.0
    traj = sample(tiny_pipe, guidance, steps=4)
    # one optimizer step per epoch, so every ratio is computed before weights change
    train = TrainConfig(batch_size=2, gradient_accumulation_steps=2, cfg=cfg, timestep_fraction=0.5)
    metrics = train_epoch(
        tiny_pipe.unet, tiny_pipe.scheduler, make_optimizer(params, train), params, traj,
        torch.tensor([1.0, -1.0, 0.5, -0.5]), train, guidance_scale=guidance, eta=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert metrics["ratio_max_dev"] < 1e-5
    assert metrics["clipfrac"] == 0.0
    assert metrics["approx_kl"] < 1e-10
    assert metrics["optimizer_steps"] == 1.0


def test_sampling_with_the_lora_merged_keeps_the_ratio_one_and_the_adapter_intact(tiny_pipe):
    """Samplers roll out with the LoRA merged (models.merged_lora); the learner recomputes
    log-probs through the unmerged adapter. The PPO ratio before any update must still be 1."""
    from ddpo_ray.models.merged_lora import MergedLora

    params = add_lora(tiny_pipe.unet, rank=4)
    randomize_lora(tiny_pipe.unet, std=0.2)
    merger = MergedLora(tiny_pipe.unet)
    unmerged = sample(tiny_pipe, 5.0, steps=4)
    with merger.merged_for_sampling():
        traj = sample(tiny_pipe, 5.0, steps=4)
    assert (traj.log_probs - unmerged.log_probs).abs().max() < 1e-5
    train = TrainConfig(batch_size=2, gradient_accumulation_steps=2, timestep_fraction=1.0)
    metrics = train_epoch(
        tiny_pipe.unet, tiny_pipe.scheduler, make_optimizer(params, train), params, traj,
        torch.tensor([1.0, -1.0, 0.5, -0.5]), train, guidance_scale=5.0, eta=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert metrics["ratio_max_dev"] < 1e-5 and metrics["clipfrac"] == 0.0
