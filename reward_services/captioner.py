"""The LLaVA captioner of the prompt-alignment reward: one short answer per image.

DDPO's alignment task asks LLaVA "Answer concisely: what is going on in this image?" and scores
the answer against the prompt. Greedy decoding, at most 64 new tokens. The model is a
transformers `LlavaForConditionalGeneration` with its processor, by HF id
(`llava-hf/llava-1.5-7b-hf`) or local dir, or:
- "tiny" (the offline default): a small LLaVA (CLIP vision tower on 64x64 images + 2-layer Llama)
  trained by `python -m ddpo_ray.tiny.captioner_trainer` to caption the tiny world ("two small
  red circles on a striped blue background"), shipped in `ddpo_ray/tiny/assets/captioner` and
  loaded through the same `from_pretrained` path as an HF checkpoint;
- "tiny-random": the same architecture at random init (its answers are random words), for tests
  that need any model of this shape.
Both tiny builds use a WordPiece tokenizer over the tiny world's words and the question's.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from transformers import (
    AutoProcessor,
    BertTokenizerFast,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from ddpo_ray.infra.hf_loading import TINY, TINY_RANDOM, load_pretrained, resolve_device, resolve_dtype
from ddpo_ray.tiny import ASSETS
from ddpo_ray.tiny.world import COLOURS, COUNTS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, TEXTURES
from reward_services.alignment import LLAVA_15_PROMPT, MAX_NEW_TOKENS, QUESTION

LLAVA_15_7B = "llava-hf/llava-1.5-7b-hf"
IMAGE_TOKEN = "<image>"
TINY_CAPTIONER = ASSETS / "captioner"
PATCH_SIZE = 8

try:  # transformers 5: the torchvision-free CLIP processor (CLIPImageProcessor warns, then falls back to it)
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessor
except ImportError:  # transformers 4
    from transformers import CLIPImageProcessor as _CLIPImageProcessor


def world_vocabulary() -> list[str]:
    """BERT's special tokens, the words of the question template, and every word a caption uses."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", "?", ".", ","]
    words += "user assistant answer concisely what is going on in this image".split()
    words += ["a", "an", "background", *COUNTS.values(), *SIZES, *COLOURS, *TEXTURES]
    words += [shape + suffix for shape in SHAPES for suffix in ("", "s")]
    words += [word for phrase in POSITIONS for word in phrase.split()]
    return list(dict.fromkeys(words))  # ordered, no repeats


def world_tokenizer() -> BertTokenizerFast:
    """A lower-casing WordPiece tokenizer over `world_vocabulary()`, plus the <image> token."""
    vocab = {word: index for index, word in enumerate(world_vocabulary())}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=256)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids for Llama
    tokenizer.padding_side = "left"  # batched generation appends on the right
    return tokenizer


def tiny_llava_config(tokenizer: BertTokenizerFast) -> LlavaConfig:
    """64x64 images in 8x8 patches (64 image tokens) -> a 4-layer, 128-wide CLIP tower -> 2-layer Llama."""
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, tie_word_embeddings=True,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2 + 1,
        # "full": the CLS token too, and the last layer: what stage 1 of its training pretrains
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        tie_word_embeddings=True,
    )


def tiny_llava_processor(tokenizer: BertTokenizerFast) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=_CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=1,  # the CLS position, kept by the "full" strategy
        image_token=IMAGE_TOKEN,
    )


def build_tiny_random_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The tiny captioner's architecture at random init (answers are random world words)."""
    tokenizer = world_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(tiny_llava_config(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tiny_llava_processor(tokenizer)


def load_llava(
    name: str,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device | str = "cpu",
):
    """(model, processor) for "tiny", "tiny-random", an HF id (llava-hf/...) or a local save_pretrained dir.

    A checkpoint is loaded straight onto a CUDA `device` (device_map), not into host memory
    first: LLaVA-1.5-7B is 14 GB in fp16.
    """
    if name == TINY_RANDOM:
        return build_tiny_random_llava(seed)
    source = str(TINY_CAPTIONER) if name == TINY else name
    placement = {"device_map": {"": str(device)}} if torch.device(device).type == "cuda" else {}
    model = load_pretrained(
        LlavaForConditionalGeneration.from_pretrained, source, "captioner_model", revision=revision, dtype=dtype,
        **placement,
    )
    processor = load_pretrained(AutoProcessor.from_pretrained, source, "captioner_model", revision=revision)
    return model, processor


class Captioner:
    """In-process LLaVA captioner: uint8 images -> one answer string per image."""

    def __init__(
        self,
        model: str = TINY,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        question: str = QUESTION,
        prompt_template: str = LLAVA_15_PROMPT,
        max_new_tokens: int = MAX_NEW_TOKENS,
        seed: int = 0,
    ):
        if "{question}" not in prompt_template or IMAGE_TOKEN not in prompt_template:
            raise ValueError(
                f"prompt_template={prompt_template!r}; expected it to contain {IMAGE_TOKEN!r} and '{{question}}'"
            )
        target = resolve_device(device)
        model_, processor = load_llava(model, revision, resolve_dtype(dtype), seed, device=target)
        self._wrap(model_, processor, target, resolve_dtype(dtype), question, prompt_template, max_new_tokens)
        self.model.eval().requires_grad_(False)

    @classmethod
    def around(
        cls,
        model: LlavaForConditionalGeneration,
        processor: LlavaProcessor,
        question: str = QUESTION,
        prompt_template: str = LLAVA_15_PROMPT,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> Captioner:
        """A captioner around a model in hand (the trainer's, as it trains): same inputs, same decoding."""
        captioner = cls.__new__(cls)
        captioner._wrap(model, processor, model.device, model.dtype, question, prompt_template, max_new_tokens)
        return captioner

    def _wrap(self, model, processor, device, dtype, question, prompt_template, max_new_tokens) -> None:
        self.device, self.dtype = device, dtype
        self.model = model.to(device, dtype)
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.prompt = prompt_template.format(question=question)
        self.max_new_tokens = max_new_tokens

    def inputs(self, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """The model inputs for `images`: the question prompt (image tokens expanded) and pixels."""
        images = list(images)
        inputs = self.processor(
            images=images, text=[self.prompt] * len(images), return_tensors="pt", padding="longest"
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return dict(inputs)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        """Greedy answers, in image order."""
        inputs = self.inputs(images)
        output = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
