"""Model cards: a README.md in every saved LoRA directory, in diffusers' LoRA convention.

The Hub reads the YAML front matter (`base_model`, `library_name: diffusers`, `tags`); the body
says what the adapter was trained for (the reward, the training config), how it scored on the
held-out prompts (when that version was evaluated) and how to load it. The same card is written
by the run (checkpoints/epoch_NNNN, checkpoints/best) and by `python -m ddpo_ray.export`, which
makes a folder `huggingface-cli upload` can push as it is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ddpo_ray.config import DDPOConfig
from ddpo_ray.prompts import get_prompts
from ddpo_ray.records.run_dir import RunDirectory

BASE_TAGS = ["ddpo", "ddpo-ray", "lora", "text-to-image", "diffusers", "reinforcement-learning"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """Does `model.pretrained` name a Hub repository (rather than "tiny", a preset or a local dir)?"""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def card_tags(cfg: DDPOConfig) -> list[str]:
    """The card's tags: DDPO, LoRA, text-to-image and every reward the adapter was trained on."""
    return [*BASE_TAGS, *cfg.reward.components()]


def model_card(
    cfg: DDPOConfig,
    *,
    run_name: str,
    label: str,
    policy_version: int,
    evaluation: Mapping[str, Any] | None = None,
    base_evaluation: Mapping[str, Any] | None = None,
    weights_location: str = ".",
) -> str:
    """The README.md of a LoRA saved after `policy_version` epochs of training.

    label: which checkpoint ("best", "epoch_0004"); evaluation: the `eval_*` metrics of this
    version (None if it was not evaluated); base_evaluation: those of version 0, to compare.
    weights_location: what the usage snippet passes to `load_lora_weights`.
    """
    front = {
        "base_model": cfg.model.pretrained,
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": card_tags(cfg),
        "inference": False,
    }
    if evaluation:
        front["model-index"] = _model_index(cfg, run_name, evaluation)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    lines += [f"# DDPO LoRA: {run_name} ({label})", ""]
    rewards = ", ".join(f"`{name}` x {weight:g}" for name, weight in cfg.reward.components().items())
    lines += [
        f"A LoRA adapter (rank {cfg.model.lora_rank}) on the UNet of `{cfg.model.pretrained}`, fine-tuned with "
        "DDPO (Black et al. 2023, *Training Diffusion Models with Reinforcement Learning*) by "
        f"ddpo-ray to maximise the reward {rewards}. Policy version "
        f"{policy_version}: the weights after {policy_version} epoch(s) of PPO.",
        "",
    ]
    if not is_hub_id(cfg.model.pretrained):
        lines += [
            f"`base_model` is `{cfg.model.pretrained}`, not a Hugging Face Hub id (ddpo-ray's built-in "
            "`tiny` model, a random-init preset or a local directory): replace it with the base's Hub id "
            "before uploading, if it has one.",
            "",
        ]
    lines += ["## Training", "", *_training_table(cfg, policy_version), ""]
    lines += ["## Held-out results", ""]
    lines += _results(cfg, evaluation, base_evaluation)
    lines += ["", "## Usage", "", *_usage(cfg, weights_location), ""]
    return "\n".join(lines)


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card (between the first two `---` lines)."""
    parts = text.split("---\n", 2)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("model card: expected YAML front matter between '---' lines at the top")
    data = yaml.safe_load(parts[1])
    if not isinstance(data, dict):
        raise ValueError(f"model card: front matter is a {type(data).__name__}, expected a mapping")
    return data


def _training_table(cfg: DDPOConfig, policy_version: int) -> list[str]:
    s, t = cfg.sample, cfg.train
    rows = [
        ("base model", f"`{cfg.model.pretrained}`" + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else "")),
        ("reward", ", ".join(f"`{n}` x {w:g}" for n, w in cfg.reward.components().items())),
        ("prompts", f"`{cfg.prompts.name}` (held out: `{cfg.prompts.eval_name}`)"),
        ("epochs trained", f"{policy_version} of {cfg.num_epochs}, {cfg.samples_per_epoch} samples each"),
        ("sampling", f"DDIM {s.num_steps} steps, eta {s.eta:g}, guidance {s.guidance_scale:g}, {s.resolution}px"),
        ("algorithm", f"{t.algorithm}, lr {t.learning_rate:g}, batch {t.batch_size}, "
                      f"{t.num_inner_epochs} inner epoch(s), clip {t.clip_range:g}, KL coef {t.kl_coef:g}"),
        ("advantages", f"{cfg.advantage.mode}"),
        ("LoRA", f"rank {cfg.model.lora_rank}, alpha {cfg.model.lora_rank} on to_q/to_k/to_v/to_out.0, "
                 f"precision {cfg.model.mixed_precision}"),
        ("seed", str(cfg.seed)),
    ]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _scored(cfg: DDPOConfig) -> list[str]:
    """The rewards evaluation scores: the weighted training reward (when it is a sum of several),
    then each one on its own (as `python -m ddpo_ray.evaluate` tabulates them)."""
    single = len(cfg.reward.components()) == 1  # then "reward" is that one component
    return cfg.eval_reward_names() if single else ["reward", *cfg.eval_reward_names()]


def _results(
    cfg: DDPOConfig, evaluation: Mapping[str, Any] | None, base: Mapping[str, Any] | None
) -> list[str]:
    if not evaluation:
        return ["This policy version was not evaluated on the held-out prompts (see `eval.every`); "
                "`python -m ddpo_ray.evaluate --checkpoint DIR` evaluates it."]
    lines = [
        f"One image per eval prompt ({cfg.eval.prompts_per_group} per group of `{cfg.prompts.eval_name}`"
        + (f" plus {cfg.eval.prompts_per_group} training prompts" if cfg.eval.include_train_prompts else "")
        + f"), fixed initial noise, DDIM eta {cfg.eval.eta:g}; mean +- std; gain is in units of the "
        "base model's spread." + (" `reward` is the training reward, weighted as in training."
                                  if len(cfg.reward.components()) > 1 else ""),
        "",
        "| reward | this model | base model | gain |",
        "|---|---|---|---|",
    ]
    for name in _scored(cfg):
        mean, std = evaluation.get(f"eval_{name}_mean"), evaluation.get(f"eval_{name}_std")
        if mean is None:
            continue
        base_cell = "" if not base or base.get(f"eval_{name}_mean") is None else (
            f"{base[f'eval_{name}_mean']:.4f} +- {base.get(f'eval_{name}_std') or 0.0:.4f}")
        gain = evaluation.get(f"eval_{name}_gain")
        lines.append(f"| {name} | {mean:.4f} +- {std or 0.0:.4f} | {base_cell} | "
                     f"{'' if gain is None else f'{gain:+.2f}'} |")
    return lines


def _model_index(cfg: DDPOConfig, run_name: str, evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Hub's machine-readable results: one metric per reward evaluation scored."""
    metrics = [
        {"type": name, "name": f"held-out {name} (mean)", "value": float(evaluation[f"eval_{name}_mean"])}
        for name in _scored(cfg) if evaluation.get(f"eval_{name}_mean") is not None
    ]
    return [{
        "name": run_name,
        "results": [{
            "task": {"type": "text-to-image", "name": "Text-to-image"},
            "dataset": {"type": cfg.prompts.eval_name, "name": f"ddpo-ray prompt set {cfg.prompts.eval_name}"},
            "metrics": metrics,
        }],
    }]


