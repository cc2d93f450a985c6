"""What a diffusers user gets from a run: every saved LoRA loads with `load_lora_weights(dir)`
and gives, bit for bit at eta 0, the images the run evaluated; each carries a model card whose
front matter the Hub can read; `python -m ddpo_ray.export` writes a folder ready to upload.

Real diffusers loading of the real files the run wrote (the tiny base model, offline). Nothing
is mocked; the Hub upload itself is not run (no network here).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from ddpo_ray.config import build_config
from ddpo_ray.export import EXPORTED_CONFIG, ExportError, resolve_source
from ddpo_ray.export import main as export_main
from ddpo_ray.models.lora import LORA_WEIGHTS_FILE, add_lora, load_trainable_state_dict, read_lora_weights
from ddpo_ray.models.pipelines import load_pipeline
from ddpo_ray.models.prompt_embeddings import encode_prompts
from ddpo_ray.records.checkpoint import MODEL_CARD, POLICY_WEIGHTS, read_learner_state
from ddpo_ray.records.model_card import model_card, read_front_matter
from ddpo_ray.training.evaluation import EvalSet, generate_eval_images, initial_latents, summarise
from ddpo_ray.training.local_loop import run_local
from reward_services.functions import compute_rewards
from tests.helpers import PLAIN

SMALL = [
    *PLAIN,
    "num_epochs=2", "save_freq=1", "sample.num_steps=3", "sample.batch_size=4", "sample.num_batches_per_epoch=2",
    "train.batch_size=8", "sample.samples_per_prompt=4", "advantage.mode=group", "train.learning_rate=1e-2",
    "train.clip_range=1e-2", "eval.every=1", "eval.prompts_per_group=2", "metrics=false",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-epoch run of the tiny model, evaluated at every version, a checkpoint every epoch."""
    out = tmp_path_factory.mktemp("runs")
    cfg = build_config(overrides=[*SMALL, f"output_dir={out}", "run_name=r"])
    run_local(cfg)
    return cfg, out / "r"


def diffusers_pipeline(cfg, lora_dir=None):
    """The base model as a plain StableDiffusionPipeline, a saved LoRA loaded the diffusers way."""
    pipe = load_pipeline(cfg.model, "cpu", seed=cfg.seed)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    return pipe


def run_policy(cfg, learner_state_dir):
    """The policy as the run holds it: its PEFT adapter, with the learner's weights of that version."""
    pipe = load_pipeline(cfg.model, "cpu", seed=cfg.seed)
    add_lora(pipe.unet, cfg.model.lora_rank, seed=cfg.seed)
    if learner_state_dir is not None:
        load_trainable_state_dict(pipe.unet, True, read_learner_state(learner_state_dir)["weights"])
    return pipe


def evaluated(cfg, pipe):
    """(images, eval_* metrics) of the run's own evaluation (fixed noise, eta 0) on `pipe`."""
    eval_set = EvalSet.from_config(cfg)
    with torch.no_grad():
        images = generate_eval_images(pipe, cfg, eval_set)
    scores = compute_rewards(cfg.eval_reward_weights(), images, list(eval_set.prompts))[1]
    return images, summarise(cfg, eval_set, scores)[0]


@pytest.mark.slow
def test_every_checkpoint_loads_in_diffusers_and_gives_the_evaluated_images(run):
    cfg, root = run
    assert cfg.eval.eta == 0
    evals = {row["policy_version"]: row for row in map(json.loads, (root / "eval.jsonl").read_text().splitlines())}
    best = json.loads((root / "checkpoints/best/best.json").read_text())["policy_version"]
    kinds = {"epoch_0000": 1, "epoch_0001": 2, "best": best}
    base_images, _ = evaluated(cfg, diffusers_pipeline(cfg))
    for name, version in kinds.items():
        directory = root / "checkpoints" / name
        assert (directory / LORA_WEIGHTS_FILE).is_file(), name
        assert not (directory / POLICY_WEIGHTS).exists(), name  # one format for every LoRA the run saves
        loaded, metrics = evaluated(cfg, diffusers_pipeline(cfg, directory))
        source = root / "checkpoints" / f"epoch_{version - 1:04d}" if version else None
        own, _ = evaluated(cfg, run_policy(cfg, source))
        assert np.array_equal(loaded, own), name  # bit for bit
        assert not np.array_equal(loaded, base_images), name  # and the LoRA did change them
        # ... and they are the images the run scored: the same held-out numbers, exactly.
        assert metrics["eval_reward_mean"] == evals[version]["eval_reward_mean"], name
        assert metrics["eval_reward_std"] == evals[version]["eval_reward_std"], name
    # best holds that version's weights exactly (diffusers' keys, converted back to PEFT's)
    if best:
        expected = read_learner_state(root / "checkpoints" / f"epoch_{best - 1:04d}")["weights"]
        got = read_lora_weights(root / "checkpoints" / "best")
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_diffusers_own_sampling_call_reproduces_the_eval_images(run):
    """`pipe(...)` itself (diffusers' DDIM loop, CFG, VAE decode) from the eval's initial noise, at
    eta 0, gives the run's eval images of best: bit for bit from the same prompt embeddings, and
    to a level or two of 255 in a few pixels when diffusers encodes the prompts itself (it encodes
    them as one batch, the run each prompt alone, once: the text encoder's rounding depends on
    the batch size)."""
    cfg, root = run
    pipe = diffusers_pipeline(cfg, root / "checkpoints" / "best")
    eval_set = EvalSet.from_config(cfg)
    ours, _ = evaluated(cfg, pipe)
    shape = (pipe.unet.config.in_channels, cfg.sample.resolution // pipe.vae_scale_factor,
             cfg.sample.resolution // pipe.vae_scale_factor)
    latents = initial_latents(cfg.seed, shape, len(eval_set))
    prompt_embeds, negative_prompt_embeds = encode_prompts(pipe, eval_set.prompts)
    call = {"latents": latents, "num_inference_steps": cfg.sample.num_steps,
            "guidance_scale": cfg.sample.guidance_scale, "eta": 0.0, "output_type": "np"}
    with torch.no_grad():
        same_embeddings = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                               **call).images
        own_encoding = pipe(list(eval_set.prompts), **call).images
    as_uint8 = [(np.asarray(images) * 255).round().astype(np.uint8) for images in (same_embeddings, own_encoding)]
    assert cfg.eval.eta == 0 and np.array_equal(as_uint8[0], ours)
    # Here: 0 pixels differ at 1 thread, 0.008% by one level at 2; bounded with room for other CPUs.
    differ = as_uint8[1] != ours
    assert differ.mean() < 0.01 and np.abs(as_uint8[1].astype(int) - ours.astype(int)).max() <= 2


