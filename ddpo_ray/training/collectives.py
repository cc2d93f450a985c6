"""Metrics over learner workers: one all-reduce on the device the process group can use. No Ray.

NCCL reduces CUDA tensors only and gloo CPU tensors only, so the tensor's device follows the
backend, not the model: a CPU tensor in an NCCL group fails (the sd15 presets' two learner
workers would crash at the end of their first epoch), which gloo-only CPU tests cannot show.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Metrics whose worst case matters: the maximum over workers, not the mean.
MAX_METRICS = frozenset({"ratio_max_dev", "ratio_dev_before_update", "sampling_log_prob_dev"})


def reduction_device(backend: str, device: torch.device | str) -> torch.device:
    """The device a collective of `backend` needs its tensors on (`device`: the worker's)."""
    device = torch.device(device)
    backend = str(backend).lower()
    if backend == "nccl":
        if device.type != "cuda":
            raise ValueError(f"process-group backend nccl reduces CUDA tensors; the worker's device is {device}")
        return device
    if backend == "gloo":
        return torch.device("cpu")
    raise ValueError(f"process-group backend {backend!r}; expected nccl or gloo")


def mean_over_ranks(metrics: dict[str, float], device: torch.device | str) -> dict[str, float]:
    """Average `metrics` over the default process group (max for MAX_METRICS); every rank gets
    the same dict. `device` is `reduction_device(backend, worker device)`."""
    world_size = dist.get_world_size()
    keys = sorted(metrics)
    is_max = [k in MAX_METRICS for k in keys]
    sums = torch.tensor([0.0 if m else metrics[k] for k, m in zip(keys, is_max)], dtype=torch.float64, device=device)
    maxes = torch.tensor([metrics[k] if m else 0.0 for k, m in zip(keys, is_max)], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    sums, maxes = sums.tolist(), maxes.tolist()
    return {k: (maxes[i] if m else sums[i] / world_size) for i, (k, m) in enumerate(zip(keys, is_max))}


def count_all_reduces(ddp: torch.nn.parallel.DistributedDataParallel) -> list[int]:
    """Register a DDP comm hook that records each gradient bucket it is asked to all-reduce and
    passes the bucket through unreduced; returns the list it appends to. How the tests and
    bench/gpu_checks.py count all-reduces per optimizer step (no_sync must hold them back)."""
    calls: list[int] = []

    def hook(state, bucket):
        calls.append(bucket.index())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    ddp.register_comm_hook(None, hook)
    return calls
