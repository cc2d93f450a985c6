"""Prompt embeddings are encoded once per prompt and equal what the text encoder gives."""

import pytest
import torch

from ddpo_ray.models.prompt_embeddings import PromptEmbeddingCache, encode_prompts, prompt_embedding_cache
from ddpo_ray.prompts.sets import TINY_SHAPES


def _whole_batch(pipe, prompts):
    """The pipeline's own encoding of a whole batch, as sampling did before the cache."""
    return pipe.encode_prompt(list(prompts), device="cpu", num_images_per_prompt=1,
                              do_classifier_free_guidance=True, negative_prompt=[""] * len(prompts))


class _CountingEncoder:
    """The pipeline's real `encode_prompt`, counting the prompts it is asked to encode."""

    def __init__(self, pipe):
        self.real, self.prompts = pipe.encode_prompt, []
        pipe.encode_prompt = self

    def __call__(self, prompts, **kwargs):
        self.prompts.extend(prompts)
        return self.real(prompts, **kwargs)


def test_embeddings_match_the_pipeline_and_repeat_exactly(tiny_pipe):
    prompts = [TINY_SHAPES[0]] * 4 + list(TINY_SHAPES[1:5])
    expected, expected_negative = _whole_batch(tiny_pipe, prompts)
    embeds, negative = encode_prompts(tiny_pipe, prompts)
    assert embeds.shape == expected.shape and negative.shape == expected_negative.shape
    # Batch sizes may round differently on another CPU: equal within float32 rounding here.
    torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(negative, expected_negative, rtol=0, atol=1e-5)
    # A prompt's row is the same however it arrived (alone, first, or among others), bit for bit.
    again, negative_again = encode_prompts(tiny_pipe, list(reversed(prompts)))
    assert torch.equal(again, embeds.flip(0)) and torch.equal(negative_again, negative)
    alone, _ = encode_prompts(tiny_pipe, [TINY_SHAPES[3]])
    assert torch.equal(alone[0], embeds[prompts.index(TINY_SHAPES[3])])


def test_each_distinct_prompt_is_encoded_once(tiny_pipe):
    counting = _CountingEncoder(tiny_pipe)
    for epoch in range(3):
        encode_prompts(tiny_pipe, [TINY_SHAPES[epoch]] * 8)
        encode_prompts(tiny_pipe, list(TINY_SHAPES[:3]))
    assert sorted(counting.prompts) == sorted(["", *TINY_SHAPES[:3]])
    assert len(prompt_embedding_cache(tiny_pipe)) == 4


def test_returned_tensors_do_not_alias_the_cache(tiny_pipe):
    embeds, negative = encode_prompts(tiny_pipe, [TINY_SHAPES[0]] * 2)
    kept = embeds[0].clone()
    embeds.zero_()
    negative.zero_()
    again, negative_again = encode_prompts(tiny_pipe, [TINY_SHAPES[0]] * 2)
    assert torch.equal(again[0], kept) and negative_again.abs().sum() > 0


def test_new_encoder_weights_drop_the_cache(tiny_pipe):
    before, _ = encode_prompts(tiny_pipe, [TINY_SHAPES[0]])
    with torch.no_grad():
        tiny_pipe.text_encoder.embeddings.word_embeddings.weight.mul_(1.5)  # in place, as load_state_dict
    after, _ = encode_prompts(tiny_pipe, [TINY_SHAPES[0]])
    expected, _ = _whole_batch(tiny_pipe, [TINY_SHAPES[0]])
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)


def test_the_cache_keeps_within_its_bytes_least_recently_used_out(tiny_pipe):
    row_bytes = encode_prompts(tiny_pipe, [TINY_SHAPES[0]])[0][0].numel() * 4
    cache = PromptEmbeddingCache(max_bytes=3 * row_bytes)
    cache.embeddings(tiny_pipe, list(TINY_SHAPES[:3]))
    cache.embeddings(tiny_pipe, [TINY_SHAPES[0]])  # used again: now the newest
    cache.embeddings(tiny_pipe, [TINY_SHAPES[3]])  # evicts TINY_SHAPES[1], the oldest
    assert len(cache) == 3
    assert list(cache._rows) == [TINY_SHAPES[2], TINY_SHAPES[0], TINY_SHAPES[3]]


def test_no_prompts_is_an_error(tiny_pipe):
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompts(tiny_pipe, [])
