"""The `alignment_gold` reward: which of a prompt's attributes an image shows, by a trained detector.

In the spirit of GenEval's detector-based checks: instead of comparing a caption with the prompt
(the `llava_bertscore` proxy, which a policy can exploit), an independent model reads the image's
attributes - object colour, shape, count, size, position, background colour and texture - and
the reward is the fraction of the attributes the prompt names that the image shows. "two red
circles" names count, colour and shape: an image of two red squares scores 2/3.

The model is a small CNN (a different architecture, data and seed from the captioner's CLIP
tower), trained by `python -m ddpo_ray.tiny.attribute_trainer` on tiny-world renders, clean and
degraded, and shipped in `ddpo_ray/tiny/assets/attributes`. It knows the tiny world only: a
prompt outside its grammar is refused with a ValueError that quotes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ddpo_ray.infra.hf_loading import TINY, resolve_device
from ddpo_ray.infra.images import as_image_array
from ddpo_ray.tiny import ASSETS
from ddpo_ray.tiny.world import ATTRIBUTES, IMAGE_SIZE, parse_caption

TINY_ATTRIBUTES = ASSETS / "attributes"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class AttributeNet(nn.Module):
    """Four conv blocks (64 -> 4 pixels) and one classification head per attribute."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128), hidden: int = 256):
        super().__init__()
        self.widths, self.hidden = tuple(widths), hidden
        blocks, channels = [], 3
        for width in widths:
            blocks += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*blocks, nn.Flatten())
        side = IMAGE_SIZE // 2 ** len(widths)
        self.trunk = nn.Sequential(nn.Linear(channels * side * side, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for (N, 3, 64, 64) float images in [0, 1]."""
        hidden = self.trunk(self.features(pixels))
        return {name: head(hidden) for name, head in self.heads.items()}


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, 64, 64) float in [0, 1] (other sizes resized, bilinear)."""
    if images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        images = np.stack([np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for im in images])
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def save_attribute_net(net: AttributeNet, out: Path) -> None:
    """fp16 weights and the architecture, loadable with `load_attribute_net(out)`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    save_file(state, out / WEIGHTS_FILE)
    config = {"widths": list(net.widths), "hidden": net.hidden, "attributes": {k: list(v) for k, v in ATTRIBUTES.items()}}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")


def load_attribute_net(path: str | Path = TINY) -> AttributeNet:
    """The trained net from a directory written by `save_attribute_net` ("tiny": the shipped one)."""
    from safetensors.torch import load_file

    directory = TINY_ATTRIBUTES if str(path) == TINY else Path(path)
    if not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"attribute_model={str(path)!r}: no {WEIGHTS_FILE} in {directory}; expected a directory written "
            f"by `python -m ddpo_ray.tiny.attribute_trainer --out DIR`"
        )
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config["attributes"] != {k: list(v) for k, v in ATTRIBUTES.items()}:
        raise ValueError(f"attribute_model={str(path)!r} was trained on other attribute values than this world's")
    net = AttributeNet(config["widths"], config["hidden"])
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(directory / WEIGHTS_FILE).items()})
    return net.eval().requires_grad_(False)


class AttributeModel:
    """In-process `alignment_gold`: (images, prompts) -> fraction of each prompt's attributes shown."""

    def __init__(self, model: str = TINY, device: str = "auto"):
        self.device = resolve_device(device)
        self.net = load_attribute_net(model).to(self.device)

    @torch.no_grad()
    def attributes(self, images: np.ndarray | Sequence[np.ndarray]) -> list[dict[str, object]]:
        """The attributes the model reads in each image (every attribute, its most likely value)."""
        logits = self.net(to_pixels(as_image_array(images)).to(self.device))
        best = {name: values.argmax(-1).cpu().numpy() for name, values in logits.items()}
        return [{name: ATTRIBUTES[name][int(best[name][i])] for name in ATTRIBUTES} for i in range(len(images))]

    def __call__(self, images: np.ndarray | Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """One score in [0, 1] per image: the fraction of its prompt's named attributes it shows."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts; expected one prompt per image")
        named = parse_prompts(prompts)
        shown = self.attributes(images)
        return np.asarray([confirmed_fraction(n, s) for n, s in zip(named, shown)], dtype=np.float64)


def parse_prompts(prompts: Sequence[str]) -> list[dict[str, object]]:
    """The attributes each prompt names; a prompt outside the tiny world fails, by index."""
    named = []
    for i, prompt in enumerate(prompts):
        try:
            named.append(parse_caption(prompt))
        except ValueError as exc:
            raise ValueError(f"prompts[{i}]: alignment_gold reads tiny-world prompts only; {exc}") from None
    return named


def confirmed_fraction(named: dict[str, object], shown: dict[str, object]) -> float:
    """The share of the named attributes whose value the image shows."""
    return sum(shown[name] == value for name, value in named.items()) / len(named)
