"""End-to-end benchmark: the Ray system against the single-process loop, on `tiny`.

(a) epoch time of `run_distributed` (1 sampler, 1 learner worker, staleness 0, the product's
    defaults: 1 CPU reserved each, `cluster.torch_threads: auto`, so each uses the machine's cores
    while its phase runs) vs `ddpo_ray.local.run` doing the same work (target: <= 1.05x), and
    the same Ray run with `cluster.torch_threads=reserved` (one thread each, the old default);
(b) staleness 1 vs 0: wall time per epoch of the Ray system; at staleness 1 the sampler and the
    learner run at the same time, so `auto` gives each its reserved CPUs as torch threads (two
    processes with all the cores' threads each oversubscribe them: measured 2.5x slower);
(c) weight-sync latency: publish a LoRA of rank 4 / 16 / 64 once, 1 / 2 / 4 samplers fetch it
    and load it into their UNet; time from publish to all loaded;
(d) the time split per phase of the Ray run (sampling, waiting for rewards, training, sync);
(e) what the ddpo_* metrics cost: the staleness-0 run again with `metrics=false`;
(f) time to first epoch: `python -m ddpo_ray.run num_epochs=1` as a user starts it (its own
    local cluster, before this bench starts one), seconds until its `eval v0` and `epoch 0` lines;
(g) whole-run memory: the peak, over the staleness-0 run, of the summed PSS (proportional set
    size: shared pages split between the processes sharing them, so the sum is not inflated) of
    this process and every process under it (Ray's daemons, the sampler, the learner, Serve
    replicas);
(h) sampling against a plain call: one tiny sampling batch through the LoRA adapter, merged (what
    samplers do) and adapter-free (`bench/merged_sampling.py`), and the sampler actor's batch time;
(i) what the cluster costs the sampler: the same `Sampler` batches (the recipe's epoch, what the
    actor runs per batch, its reward client scoring nothing) in a fresh process before Ray starts,
    in one beside the cluster once its runs are over, and in a Ray task on it.
The first epoch of each run (start-up, warm-up) is left out of epoch times. Prints figures;
writes JSON. Run it twice to see the noise of this machine.

    python bench/e2e.py                  # 4 epochs per run, a few minutes on 2 cores
    python bench/e2e.py --epochs 6 --skip-sync
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch

from ddpo_ray.config import build_config
from ddpo_ray.distributed.driver import run_distributed
from ddpo_ray.training.local_loop import run_local
from reward_services.client import ensure_reward_apps

from merged_sampling import measure as measure_sampling  # bench/ is on sys.path: scripts run as bench/*.py


def steady_epoch_time(history: list[dict]) -> float:
    return statistics.median(m["time_epoch"] for m in history[1:])


def wall_per_epoch(history: list[dict], total: float) -> float:
    return total / len(history)


@ray.remote(num_cpus=0.5)
class SyncProbe:
    """A tiny UNet with a LoRA of the given rank, loading published weights like a sampler does."""

    def __init__(self, rank: int):
        from ddpo_ray.config import ModelConfig
        from ddpo_ray.models.lora import trainable_parameters
        from ddpo_ray.models.pipelines import load_pipeline

        torch.set_num_threads(1)
        self.unet = load_pipeline(ModelConfig(pretrained="tiny-random")).unet
        trainable_parameters(self.unet, True, rank)

    def apply(self, weights) -> float:
        from ddpo_ray.distributed.weight_transport import ObjectStoreTransport
        from ddpo_ray.models.lora import load_trainable_state_dict

        load_trainable_state_dict(self.unet, True, ObjectStoreTransport().fetch(weights))
        return time.time()


def time_to_first_epoch(tmp: str) -> dict:
    """Seconds from starting `python -m ddpo_ray.run num_epochs=1` to its eval v0 / epoch 0 lines."""
    command = [sys.executable, "-u", "-m", "ddpo_ray.run", "num_epochs=1", f"output_dir={tmp}", "run_name=first-epoch"]
    start = time.perf_counter()
    marks: dict[str, float] = {}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}) as process:
        for line in process.stdout:
            for mark, prefix in (("ray_started_s", "started a local Ray cluster"),
                                 ("rewards_deployed_s", "deployed reward applications"),
                                 ("eval_v0_s", "eval v0"), ("epoch0_s", "epoch    0")):
                if line.startswith(prefix) and mark not in marks:
                    marks[mark] = time.perf_counter() - start
        returncode = process.wait()
    marks["whole_process_s"] = time.perf_counter() - start
    if returncode != 0 or "epoch0_s" not in marks:
        raise RuntimeError(f"{' '.join(command)} exited {returncode} after {marks}")
    return marks


class MemoryWatch:
    """Peak summed PSS of this process and all its descendants, sampled every `period_s`."""

    def __init__(self, period_s: float = 0.5):
        import psutil

        self._psutil, self._period_s = psutil, period_s
        self.peak_bytes, self.peak_processes = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _total(self) -> tuple[int, int]:
        me = self._psutil.Process()
        total, count = 0, 0
        for process in [me, *me.children(recursive=True)]:
            try:
                total += process.memory_full_info().pss
                count += 1
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                pass  # ended between listing and reading
        return total, count

    def _watch(self) -> None:
        while not self._stop.is_set():
            total, count = self._total()
            if total > self.peak_bytes:
                self.peak_bytes, self.peak_processes = total, count
            self._stop.wait(self._period_s)

    def __enter__(self) -> "MemoryWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def sampler_batch_s(rounds: int = 3) -> float:
    """Median seconds of one sampling batch through `Sampler._sample` (what the sampler actor runs
    per batch) with the machine's cores as torch threads, over `rounds` epochs after a warm-up.
    On the calling thread: this process's torch already runs on its main thread (see TorchThread)."""
    from ddpo_ray.distributed.sampler import Sampler, SampleTask
    from ddpo_ray.distributed.weight_transport import INITIAL_POLICY
    from ddpo_ray.prompts import get_prompts

    class ScoresNothing:  # the sampler is timed, not the rewards (no Serve before Ray starts)
        def submit(self, images, prompts):
            return None

    cfg = build_config()
    torch.set_num_threads(os.cpu_count() or 2)
    sampler = Sampler(cfg, 0, reward_client=ScoresNothing())
    sampler.apply_weights(INITIAL_POLICY)
    prompts, batches = get_prompts(cfg.prompts.name), cfg.sample.num_batches_per_epoch
    per_batch = []
    for epoch in range(rounds + 1):
        start = time.perf_counter()
        for b in range(batches):  # each batch one prompt's group, as the recipe lays them out
            task = SampleTask(epoch=epoch, batch_index=b, prompts=(prompts[b % len(prompts)],) * cfg.sample.batch_size)
            sampler._sample(task, INITIAL_POLICY)
        per_batch.append((time.perf_counter() - start) / batches)
    return statistics.median(per_batch[1:])


