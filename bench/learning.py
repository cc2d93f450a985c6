"""The DDPO paper's four tasks at small scale: reward curves, held-out vs train, with and without the guard.

For each `tiny_*` preset (compressibility, incompressibility, aesthetic, alignment) this runs
the single-process loop with held-out evaluation every epoch and records, per policy version:
the training reward (samples drawn by that version, eta 1) and the held-out reward (fixed eval
prompts and noise, eta 0; train-prompt and held-out-prompt groups separately). For the presets
with a guard (the JPEG tasks), it runs twice: without stopping (eval.guard_margin=inf: the guard
reward is still recorded) and with the preset's guard, and reports where the guard stopped the
run next to where the unguarded run's guard reward peaked.

Writes one PNG (a panel per task) and JSON. With `tiny`, the aesthetic and alignment rewards are
the trained tiny reward models (README, "The tiny reward models"); their presets also evaluate
`aesthetic_gold` / `alignment_gold` (in each run's eval.jsonl).

    python bench/learning.py                        # 20 epochs per run, ~10 minutes on 2 cores
    python bench/learning.py --epochs 6 --tasks tiny_compressibility --out-dir /tmp/learning
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from ddpo_ray.config import build_config
from ddpo_ray.records.run_dir import RunDirectory
from ddpo_ray.training.evaluation import EvalSet
from ddpo_ray.training.local_loop import run_local as run_local_loop

TASKS = ("tiny_compressibility", "tiny_incompressibility", "tiny_aesthetic", "tiny_alignment")


def run_task(preset: str, epochs: int, seed: int, out: Path, guarded: bool, overrides: list[str]) -> dict:
    name = f"{preset}-{'guarded' if guarded else 'unguarded'}"
    cfg = build_config(preset, overrides=[
        f"num_epochs={epochs}", f"seed={seed}", "save_freq=0", "metrics=false",
        f"output_dir={out}", f"run_name={name}", *overrides,
    ])
    if not guarded and cfg.eval.guard_reward:
        cfg.eval.guard_margin = math.inf  # record the guard reward, never stop
    start = time.perf_counter()
    history = run_local_loop(cfg)
    seconds = time.perf_counter() - start
    evals = RunDirectory(out / name).read_evals()
    guard_key = f"eval_{cfg.eval.guard_reward}_mean" if cfg.eval.guard_reward else None
    groups = EvalSet.from_config(cfg).group_names()
    return {
        "preset": preset, "guarded": guarded, "seconds": round(seconds, 1), "epochs_run": len(history),
        "guard_reward": cfg.eval.guard_reward,
        "guard_margin": cfg.eval.guard_margin if math.isfinite(cfg.eval.guard_margin) else None,
        "train_reward": [m["reward_mean"] for m in history],  # index = policy version that sampled it
        "train_reward_std": [m["reward_std"] for m in history],
        "eval_versions": [r["policy_version"] for r in evals],
        "eval_reward": [r["eval_reward_mean"] for r in evals],
        "eval_reward_by_group": {g: [r[f"eval_reward_{g}_mean"] for r in evals] for g in groups},
        "guard": [r[guard_key] for r in evals] if guard_key else None,
        "best_version": evals[-1]["eval_best_version"],
        "stopped_at_version": evals[-1]["policy_version"] if evals[-1].get("eval_guard_stop") else None,
    }


def plot(results: dict[str, dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(fig)
    for i, (preset, runs) in enumerate(results.items()):
        ax = fig.add_subplot(2, 2, i + 1)
        run = runs["unguarded"]
        ax.plot(range(len(run["train_reward"])), run["train_reward"], "o-", label="train (eta 1)")
        for group, values in run["eval_reward_by_group"].items():
            ax.plot(run["eval_versions"], values, "s--", label=f"held-out eval: {group}")
        ax.set_xlabel("policy version (epochs trained)")
        ax.set_ylabel(preset.removeprefix("tiny_") + " reward")
        ax.set_title(preset)
        ax.grid(alpha=0.3)
        if run["guard"] is not None:
            twin = ax.twinx()
            twin.plot(run["eval_versions"], run["guard"], "^:", color="gray", label=f"guard: {run['guard_reward']} (eval)")
            twin.set_ylabel(f"guard {run['guard_reward']}", color="gray")
            peak = run["eval_versions"][max(range(len(run["guard"])), key=run["guard"].__getitem__)]
            twin.axvline(peak, color="gray", alpha=0.4, linestyle=":")
            stopped = runs.get("guarded", {}).get("stopped_at_version")
            if stopped is not None:
                ax.axvline(stopped, color="red", alpha=0.6, label=f"guarded run stopped (v{stopped})")
            twin.legend(loc="lower right", fontsize=7)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--out-dir", default="bench/results")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.tasks:
            runs = {"unguarded": run_task(preset, args.epochs, args.seed, Path(tmp), False, args.overrides)}
            if runs["unguarded"]["guard"] is not None:
                runs["guarded"] = run_task(preset, args.epochs, args.seed, Path(tmp), True, args.overrides)
            results[preset] = runs
            u = runs["unguarded"]
            line = (f"{preset}: train reward v0 {u['train_reward'][0]:+.4f} -> v{len(u['train_reward']) - 1} "
                    f"{u['train_reward'][-1]:+.4f} | held-out eval v0 {u['eval_reward'][0]:+.4f} -> "
                    f"v{u['eval_versions'][-1]} {u['eval_reward'][-1]:+.4f} | best v{u['best_version']} | {u['seconds']:.0f}s")
            if u["guard"] is not None:
                peak = u["eval_versions"][max(range(len(u["guard"])), key=u["guard"].__getitem__)]
                g = runs["guarded"]
                line += (f"\n  guard {u['guard_reward']}: unguarded peak at v{peak} "
                         f"({max(u['guard']):+.5f}); guarded run (margin {g['guard_margin']}) stopped at "
                         f"{'v' + str(g['stopped_at_version']) if g['stopped_at_version'] is not None else 'never'}, "
                         f"best v{g['best_version']}")
            print(line, flush=True)

    png = out_dir / "learning.png"
    plot(results, png)
    (out_dir / "learning.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {png} and {out_dir / 'learning.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
