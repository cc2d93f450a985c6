"""The shipped `tiny` model: loads offline, follows its prompts, reconstructs its world."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from ddpo_ray.config import ModelConfig
from ddpo_ray.maths.diffusion import sample_trajectories
from ddpo_ray.models.pipelines import TINY_WEIGHTS, build_tiny_random_pipeline, load_pipeline
from ddpo_ray.tiny.base_trainer import vae_reconstruction_mse
from ddpo_ray.tiny.world import COLOURS


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline(ModelConfig(pretrained="tiny"))


def sample(pipe, prompts, seed=0):
    return sample_trajectories(
        pipe, prompts, num_steps=20, guidance_scale=5.0, eta=1.0, resolution=64,
        generator=torch.Generator().manual_seed(seed),
    ).images.numpy()


def test_shipped_weights_load_offline_and_are_trained(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (TINY_WEIGHTS / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    size_mb = sum(f.stat().st_size for f in TINY_WEIGHTS.rglob("*.safetensors")) / 1e6
    assert size_mb < 10, f"shipped weights are {size_mb:.1f} MB"
    random = build_tiny_random_pipeline()
    assert tiny.unet.dtype == torch.float32
    assert not torch.equal(tiny.unet.conv_in.weight, random.unet.conv_in.weight)


def test_vae_reconstructs_held_out_world_images(tiny):
    mse = vae_reconstruction_mse(tiny.vae, num_images=64)
    # Measured 0.018 at training time (tiny/assets/base/training.json: PSNR ~23 dB); random: ~0.5.
    assert mse < 0.03, mse


@pytest.mark.slow
def test_images_follow_the_prompt_colour(tiny):
    """Same noise, different colour words: the named colour shows up where it was asked for.

    Measured share of pixels nearest to the named colour: ~0.4 in images prompted with it,
    ~0.1 in images prompted with another colour (the background takes most pixels).
    """
    colours = ["red", "blue", "green", "yellow"]
    names = list(COLOURS)
    palette = np.array(list(COLOURS.values()), dtype=float)
    share = np.zeros((len(colours), len(colours)))  # [prompted colour, measured colour]
    for seed in (0, 1):
        images = sample(tiny, [f"a large {c} square" for c in colours], seed=seed)
        for i, image in enumerate(images):
            pixels = image.reshape(-1, 3).astype(float)
            nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
            for j, colour in enumerate(colours):
                share[i, j] += (nearest == names.index(colour)).mean() / 2
    on_target = np.diag(share).mean()
    off_target = share[~np.eye(len(colours), dtype=bool)].mean()
    assert on_target > 2 * off_target, share.round(2)


@pytest.mark.slow
def test_saves_and_loads_as_a_standard_diffusers_pipeline(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "pipe")
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert np.array_equal(sample(reloaded, ["two red circles"]), sample(tiny, ["two red circles"]))
