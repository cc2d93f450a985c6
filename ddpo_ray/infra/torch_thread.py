"""One thread per process for torch, with as many torch threads as the process's CPU share.

Measured on this project (DESIGN.md, "Ray facts"): torch threads that outnumber a process's
CPU share slow everything on the node, so each sampler, learner worker and model replica runs
as many torch threads as the CPUs Ray gave it; and torch on CPU runs about 2x slower on a
thread other than the first one that ran parallel ops (see `TorchThread`). No Ray import at
module level: outside Ray the CPU share is the caller's default.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


def assigned_cpus(default: float = 1.0) -> float:
    """The CPUs Ray reserved for this actor (the replica's `ray_actor_options.num_cpus`);
    `default` outside an actor (a driver or a plain process)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return default
    return float(ray.get_runtime_context().get_assigned_resources().get("CPU", default))


def node_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def match_torch_threads_to_cpus(threads: int | None = None) -> int:
    """torch.set_num_threads(`threads`, default: the CPUs reserved for this actor, at least 1);
    returns the count."""
    import torch

    threads = max(1, math.floor(assigned_cpus())) if threads is None else threads
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

    def __init__(self, name: str = "torch", threads: int | None = None):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        # OpenMP's thread count is per thread: set it on this one (default: the reserved CPUs)
        self.call(match_torch_threads_to_cpus, threads)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on the torch thread; blocks until it returns (or raises)."""
        return self._executor.submit(fn, *args, **kwargs).result()

    async def call_async(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The same from an event loop, which stays free while the torch thread works."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
