"""The rewards a config may name: one table for the config, the in-process functions, the Serve
registry and the tests. Each name is also the Serve application's name and route (`/<name>`).

The gold rewards are the tiny world's references for the learned proxies (`aesthetic` and
`llava_bertscore` on `tiny`): what those models stand for, computed independently, for the
evaluation and guards that show over-optimisation.
"""

from __future__ import annotations

from typing import Iterable

JPEG_REWARDS: tuple[str, ...] = ("jpeg_compressibility", "jpeg_incompressibility")
MODEL_REWARDS: tuple[str, ...] = ("aesthetic", "llava_bertscore")
GOLD_REWARDS: tuple[str, ...] = ("aesthetic_gold", "alignment_gold")
REWARD_NAMES: tuple[str, ...] = JPEG_REWARDS + MODEL_REWARDS + GOLD_REWARDS

# model.pretrained values built in code or shipped: offline, for tests, CPUs and GPU timings.
BUILTIN_MODELS: tuple[str, ...] = ("tiny", "tiny-random", "sd15-random")

# Rewards whose offline default (what a run deploys, or computes in process, when nothing else
# is given) is a tiny-world model, and what a run on a real model needs instead.
_GPU_LINES = "edit the lines marked GPU: in deploy/serve.yaml and `serve deploy deploy/serve.yaml` before the run"
TINY_DEFAULT_REWARDS: dict[str, str] = {
    "aesthetic": "aesthetic with model.clip_model=openai/clip-vit-large-patch14 and model.mlp_weights="
    f"<path or URL of sac+logos+ava1-l14-linearMSE.pth> ({_GPU_LINES})",
    "llava_bertscore": "llava_bertscore with captioner.model=llava-hf/llava-1.5-7b-hf and bertscore.model="
    f"microsoft/deberta-xlarge-mnli ({_GPU_LINES})",
    "aesthetic_gold": "nothing: it scores tiny-world images only; drop it from eval.rewards / eval.guard_reward",
    "alignment_gold": "nothing: it scores tiny-world images only; drop it from eval.rewards / eval.guard_reward",
}


def tiny_reward_refusal(pretrained: str, reward_names: Iterable[str], where: str) -> str | None:
    """Why `reward_names` must not get their tiny defaults under model.pretrained=`pretrained`
    (None when they may). A real model scored by tiny-world reward models trains against noise
    with nothing on the console to say so. `where`: what would have supplied the defaults."""
    if pretrained in BUILTIN_MODELS:
        return None
    bad = [name for name in dict.fromkeys(reward_names) if name in TINY_DEFAULT_REWARDS]
    if not bad:
        return None
    needs = "; ".join(f"{name}: deploy {TINY_DEFAULT_REWARDS[name]}" for name in bad)
    return (
        f"model.pretrained={pretrained!r} is a real model, but {where} would score it with the tiny-world "
        f"default of {', '.join(bad)} (trained on 64x64 cartoons). Instead: {needs}"
    )
