"""The LAION aesthetic reward as a Ray Serve application (`aesthetic`).

One deployment, `AestheticScorer`: CLIP + MLP on its own replica pool (GPUs via
ray_actor_options.num_gpus). `@serve.batch` merges concurrent requests (from several samplers)
into one forward pass; `user_config` (BatchSettings) tunes the batching on a live deployment.

    serve run reward_services.aesthetic:build_app clip_model=openai/clip-vit-large-patch14 \
        mlp_weights=/models/sac+logos+ava1-l14-linearMSE.pth
"""

# No `from __future__ import annotations` here: FastAPI reads the route's annotations at runtime.

from typing import Any, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from reward_services.http_api import (
    RequestLimits,
    answer_http,
    make_reward_api,
    response_dict,
    reward_route,
    validate_batch,
)
from reward_services.runtime import BatchSettings, ModelReplica, check_deployment_names, with_options


class AestheticModelArgs(BaseModel):
    """Which CLIP and MLP to load (AestheticPredictor's arguments)."""

    model_config = ConfigDict(extra="forbid")

    clip_model: str = Field(
        "tiny", description='"tiny" (trained on the tiny world, shipped), "tiny-random", an HF id '
        "(openai/clip-vit-large-patch14) or a local dir"
    )
    revision: str | None = None
    mlp_weights: str | None = Field(
        None, description="sac+logos+ava1-l14-linearMSE.pth path or URL, or .safetensors; None: the head "
        "shipped with tiny (random with tiny-random; required with any other clip_model)"
    )
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0


class AestheticArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of the application in deploy/serve.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: AestheticModelArgs = AestheticModelArgs()
    limits: RequestLimits = RequestLimits()
    deployment_options: dict[str, dict[str, Any]] = Field(default_factory=dict)


aesthetic_api = make_reward_api(
    "aesthetic", "LAION aesthetic predictor: CLIP ViT-L/14 embedding, L2-normalised, into the LAION MLP."
)


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=16,  # >= BatchSettings.max_batch_size, so batches can fill
    ray_actor_options={"num_cpus": 1},
    user_config=BatchSettings().model_dump(),
    health_check_period_s=10,
)
@serve.ingress(aesthetic_api)
class AestheticScorer(ModelReplica):
    """`score(images, prompts, metadata)` through handles; `POST /` over HTTP."""

    BATCHED_METHOD = "_score_batch"

    def __init__(self, model: Mapping[str, Any], limits: Mapping[str, Any]):
        # Imported here, not at the top: building the application (`serve deploy` runs the
        # builder in a task) then needs no torch; only replicas load it.
        from reward_services.aesthetic_model import AestheticPredictor

        self.limits = RequestLimits.model_validate(dict(limits))
        self.setup_replica(self.limits)
        args = AestheticModelArgs.model_validate(dict(model)).model_dump()
        self.predictor = self.torch.call(AestheticPredictor, **args)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[list[np.ndarray]]) -> list[list[float]]:
        return await self.run_model(self.predictor, requests)

    async def score(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """One aesthetic score per image, in order (prompts are checked, not used)."""
        with self.metrics.request() as request:
            images, prompts, metadata = validate_batch(images, prompts, metadata, self.limits)
            request["images"] = len(images)
            scores = await self._score_batch(images)
            return response_dict(scores)

    @reward_route(aesthetic_api)
    async def http_score(self, request: Request) -> JSONResponse:
        return await answer_http(request, self.limits, self.score)


def build_app(args: AestheticArgs | Mapping[str, Any]) -> Application:
    """The `aesthetic` application (`serve run` / serve.yaml import path)."""
    args = args if isinstance(args, AestheticArgs) else AestheticArgs.model_validate(dict(args))
    check_deployment_names(args.deployment_options, ["AestheticScorer"])
    return with_options(AestheticScorer, args.deployment_options).bind(
        args.model.model_dump(), args.limits.model_dump()
    )
