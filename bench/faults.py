"""The fault matrix with figures: each fault injected into a real run, and how the run came out.

A two-node cluster on loopback (`ray.cluster_utils.Cluster`: a head node, and a second node
added after the reward apps are deployed, so only a sampler lands there); a small `tiny` run
(2 samplers, one per node through the custom resource `sampler_slot`, 4 batches of 4 per epoch,
a checkpoint every epoch, no evaluation) per fault. For each fault: the outcome (recovered,
stopped with an error, or still waiting at the deadline), the seconds from the fault to the
end of the epoch it hit (recovered) or to the error (stopped), a normal epoch's time beside
it, and the samples of every epoch (the configured count each time means none was lost or
counted twice). The same faults are tested in `tests/test_fault_matrix.py` and
`tests/test_system.py`; this measures them.

Faults a CPU cannot produce for real are stood in for, as in the tests: a sampler whose
`sample` raises is a task with the wrong prompt count. Everything else is real: actors killed
with `ray.kill`, Ray Train worker processes and the driver with SIGKILL, a node removed.

    python bench/faults.py                   # every fault, ~10 minutes on 2 cores
    python bench/faults.py --faults sampler_killed node_removed
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray

from ddpo_ray.config import DDPOConfig, build_config
from ddpo_ray.distributed.driver import RayBackend
from ddpo_ray.training.epoch_loop import EpochLoop

REPO = Path(__file__).resolve().parents[1]
SAMPLES = 16  # 4 batches of 4 per epoch
RUN = [
    "num_epochs=4", "save_freq=1", "metrics=false", "eval.every=0", "sample.num_steps=4", "sample.batch_size=4",
    "sample.num_batches_per_epoch=4", "sample.samples_per_prompt=1", "sample.initial_noise=per_sample", "advantage.mode=batch", "train.batch_size=8",
    "train.learning_rate=3e-4", "train.lr_schedule=constant", "cluster.num_samplers=2", "cluster.cpus_per_sampler=1",
    "cluster.cpus_per_learner_worker=0.5", "cluster.sampler_resources={sampler_slot: 1}",
    "cluster.torch_threads=reserved",
]
DEADLINE_S = 300.0  # a run still going this long after its fault is reported as waiting


@dataclass
class FaultRow:
    fault: str
    outcome: str  # recovered | stopped with error | still waiting (a hang)
    seconds: float | None  # fault -> end of the epoch it hit (recovered), or -> the error
    normal_epoch_s: float | None
    samples: list[int] = field(default_factory=list)
    detail: str = ""


class WatchedRun:
    """A run on a thread: when each epoch ended, its samples, and how the run ended."""

    def __init__(self, cfg: DDPOConfig, on_epoch: Callable[[dict], None] | None = None):
        self.cfg, self.backend = cfg, RayBackend(cfg)
        self.epoch_ends: dict[int, float] = {}
        self.samples: list[int] = []
        self.history: list[dict] = []
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self._on_epoch = on_epoch
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _epoch(self, metrics: dict) -> None:
        self.epoch_ends[metrics["epoch"]] = time.monotonic()
        self.samples.append(int(metrics["samples"]))
        self.history.append(metrics)
        if self._on_epoch:
            self._on_epoch(metrics)

    def _run(self) -> None:
        try:
            EpochLoop(self.cfg, self.backend, exporter="ray", on_epoch=self._epoch).run()
        except BaseException as exc:  # noqa: BLE001 - reported in the table
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def wait_epoch(self, epoch: int, timeout_s: float = 240.0) -> None:
        wait_until(lambda: epoch in self.epoch_ends or not self.thread.is_alive(), timeout_s, f"epoch {epoch}")

    def row(self, fault: str, fault_at: float) -> FaultRow:
        self.thread.join(DEADLINE_S)
        ends = sorted(self.epoch_ends.items())
        # Epochs the fault did not hit (from one epoch's end to the next, so not epoch 0's start-up).
        normal = [b - a for (_, a), (_, b) in zip(ends, ends[1:]) if not a < fault_at <= b]
        normal_s = statistics.median(normal) if normal else None
        if self.thread.is_alive():
            outcome, seconds, detail = "still waiting (a hang)", None, f"nothing after {DEADLINE_S:.0f} s"
        elif self.error is not None:
            outcome, seconds = "stopped with error", self.ended_at - fault_at
            detail = f"{type(self.error).__name__}: {str(self.error)[:400]}"
        else:
            after = [t for _, t in ends if t > fault_at]
            outcome, seconds, detail = "recovered", (after[0] - fault_at) if after else None, ""
        return FaultRow(fault, outcome, seconds, normal_s, self.samples, detail)


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"bench: {what} did not happen within {timeout_s:g} s")


def config(tmp: Path, name: str, *extra: str) -> DDPOConfig:
    return build_config(overrides=[*RUN, f"output_dir={tmp}", f"run_name={name}", *extra])


def sampled(actor_name: str) -> int:
    try:
        return ray.get(ray.get_actor(actor_name).stats.remote(), timeout=5)["batches_sampled"]
    except Exception:  # noqa: BLE001 - not there (yet), or dead
        return -1


def train_worker_pids() -> list[int]:
    """Ray Train worker processes on this machine (Ray titles them `ray::RayTrainWorker...`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def in_epoch_1(tmp: Path, name: str, sampler: int) -> WatchedRun:
    """A run `name`, once sampler `sampler` has sampled its first batch of epoch 1."""
    run = WatchedRun(config(tmp, name))
    run.wait_epoch(0)
    actor = f"sampler-{name}-{sampler}"
    before = sampled(actor)
    wait_until(lambda: sampled(actor) > before, 120, f"{actor}'s first batch of epoch 1")
    return run


# --- the faults ---------------------------------------------------------------------------------
def sampler_killed(tmp: Path, cluster) -> FaultRow:
    run = in_epoch_1(tmp, "sampler-killed", 0)
    fault_at = time.monotonic()
    ray.kill(ray.get_actor("sampler-sampler-killed-0"), no_restart=False)  # dies with queued work, and restarts
    return run.row("sampler killed mid-epoch (it restarts)", fault_at)


def sampler_raises(tmp: Path, cluster) -> FaultRow:
    """Injected: the batch's task has one prompt for a batch of 4 (the path a CUDA OOM takes)."""
    from ddpo_ray.distributed.sampler import SampleTask
    from ddpo_ray.distributed.sampler_pool import SamplerPool
    from ddpo_ray.distributed.weight_transport import INITIAL_POLICY

    pool = SamplerPool(config(tmp, "sampler-raises"), name_prefix="bench-raises")
    try:
        fault_at = time.monotonic()
        try:
            pool.sample_epoch([SampleTask(0, 3, ("a red circle",))], INITIAL_POLICY)
            return FaultRow("sampler's sample raises", "no error", None, None)
        except Exception as exc:  # noqa: BLE001 - the outcome
            return FaultRow("sampler's sample raises", "stopped with error", time.monotonic() - fault_at, None,
                            detail=f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        pool.shutdown()


def replica_killed(tmp: Path, cluster) -> FaultRow:
    run = WatchedRun(config(tmp, "replica-killed"))
    run.wait_epoch(0)
    prefix = "SERVE_REPLICA::jpeg_compressibility#"
    (replica,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)][:1]
    wait_until(lambda: sampled("sampler-replica-killed-0") > 1, 120, "epoch 1's sampling")
    fault_at = time.monotonic()
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)  # Serve starts a new one
    return run.row("reward replica killed mid-epoch", fault_at)


