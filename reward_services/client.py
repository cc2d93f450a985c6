"""The sampler side of the reward services: submit images, keep sampling, collect rewards later.

    client = RewardClient({"aesthetic": 1.0, "jpeg_compressibility": 0.1})
    pending = client.submit(images, prompts)        # returns at once; requests are in flight
    ...                                             # sample the next batch
    result = pending.result()                       # RewardResult: weighted rewards + info

Requests go through DeploymentHandles (uint8 arrays, no HTTP, no image encoding). Each reward
is its own Serve application; a batch is split into chunks of at most `max_images_per_call`
images, each put in the object store once and sent to every reward application of the config,
and the answers are put back together in the order of the input.
A chunk whose replica died is sent again (up to `max_retries` times); a reward that does not
answer within `timeout_s` raises RewardTimeoutError naming the application. A sample is never
dropped or reordered: every answer is checked to have exactly one reward per image.

`ensure_reward_apps` deploys the applications a config needs unless they already run (then it
attaches), and returns the ones it started so the caller shuts down only those.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from ray.serve.schema import ApplicationStatus

from ddpo_ray.infra.images import as_image_array
from ddpo_ray.infra.reward_names import tiny_reward_refusal
from reward_services.registry import build_reward_app, reward_app


class RewardServiceError(RuntimeError):
    """A reward application failed to answer (not a problem with the caller's input)."""


class RewardTimeoutError(RewardServiceError, TimeoutError):
    """A reward application did not answer in time."""


@dataclass
class RewardResult:
    """Rewards for one submitted batch, in input order."""

    rewards: np.ndarray  # (N,) float64: sum over rewards of weight * value
    components: dict[str, np.ndarray]  # reward name -> (N,) unweighted values
    info: dict[str, dict[str, list]]  # reward name -> {key: one entry per image}


@dataclass
class _Call:
    """One chunk of a batch sent to one reward application; kept so it can be sent again."""

    reward_name: str
    handle: DeploymentHandle
    start: int  # index of the chunk's first image in the batch
    images: ray.ObjectRef  # the chunk's uint8 array, put once, shared by every reward's call
    prompts: list[str]
    metadata: list[dict[str, Any]] | None
    response: DeploymentResponse | None = None
    answer: dict[str, Any] | None = None
    attempts: int = 0

    def send(self) -> None:
        self.response = self.handle.score.remote(self.images, self.prompts, self.metadata)
        self.attempts += 1

    @property
    def span(self) -> str:
        """Which images of the batch this chunk holds, for error messages."""
        return f"images {self.start}..{self.start + len(self.prompts) - 1}"


@dataclass
class _Retries:
    """How many chunks were resent after their replica died, and the last errors (for logs)."""

    count: int = 0
    errors: deque = field(default_factory=lambda: deque(maxlen=100))


class PendingRewards:
    """Rewards in flight for one batch; `done()` polls, `result()` waits (with the deadline)."""

    def __init__(
        self,
        weights: Mapping[str, float],
        calls: list[_Call],
        num_images: int,
        deadline: float,
        max_retries: int,
        retries: _Retries,
    ):
        self._weights = dict(weights)
        self._calls = calls
        self._num_images = num_images
        self._deadline = deadline
        self._max_retries = max_retries
        self._retries = retries
        self._result: RewardResult | None = None

    def done(self) -> bool:
        """True when every reward has answered (never blocks; resends chunks whose replica died)."""
        for call in self._calls:
            if call.answer is None and not self._wait(call, timeout_s=0.0, raise_timeout=False):
                return False
        return True

    def result(self, timeout_s: float | None = None) -> RewardResult:
        """Block until all rewards are in, at most until the client's deadline (then the requests
        are cancelled) or for `timeout_s` (then they stay in flight and result() can be retried)."""
        if self._result is not None:
            return self._result
        deadline = self._deadline if timeout_s is None else min(self._deadline, time.monotonic() + timeout_s)
        for call in self._calls:
            if call.answer is None:
                self._wait(call, timeout_s=max(0.0, deadline - time.monotonic()), raise_timeout=True)
        self._result = self._combine()
        return self._result

    def cancel(self) -> None:
        for call in self._calls:
            if call.answer is None and call.response is not None:
                call.response.cancel()

    def _wait(self, call: _Call, timeout_s: float, raise_timeout: bool) -> bool:
        while True:
            try:
                answer = call.response.result(timeout_s=timeout_s)
            except RayActorError as exc:  # the replica (or one it called) died with the request: resend
                if call.attempts > self._max_retries:
                    self.cancel()
                    raise RewardServiceError(
                        f"reward {call.reward_name!r}: the replica died {call.attempts} times while scoring "
                        f"{call.span}; giving up: {exc}"
                    ) from exc
                self._retries.count += 1
                self._retries.errors.append(f"{call.reward_name}: {type(exc).__name__}")
                call.send()
                continue
            except RayTaskError as exc:  # the replica raised: not retried (it would raise again)
                self.cancel()
                if isinstance(exc.cause, ValueError):
                    raise  # bad input (RewardInputError, a ValueError): the caller's to fix, its type kept
                raise RewardServiceError(
                    f"reward {call.reward_name!r}: the replica raised while scoring {call.span}: "
                    f"{type(exc.cause).__name__}: {exc.cause}"
                ) from exc
            except TimeoutError:  # no answer yet
                if not raise_timeout:
                    return False
                if time.monotonic() >= self._deadline:
                    self.cancel()
                spec = reward_app(call.reward_name)
                raise RewardTimeoutError(
                    f"reward {call.reward_name!r} (Serve application {spec.app_name!r}, deployment "
                    f"{spec.ingress!r}) did not answer {call.span} "
                    f"in time (attempt {call.attempts}); check `serve status` for unhealthy or pending replicas"
                ) from None
            call.answer = self._checked(call, answer)
            return True

    @staticmethod
    def _checked(call: _Call, answer: Any) -> dict[str, Any]:
        expected = len(call.prompts)
        rewards = answer.get("rewards") if isinstance(answer, Mapping) else None
        if rewards is None or len(rewards) != expected:
            got = "no rewards" if rewards is None else f"{len(rewards)} rewards"
            raise RewardServiceError(
                f"reward {call.reward_name!r} answered {got} for {expected} images; expected one per image"
            )
        for key, values in answer.get("info", {}).items():
            if len(values) != expected:
                raise RewardServiceError(
                    f"reward {call.reward_name!r}: info[{key!r}] has {len(values)} entries for {expected} images"
                )
        return answer

    def _combine(self) -> RewardResult:
        components: dict[str, np.ndarray] = {}
        info: dict[str, dict[str, list]] = {}
        for name in self._weights:
            calls = sorted((c for c in self._calls if c.reward_name == name), key=lambda c: c.start)
            components[name] = np.concatenate(
                [np.asarray(c.answer["rewards"], dtype=np.float64) for c in calls]
            )
            info[name] = {}
            for call in calls:
                for key, values in call.answer.get("info", {}).items():
                    info[name].setdefault(key, []).extend(values)
        total = np.zeros(self._num_images, dtype=np.float64)
        for name, weight in self._weights.items():
            total += weight * components[name]
        return RewardResult(rewards=total, components=components, info=info)


def _app_handle(reward_name: str) -> DeploymentHandle:
    app_name = reward_app(reward_name).app_name
    try:
        return serve.get_app_handle(app_name)
    except RayServeException as exc:
        raise RewardServiceError(
            f"reward {reward_name!r}: Serve application {app_name!r} is not running ({exc}); deploy it with "
            "`serve deploy deploy/serve.yaml` or ensure_reward_apps()"
        ) from None


class RewardClient:
    """Scores batches on the reward applications a reward config names, weighted and summed."""

    def __init__(
        self,
        weights: Mapping[str, float] | Any,
        *,
        timeout_s: float = 300.0,
        max_retries: int = 2,
        max_images_per_call: int = 32,
    ):
        # A RewardConfig (ddpo_ray.config) gives its weights through components().
        weights = weights.components() if hasattr(weights, "components") else dict(weights)
        if not weights:
            raise ValueError("weights is empty; expected at least one {reward_name: weight}")
        for name, weight in weights.items():
            reward_app(name)  # raises for an unknown name
            if not np.isfinite(weight):
                raise ValueError(f"weights[{name!r}]={weight}; expected a finite number")
        if timeout_s <= 0 or max_retries < 0 or max_images_per_call < 1:
            raise ValueError(
                f"timeout_s={timeout_s}, max_retries={max_retries}, max_images_per_call={max_images_per_call}; "
                "expected timeout_s > 0, max_retries >= 0, max_images_per_call >= 1"
            )
        self.weights = weights
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_images_per_call = max_images_per_call
        self.handles = {name: _app_handle(name) for name in weights}
        self.retries = _Retries()  # how many chunks were resent after a replica died

    def submit(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> PendingRewards:
        """Send the batch to every reward application and return at once."""
        images = as_image_array(np.asarray(images))
        prompts = list(prompts)
        if len(prompts) != len(images):
            raise ValueError(
                f"{len(images)} images but {len(prompts)} prompts; expected one prompt per image"
            )
        if metadata is not None and len(metadata) != len(images):
            raise ValueError(
                f"{len(images)} images but {len(metadata)} metadata entries; expected one per image"
            )
        if len(images) == 0:
            raise ValueError("images is empty; expected at least one image")
        calls = []
        for start in range(0, len(images), self.max_images_per_call):
            stop = start + self.max_images_per_call
            # One copy into the object store per chunk, whatever the number of rewards (and
            # retries); Serve hands the array itself to the replicas.
            chunk = ray.put(np.ascontiguousarray(images[start:stop]))
            for name, handle in self.handles.items():
                call = _Call(
                    reward_name=name,
                    handle=handle,
                    start=start,
                    images=chunk,
                    prompts=prompts[start:stop],
                    metadata=None if metadata is None else [dict(m) for m in metadata[start:stop]],
                )
                call.send()
                calls.append(call)
        deadline = time.monotonic() + self.timeout_s
        return PendingRewards(self.weights, calls, len(images), deadline, self.max_retries, self.retries)

    def __call__(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> RewardResult:
        """Blocking form of submit(...).result()."""
        return self.submit(images, prompts, metadata).result()


# --- deploying what a config needs --------------------------------------------------------


def ensure_reward_apps(
    reward_names: Iterable[str],
    args: Mapping[str, Mapping[str, Any]] | None = None,
    model_pretrained: str = "tiny",
) -> list[str]:
    """Deploy each reward's application unless it already runs; returns the names this started.

    An application already deployed (e.g. by `serve deploy deploy/serve.yaml`, possibly with
    other models or replica counts) is used as it is. `args` gives builder arguments per reward
    for the ones started here. Serve must be started (serve.start) or it starts with defaults.
    For a real `model_pretrained` (not a built-in model), a missing application whose default
    is a tiny-world model is refused (RewardServiceError saying what to deploy) before anything
    is deployed.
    """
    args = dict(args or {})
    running = serve.status().applications
    names = list(dict.fromkeys(reward_names))
    missing = [
        name for name in names
        if name not in args and (
            running.get(reward_app(name).app_name) is None
            or running[reward_app(name).app_name].status == ApplicationStatus.NOT_STARTED
        )
    ]
    refusal = tiny_reward_refusal(model_pretrained, missing, "deploying the missing reward applications")
    if refusal is not None:
        raise RewardServiceError(refusal)
    started = []
    for name in names:
        spec = reward_app(name)
        existing = running.get(spec.app_name)
        if existing is not None and existing.status in (
            ApplicationStatus.RUNNING,
            ApplicationStatus.DEPLOYING,
            ApplicationStatus.UNHEALTHY,
        ):
            continue  # attach: a replica being replaced is Serve's job, not ours
        if existing is not None and existing.status != ApplicationStatus.NOT_STARTED:
            raise RewardServiceError(
                f"Serve application {spec.app_name!r} exists with status {existing.status.value}: "
                f"{existing.message or 'no message'}; fix it or delete it (serve.delete) before starting a run"
            )
        serve.run(build_reward_app(name, args.get(name)), name=spec.app_name, route_prefix=spec.route_prefix)
        started.append(spec.app_name)
    return started


def shutdown_reward_apps(app_names: Iterable[str]) -> None:
    """Delete the applications `ensure_reward_apps` started (and nothing else)."""
    for app_name in app_names:
        serve.delete(app_name)
