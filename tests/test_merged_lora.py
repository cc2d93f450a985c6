"""The merged-LoRA sampler (ddpo_ray/models/merged_lora.py): a merge is always recomputed from
the saved base weights, so nothing accumulates, and it is on only where it is exact."""

import pytest
import torch
from peft.tuners.lora import LoraLayer

from ddpo_ray.models.lora import LORA_TARGET_MODULES, add_lora
from ddpo_ray.models.merged_lora import MergedLora
from tests.helpers import randomize_lora


def base_weights(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" not in n}


def unet_output(unet):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=text).sample


def test_merged_unet_computes_what_the_adapter_computes_and_restores_bit_for_bit(tiny_pipe):
    unet = tiny_pipe.unet
    add_lora(unet, rank=4)
    before = base_weights(unet)
    merger = MergedLora(unet)
    assert len(merger.layers) >= len(LORA_TARGET_MODULES)
    for version in range(5):  # every version re-merges the new adapter from the saved base
        randomize_lora(unet, std=0.2, seed=version)
        adapted = unet_output(unet)
        merger.merge()
        changed = [n for n, p in base_weights(unet).items() if not torch.equal(p, before[n])]
        assert changed and all(any(t in n for t in LORA_TARGET_MODULES) for n in changed)
        assert torch.allclose(unet_output(unet), adapted, atol=1e-5)
        merger.merge()  # merging twice is the same merge, not twice the delta
        assert torch.allclose(unet_output(unet), adapted, atol=1e-5)
        merger.restore()
        assert all(torch.equal(p, before[n]) for n, p in base_weights(unet).items())
        assert torch.equal(unet_output(unet), adapted)


def lora_layers(unet):
    return [m for m in unet.modules() if isinstance(m, LoraLayer)]


def test_sampling_runs_the_plain_merged_layers_and_gives_the_adapter_back(tiny_pipe):
    unet = tiny_pipe.unet
    params = add_lora(unet, rank=4)
    randomize_lora(unet, std=0.2)
    adapted = unet_output(unet)
    merger = MergedLora(unet)
    with merger.merged_for_sampling():
        assert not lora_layers(unet)  # no peft wrapper left on the sampling path
        assert torch.allclose(unet_output(unet), adapted, atol=1e-5)
    assert len(lora_layers(unet)) == len(merger.layers)
    # the optimizer's parameters are the UNet's again, and the adapter computes what it did
    assert {id(p) for n, p in unet.named_parameters() if "lora_" in n} == {id(p) for p in params}
    assert torch.equal(unet_output(unet), adapted)


def test_merged_for_sampling_restores_even_when_sampling_raises(tiny_pipe):
    add_lora(tiny_pipe.unet, rank=4)
    randomize_lora(tiny_pipe.unet, std=0.2)
    before = base_weights(tiny_pipe.unet)
    merger = MergedLora(tiny_pipe.unet)
    with pytest.raises(RuntimeError, match="boom"):
        with merger.merged_for_sampling():
            raise RuntimeError("boom")
    assert not merger.merged and all(torch.equal(p, before[n]) for n, p in base_weights(tiny_pipe.unet).items())
    assert len(lora_layers(tiny_pipe.unet)) == len(merger.layers)


def test_merge_is_off_where_it_would_not_be_exact_or_has_nothing_to_merge(tiny_pipe):
    unet = tiny_pipe.unet
    assert not MergedLora.for_sampling(unet, use_lora=False, merge_lora=True).layers  # full fine-tune
    with pytest.raises(ValueError, match="LoRA adapter"):
        MergedLora(unet)  # asked to merge a UNet that has no adapter
    add_lora(unet, rank=4)
    assert MergedLora.for_sampling(unet, use_lora=True, merge_lora=True).layers
    assert not MergedLora.for_sampling(unet, use_lora=True, merge_lora=False).layers
    unet.to(torch.bfloat16)  # a half-precision merge would round small LoRA updates away
    off = MergedLora.for_sampling(unet, use_lora=True, merge_lora=True)
    assert not off.layers
    with off.merged_for_sampling():
        assert not off.merged