def learner_worker_killed(tmp: Path, cluster, workers: int, staleness: int) -> FaultRow:
    name = f"learner-killed-{workers}w-s{staleness}"
    run = WatchedRun(config(tmp, name, f"cluster.learner_workers={workers}", f"cluster.staleness={staleness}"))
    wait_until(lambda: (tmp / name / "checkpoints/epoch_0000/COMPLETE").is_file(), 240, "the first checkpoint")
    pids = train_worker_pids()
    fault_at = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    row = run.row(f"learner worker killed (1 of {len(pids)}, staleness {staleness})", fault_at)
    if not row.detail:
        row.detail = f"learner_restarts per epoch {[m.get('learner_restarts') for m in run.history]}"
    return row


def exchange_killed(tmp: Path, cluster) -> FaultRow:
    holder: dict[str, float] = {}

    def kill_after_epoch_0(metrics: dict) -> None:
        if metrics["epoch"] == 0:
            holder["fault_at"] = time.monotonic()
            ray.kill(run.backend.learner.exchange)

    run = WatchedRun(config(tmp, "exchange-killed"), on_epoch=kill_after_epoch_0)
    run.wait_epoch(0)
    return run.row("epoch exchange killed", holder["fault_at"])


def node_removed(tmp: Path, cluster) -> FaultRow:
    """The second node holds sampler 1 and, in its object store, the trajectories it sampled."""
    run = in_epoch_1(tmp, "node-removed", 1)
    fault_at = time.monotonic()
    cluster.remove_node(next(iter(cluster.worker_nodes)))
    row = run.row("node holding a sampler and its trajectories removed", fault_at)
    cluster.add_node(num_cpus=1, resources={"sampler_slot": 1})  # for the faults after this one
    cluster.wait_for_nodes()
    return row


