"""The run's Prometheus metrics (`ddpo_*`): per epoch from the driver, per batch from samplers.

`EpochMetrics.record(metrics)` takes the same dict an epoch writes to metrics.jsonl, so the
Prometheus view and the file never disagree; both loops call it (the Ray driver through
`ray.util.metrics`, the single-process loop through prometheus-client, see
`reward_services.metrics`). `SamplerMetrics` counts trajectories and times batches and weight
loads inside each sampler actor. Labels: run name, sampler id, phase, reward name; never a
sample.
"""

from __future__ import annotations

from typing import Any, Mapping

from ddpo_ray.infra.metrics_backend import (
    LATENCY_BUCKETS_S,
    Backend,
    MetricSpec,
    default_backend,
    make_metric,
)

PHASES = {  # label value -> key in the epoch metrics
    "sampling": "time_sampling",
    "reward_wait": "time_reward",
    "training": "time_training",
    "weight_sync": "time_weight_sync",
    "waiting_for_learner": "time_waiting_for_learner",
}

_RUN = ("run",)
EPOCH_GAUGES = {  # metric name -> key in the epoch metrics
    "ddpo_epoch": "epoch",
    "ddpo_policy_version": "policy_version",
    "ddpo_reward_mean": "reward_mean",
    "ddpo_reward_std": "reward_std",
    "ddpo_reward_min": "reward_min",
    "ddpo_reward_max": "reward_max",
    "ddpo_advantage_mean": "advantage_mean",
    "ddpo_advantage_std": "advantage_std",
    "ddpo_ppo_loss": "loss",
    "ddpo_ppo_approx_kl": "approx_kl",
    "ddpo_ppo_clipfrac": "clipfrac",
    "ddpo_ppo_grad_norm": "grad_norm",
    # |ratio - 1| before the first update: ~0 at staleness 0 (training scores what sampling drew)
    "ddpo_ppo_ratio_dev_before_update": "ratio_dev_before_update",
    # sampler-vs-learner log-prob deviation that train.recompute_old_log_probs removed (bf16/fp16)
    "ddpo_sampling_log_prob_dev": "sampling_log_prob_dev",
    "ddpo_epoch_seconds": "time_epoch",
    "ddpo_learner_restarts": "learner_restarts",
}
EPOCH_COUNTERS = {
    "ddpo_epochs_completed": None,  # +1 per epoch
    "ddpo_trajectories_trained": "samples",
    "ddpo_sampler_reissued_batches": "sampler_reissued",
}

RUN_SPECS = [
    *(MetricSpec(name, "gauge", f"this epoch's {key}", _RUN) for name, key in EPOCH_GAUGES.items()),
    *(MetricSpec(name, "counter", f"sum of {key or 'epochs'}", _RUN) for name, key in EPOCH_COUNTERS.items()),
    MetricSpec("ddpo_reward_component_mean", "gauge", "mean of one unweighted reward component", ("run", "reward")),
    MetricSpec("ddpo_epoch_phase_seconds", "gauge", "time of one phase of the epoch", ("run", "phase")),
    MetricSpec("ddpo_sampling_throughput", "gauge", "samples per second of the sampling phase", _RUN),
    MetricSpec("ddpo_eval_policy_version", "gauge", "the policy version of the last held-out evaluation", _RUN),
    MetricSpec(
        "ddpo_eval_reward_mean", "gauge", "held-out mean of a reward (reward=training: the training reward)",
        ("run", "reward"),
    ),
    MetricSpec("ddpo_eval_best_version", "gauge", "the policy version with the best eval.best_metric", _RUN),
    MetricSpec("ddpo_eval_guard_drop", "gauge", "how far the guard reward is below its best (eval)", _RUN),
    MetricSpec("ddpo_eval_guard_stops", "counter", "runs stopped by the over-optimisation guard", _RUN),
]

