"""Over-optimisation on `tiny`: the learned proxy reward against its gold, over a long run.

For `tiny_aesthetic` (proxy: the trained tiny aesthetic scorer; gold: `aesthetic_gold`, the
pixel function it learned) and `tiny_alignment` (proxy: `llava_bertscore` on the tiny
captioner; gold: `alignment_gold`, an independent attribute model), this runs the
single-process loop for `--epochs` epochs with held-out evaluation every epoch, in three arms:

- `plain`: no guard (the proxy is optimised as far as it goes);
- `kl`: the same with a KL penalty to the reference policy (`train.kl_coef`);
- `guard`: the gold as the guard reward (`eval.guard_reward`, `eval.guard_margin` in gold
  spreads of the base model): the run stops when gold falls that far below its peak, and
  `checkpoints/best` keeps the best proxy version before that. A guard only stops a run, so
  until it trips the guarded run is the plain run: this arm replays the plain run's eval rows
  through the product's `EvalTracker` under the guard config instead of training again.

Prints a table (gold at the best-proxy checkpoint vs at the end, the version where gold peaks,
where the proxy peaks, where the guard stopped) and writes `overoptimization.png` (proxy and
gold per version, both in base spreads, a panel per task and arm) and JSON.

    python bench/overoptimization.py                     # 2 tasks x 3 arms x 40 epochs
    python bench/overoptimization.py --epochs 10 --tasks tiny_aesthetic --arms plain
    python bench/overoptimization.py --merge a/overoptimization.json b/overoptimization.json
                                         # one table and PNG from runs made in parallel
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddpo_ray.config import DDPOConfig, build_config
from ddpo_ray.records.run_dir import RunDirectory
from ddpo_ray.training.evaluation import EvalTracker
from ddpo_ray.training.learning_gain import LearningGain
from ddpo_ray.training.local_loop import run_local as run_local_loop

GOLD = {"tiny_aesthetic": "aesthetic_gold", "tiny_alignment": "alignment_gold"}
ARMS = ("plain", "kl", "guard")


def arm_config(preset: str, arm: str, args, out: Path, base_gold_std: float | None) -> DDPOConfig:
    gold = GOLD[preset]
    if arm == "plain":
        arm_overrides = ["eval.guard_margin=null"]
    elif arm == "kl":
        arm_overrides = [f"train.kl_coef={args.kl_coef}", "eval.guard_margin=null"]
    elif base_gold_std is None:
        raise ValueError("the guard arm needs the plain arm's base gold spread (run plain first)")
    else:
        arm_overrides = [f"eval.guard_reward={gold}", f"eval.guard_margin={args.guard_spreads * base_gold_std}"]
    return build_config(preset, overrides=[
        f"seed={args.seed}", f"num_epochs={args.epochs}", "save_freq=0", "metrics=false", "eval.every=1",
        f"output_dir={out}", f"run_name={preset}-{arm}", *arm_overrides, *args.overrides,
    ])


def guarded(cfg: DDPOConfig, plain_evals: list[dict]) -> list[dict]:
    """The plain run's eval rows as the guarded run records them: the product's tracker under
    the guard config, up to and including the version that trips the guard (where it stops)."""
    tracker = EvalTracker.for_config(cfg)
    rows = []
    for row in plain_evals:
        version = int(row["policy_version"])
        rows.append({**row, **tracker.update(version, row)})
        if tracker.stopped:
            break
    return rows


def run_arm(preset: str, arm: str, args, out: Path, base_gold_std: float | None,
            plain_evals: list[dict] | None) -> dict:
    gold = GOLD[preset]
    cfg = arm_config(preset, arm, args, out, base_gold_std)
    start = time.perf_counter()
    if arm == "guard":
        if plain_evals is None:
            raise ValueError("the guard arm replays the plain arm's evaluations (run plain first)")
        evals = guarded(cfg, plain_evals)
    else:
        run_local_loop(cfg)
        evals = RunDirectory(out / cfg.run_name).read_evals()
    proxy = LearningGain.from_evals(evals)
    gold_gain = LearningGain.from_evals(evals, f"eval_{gold}_mean")
    best = evals[-1]["eval_best_version"]  # by the proxy (eval.best_metric), before any guard stop
    stopped = evals[-1]["policy_version"] if evals[-1].get("eval_guard_stop") else None
    return {
        "preset": preset, "arm": arm, "gold": gold, "seconds": round(time.perf_counter() - start, 1),
        "evals": evals,
        "proxy": proxy.row(), "gold_record": gold_gain.row(),
        "best_version": best,
        "gold_at_best": gold_gain.values[gold_gain.versions.index(best)] if best is not None else None,
        "gold_at_end": gold_gain.final,
        "gold_peak_version": gold_gain.best_version,
        "proxy_peak_version": proxy.best_version,
        "stopped_at_version": stopped,
    }


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    presets = list(dict.fromkeys(r["preset"] for r in results))
    arms = list(dict.fromkeys(r["arm"] for r in results))
    fig = Figure(figsize=(4.5 * len(arms), 3.6 * len(presets)), dpi=100)
    FigureCanvasAgg(fig)
    for r in results:
        ax = fig.add_subplot(len(presets), len(arms), presets.index(r["preset"]) * len(arms) + arms.index(r["arm"]) + 1)
        for record, label, style in ((r["proxy"], "proxy (training reward)", "o-"), (r["gold_record"], r["gold"], "s--")):
            gains = [(v - record["values"][0]) / max(record["base_std"], 1e-12) for v in record["values"]]
            ax.plot(record["versions"], gains, style, markersize=3, label=label)
        ax.axvline(r["gold_peak_version"], color="gray", linestyle=":", label=f"gold peak v{r['gold_peak_version']}")
        if r["stopped_at_version"] is not None:
            ax.axvline(r["stopped_at_version"], color="red", alpha=0.6, label=f"guard stop v{r['stopped_at_version']}")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"{r['preset']}: {r['arm']}")
        ax.set_xlabel("policy version")
        ax.set_ylabel("held-out gain (base spreads)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=list(GOLD), choices=list(GOLD))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--kl-coef", type=float, default=0.1)
    parser.add_argument("--guard-spreads", type=float, default=0.5,
                        help="the guard arm stops when gold falls this many base gold spreads below its peak")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-dir", default="bench/results/overoptimization")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="no runs: one table and PNG from these overoptimization.json files")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.merge:
        results = [r for path in args.merge for r in json.loads(Path(path).read_text())["results"]]
        return report(results, args, out_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "guard" in args.arms and "plain" not in args.arms:
        parser.error("--arms guard needs plain too: its margin is in the plain run's base gold spreads")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.tasks:
            base_gold_std, plain_evals = None, None
            for arm in [a for a in ARMS if a in args.arms]:
                r = run_arm(preset, arm, args, Path(tmp), base_gold_std, plain_evals)
                if arm == "plain":
                    base_gold_std, plain_evals = r["gold_record"]["base_std"], r["evals"]
                results.append(r)
                print(f"{preset} {arm}: proxy {r['proxy']['base']:+.4f} -> {r['proxy']['final']:+.4f} "
                      f"(peak v{r['proxy_peak_version']}); gold {r['gold_record']['base']:+.4f} -> "
                      f"{r['gold_at_end']:+.4f} (peak v{r['gold_peak_version']}) | {r['seconds']:.0f}s", flush=True)
    return report(results, args, out_dir)


def report(results: list[dict], args, out_dir: Path) -> int:
    print(f"\n{'task':16s} {'arm':6s} {'gold base':>9s} {'gold@best':>9s} {'gold@end':>9s} {'best v':>6s} "
          f"{'gold peak v':>11s} {'proxy peak v':>12s} {'guard stop v':>12s}")
    for r in results:
        fmt = lambda v: f"{v:+9.4f}" if v is not None and math.isfinite(v) else f"{'-':>9s}"  # noqa: E731
        print(f"{r['preset']:16s} {r['arm']:6s} {r['gold_record']['base']:+9.4f} {fmt(r['gold_at_best'])} "
              f"{r['gold_at_end']:+9.4f} {str(r['best_version']):>6s} {r['gold_peak_version']:11d} "
              f"{r['proxy_peak_version']:12d} {str(r['stopped_at_version'] or 'never'):>12s}")
    png = out_dir / "overoptimization.png"
    plot(results, png)
    (out_dir / "overoptimization.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
    print(f"wrote {png} and {out_dir / 'overoptimization.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
