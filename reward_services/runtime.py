"""Shared by the reward deployments: per-replica setup (torch thread, PIL limits), builder helpers.

Each model replica runs its model on one `ddpo_ray.infra.torch_thread.TorchThread` with as many
torch threads as the CPUs Ray gave it. torch is imported lazily, so the JPEG app and the
application builders stay light.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ddpo_ray.infra.torch_thread import TorchThread
from reward_services.http_api import RequestLimits


def apply_pil_limits(limits: RequestLimits) -> None:
    """PIL refuses (DecompressionBombError) images over 2x this; we check 1x before decoding."""
    Image.MAX_IMAGE_PIXELS = limits.max_pixels_per_image


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def with_options(deployment, options_by_name: Mapping[str, Mapping[str, Any]]):
    """`deployment.options(**overrides)` for this deployment's entry in a builder's deployment_options."""
    return deployment.options(**dict(options_by_name.get(deployment.name, {})))


def check_deployment_names(options_by_name: Mapping[str, Any], known: Sequence[str]) -> None:
    unknown = sorted(set(options_by_name) - set(known))
    if unknown:
        raise ValueError(
            f"deployment_options names {unknown}; expected deployments of this application: {list(known)}"
        )


def flatten_call_split(
    fn: Callable[[list], Sequence], requests: Sequence[Sequence], chunk_size: int
) -> list[list]:
    """Run `fn` over all requests' items in chunks of `chunk_size`; one result list per request.

    `@serve.batch` hands a replica several requests at once; the model sees one flat batch (in
    chunks that fit its memory) and every request gets back exactly its items, in order.
    """
    flat = [item for request in requests for item in request]
    outputs: list = []
    for chunk in chunks(flat, chunk_size):
        result = list(fn(chunk))
        if len(result) != len(chunk):
            raise RuntimeError(f"model returned {len(result)} results for {len(chunk)} inputs")
        outputs.extend(result)
    split, start = [], 0
    for request in requests:
        split.append(outputs[start : start + len(request)])
        start += len(request)
    return split


class BatchSettings(BaseModel):
    """A model deployment's `user_config`: changeable on a running deployment, no restart."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, description="requests @serve.batch merges into one model call")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, description="how long a batch waits to fill")
    model_batch_size: int = Field(16, ge=1, description="images per forward pass (memory bound)")


class ModelReplica:
    """Shared by the deployments that hold a model: one torch thread, live batch settings,
    health from failures.

    The model is built and run on a single `TorchThread` (torch uses the replica's CPU share
    inside it), so the event loop keeps taking requests, filling the next batch and answering
    health checks. A replica whose model calls keep failing (a wedged GPU, a corrupt weight
    file) reports itself unhealthy and Serve replaces it; bad input never gets this far.
    Subclasses name their `@serve.batch` method in `BATCHED_METHOD`, so `reconfigure` (the
    deployment's `user_config`) resizes its batches.
    """

    MAX_CONSECUTIVE_FAILURES = 3
    BATCHED_METHOD: str = ""

    def setup_replica(self, limits: RequestLimits | None = None) -> None:
        from reward_services.metrics import ServiceMetrics

        self.metrics = ServiceMetrics()
        self.torch = TorchThread("model")
        if limits is not None:
            apply_pil_limits(limits)
        self.batch_settings = BatchSettings()
        self._consecutive_failures = 0
        self._last_error = ""

    def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        self.batch_settings = BatchSettings.model_validate(dict(user_config))
        batched = getattr(self, self.BATCHED_METHOD)
        batched.set_max_batch_size(self.batch_settings.max_batch_size)
        batched.set_batch_wait_timeout_s(self.batch_settings.batch_wait_timeout_s)

    async def run_model(self, fn: Callable[[list], Sequence], requests: Sequence[Sequence]) -> list[list]:
        start = time.perf_counter()
        num_items = sum(len(r) for r in requests)
        try:
            result = await self.torch.call_async(
                flatten_call_split, fn, requests, self.batch_settings.model_batch_size
            )
        except Exception as exc:
            self._consecutive_failures += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            self.metrics.model_batch(len(requests), num_items, time.perf_counter() - start, failed=True)
            raise
        self._consecutive_failures = 0
        self.metrics.model_batch(len(requests), num_items, time.perf_counter() - start, failed=False)
        return result

    def check_health(self) -> None:
        if self._consecutive_failures >= self.MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(
                f"{self._consecutive_failures} model calls failed in a row; last: {self._last_error}"
            )
