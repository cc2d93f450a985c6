"""The single-process DDPO loop: sample -> reward -> advantages -> PPO -> repeat.

Read it top to bottom: it is the whole algorithm with no Ray. It is the reference the Ray
system is checked and measured against, and a debugging tool:

    python -m ddpo_ray.local                                  # the offline `tiny` preset
    python -m ddpo_ray.local --preset tiny num_epochs=2 sample.num_steps=10
    python -m ddpo_ray.local --config my.yaml resume_from=latest run_name=my-run
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

import torch

from ddpo_ray.advantages import AdvantageEstimator
from ddpo_ray.checkpoint import load_checkpoint, resolve_resume_path, save_checkpoint, trainable_state_dict
from ddpo_ray.config import ConfigError, DDPOConfig, add_config_arguments, config_from_args
from ddpo_ray.diffusion import Trajectories
from ddpo_ray.epoch_steps import checkpoint_due, format_progress, format_summary, sample_batch, summary, train_inner_epochs
from ddpo_ray.evaluation import EvalRecorder, generate_eval_images
from ddpo_ray.metrics import EpochMetrics
from ddpo_ray.models import load_pipeline, trainable_parameters
from ddpo_ray.ppo import make_optimizer
from ddpo_ray.prompts import PromptSampler, get_prompts
from ddpo_ray.run_dir import RunDirectory
from reward_services.functions import compute_rewards
from reward_services.metrics import ServiceMetrics


def run(cfg: DDPOConfig, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Train for cfg.num_epochs epochs in this process; returns the per-epoch metrics."""
    run_dir = RunDirectory(f"{cfg.output_dir}/{cfg.resolved_run_name()}")
    run_dir.write_config(cfg.to_dict())
    print(f"run directory: {run_dir.root}", flush=True)

    # --- the policy: frozen pipeline + trainable LoRA, its optimizer -----------------------
    pipe = load_pipeline(cfg.model, device)
    params = trainable_parameters(pipe.unet, cfg.model.use_lora, cfg.model.lora_rank, seed=cfg.seed)
    optimizer = make_optimizer(params, cfg.train)
    advantage_fn = AdvantageEstimator(cfg.advantage.mode, cfg.advantage.buffer_size, cfg.advantage.min_count)
    prompt_sampler = PromptSampler(get_prompts(cfg.prompts.name), cfg.sample.samples_per_prompt, cfg.seed)
    reward_weights = cfg.reward.components()
    # No Ray here: prometheus-client holds the metrics (--metrics-port serves them), the rewards'
    # own included, labelled as the in-process path.
    exported = EpochMetrics(run_dir.root.name, "prometheus" if cfg.metrics else "off")
    reward_metrics = ServiceMetrics("prometheus" if cfg.metrics else "off", app="+".join(reward_weights), deployment="in_process")

    first_epoch, policy_version = 0, 0
    if cfg.resume_from:
        path = resolve_resume_path(cfg.resume_from, run_dir)
        state = load_checkpoint(path, pipe.unet, cfg.model.use_lora, optimizer, advantage_fn)
        first_epoch, policy_version = state["epoch"] + 1, state["policy_version"]
        run_dir.truncate_metrics(after_epoch=state["epoch"])
        print(f"resumed from {path} at epoch {first_epoch}", flush=True)

    # --- held-out evaluation: fixed prompts and noise, deterministic sampling (eta 0) -------
    evals = EvalRecorder(cfg, run_dir, exported, policy_version)
    eval_weights = {name: 1.0 for name in cfg.eval_reward_names()}

    def evaluate_policy(version: int) -> dict[str, Any]:
        """Evaluate the current weights (policy `version`); record, keep the best, check the guard."""
        start = time.perf_counter()
        images = generate_eval_images(pipe, cfg, evals.eval_set)
        scores = compute_rewards(eval_weights, images, evals.eval_set.prompts)[1]
        return evals.record(version, images, scores,
                            lambda: trainable_state_dict(pipe.unet, cfg.model.use_lora), start)

    if evals.due(policy_version):
        evaluate_policy(policy_version)  # the base model, or where a resumed run stands

    history = run_dir.read_metrics()
    for epoch in range(first_epoch, cfg.num_epochs):
        if evals.stopped:
            print(evals.stop_message(), flush=True)
            break
        epoch_start = time.perf_counter()

        # 1. sample: trajectories with log-probs under the current policy
        prompts = prompt_sampler.epoch_prompts(epoch, cfg.samples_per_epoch)
        batches = [
            sample_batch(pipe, cfg, prompts[b * cfg.sample.batch_size:(b + 1) * cfg.sample.batch_size],
                         epoch, b, policy_version)
            for b in range(cfg.sample.num_batches_per_epoch)
        ]
        trajectories = Trajectories.concat(batches)
        time_sampling = time.perf_counter() - epoch_start

        # 2. reward the decoded images
        start = time.perf_counter()
        with reward_metrics.request() as request:
            request["images"] = len(trajectories)
            rewards, components = compute_rewards(reward_weights, trajectories.images.numpy(), trajectories.prompts)
        time_reward = time.perf_counter() - start

        # 3. advantages over the whole epoch
        advantages = advantage_fn(trajectories.prompts, rewards)

        # 4. PPO: num_inner_epochs passes over the epoch's trajectories
        start = time.perf_counter()
        train_metrics = train_inner_epochs(
            pipe.unet, pipe.scheduler, optimizer, params, trajectories,
            torch.as_tensor(advantages, dtype=torch.float32), cfg, epoch,
        )
        policy_version += 1
        time_training = time.perf_counter() - start

        # 5. record the epoch
        metrics: dict[str, Any] = {"epoch": epoch, "samples": len(trajectories), "policy_version": policy_version}
        metrics.update(summary("reward", rewards))
        metrics.update(summary("advantage", advantages, extremes=False))
        for name, values in components.items():
            metrics.update(summary(f"reward_{name}", values, extremes=False))  # each unweighted component
        metrics.update(train_metrics)
        metrics.update(time_sampling=time_sampling, time_reward=time_reward, time_training=time_training)
        if evals.due(policy_version):
            metrics.update(evaluate_policy(policy_version))  # of the weights this epoch produced
        metrics["time_epoch"] = time.perf_counter() - epoch_start
        run_dir.append_metrics(metrics)
        exported.record(metrics)
        history.append(metrics)
        run_dir.save_sample_grid(epoch, trajectories.images.numpy(), trajectories.prompts, rewards.tolist())
        run_dir.save_reward_curve(history)
        if checkpoint_due(cfg, epoch) or evals.stopped:
            save_checkpoint(run_dir, epoch, pipe.unet, cfg.model.use_lora, optimizer, advantage_fn, policy_version)
        print(format_progress(metrics), flush=True)

    return history


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpo_ray.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve the ddpo_* Prometheus metrics on http://127.0.0.1:PORT/metrics")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.metrics_port is not None:
        from reward_services.metrics import serve_prometheus

        print(f"metrics: http://127.0.0.1:{serve_prometheus(args.metrics_port)}/metrics", flush=True)
    if cfg.run_name is None:
        cfg.run_name = cfg.resolved_run_name()  # one name for the whole run (it is time-stamped)
    history = run(cfg, args.device)
    print(format_summary(history, f"{cfg.output_dir}/{cfg.resolved_run_name()}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
