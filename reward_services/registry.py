"""Which Serve application computes which reward: names, builders, routes, deployments.

One application per reward, named after the reward and routed at `/<reward_name>`, so a config's
`reward.name` / `reward.weights` keys are also the application names the client looks up.
Builders are referenced by import path (as in deploy/serve.yaml) and imported only when used,
so asking for the JPEG app never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from ray.serve import Application


@dataclass(frozen=True)
class RewardApp:
    reward_name: str
    import_path: str  # "module:builder", the builder takes one args mapping
    ingress: str  # the deployment handles and HTTP reach
    deployments: tuple[str, ...]
    default_args: Mapping[str, Any] = field(default_factory=dict)

    @property
    def app_name(self) -> str:
        return self.reward_name

    @property
    def route_prefix(self) -> str:
        return f"/{self.reward_name}"


REWARD_APPS: dict[str, RewardApp] = {
    "jpeg_compressibility": RewardApp(
        "jpeg_compressibility",
        "reward_services.jpeg_app:build_app",
        ingress="JpegReward",
        deployments=("JpegReward",),
        default_args={"reward_name": "jpeg_compressibility"},
    ),
    "jpeg_incompressibility": RewardApp(
        "jpeg_incompressibility",
        "reward_services.jpeg_app:build_app",
        ingress="JpegReward",
        deployments=("JpegReward",),
        default_args={"reward_name": "jpeg_incompressibility"},
    ),
    "aesthetic": RewardApp(
        "aesthetic",
        "reward_services.aesthetic:build_app",
        ingress="AestheticScorer",
        deployments=("AestheticScorer",),
    ),
    "llava_bertscore": RewardApp(
        "llava_bertscore",
        "reward_services.llava_bertscore:build_app",
        ingress="LlavaBertScore",
        deployments=("LlavaBertScore", "LlavaCaptioner", "BertScorer"),
    ),
    **{
        name: RewardApp(
            name, "reward_services.gold:build_app", ingress="GoldReward", deployments=("GoldReward",),
            default_args={"reward_name": name},
        )
        for name in ("aesthetic_gold", "alignment_gold")
    },
}


def reward_app(reward_name: str) -> RewardApp:
    try:
        return REWARD_APPS[reward_name]
    except KeyError:
        raise ValueError(f"unknown reward {reward_name!r}; expected one of {sorted(REWARD_APPS)}") from None


def build_reward_app(reward_name: str, args: Mapping[str, Any] | None = None) -> Application:
    """The Serve application for a reward: its builder called with default_args <- args."""
    spec = reward_app(reward_name)
    module_name, _, builder_name = spec.import_path.partition(":")
    builder = getattr(importlib.import_module(module_name), builder_name)
    return builder({**spec.default_args, **dict(args or {})})