def _example_prompt(cfg: DDPOConfig) -> str:
    prompts: Sequence[str] = get_prompts(cfg.prompts.name)
    return prompts[0] if prompts else "a photo"


def _usage(cfg: DDPOConfig, weights_location: str) -> list[str]:
    s = cfg.sample
    if is_hub_id(cfg.model.pretrained):
        load = [
            "import torch",
            "from diffusers import DDIMScheduler, StableDiffusionPipeline",
            "",
            f'pipe = StableDiffusionPipeline.from_pretrained("{cfg.model.pretrained}")',
            "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # DDPO samples with DDIM",
        ]
    else:
        load = [
            "from ddpo_ray.config import ModelConfig",
            "from ddpo_ray.models.pipelines import load_pipeline",
            "",
            f'pipe = load_pipeline(ModelConfig(pretrained="{cfg.model.pretrained}"), "cpu")  # a StableDiffusionPipeline',
        ]
    return [
        "```python",
        *load,
        f'pipe.load_lora_weights("{weights_location}")  # this folder, or its Hub repo id',
        f'image = pipe("{_example_prompt(cfg)}", num_inference_steps={s.num_steps}, '
        f"guidance_scale={s.guidance_scale:g}, eta=0.0).images[0]",
        "```",
        "",
        "To push it: `huggingface-cli upload <user>/<repo> <this folder>`.",
    ]


def run_model_card(
    cfg: DDPOConfig,
    run_dir: RunDirectory,
    *,
    label: str,
    policy_version: int,
    weights_location: str | Path,
    evaluation: Mapping[str, Any] | None = None,
) -> str:
    """The card of a LoRA of this run: its evaluation (given, else eval.jsonl's) beside the base's."""
    evals = {int(row["policy_version"]): row for row in run_dir.read_evals()}
    if evaluation is None:
        evaluation = evals.get(policy_version)
    base = evals.get(0) or (evaluation if policy_version == 0 else None)
    return model_card(cfg, run_name=run_dir.root.name, label=label, policy_version=policy_version,
                      evaluation=evaluation, base_evaluation=base, weights_location=str(weights_location))
