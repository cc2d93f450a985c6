"""Shared fixtures. Everything runs on the CPU, offline (HF_HUB_OFFLINE=1), with tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from ddpo_ray.models import build_tiny_random_pipeline  # noqa: E402


@pytest.fixture
def tiny_pipe():
    """A fresh tiny pipeline (fp32, CPU, frozen); tests may add LoRA and change weights."""
    pipe = build_tiny_random_pipeline(seed=0)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return pipe
