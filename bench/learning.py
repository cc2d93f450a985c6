"""Does DDPO learn on `tiny`, on every seed? The paper's four tasks over seeds 0-4.

For each `tiny_*` preset (compressibility, incompressibility, aesthetic, alignment) and each
seed, this runs the single-process loop with held-out evaluation every epoch and reads the run
through `LearningGain`: held-out base (version 0) / best / final, and the gains in units of the
base model's spread over the eval images (the issue's bar: final gain >= 1 on every seed, and
no collapse, final >= base, on at least 4 of 5). Also per prompt group (the training prompts vs
held-out shapes never trained on) and, for the learned rewards, their gold references.

Writes `learning.json`, `learning.png` (held-out gain per version, a line per seed, a panel per
task) and, for the first seed, the eval grids at the start, the best version and the end.

    python bench/learning.py                                  # 4 tasks x 5 seeds, ~1 hour on 2 cores
    python bench/learning.py --tasks tiny_aesthetic --seeds 0 1 train.learning_rate=3e-3
    python bench/learning.py --tasks tiny_alignment --no-signal     # the drift baseline
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ddpo_ray.config import DDPOConfig, build_config
from ddpo_ray.records.run_dir import RunDirectory
from ddpo_ray.training.evaluation import EvalSet
from ddpo_ray.training.learning_gain import LearningGain
from ddpo_ray.training.local_loop import TrainingRewards
from ddpo_ray.training.local_loop import run_local as run_local_loop
from reward_services.functions import compute_rewards

TASKS = ("tiny_compressibility", "tiny_incompressibility", "tiny_aesthetic", "tiny_alignment")


def rewards_without_signal(cfg: DDPOConfig, seed: int) -> TrainingRewards:
    """The config's rewards, each prompt's group of samples given its rewards in a random order.

    Every prompt keeps its reward distribution, but no sample's reward says anything about how
    it was drawn: what a run trained on these does is the recipe's drift alone, the baseline
    against which a reward's signal shows (`--no-signal`).
    """
    rng = np.random.default_rng([seed, 0x5EED])
    k = cfg.sample.samples_per_prompt

    def shuffled(images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, dict[str, Any]]:
        if any(len(set(prompts[start:start + k])) != 1 for start in range(0, len(prompts), k)):
            raise ValueError(f"--no-signal shuffles within groups of sample.samples_per_prompt={k}, "
                             "but a group holds several prompts")
        rewards, info = compute_rewards(cfg.reward.components(), images, prompts)
        order = np.concatenate([start + rng.permutation(min(k, len(rewards) - start))
                                for start in range(0, len(rewards), k)])
        return rewards[order], {name: np.asarray(values)[order] for name, values in info.items()}

    return shuffled


def run_seed(preset: str, seed: int, epochs: int | None, out: Path, overrides: list[str],
             no_signal: bool = False) -> dict:
    """One run; its held-out record overall, per group and for each extra eval reward."""
    name = f"{preset}-seed{seed}"
    cfg = build_config(preset, overrides=[
        f"seed={seed}", "save_freq=0", "metrics=false", "eval.every=1", "eval.guard_margin=null",
        f"output_dir={out}", f"run_name={name}", *([f"num_epochs={epochs}"] if epochs else []), *overrides,
    ])
    start = time.perf_counter()
    history = run_local_loop(cfg, training_rewards=rewards_without_signal(cfg, seed) if no_signal else None)
    seconds = time.perf_counter() - start
    run_dir = RunDirectory(out / name)
    evals = run_dir.read_evals()
    gain = LearningGain.from_evals(evals)
    result = {
        "preset": preset, "seed": seed, "seconds": round(seconds, 1), "epochs": len(history),
        "train_reward": [m["reward_mean"] for m in history], "held_out": gain.row(),
        "groups": {g: LearningGain.from_evals(evals, f"eval_reward_{g}_mean", "eval_reward_std").row()
                   for g in EvalSet.from_config(cfg).group_names()},
        "eval_rewards": {n: LearningGain.from_evals(evals, f"eval_{n}_mean").row()
                         for n in cfg.eval_reward_names() if n not in cfg.reward.components()},
        "run_dir": str(run_dir.root),
    }
    return result


def print_table(results: dict[str, list[dict]]) -> None:
    print("\nheld-out eval (training reward on fixed eval noise); gains in base-model spreads")
    print(f"{'task':24s} {'seed':>4s} {'base':>9s} {'best':>9s} {'final':>9s} {'spread':>7s} "
          f"{'gain@best':>9s} {'gain@end':>8s} {'collapse':>8s}  groups (gain@end)  eval rewards (gain@end)")
    for preset, runs in results.items():
        for r in runs:
            h = r["held_out"]
            groups = " ".join(f"{g}:{v['gain_final']:+.2f}" for g, v in r["groups"].items())
            extra = " ".join(f"{n}:{v['gain_final']:+.2f}" for n, v in r["eval_rewards"].items())
            print(f"{preset:24s} {r['seed']:4d} {h['base']:+9.4f} {h['best']:+9.4f} {h['final']:+9.4f} "
                  f"{h['base_std']:7.4f} {h['gain_best']:+9.2f} {h['gain_final']:+8.2f} "
                  f"{'yes' if h['collapsed'] else 'no':>8s}  {groups}  {extra}")
        learned = sum(r["held_out"]["learned"] for r in runs)
        kept = sum(not r["held_out"]["collapsed"] for r in runs)
        mean_gain = sum(r["held_out"]["gain_final"] for r in runs) / len(runs)
        print(f"{preset:24s} summary: gain@end >= 1 on {learned}/{len(runs)} seeds, no collapse on "
              f"{kept}/{len(runs)}, mean gain@end {mean_gain:+.2f}")


def plot(results: dict[str, list[dict]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(fig)
    for i, (preset, runs) in enumerate(results.items()):
        ax = fig.add_subplot(2, 2, i + 1)
        for r in runs:
            h = r["held_out"]
            gains = [(v - h["values"][0]) / max(h["base_std"], 1e-12) for v in h["values"]]
            ax.plot(h["versions"], gains, "o-", markersize=3, label=f"seed {r['seed']}")
        ax.axhline(1.0, color="gray", linestyle=":", label="one base spread")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("policy version (epochs trained)")
        ax.set_ylabel("held-out gain (base spreads)")
        ax.set_title(preset)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def copy_grids(run: dict, out_dir: Path) -> list[Path]:
    """The first seed's eval grids at version 0, the best version and the last."""
    h = run["held_out"]
    copied = []
    for label, version in (("start", 0), ("best", h["best_version"]), ("end", h["versions"][-1])):
        source = Path(run["run_dir"]) / "eval" / f"version_{version:04d}.png"
        if source.exists():
            target = out_dir / f"{run['preset']}_{label}_v{version}.png"
            shutil.copyfile(source, target)
            copied.append(target)
    return copied


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's num_epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out-dir", default="bench/results/learning")
    parser.add_argument("--no-signal", action="store_true",
                        help="train on each prompt's rewards in a random order: the recipe's drift alone")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.tasks:
            results[preset] = []
            for seed in args.seeds:
                run = run_seed(preset, seed, args.epochs, Path(tmp), args.overrides, args.no_signal)
                h = run["held_out"]
                print(f"{preset} seed {seed}: held-out {h['base']:+.4f} -> best {h['best']:+.4f} "
                      f"(v{h['best_version']}) -> end {h['final']:+.4f}; gain@end {h['gain_final']:+.2f} "
                      f"spreads | train {run['train_reward'][0]:+.4f} -> {run['train_reward'][-1]:+.4f} "
                      f"| {run['seconds']:.0f}s", flush=True)
                results[preset].append(run)
            copy_grids(results[preset][0], out_dir)
        print_table(results)
        for runs in results.values():
            for run in runs:
                run.pop("run_dir")
    png = out_dir / "learning.png"
    plot(results, png)
    (out_dir / "learning.json").write_text(
        json.dumps({"overrides": args.overrides, "no_signal": args.no_signal, "results": results}, indent=1)
    )
    print(f"wrote {png}, {out_dir / 'learning.json'} and the first seed's eval grids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
