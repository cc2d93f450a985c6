"""Pipelines and LoRA: offline loading, diffusers-format LoRA that load_lora_weights accepts."""

import pytest
import torch

from ddpo_ray.config import ModelConfig
from ddpo_ray.infra.hf_loading import ModelNotFoundError
from ddpo_ray.maths.diffusion import sample_trajectories
from ddpo_ray.models.lora import add_lora, load_lora_state_dict, lora_state_dict, save_lora
from ddpo_ray.models.pipelines import build_sd15_random_pipeline, build_tiny_random_pipeline, load_pipeline
from tests.helpers import randomize_lora


def images(pipe, seed=0):
    return sample_trajectories(
        pipe, ["a cat", "a red fox"], num_steps=4, guidance_scale=5.0, eta=1.0, resolution=64,
        generator=torch.Generator().manual_seed(seed),
    ).images


def test_tiny_pipeline_has_the_real_minilm_text_encoder():
    pipe = build_tiny_random_pipeline()
    assert type(pipe.text_encoder).__name__ == "BertModel"
    assert pipe.text_encoder.config.hidden_size == 384 == pipe.unet.config.cross_attention_dim
    assert pipe.tokenizer.model_max_length == 32  # every tiny-world and shipped prompt fits
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    # same seed -> same weights; the text encoder is pretrained, not random
    other = build_tiny_random_pipeline()
    for (name, a), (_, b) in zip(pipe.unet.state_dict().items(), other.unet.state_dict().items()):
        assert torch.equal(a, b), name


def test_only_lora_parameters_train(tiny_pipe):
    params = add_lora(tiny_pipe.unet, rank=4)
    trainable = [n for n, p in tiny_pipe.unet.named_parameters() if p.requires_grad]
    assert len(trainable) == len(params) > 0
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0 ends in "0"


def test_lora_at_init_is_the_base_model(tiny_pipe):
    before = images(tiny_pipe)
    add_lora(tiny_pipe.unet, rank=4)
    assert torch.equal(images(tiny_pipe), before)


def test_lora_saves_in_diffusers_format_and_loads_with_load_lora_weights(tiny_pipe, tmp_path):
    add_lora(tiny_pipe.unet, rank=4)
    randomize_lora(tiny_pipe.unet, std=0.1)
    trained = images(tiny_pipe)
    save_lora(tiny_pipe.unet, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    fresh = build_tiny_random_pipeline()
    base = images(fresh)
    fresh.load_lora_weights(tmp_path / "lora")
    reloaded = images(fresh)
    assert not torch.equal(base, trained)  # the LoRA matters...
    assert (reloaded.int() - trained.int()).abs().max() <= 1  # ...and survives the round trip


def test_lora_state_dict_round_trip(tiny_pipe):
    add_lora(tiny_pipe.unet, rank=4)
    randomize_lora(tiny_pipe.unet, seed=1)
    state = lora_state_dict(tiny_pipe.unet)
    other = build_tiny_random_pipeline()
    add_lora(other.unet, rank=4)
    load_lora_state_dict(other.unet, state)
    assert all(torch.equal(v, lora_state_dict(other.unet)[k]) for k, v in state.items())


def test_load_pipeline_from_local_directory(tmp_path):
    build_tiny_random_pipeline(seed=3).save_pretrained(tmp_path / "tiny")
    pipe = load_pipeline(ModelConfig(pretrained=str(tmp_path / "tiny")))
    expected = build_tiny_random_pipeline(seed=3).unet.state_dict()
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_missing_models_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model"):
        load_pipeline(ModelConfig(pretrained="no-such-org/no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        load_pipeline(ModelConfig(pretrained=str(tmp_path / "empty")))


def test_sd15_random_has_the_sd15_architecture():
    # Built on the meta device: the shapes without allocating 1B parameters.
    with torch.device("meta"):
        pipe = build_sd15_random_pipeline()
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    assert 855e6 < unet_params < 865e6  # SD1.5's UNet: 859.5M
    assert pipe.unet.config.cross_attention_dim == 768
    assert pipe.vae_scale_factor == 8
    assert pipe.text_encoder.config.hidden_size == 768


def test_a_training_only_pipeline_releases_its_text_encoder_and_vae(tiny_pipe):
    """The learner never encodes prompts or decodes images; its UNet and scheduler stay."""
    from ddpo_ray.models.pipelines import drop_sampling_modules

    unet, scheduler = tiny_pipe.unet, tiny_pipe.scheduler
    pipe = drop_sampling_modules(tiny_pipe)
    assert pipe.text_encoder is None and pipe.vae is None
    assert pipe.unet is unet and pipe.scheduler is scheduler
    assert pipe.vae_scale_factor == 4  # kept: the latent shape is still known
