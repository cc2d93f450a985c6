"""What a run prints: one line per epoch, one per held-out evaluation of the base model, a summary.

Both loops print exactly these lines (through `logging`, logger `ddpo_ray`); everything else
a run has to say goes to its log file (`ddpo_ray.infra.logs`). On a terminal, a long epoch also
shows a live counter (`PhaseCounter`) on one rewritten line, which leaves nothing behind.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence, TextIO

from ddpo_ray.config import DDPOConfig


def format_progress(metrics: Mapping[str, Any]) -> str:
    """The one line per epoch: reward, PPO health, time split and, when evaluated, the held-out reward."""
    line = (
        f"epoch {metrics['epoch']:4d} | samples {metrics['samples']:4d} | "
        f"reward {metrics['reward_mean']:+.4f} +- {metrics['reward_std']:.4f} | "
        f"kl {metrics['approx_kl']:.2e} clipfrac {metrics['clipfrac']:.3f} | "
        f"time sample {metrics['time_sampling']:.1f}s reward {metrics['time_reward']:.1f}s "
        f"train {metrics['time_training']:.1f}s"
    )
    if "time_weight_sync" in metrics:
        line += f" sync {metrics['time_weight_sync']:.2f}s"
    if metrics.get("eval_reward_mean") is not None:
        line += f" | held-out {metrics['eval_reward_mean']:+.4f} (best v{metrics['eval_best_version']})"
        if metrics.get("eval_guard_stop"):
            line += " guard STOP"
    return line


def format_eval(policy_version: int, metrics: Mapping[str, Any], cfg: DDPOConfig) -> str:
    """A held-out evaluation in one line (the base model's is printed; later ones join their epoch's line)."""
    line = f"eval v{policy_version:<3d} | reward {metrics['eval_reward_mean']:+.4f} +- {metrics['eval_reward_std']:.4f}"
    extra = [name for name in cfg.eval_reward_names() if name not in cfg.reward.components()]
    for name in extra:
        line += f" | {name} {metrics[f'eval_{name}_mean']:+.4f}"
    line += f" | best v{metrics['eval_best_version']}"
    if "eval_guard_drop" in metrics:
        line += f" | guard drop {metrics['eval_guard_drop']:.4f} (margin {cfg.eval.guard_margin})"
        if metrics["eval_guard_stop"]:
            line += " -> STOP"
    return line


def format_summary(history: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]], run_root: str) -> str:
    """The closing lines: epochs run, the training and held-out gains, and where the pictures are."""
    if not history:
        return f"done: nothing to do; run directory {run_root}"
    first, last = history[0], history[-1]
    lines = [
        f"done: {len(history)} epochs; training reward {first['reward_mean']:+.4f} -> {last['reward_mean']:+.4f} "
        f"({last['reward_mean'] - first['reward_mean']:+.4f}; epoch-0 spread {first['reward_std']:.4f})"
    ]
    scored = [row for row in evals if row.get("eval_reward_mean") is not None]
    if scored:
        base, end = scored[0], scored[-1]
        gain = end["eval_reward_mean"] - base["eval_reward_mean"]
        groups = [key.removeprefix("eval_reward_").removesuffix("_gain") for key in end
                  if key.startswith("eval_reward_") and key.endswith("_gain") and key != "eval_reward_gain"]
        by_group = ", ".join(f"{group} {end[f'eval_reward_{group}_gain']:+.2f}" for group in groups)
        lines.append(
            f"held-out reward v{base['policy_version']} {base['eval_reward_mean']:+.4f} -> "
            f"v{end['policy_version']} {end['eval_reward_mean']:+.4f} ({gain:+.4f} = "
            f"{end['eval_reward_gain']:+.2f} base spreads"
            + (f"; by prompt group: {by_group}" if by_group else "")
            + f"); best v{end.get('eval_best_version')}"
        )
    lines.append(f"run directory {run_root}: reward_curve.png, samples/, eval/, checkpoints/")
    return "\n".join(lines)


class PhaseCounter:
    """`epoch 3 | sampling 5/32 batches` on one rewritten terminal line; silent when not a terminal."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._width = 0

    def show(self, epoch: int, phase: str, done: int | None = None, total: int | None = None) -> None:
        if not self.enabled:
            return
        text = f"epoch {epoch:4d} | {phase}" + (f" {done}/{total}" if total else "")
        self._width = max(self._width, len(text))
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
