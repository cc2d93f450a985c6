"""The prompt-alignment reward as one Ray Serve application (`llava_bertscore`), three deployments:

    LlavaBertScore (ingress, light)  --images-->  LlavaCaptioner (GPU pool, @serve.batch)
                   |                 <--captions--
                   +--captions, "The image contains {prompt}"-->  BertScorer (@serve.batch)

The LLaVA pool is the expensive one, so it scales on its own (`num_replicas` /
`autoscaling_config` of `LlavaCaptioner`) without touching the scorer or the ingress. The reward
is BERTScore recall; `info` carries the captions and P/R/F1.

    serve run reward_services.llava_bertscore:build_app   # tiny models, offline
"""

# No `from __future__ import annotations` here: FastAPI reads the route's annotations at runtime.

from typing import Any, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from reward_services.alignment import (
    LLAVA_15_PROMPT,
    MAX_NEW_TOKENS,
    QUESTION,
    REFERENCE_TEMPLATE,
    alignment_result,
    references_for,
)
from reward_services.http_api import (
    RequestLimits,
    answer_http,
    make_reward_api,
    response_dict,
    reward_route,
    validate_batch,
)
from reward_services.metrics import ServiceMetrics
from reward_services.runtime import (
    BatchSettings,
    ModelReplica,
    apply_pil_limits,
    check_deployment_names,
    with_options,
)

DEPLOYMENTS = ("LlavaBertScore", "LlavaCaptioner", "BertScorer")


class CaptionerArgs(BaseModel):
    """Captioner's arguments: the LLaVA checkpoint and the question it answers."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description='"tiny", an HF id (llava-hf/llava-1.5-7b-hf) or a local dir')
    revision: str | None = None
    device: str = "auto"
    dtype: str = Field("float32", description="float16 / bfloat16 on GPUs")
    question: str = QUESTION
    prompt_template: str = LLAVA_15_PROMPT
    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1)
    seed: int = 0


class BertScoreArgs(BaseModel):
    """BertScore's arguments: the scoring model and layer."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description='"tiny" (MiniLM, offline) or e.g. microsoft/deberta-xlarge-mnli')
    num_layers: int | None = Field(
        None, description="None: bert-score's choice for the model (40 for deberta)"
    )
    device: str = "auto"
    batch_size: int = Field(64, ge=1)


class LlavaBertScoreArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of the application in deploy/serve.yaml)."""

    model_config = ConfigDict(extra="forbid")

    captioner: CaptionerArgs = CaptionerArgs()
    bertscore: BertScoreArgs = BertScoreArgs()
    reference_template: str = REFERENCE_TEMPLATE
    limits: RequestLimits = RequestLimits()
    deployment_options: dict[str, dict[str, Any]] = Field(default_factory=dict)


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=16,  # >= BatchSettings.max_batch_size
    ray_actor_options={"num_cpus": 1},
    user_config=BatchSettings().model_dump(),
    health_check_period_s=10,
)
class LlavaCaptioner(ModelReplica):
    """`caption(images) -> [str]`, batched across concurrent requests."""

    BATCHED_METHOD = "caption"

    def __init__(self, captioner: Mapping[str, Any]):
        from reward_services.captioner import Captioner  # here: the ingress and the builder need no torch

        self.setup_replica()
        self.captioner = self.torch.call(Captioner, **CaptionerArgs.model_validate(dict(captioner)).model_dump())

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def caption(self, requests: list[list[np.ndarray]]) -> list[list[str]]:
        return await self.run_model(self.captioner, requests)


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=16,
    ray_actor_options={"num_cpus": 1},
    user_config=BatchSettings(model_batch_size=64).model_dump(),
    health_check_period_s=10,
)
class BertScorer(ModelReplica):
    """`score(pairs) -> [(P, R, F1)]` for [(caption, reference)], batched across requests."""

    BATCHED_METHOD = "score"

    def __init__(self, bertscore: Mapping[str, Any]):
        from reward_services.bertscore import BertScore  # here: the ingress and the builder need no torch

        self.setup_replica()
        self.bertscore = self.torch.call(BertScore, **BertScoreArgs.model_validate(dict(bertscore)).model_dump())

    def _score_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[float, float, float]]:
        precision, recall, f1 = self.bertscore([c for c, _ in pairs], [r for _, r in pairs])
        return list(zip(precision.tolist(), recall.tolist(), f1.tolist(), strict=True))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def score(self, requests: list[list[tuple[str, str]]]) -> list[list[tuple[float, float, float]]]:
        return await self.run_model(self._score_pairs, requests)


llava_bertscore_api = make_reward_api(
    "llava_bertscore",
    "Prompt alignment: LLaVA answers 'what is going on in this image?'; the reward is the BERTScore "
    "recall of the answer against 'The image contains {prompt}'. info: captions, BERTScore P/R/F1.",
)


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=10,
)
@serve.ingress(llava_bertscore_api)
class LlavaBertScore:
    """The ingress: validates, asks the captioner pool, then the scorer; `score` / `POST /`."""

    def __init__(
        self,
        captioner: DeploymentHandle,
        scorer: DeploymentHandle,
        reference_template: str,
        limits: Mapping[str, Any],
    ):
        if "{prompt}" not in reference_template:
            raise ValueError(
                f"reference_template={reference_template!r}; expected it to contain '{{prompt}}'"
            )
        self.captioner, self.scorer = captioner, scorer
        self.reference_template = reference_template
        self.limits = RequestLimits.model_validate(dict(limits))
        apply_pil_limits(self.limits)
        self.metrics = ServiceMetrics()

    async def score(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """BERTScore recall per image, in order; info: captions and P/R/F1."""
        with self.metrics.request() as request:
            images, prompts, metadata = validate_batch(images, prompts, metadata, self.limits)
            request["images"] = len(images)
            captions = await self.captioner.caption.remote(images)
            references = references_for(prompts, self.reference_template)
            scores = await self.scorer.score.remote(list(zip(captions, references, strict=True)))
            precision, recall, f1 = (np.array(column, dtype=np.float64) for column in zip(*scores, strict=True))
            rewards, info = alignment_result(captions, precision, recall, f1)
            return response_dict(rewards, info)

    @reward_route(llava_bertscore_api)
    async def http_score(self, request: Request) -> JSONResponse:
        return await answer_http(request, self.limits, self.score)


def build_app(args: LlavaBertScoreArgs | Mapping[str, Any]) -> Application:
    """The `llava_bertscore` application (`serve run` / serve.yaml import path)."""
    args = args if isinstance(args, LlavaBertScoreArgs) else LlavaBertScoreArgs.model_validate(dict(args))
    check_deployment_names(args.deployment_options, DEPLOYMENTS)
    options = args.deployment_options
    captioner = with_options(LlavaCaptioner, options).bind(args.captioner.model_dump())
    scorer = with_options(BertScorer, options).bind(args.bertscore.model_dump())
    return with_options(LlavaBertScore, options).bind(
        captioner, scorer, args.reference_template, args.limits.model_dump()
    )
