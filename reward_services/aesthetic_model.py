"""The LAION aesthetic predictor: CLIP ViT-L/14 image embedding -> L2 norm -> linear MLP.

As in ddpo-pytorch and the LAION improved-aesthetic-predictor: the image embedding is CLIP's
projected image features (768-d for ViT-L/14), L2-normalised, into an MLP
768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout 0.2, 0.2, 0.1 after the first three layers and
no activations. Its weights are `sac+logos+ava1-l14-linearMSE.pth` (keys `layers.N.weight`).

Offline default ("tiny"): a small CLIP vision tower (64x64 images) projecting to 768 dims and the
MLP in exactly the LAION shape, both trained by `python -m ddpo_ray.tiny.aesthetic_trainer` to
predict the documented tiny aesthetic score (`reward_services.tiny_aesthetic`, the
`aesthetic_gold` reward) and shipped in `ddpo_ray/tiny/assets/aesthetic`. "tiny-random" is a
smaller tower and MLP at random init, for tests that need any model of this shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from transformers import AutoImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from ddpo_ray.infra.hf_loading import TINY, TINY_RANDOM, load_pretrained, resolve_device, resolve_dtype
from ddpo_ray.tiny import ASSETS

CLIP_VIT_L14 = "openai/clip-vit-large-patch14"
LAION_MLP_WEIGHTS_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
EMBEDDING_DIM = 768
TINY_AESTHETIC = ASSETS / "aesthetic"  # clip/ (save_pretrained) + mlp.safetensors
TINY_MLP_FILE = "mlp.safetensors"

try:  # transformers 5: the torchvision-free CLIP processor (CLIPImageProcessor warns, then falls back to it)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4
    from transformers import CLIPImageProcessor


class AestheticMLP(nn.Module):
    """The LAION MLP; the attribute and layer indices match the released state dict."""

    def __init__(self, input_size: int = EMBEDDING_DIM):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def build_tiny_random_clip(seed: int = 0) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """A 2-layer, 32-wide CLIP vision tower on 32x32 crops, projecting to 768 like ViT-L/14."""
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=EMBEDDING_DIM,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(config)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, processor


def load_clip(name: str, revision: str | None = None, seed: int = 0):
    """(vision model with projection, image processor) for "tiny", "tiny-random", an HF id or a local dir."""
    if name == TINY_RANDOM:
        return build_tiny_random_clip(seed)
    source = str(TINY_AESTHETIC / "clip") if name == TINY else name
    model = load_pretrained(
        CLIPVisionModelWithProjection.from_pretrained, source, "clip_model", revision=revision,
        dtype=torch.float32,
    )
    processor = load_pretrained(AutoImageProcessor.from_pretrained, source, "clip_model", revision=revision)
    return model, processor


def load_mlp(weights: str | None, seed: int = 0) -> AestheticMLP:
    """The MLP from a .pth path or URL (the LAION file) or a .safetensors file; random from `seed` when None."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlp = AestheticMLP()
    if weights is None:
        return mlp
    if weights.endswith(".safetensors") and Path(weights).is_file():
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(weights).items()}
    elif weights.startswith(("http://", "https://")):
        state = torch.hub.load_state_dict_from_url(weights, map_location="cpu", weights_only=True)
    else:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"mlp_weights={weights!r}: no such file; expected the LAION predictor "
                f"(sac+logos+ava1-l14-linearMSE.pth) as a path or URL"
            ) from None
    mlp.load_state_dict(state)
    return mlp


class AestheticPredictor:
    """In-process scorer: uint8 images -> LAION aesthetic scores (the plain function)."""

    def __init__(
        self,
        clip_model: str = TINY,
        mlp_weights: str | None = None,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        seed: int = 0,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        if mlp_weights is None and clip_model == TINY:
            mlp_weights = str(TINY_AESTHETIC / TINY_MLP_FILE)  # the head trained with the tiny tower
        elif mlp_weights is None and clip_model != TINY_RANDOM:
            raise ValueError(
                f"mlp_weights is required with clip_model={clip_model!r}: expected the LAION predictor "
                f"(sac+logos+ava1-l14-linearMSE.pth, path or URL); only {TINY!r} ships its own head "
                f"and {TINY_RANDOM!r} uses a random one"
            )
        clip, self.processor = load_clip(clip_model, revision, seed)
        projection_dim = clip.config.projection_dim
        if projection_dim != EMBEDDING_DIM:
            raise ValueError(
                f"clip_model={clip_model!r} projects images to {projection_dim} dims; the LAION MLP "
                f"expects {EMBEDDING_DIM} (CLIP ViT-L/14)"
            )
        self.clip = clip.to(self.device, self.dtype).eval().requires_grad_(False)
        self.mlp = load_mlp(mlp_weights, seed).to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """L2-normalised CLIP image embeddings, float32, (N, 768)."""
        inputs = self.processor(images=list(images), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        embeddings = self.clip(pixel_values=pixel_values).image_embeds.float()
        return embeddings / torch.linalg.vector_norm(embeddings, dim=-1, keepdim=True)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """One aesthetic score per image, float64 (N,)."""
        scores = self.mlp(self.embed(images)).squeeze(-1)
        return scores.cpu().numpy().astype(np.float64)
