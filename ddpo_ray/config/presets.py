"""Presets: named sets of overrides on the defaults (which are the `tiny` preset).

`tiny` (the offline default), `tiny_*` (the paper's four tasks at small scale, minutes on a CPU),
`sd15_*` (the paper's four tasks on Stable Diffusion 1.5), `sd14_*` (the same on SD1.4, the
paper's base model) and `sd15_random` (GPU timings).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping


def merged(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `update` merged in, section by section (deep copies; neither is changed)."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# The maintained copy of SD1.5 (runwayml/stable-diffusion-v1-5 was removed from the Hub in 2024).
SD15_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The model the DDPO paper trained (Black et al. 2023): the sd14_* presets.
SD14_MODEL = "CompVis/stable-diffusion-v1-4"

_SD15 = {
    "num_epochs": 100,
    # bf16: train.recompute_old_log_probs (unset) is on, see ddpo_ray.maths.ppo.recompute_log_probs.
    "model": {"pretrained": SD15_MODEL, "lora_rank": 4, "mixed_precision": "bf16"},
    # 8 x 32 = 256 samples per epoch, as in the paper.
    "sample": {"num_steps": 50, "eta": 1.0, "guidance_scale": 5.0, "resolution": 512,
               "batch_size": 8, "num_batches_per_epoch": 32},
    # 2 workers x 4 x 8 = 64 samples per optimizer step: 4 updates per epoch (ddpo-pytorch's
    # 8 GPUs x 4 x 2).
    "train": {"learning_rate": 3e-4, "batch_size": 4, "gradient_accumulation_steps": 8,
              "clip_range": 1e-4, "adv_clip_max": 5.0, "cfg": True},
    "advantage": {"mode": "per_prompt", "buffer_size": 16, "min_count": 16},
    "prompts": {"name": "imagenet_animals", "eval_name": "held_out"},
    "reward": {"name": "jpeg_compressibility"},
    "eval": {"every": 10, "prompts_per_group": 8},
    "cluster": {"num_samplers": 2, "gpus_per_sampler": 1, "learner_workers": 2,
                "gpus_per_learner_worker": 1},
}


# The `tiny` model's learning recipe (README, "Learning on tiny"; measured over seeds 0-4 with
# bench/learning.py): few steps and many samples per optimizer step, because on `tiny` the
# policy gradient of 32 samples is mostly noise (two halves of one epoch's samples give
# gradients with cosine ~0). One full-batch Adam step per epoch at a high LoRA learning rate
# that falls (cosine) to a tenth by the last epoch, so the late, noisy steps are small and the
# policy keeps what it gained; each prompt's 8 samples drawn as a binary tree over the first 3
# denoising steps, with per-step advantages (`sample.initial_noise: tree`, `advantage.mode:
# tree`: seeds 0-4, held-out gain at the end, compressibility mean +2.31 base spreads and 5/5
# seeds over one spread, against +1.33 and 3/5 with group advantages); each denoising step's
# loss divided by its score scale (`train.step_weighting`), without which the t=201 step's
# 1/std-sized, mostly-noise score is 10x every other step's. Evaluation samples
# the policy DDPO trains (eta 1, its noise fixed per eval image), every epoch.
_TINY_LEARNING = {
    "num_epochs": 15,
    "save_freq": 5,
    "sample": {"num_steps": 5, "batch_size": 8, "num_batches_per_epoch": 4, "samples_per_prompt": 8,
               "initial_noise": "tree"},
    "advantage": {"mode": "tree"},
    "train": {"batch_size": 32, "learning_rate": 1e-2, "clip_range": 1e-2, "lr_schedule": "cosine",
              "lr_final_fraction": 0.1, "step_weighting": "score_scale"},
    "eval": {"every": 1, "prompts_per_group": 12, "eta": 1.0},
}
# The JPEG tasks learn more from 8 prompts x 8 per epoch (seeds 0-4, held-out gain at the end,
# base spreads, group advantages: compressibility mean +1.33 against +0.65 with 4 x 8,
# incompressibility +1.41 against +0.73, each better on 4 of 5 seeds, at 1.6x the time); so
# does the aesthetic proxy with the tree (+1.90 and 5/5 seeds over one spread against 4 x 8's
# +1.15 and 3/5; with group advantages it had learned less from 64: +0.32 against +1.03).
_TINY_LEARNING_64 = merged(_TINY_LEARNING, {"sample": {"num_batches_per_epoch": 8}, "train": {"batch_size": 64}})

PRESETS: dict[str, dict[str, Any]] = {
    # The offline default (`make run`): JPEG compressibility with the learning recipe.
    "tiny": merged(_TINY_LEARNING_64, {"reward": {"name": "jpeg_compressibility"}}),
    # The paper's four tasks at small scale: minutes on a CPU. The guard watches a second reward
    # on held-out images while the JPEG size is optimised: on `tiny` the trained tiny aesthetic
    # scorer, whose values over base-model samples spread by 1.27 (std, 64 samples, measured by
    # bench/tiny_rewards.py), so the margin is about one such spread.
    "tiny_compressibility": merged(_TINY_LEARNING_64, {
        "reward": {"name": "jpeg_compressibility"},
        "eval": {"guard_reward": "aesthetic", "guard_margin": 1.0},
    }),
    "tiny_incompressibility": merged(_TINY_LEARNING_64, {
        "reward": {"name": "jpeg_incompressibility"},
        "eval": {"guard_reward": "aesthetic", "guard_margin": 1.0},
    }),
    # The learned proxies on `tiny`, each evaluated beside its gold reference (what the proxy
    # stands for), so over-optimisation shows in eval.jsonl as proxy up, gold down.
    "tiny_aesthetic": merged(_TINY_LEARNING_64, {
        "reward": {"name": "aesthetic"}, "eval": {"rewards": ["aesthetic_gold"]},
    }),
    "tiny_alignment": merged(_TINY_LEARNING, {
        "reward": {"name": "llava_bertscore"}, "eval": {"rewards": ["alignment_gold"]},
    }),
    "sd15_compressibility": _SD15,
    "sd15_incompressibility": merged(_SD15, {"reward": {"name": "jpeg_incompressibility"}}),
    "sd15_aesthetic": merged(_SD15, {
        "num_epochs": 200,
        "prompts": {"name": "simple_animals"},
        "reward": {"name": "aesthetic"},
        # 2 updates per epoch (ddpo-pytorch: "this reward is a bit easier to optimize").
        "train": {"gradient_accumulation_steps": 16},
        "advantage": {"buffer_size": 32, "min_count": 16},
    }),
    "sd15_alignment": merged(_SD15, {
        "num_epochs": 200,
        # 8 x 36 = 288 samples per epoch; 2 workers x 4 x 18 = 144 per step: 2 updates.
        "sample": {"num_batches_per_epoch": 36},
        "train": {"gradient_accumulation_steps": 18},
        "prompts": {"name": "nouns_activities"},
        "reward": {"name": "llava_bertscore"},
        "advantage": {"buffer_size": 32, "min_count": 16},
    }),
    # True-size SD1.5 UNet/VAE at random init: GPU timings with no download.
    "sd15_random": merged(_SD15, {"model": {"pretrained": "sd15-random"}}),
}
# The paper's own base model, for its four tasks with the same settings.
PRESETS.update({
    name.replace("sd15_", "sd14_"): merged(preset, {"model": {"pretrained": SD14_MODEL}})
    for name, preset in list(PRESETS.items())
    if name.startswith("sd15_") and name != "sd15_random"
})
