"""Weight broadcast from the learner to the samplers, behind one small interface.

The learner publishes a policy version once; every sampler fetches that one copy:

    weights = transport.publish(lora_state_dict(unet), version=3)   # learner rank 0
    ...                                                             # `weights` travels to samplers
    state_dict = transport.fetch(weights)                           # each sampler

`PolicyWeights` is a small, picklable record (version, size, transport payload); the algorithm
only ever passes it around. The transport is chosen by `cluster.weight_transport` and built by
`make_transport` in the driver, the learner and every sampler, so a collective transport (NCCL
broadcast from rank 0 into the samplers' GPUs) is one more entry in `TRANSPORTS`, with no change
to the driver, the learner loop or the samplers.

`ObjectStoreTransport` puts the state dict in Ray's object store once, as numpy arrays: a
sampler on the same node reads them from shared memory without a copy, and a sampler on
another node pulls one copy per node. The ObjectRef rides inside a tuple, so Ray does not
resolve it when a PolicyWeights is passed as an argument: only `fetch` reads the weights.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # imported where tensors are made: the epoch exchange passes PolicyWeights on without torch
    import torch


@dataclass(frozen=True)
class PolicyWeights:
    """A published policy version; what samplers are handed (cheap to copy and pickle)."""

    version: int
    num_bytes: int
    payload: Any = None  # the transport's: for the object store, a 1-tuple holding the ObjectRef


# A fresh run's version 0: the adapter every process builds for itself from the seed
# (`trainable_parameters(..., seed=cfg.seed)`: the learner's and each sampler's are the same
# tensors, and LoRA's B starts at zero, so the policy is the base model). Samplers use their own
# copy, so epoch 0 and the base evaluation need not wait for the learner to start.
INITIAL_POLICY = PolicyWeights(version=0, num_bytes=0, payload=None)


class WeightTransport(ABC):
    """Moves a policy's trainable weights from the learner to the samplers."""

    @abstractmethod
    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> PolicyWeights:
        """Make `state_dict` (the trainable weights after `version` updates) available once."""

    @abstractmethod
    def fetch(self, weights: PolicyWeights) -> dict[str, torch.Tensor]:
        """The state dict `weights` stands for, as CPU tensors (on the caller's side)."""


def state_dict_num_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


class ObjectStoreTransport(WeightTransport):
    """One `ray.put` per version; samplers `ray.get` it (zero-copy on the same node)."""

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> PolicyWeights:
        import ray

        if version < 0:
            raise ValueError(f"version={version}; expected a non-negative policy version")
        arrays = {name: tensor.detach().cpu().contiguous().numpy() for name, tensor in state_dict.items()}
        ref = ray.put(arrays)
        return PolicyWeights(version=version, num_bytes=state_dict_num_bytes(state_dict), payload=(ref,))

    def fetch(self, weights: PolicyWeights) -> dict[str, torch.Tensor]:
        import ray

        if not (isinstance(weights.payload, tuple) and len(weights.payload) == 1):
            raise ValueError(
                f"PolicyWeights(version={weights.version}) has payload {type(weights.payload).__name__}; "
                "expected the 1-tuple (ObjectRef,) that ObjectStoreTransport.publish makes"
            )
        import torch

        arrays = ray.get(weights.payload[0])
        # Read-only views of shared memory, no copy: the caller copies them into its parameters
        # (load_state_dict) and must not write to them. torch warns about the read-only buffer.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return {name: torch.from_numpy(array) for name, array in arrays.items()}


class InProcessTransport(WeightTransport):
    """Hands the state dict over by reference (one process: tests and the single-process loop)."""

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> PolicyWeights:
        copied = {name: tensor.detach().cpu().clone() for name, tensor in state_dict.items()}
        return PolicyWeights(version=version, num_bytes=state_dict_num_bytes(copied), payload=copied)

    def fetch(self, weights: PolicyWeights) -> dict[str, torch.Tensor]:
        return dict(weights.payload)


# cluster.weight_transport -> the transport class (InProcessTransport is for one process only).
TRANSPORTS: dict[str, type[WeightTransport]] = {"object_store": ObjectStoreTransport}


def make_transport(name: str) -> WeightTransport:
    """The transport `cluster.weight_transport` names."""
    try:
        return TRANSPORTS[name]()
    except KeyError:
        raise ValueError(f"cluster.weight_transport={name!r}; expected one of {sorted(TRANSPORTS)}") from None
