"""The gold rewards of the tiny world as Ray Serve applications: `aesthetic_gold`, `alignment_gold`.

A proxy reward (the learned `aesthetic` scorer, the `llava_bertscore` captioner) can be exploited:
a policy can find images the model scores high that are not what the model stands for. The gold
rewards are what the proxies stand for, computed independently, so `eval.rewards` and guards
can show over-optimisation instead of leaving it to the eye:
- `aesthetic_gold`: the documented pixel function the tiny aesthetic scorer was trained to
  predict (`reward_services.tiny_aesthetic`); prompts are checked, not used.
- `alignment_gold`: the fraction of the prompt's attributes (colour, shape, count, size,
  position, background) an independent attribute model reads in the image
  (`reward_services.attribute_model`); it knows tiny-world prompts only and answers 400 for others.

One deployment class, `GoldReward`, serves either (the name is an argument), on one torch thread
per replica with `@serve.batch`, like the other model rewards.

    serve run reward_services.gold:build_app reward_name=alignment_gold
"""

# No `from __future__ import annotations` here: FastAPI reads the route's annotations at runtime.

from typing import Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from ddpo_ray.infra.reward_names import GOLD_REWARDS
from reward_services.http_api import (
    RequestLimits,
    RewardInputError,
    answer_http,
    make_reward_api,
    response_dict,
    reward_route,
    validate_batch,
)
from reward_services.runtime import BatchSettings, ModelReplica, check_deployment_names, with_options

GoldRewardName = Literal["aesthetic_gold", "alignment_gold"]


class GoldArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of an application in deploy/serve.yaml)."""

    model_config = ConfigDict(extra="forbid")

    reward_name: GoldRewardName = "aesthetic_gold"
    attribute_model: str = Field("tiny", description='alignment_gold\'s detector: "tiny" or a trainer --out dir')
    device: str = "auto"
    limits: RequestLimits = RequestLimits()
    deployment_options: dict[str, dict[str, Any]] = Field(default_factory=dict)


gold_api = make_reward_api(
    "gold",
    "Gold rewards of the tiny world: aesthetic_gold (the documented pixel function the aesthetic "
    "scorer learned), alignment_gold (fraction of the prompt's attributes a detector confirms).",
)


def gold_function(reward_name: str, attribute_model: str = "tiny", device: str = "auto"):
    """f(list of (image, prompt)) -> [score]: the gold reward `reward_name` in this process."""
    if reward_name == "aesthetic_gold":
        from reward_services.tiny_aesthetic import tiny_aesthetic

        return lambda pairs: tiny_aesthetic([image for image, _ in pairs]).tolist()
    if reward_name == "alignment_gold":
        from reward_services.attribute_model import AttributeModel

        model = AttributeModel(attribute_model, device)
        return lambda pairs: model([image for image, _ in pairs], [prompt for _, prompt in pairs]).tolist()
    raise ValueError(f"reward_name={reward_name!r}; expected one of {list(GOLD_REWARDS)}")


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=16,
    ray_actor_options={"num_cpus": 1},
    user_config=BatchSettings().model_dump(),
    health_check_period_s=10,
)
@serve.ingress(gold_api)
class GoldReward(ModelReplica):
    """`score(images, prompts, metadata)` through handles; `POST /` over HTTP."""

    BATCHED_METHOD = "_score_batch"

    def __init__(self, reward_name: GoldRewardName, attribute_model: str, device: str, limits: Mapping[str, Any]):
        self.reward_name = reward_name
        self.limits = RequestLimits.model_validate(dict(limits))
        self.setup_replica(self.limits)
        self.function = self.torch.call(gold_function, reward_name, attribute_model, device)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[list[tuple[np.ndarray, str]]]) -> list[list[float]]:
        return await self.run_model(self.function, requests)

    async def score(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """One gold score per image, in order."""
        with self.metrics.request() as request:
            images, prompts, metadata = validate_batch(images, prompts, metadata, self.limits)
            request["images"] = len(images)
            if self.reward_name == "alignment_gold":
                from reward_services.attribute_model import parse_prompts

                try:
                    parse_prompts(prompts)  # refused here, as bad input, not as a failing model
                except ValueError as exc:
                    raise RewardInputError(str(exc)) from None
            return response_dict(await self._score_batch(list(zip(images, prompts))))

    @reward_route(gold_api)
    async def http_score(self, request: Request) -> JSONResponse:
        return await answer_http(request, self.limits, self.score)


def build_app(args: GoldArgs | Mapping[str, Any]) -> Application:
    """The application for one gold reward (`serve run` / serve.yaml import path)."""
    args = args if isinstance(args, GoldArgs) else GoldArgs.model_validate(dict(args))
    check_deployment_names(args.deployment_options, ["GoldReward"])
    return with_options(GoldReward, args.deployment_options).bind(
        args.reward_name, args.attribute_model, args.device, args.limits.model_dump()
    )