SAMPLER_SPECS = [
    MetricSpec("ddpo_trajectories_sampled", "counter", "trajectories sampled", ("sampler",)),
    MetricSpec("ddpo_sampler_batch_seconds", "histogram", "denoising + decoding one batch", ("sampler",), LATENCY_BUCKETS_S),
    MetricSpec("ddpo_sampler_policy_version", "gauge", "the policy version the sampler holds", ("sampler",)),
    MetricSpec(
        "ddpo_weight_sync_seconds", "histogram", "fetching and loading a new policy version", ("sampler",), LATENCY_BUCKETS_S
    ),
]


class EpochMetrics:
    """The driver's metrics; `record` once per finished epoch."""

    def __init__(self, run_name: str, backend: Backend | None = None):
        backend = backend or default_backend()
        self.run = run_name
        self._m = {spec.name: make_metric(spec, backend) for spec in RUN_SPECS}

    def record(self, metrics: Mapping[str, Any]) -> None:
        run = self.run
        for name, key in EPOCH_GAUGES.items():
            if key in metrics:
                self._m[name].set(float(metrics[key]), run=run)
        for name, key in EPOCH_COUNTERS.items():
            value = 1.0 if key is None else float(metrics.get(key, 0))
            if value:
                self._m[name].inc(value, run=run)
        for label, key in PHASES.items():
            if key in metrics:
                self._m["ddpo_epoch_phase_seconds"].set(float(metrics[key]), run=run, phase=label)
        for key, value in metrics.items():
            if key.startswith("reward_") and key.endswith("_mean") and key != "reward_mean":
                self._m["ddpo_reward_component_mean"].set(float(value), run=run, reward=key[len("reward_"):-len("_mean")])
        if metrics.get("time_sampling"):
            self._m["ddpo_sampling_throughput"].set(float(metrics["samples"]) / float(metrics["time_sampling"]), run=run)

    def record_eval(self, policy_version: int, metrics: Mapping[str, Any]) -> None:
        """A held-out evaluation's `eval_*` metrics (ddpo_ray.training.evaluation)."""
        run = self.run
        self._m["ddpo_eval_policy_version"].set(float(policy_version), run=run)
        for key, value in metrics.items():
            if key.startswith("eval_") and key.endswith("_mean") and key.count("_") >= 2:
                name = key[len("eval_"):-len("_mean")]
                if name == "reward":
                    self._m["ddpo_eval_reward_mean"].set(float(value), run=run, reward="training")
                elif f"eval_{name}_std" in metrics:  # a whole-set reward, not a per-group mean
                    self._m["ddpo_eval_reward_mean"].set(float(value), run=run, reward=name)
        if metrics.get("eval_best_version") is not None:
            self._m["ddpo_eval_best_version"].set(float(metrics["eval_best_version"]), run=run)
        if "eval_guard_drop" in metrics:
            self._m["ddpo_eval_guard_drop"].set(float(metrics["eval_guard_drop"]), run=run)
            if metrics["eval_guard_stop"]:
                self._m["ddpo_eval_guard_stops"].inc(1.0, run=run)


class SamplerMetrics:
    """A sampler's metrics, labelled with its id."""

    def __init__(self, sampler_id: int, backend: Backend | None = None):
        backend = backend or default_backend()
        self.tags = {"sampler": str(sampler_id)}
        self._m = {spec.name: make_metric(spec, backend) for spec in SAMPLER_SPECS}

    def batch_sampled(self, num_samples: int, seconds: float) -> None:
        self._m["ddpo_trajectories_sampled"].inc(num_samples, **self.tags)
        self._m["ddpo_sampler_batch_seconds"].observe(seconds, **self.tags)

    def weights_applied(self, version: int, seconds: float) -> None:
        self._m["ddpo_sampler_policy_version"].set(version, **self.tags)
        self._m["ddpo_weight_sync_seconds"].observe(seconds, **self.tags)


def metric_names() -> list[str]:
    """Every ddpo_* metric the system defines (run, sampler and reward service), as registered."""
    from reward_services.metrics import SERVICE_METRICS

    return sorted({s.name for s in RUN_SPECS} | {s.name for s in SAMPLER_SPECS} | {s.name for s in SERVICE_METRICS.values()})
