"""The JPEG rewards as Ray Serve applications: `jpeg_compressibility`, `jpeg_incompressibility`.

One deployment class serves both (the sign is an argument); each reward is its own application
with its own route, replicas and resources. There is no model, so no `@serve.batch`: the work is
per image and merging requests would only add waiting. The encoding runs on one worker thread
per replica, off the event loop, so health checks and HTTP parsing stay responsive.

    serve run reward_services.jpeg_app:build_app reward_name=jpeg_incompressibility
"""

# No `from __future__ import annotations` here: FastAPI reads the route's annotations at runtime.

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from ddpo_ray.infra.reward_names import JPEG_REWARDS
from reward_services.http_api import (
    RequestLimits,
    answer_http,
    make_reward_api,
    response_dict,
    reward_route,
    validate_batch,
)
from reward_services.jpeg import jpeg_sizes_kb
from reward_services.metrics import ServiceMetrics
from reward_services.runtime import apply_pil_limits, check_deployment_names, with_options

JpegRewardName = Literal["jpeg_compressibility", "jpeg_incompressibility"]


class JpegArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of an application in deploy/serve.yaml)."""

    model_config = ConfigDict(extra="forbid")

    reward_name: JpegRewardName = "jpeg_compressibility"
    limits: RequestLimits = RequestLimits()
    deployment_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per deployment name: Deployment.options overrides (num_replicas, "
        "autoscaling_config, ray_actor_options, max_ongoing_requests)",
    )


jpeg_api = make_reward_api(
    "jpeg", "JPEG size rewards: -(kB) for compressibility, +(kB) for incompressibility (PIL, quality 95)."
)


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
)
@serve.ingress(jpeg_api)
class JpegReward:
    """`score(images, prompts, metadata)` through handles; `POST /` over HTTP."""

    def __init__(self, reward_name: JpegRewardName, limits: Mapping[str, Any]):
        if reward_name not in JPEG_REWARDS:
            raise ValueError(f"reward_name={reward_name!r}; expected one of {list(JPEG_REWARDS)}")
        self.reward_name = reward_name
        self.sign = -1.0 if reward_name == "jpeg_compressibility" else 1.0
        self.limits = RequestLimits.model_validate(dict(limits))
        apply_pil_limits(self.limits)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jpeg")
        self.metrics = ServiceMetrics()

    async def score(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Rewards and `info["jpeg_kb"]` (the file sizes), one per image, in order."""
        with self.metrics.request() as request:
            images, prompts, metadata = validate_batch(images, prompts, metadata, self.limits)
            request["images"] = len(images)
            loop = asyncio.get_running_loop()
            sizes = await loop.run_in_executor(self._executor, jpeg_sizes_kb, images)
            return response_dict(self.sign * sizes, {"jpeg_kb": sizes.tolist()})

    @reward_route(jpeg_api)
    async def http_score(self, request: Request) -> JSONResponse:
        return await answer_http(request, self.limits, self.score)

    def check_health(self) -> None:
        """The encoder still works (a broken PIL install or exhausted memory fails here)."""
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format="JPEG", quality=95)


def build_app(args: JpegArgs | Mapping[str, Any]) -> Application:
    """The application for one JPEG reward (`serve run` / serve.yaml import path)."""
    args = JpegArgs.model_validate(args if isinstance(args, JpegArgs) else dict(args))
    check_deployment_names(args.deployment_options, ["JpegReward"])
    return with_options(JpegReward, args.deployment_options).bind(args.reward_name, args.limits.model_dump())