@pytest.mark.slow
def test_saved_loras_carry_a_model_card_and_export_writes_a_hub_folder(run, tmp_path):
    cfg, root = run
    for name in ("epoch_0000", "epoch_0001", "best"):
        text = (root / "checkpoints" / name / MODEL_CARD).read_text()
        front = read_front_matter(text)
        assert front["base_model"] == "tiny" and front["library_name"] == "diffusers", name
        assert {"ddpo", "lora", "text-to-image", "jpeg_compressibility"} <= set(front["tags"]), name
        assert "## Training" in text and "## Usage" in text and "load_lora_weights" in text, name
        # every version here was evaluated: the card holds its held-out result
        version = 1 if name == "epoch_0000" else 2 if name == "epoch_0001" else None
        if version is not None:
            row = [json.loads(r) for r in (root / "eval.jsonl").read_text().splitlines()][version]
            metric = front["model-index"][0]["results"][0]["metrics"][0]
            assert metric["type"] == "jpeg_compressibility", name  # the one training reward
            assert metric["value"] == row["eval_jpeg_compressibility_mean"] == row["eval_reward_mean"], name
            assert f"{row['eval_reward_mean']:.4f}" in text

    out = tmp_path / "hub"
    assert export_main([str(root), "--out", str(out), "--repo-id", "me/tiny-ddpo"]) == 0  # a run: its best
    assert sorted(p.name for p in out.iterdir()) == sorted([LORA_WEIGHTS_FILE, MODEL_CARD, EXPORTED_CONFIG])
    card = (out / MODEL_CARD).read_text()
    assert read_front_matter(card)["library_name"] == "diffusers"
    assert 'pipe.load_lora_weights("me/tiny-ddpo")' in card and str(tmp_path) not in card
    assert yaml.safe_load((out / EXPORTED_CONFIG).read_text())["run_name"] == "r"
    exported, _ = evaluated(cfg, diffusers_pipeline(cfg, out))
    best, _ = evaluated(cfg, diffusers_pipeline(cfg, root / "checkpoints" / "best"))
    assert np.array_equal(exported, best)
    assert export_main([str(root / "checkpoints" / "epoch_0000"), "--out", str(out)]) == 2  # not empty
    assert export_main([str(root / "checkpoints" / "epoch_0000"), "--out", str(tmp_path / "e0")]) == 0
    assert "(epoch_0000)" in (tmp_path / "e0" / MODEL_CARD).read_text()


def test_model_card_front_matter_parses_and_names_base_tags_and_reward():
    cfg = build_config(overrides=["model.pretrained=stable-diffusion-v1-5/stable-diffusion-v1-5",
                                  "reward.name=null", "reward.weights={aesthetic: 1.0, jpeg_compressibility: 0.1}",
                                  "eval.rewards=[aesthetic_gold]"])
    evaluation = {"eval_reward_mean": 5.25, "eval_reward_std": 0.5, "eval_reward_gain": 1.5,
                  "eval_aesthetic_mean": 5.5, "eval_aesthetic_std": 0.25, "eval_aesthetic_gold_mean": 0.75,
                  "eval_aesthetic_gold_std": 0.1}
    text = model_card(cfg, run_name="my-run", label="best", policy_version=7, evaluation=evaluation,
                      base_evaluation={"eval_reward_mean": 4.5, "eval_reward_std": 0.5}, weights_location="me/my-lora")
    front = read_front_matter(text)
    assert front["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "text-to-image"
    assert {"ddpo", "lora", "text-to-image", "aesthetic", "jpeg_compressibility"} <= set(front["tags"])
    metrics = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"reward": 5.25, "aesthetic": 5.5, "aesthetic_gold": 0.75}
    assert "after 7 epoch(s)" in text and "+1.50" in text and "4.5000 +- 0.5000" in text
    assert 'StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")' in text
    assert 'pipe.load_lora_weights("me/my-lora")' in text
    assert "not a Hugging Face Hub id" not in text  # only said for tiny / local bases
    unevaluated = model_card(cfg, run_name="my-run", label="epoch_0003", policy_version=4)
    assert "model-index" not in read_front_matter(unevaluated) and "was not evaluated" in unevaluated


def test_export_refuses_what_is_not_a_run_or_checkpoint(tmp_path):
    with pytest.raises(ExportError, match="expected a run directory or a checkpoint"):
        resolve_source(tmp_path)
    assert export_main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
