"""Sampling with the LoRA folded into the base weights: the speed of a plain UNet.

A peft LoRA layer computes base(x) + B(A(x)) * scale on every call: on tiny's UNet that is ~50%
more sampling time than the adapter-free model. Samplers never train, so before a rollout the
adapter can be merged (W = W_base + scale * B @ A) and the UNet runs its plain layers.

The merge is always recomputed from a saved copy of the frozen base weights, never by adding to
or subtracting from the current ones, so nothing accumulates over thousands of weight versions
(`restore` puts the exact base back before training, or before the next merge).

Merging is exact up to float rounding in fp32. In fp16/bf16 the merged weight is rounded to the
base's precision, which swallows LoRA updates below ~2^-8 (bf16) of a weight: the sampled policy
would not be the trained one. `MergedLora.for_sampling` therefore merges only fp32 UNets.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from peft.tuners.lora import LoraLayer

log = logging.getLogger(__name__)


def merge_is_exact(unet: torch.nn.Module) -> bool:
    """Merged sampling is the trained policy up to rounding only on an fp32 UNet."""
    return all(p.dtype == torch.float32 for name, p in unet.named_parameters() if "lora_" not in name)


class MergedLora:
    """Merge a UNet's LoRA into its base weights for sampling, and take it out again exactly.

    `enabled=False` (no LoRA, `sample.merge_lora: false`, or a half-precision UNet) keeps the
    same interface and merges nothing, so the loops never branch on it.
    """

    def __init__(self, unet: torch.nn.Module, enabled: bool = True):
        named = [(n, m) for n, m in unet.named_modules() if isinstance(m, LoraLayer)] if enabled else []
        self.layers = [m for _, m in named]
        # (parent, attribute) of each adapted layer: sampling puts the plain base layer there
        self._slots = [(unet.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n, _ in named]
        if enabled and not self.layers:
            raise ValueError("MergedLora needs a UNet with a LoRA adapter (models.lora.add_lora)")
        # The frozen base weights (and biases) of the adapted layers: what every merge starts from.
        self._base = [
            {name: p.detach().clone() for name, p in layer.get_base_layer().named_parameters(recurse=False)}
            for layer in self.layers
        ]
        self.merged = False

    @classmethod
    def for_sampling(cls, unet: torch.nn.Module, use_lora: bool, merge_lora: bool) -> "MergedLora":
        """The sampler's merger: on for a LoRA run on an fp32 UNet when `sample.merge_lora` asks."""
        enabled = use_lora and merge_lora and merge_is_exact(unet)
        if use_lora and merge_lora and not enabled:
            log.info("sampling with the LoRA unmerged: a half-precision merge would round its updates away")
        return cls(unet, enabled)

    def merge(self) -> None:
        """Base weights := saved base + the adapter's current delta (re-merges if already merged)."""
        if not self.layers:
            return
        self.restore()
        for layer in self.layers:
            layer.merge()
        self.merged = True

    def restore(self) -> None:
        """The exact saved base weights back, the adapter active again (a no-op when not merged)."""
        if not self.merged and not any(layer.merged for layer in self.layers):
            return
        with torch.no_grad():
            for layer, base in zip(self.layers, self._base):
                if layer.merged:
                    layer.unmerge()  # clears peft's merged flag; the values are overwritten next
                for name, p in layer.get_base_layer().named_parameters(recurse=False):
                    p.copy_(base[name])
        self.merged = False

    @contextlib.contextmanager
    def merged_for_sampling(self) -> Iterator[None]:
        """Merged inside, the adapter restored after (the local loop trains the same UNet).

        Inside, the UNet calls the merged base layers directly: peft's wrapper, even merged,
        costs ~10% on tiny's small layers (measured, bench/merged_sampling.py).
        """
        self.merge()
        try:
            for (parent, attr), layer in zip(self._slots, self.layers):
                setattr(parent, attr, layer.get_base_layer())
            yield
        finally:
            for (parent, attr), layer in zip(self._slots, self.layers):
                setattr(parent, attr, layer)
            self.restore()
