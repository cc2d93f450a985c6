"""The LLaVA captioner of the prompt-alignment reward: one short answer per image.

DDPO's alignment task asks LLaVA "Answer concisely: what is going on in this image?" and scores
the answer against the prompt. Greedy decoding, at most 64 new tokens. The model is a
transformers `LlavaForConditionalGeneration` with its processor, by HF id
(`llava-hf/llava-1.5-7b-hf`) or local dir, or "tiny": a random 2-layer LLaVA (CLIP vision tower
+ Llama text model) built in code around MiniLM's WordPiece tokenizer, so the whole reward path
runs offline on a CPU. Its answers are random words, deterministic for a seed.
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

from ddpo_ray.infra.hf_loading import TINY, load_pretrained, minilm_path, resolve_device, resolve_dtype
from reward_services.alignment import LLAVA_15_PROMPT, MAX_NEW_TOKENS, QUESTION

LLAVA_15_7B = "llava-hf/llava-1.5-7b-hf"
IMAGE_TOKEN = "<image>"

try:  # transformers 5: the torchvision-free CLIP processor (CLIPImageProcessor warns, then falls back to it)
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessor
except ImportError:  # transformers 4
    from transformers import CLIPImageProcessor as _CLIPImageProcessor


def build_tiny_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random LLaVA: 32x32 images (16 patches), 64-wide 2-layer Llama, MiniLM's vocabulary."""
    tokenizer = BertTokenizerFast.from_pretrained(minilm_path(), model_max_length=256)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids for Llama
    tokenizer.padding_side = "left"  # batched generation appends on the right
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(32 // 8) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=_CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS position the "default" strategy drops
        image_token=IMAGE_TOKEN,
    )
    return model, processor


def load_llava(name: str, revision: str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(model, processor) for "tiny", an HF id (llava-hf/...) or a local save_pretrained dir."""
    if name == TINY:
        return build_tiny_llava(seed)
    model = load_pretrained(
        LlavaForConditionalGeneration.from_pretrained, name, "captioner_model", revision=revision, dtype=dtype
    )
    processor = load_pretrained(AutoProcessor.from_pretrained, name, "captioner_model", revision=revision)
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
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        model_, self.processor = load_llava(model, revision, self.dtype, seed)
        self.model = model_.to(self.device, self.dtype).eval().requires_grad_(False)
        self.processor.tokenizer.padding_side = "left"
        self.prompt = prompt_template.format(question=question)
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        """Greedy answers, in image order."""
        images = list(images)
        inputs = self.processor(
            images=images, text=[self.prompt] * len(images), return_tensors="pt", padding="longest"
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        output = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