def driver_killed_then_resumed(tmp: Path, cluster) -> FaultRow:
    """`python -m ddpo_ray.run` against the cluster, SIGKILLed after its first checkpoint, then
    `resume_from=latest`: seconds from the resume command to its first epoch."""
    common = [*RUN, f"output_dir={tmp}", "run_name=driver-killed"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": cluster.address}
    driver = subprocess.Popen([sys.executable, "-m", "ddpo_ray.run", *common], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (tmp / "driver-killed/checkpoints/epoch_0000/COMPLETE").is_file(), 240, "the first checkpoint")
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    fault_at = time.monotonic()
    resumed = subprocess.Popen([sys.executable, "-u", "-m", "ddpo_ray.run", *common, "resume_from=latest"], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_epoch_at, tail = None, []
    for line in resumed.stdout:
        tail = (tail + [line])[-20:]
        if first_epoch_at is None and line.startswith("epoch "):
            first_epoch_at = time.monotonic()
    code = resumed.wait(DEADLINE_S)
    lines = (tmp / "driver-killed/metrics.jsonl").read_text().splitlines()
    samples = [json.loads(line)["samples"] for line in lines]
    epochs = [json.loads(line)["epoch"] for line in lines]
    if code != 0 or first_epoch_at is None:
        return FaultRow("driver killed, then resume_from=latest", "stopped with error", None, None, samples,
                        "".join(tail)[-300:])
    return FaultRow("driver killed, then resume_from=latest", "recovered", first_epoch_at - fault_at, None, samples,
                    f"epochs in metrics.jsonl {epochs} (seconds: resume command to its first epoch line)")


FAULTS: dict[str, Callable[[Path, Any], FaultRow]] = {
    "sampler_killed": sampler_killed,
    "sampler_raises": sampler_raises,
    "replica_killed": replica_killed,
    "learner_killed_1w_s0": lambda tmp, c: learner_worker_killed(tmp, c, 1, 0),
    "learner_killed_1w_s1": lambda tmp, c: learner_worker_killed(tmp, c, 1, 1),
    "learner_killed_2w_s0": lambda tmp, c: learner_worker_killed(tmp, c, 2, 0),
    "learner_killed_2w_s1": lambda tmp, c: learner_worker_killed(tmp, c, 2, 1),
    "exchange_killed": exchange_killed,
    "driver_killed": driver_killed_then_resumed,
    "node_removed": node_removed,  # last: it changes the cluster
}


def start_cluster():
    """Head (Serve and the reward apps land here), then the sampler node."""
    from ray import serve
    from ray.cluster_utils import Cluster

    from ddpo_ray.distributed.cluster import set_local_cluster_env
    from reward_services.client import ensure_reward_apps

    set_local_cluster_env()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 6, "resources": {"sampler_slot": 1}})
    ray.init(address=cluster.address, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    half = {"ray_actor_options": {"num_cpus": 0.5}}
    ensure_reward_apps(["jpeg_compressibility"], {"jpeg_compressibility": {"deployment_options": {"JpegReward": half}}})
    cluster.add_node(num_cpus=1, resources={"sampler_slot": 1})
    cluster.wait_for_nodes()
    return cluster


def print_table(rows: list[FaultRow]) -> None:
    print(f"\n{'fault':58s} {'outcome':24s} {'seconds':>8s} {'normal epoch':>12s}  samples per epoch")
    for r in rows:
        seconds = f"{r.seconds:8.1f}" if r.seconds is not None else f"{'-':>8s}"
        normal = f"{r.normal_epoch_s:12.1f}" if r.normal_epoch_s is not None else f"{'-':>12s}"
        print(f"{r.fault:58s} {r.outcome:24s} {seconds} {normal}  {r.samples}")
        if r.detail:
            print(f"{'':58s}   {r.detail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", nargs="+", default=list(FAULTS), choices=list(FAULTS))
    parser.add_argument("--out", default="bench/results/faults.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cluster = start_cluster()
    rows: list[FaultRow] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.faults:
                start = time.monotonic()
                try:
                    row = FAULTS[name](Path(tmp), cluster)
                except Exception as exc:  # noqa: BLE001 - the bench itself failed on this fault
                    row = FaultRow(name, "bench failed", None, None, detail=f"{type(exc).__name__}: {exc}"[:300])
                rows.append(row)
                print(f"{row.fault}: {row.outcome}"
                      f"{'' if row.seconds is None else f' in {row.seconds:.1f} s'}, samples {row.samples} "
                      f"({time.monotonic() - start:.0f} s)", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