def sampler_batch_in_fresh_process() -> float:
    """`sampler_batch_s` in a new Python process (no Ray in it), which leaves nothing behind here."""
    code = "import e2e; print(e2e.sampler_batch_s())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def sync_latency(rank: int, num_samplers: int, repeats: int = 5) -> dict:
    from ddpo_ray.config import ModelConfig
    from ddpo_ray.distributed.weight_transport import ObjectStoreTransport
    from ddpo_ray.models.lora import trainable_parameters, trainable_state_dict
    from ddpo_ray.models.pipelines import load_pipeline

    unet = load_pipeline(ModelConfig(pretrained="tiny-random")).unet
    trainable_parameters(unet, True, rank)
    state = trainable_state_dict(unet, True)
    probes = [SyncProbe.remote(rank) for _ in range(num_samplers)]
    ray.get([p.apply.remote(ObjectStoreTransport().publish(state, 0)) for p in probes])  # warm up
    times = []
    for version in range(1, repeats + 1):
        start = time.time()
        weights = ObjectStoreTransport().publish(state, version)
        done = ray.get([p.apply.remote(weights) for p in probes])
        times.append(max(done) - start)
    for p in probes:
        ray.kill(p)
    return {"lora_rank": rank, "samplers": num_samplers, "bytes": weights.num_bytes,
            "latency_ms_median": 1000 * statistics.median(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--skip-sync", action="store_true")
    parser.add_argument("--out", default="bench/results/e2e.json")
    args = parser.parse_args()
    cpus = os.cpu_count() or 2
    work = [f"num_epochs={args.epochs}", "save_freq=0", "cluster.num_samplers=1"]
    half = [f"cluster.cpus_per_sampler={max(1, cpus // 2)}", f"cluster.cpus_per_learner_worker={max(1, cpus // 2)}"]
    results: dict = {"cpus": cpus, "epochs": args.epochs, "work_steps": build_config().sample.num_steps}
    with tempfile.TemporaryDirectory() as tmp:
        results["first_epoch"] = time_to_first_epoch(tmp)  # before this bench's cluster: one at a time
        results["plain_call"] = measure_sampling(build_config(overrides=["sample.num_steps=20"]), repeats=3, threads=cpus)
        results["sampler_batch_plain_process_s"] = sampler_batch_in_fresh_process()  # no Ray running
        ray.init(num_cpus=2 * cpus + 4, include_dashboard=False, log_to_driver=False)
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        ensure_reward_apps(["jpeg_compressibility"])

        torch.set_num_threads(cpus)
        start = time.perf_counter()
        local = run_local(build_config(overrides=[*work, f"output_dir={tmp}", "run_name=local"]))
        local_total = time.perf_counter() - start
        runs = {}
        for name, extra in [(0, ["cluster.staleness=0"]), ("reserved", ["cluster.torch_threads=reserved"]),
                            (1, [*half, "cluster.staleness=1"]),
                            ("no_metrics", ["cluster.staleness=0", "metrics=false"])]:
            start = time.perf_counter()
            with MemoryWatch() as memory:
                history = run_distributed(build_config(overrides=[*work, *extra, f"output_dir={tmp}", f"run_name=ray{name}"]))
            runs[name] = (history, time.perf_counter() - start)
            if name == 0:
                results["whole_run_memory_gb"] = memory.peak_bytes / 2**30
                results["whole_run_processes"] = memory.peak_processes

        ray0, ray0_total = runs[0]
        ray1, ray1_total = runs[1]
        results["epoch_time_local_s"] = steady_epoch_time(local)
        results["epoch_time_ray_s"] = steady_epoch_time(ray0)
        results["ray_vs_local"] = results["epoch_time_ray_s"] / results["epoch_time_local_s"]
        results["epoch_time_ray_reserved_threads_s"] = steady_epoch_time(runs["reserved"][0])
        results["reserved_threads_vs_local"] = results["epoch_time_ray_reserved_threads_s"] / results["epoch_time_local_s"]
        results["wall_per_epoch_local_s"] = wall_per_epoch(local, local_total)
        results["wall_per_epoch_ray_staleness0_s"] = wall_per_epoch(ray0, ray0_total)
        results["wall_per_epoch_ray_staleness1_s"] = wall_per_epoch(ray1, ray1_total)
        results["staleness1_vs_0_wall"] = ray1_total / ray0_total
        results["epoch_time_ray_no_metrics_s"] = steady_epoch_time(runs["no_metrics"][0])
        results["metrics_on_vs_off"] = results["epoch_time_ray_s"] / results["epoch_time_ray_no_metrics_s"]
        phases = ("time_sampling", "time_reward", "time_training", "time_weight_sync", "time_waiting_for_learner")
        results["phases_ray_staleness0_s"] = {k: statistics.median(m[k] for m in ray0[1:]) for k in phases}
        results["phases_local_s"] = {k: statistics.median(m[k] for m in local[1:])
                                     for k in ("time_sampling", "time_reward", "time_training")}
        # One sampler samples the epoch's batches in order: its batch time is the phase over the batches.
        batches = build_config().sample.num_batches_per_epoch
        results["sampler_batch_s"] = results["phases_ray_staleness0_s"]["time_sampling"] / batches
        if not args.skip_sync:
            results["weight_sync"] = [sync_latency(r, n) for r in (4, 16, 64) for n in (1, 2, 4)]
        # After the runs, so the pipelines these load are in no memory figure above.
        results["sampler_batch_beside_idle_cluster_s"] = sampler_batch_in_fresh_process()
        results["sampler_batch_in_ray_task_s"] = ray.get(ray.remote(num_cpus=1)(sampler_batch_s).remote())
        ray.shutdown()

    print(f"epoch time (steady, median): local {results['epoch_time_local_s']:.2f}s, "
          f"ray staleness 0 {results['epoch_time_ray_s']:.2f}s -> {results['ray_vs_local']:.3f}x (target <= 1.05); "
          f"with one thread each (torch_threads=reserved) {results['epoch_time_ray_reserved_threads_s']:.2f}s -> "
          f"{results['reserved_threads_vs_local']:.3f}x")
    print(f"wall per epoch incl. start-up: local {results['wall_per_epoch_local_s']:.2f}s, ray s0 "
          f"{results['wall_per_epoch_ray_staleness0_s']:.2f}s, ray s1 {results['wall_per_epoch_ray_staleness1_s']:.2f}s "
          f"(s1/s0 {results['staleness1_vs_0_wall']:.3f}x)")
    print(f"metrics: epoch {results['epoch_time_ray_s']:.2f}s with, {results['epoch_time_ray_no_metrics_s']:.2f}s "
          f"without -> {results['metrics_on_vs_off']:.3f}x")
    print("phases, ray staleness 0 (median s):", {k: round(v, 3) for k, v in results["phases_ray_staleness0_s"].items()})
    print("phases, local (median s):", {k: round(v, 3) for k, v in results["phases_local_s"].items()})
    first = results["first_epoch"]
    print(f"time to first epoch (python -m ddpo_ray.run): Ray up {first.get('ray_started_s', 0):.1f}s, rewards "
          f"deployed {first.get('rewards_deployed_s', 0):.1f}s, eval v0 {first.get('eval_v0_s', 0):.1f}s, epoch 0 "
          f"{first['epoch0_s']:.1f}s, whole 1-epoch process {first['whole_process_s']:.1f}s")
    print(f"whole-run memory (staleness 0, summed PSS of {results['whole_run_processes']} processes): "
          f"{results['whole_run_memory_gb']:.2f} GB (target < 3)")
    plain = results["plain_call"]
    print(f"one sampling batch ({plain['batch_size']} x {plain['num_steps']} steps, CFG): adapter "
          f"{plain['seconds']['adapter']:.3f}s, merged {plain['seconds']['merged']:.3f}s, adapter-free "
          f"{plain['seconds']['adapter-free']:.3f}s -> merged / adapter-free {plain['merged_over_adapter_free']:.3f} "
          f"(target <= 1.05); sampler actor batch in the Ray run ({results['work_steps']} steps) "
          f"{results['sampler_batch_s']:.3f}s")
    print(f"sampler batch, the same code: plain process {results['sampler_batch_plain_process_s']:.3f}s, beside the "
          f"idle cluster {results['sampler_batch_beside_idle_cluster_s']:.3f}s, in a Ray task "
          f"{results['sampler_batch_in_ray_task_s']:.3f}s, in the Ray run {results['sampler_batch_s']:.3f}s")
    for row in results.get("weight_sync", []):
        print(f"weight sync: LoRA rank {row['lora_rank']:3d} ({row['bytes'] / 1e3:.0f} kB) to {row['samplers']} "
              f"sampler(s): {row['latency_ms_median']:.1f} ms")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
