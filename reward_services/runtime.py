"""Shared by the reward deployments: per-replica setup (threads, PIL limits), builder helpers.

Measured on this project (DESIGN.md, "Ray facts"): torch threads that outnumber a process's
CPU share slow everything on the node, so each replica runs as many torch threads as the CPUs
Ray gave it. torch is imported lazily, so the JPEG app and the application builders stay light.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from reward_services.http_api import RequestLimits


def assigned_cpus(default: float = 1.0) -> float:
    """The CPUs Ray reserved for this actor (the replica's `ray_actor_options.num_cpus`);
    `default` outside an actor (a driver or a plain process)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return default
    return float(ray.get_runtime_context().get_assigned_resources().get("CPU", default))


def match_torch_threads_to_cpus() -> int:
    """torch.set_num_threads(CPUs reserved for this replica, at least 1); returns the count."""
    import torch

    threads = max(1, math.floor(assigned_cpus()))
    torch.set_num_threads(threads)
    return threads


class TorchThread:
    """The one thread of a process that builds and runs its torch models.

    Measured here (2 cores, torch 2.13 CPU, libgomp): once one thread of a process has run
    parallel torch ops, the same ops run about 2x slower on any other thread of it (a tiny-UNet
    sampling batch: 2.4 s on the first thread, 4.9 s on a second; 2.3 s when the second thread
    is the only one that ever ran torch). Ray runs an actor's `__init__` and its methods
    (concurrency groups, Serve's executor) on different threads, so the samplers and the model
    replicas send every torch call, loading included, through one of these.
    """

    def __init__(self, name: str = "torch"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.call(match_torch_threads_to_cpus)  # OpenMP's thread count is per thread: set it on this one

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on the torch thread; blocks until it returns (or raises)."""
        return self._executor.submit(fn, *args, **kwargs).result()

    async def call_async(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The same from an event loop, which stays free while the torch thread works."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))


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
