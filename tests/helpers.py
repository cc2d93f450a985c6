"""Plain helpers and constants shared by several test files (fixtures live in conftest.py).

Test modules import from here, never from each other.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddpo_ray.infra.reward_names import REWARD_NAMES

REPO = Path(__file__).resolve().parents[1]
SERVE_YAML = REPO / "deploy" / "serve.yaml"
ALL_REWARDS = REWARD_NAMES
HALF_CPU = {"ray_actor_options": {"num_cpus": 0.5}}

# Builder arguments used by the tests: the offline tiny models, small CPU shares.
TEST_APP_ARGS = {
    "jpeg_compressibility": {"deployment_options": {"JpegReward": HALF_CPU}},
    "jpeg_incompressibility": {"deployment_options": {"JpegReward": HALF_CPU}},
    "aesthetic": {"model": {"device": "cpu"}, "deployment_options": {"AestheticScorer": HALF_CPU}},
    "llava_bertscore": {
        "captioner": {"device": "cpu"},
        "bertscore": {"device": "cpu"},
        "deployment_options": {
            "LlavaCaptioner": HALF_CPU,
            "BertScorer": HALF_CPU,
            "LlavaBertScore": {"ray_actor_options": {"num_cpus": 0.1}},
        },
    },
    "aesthetic_gold": {"deployment_options": {"GoldReward": HALF_CPU}},
    "alignment_gold": {"device": "cpu", "deployment_options": {"GoldReward": HALF_CPU}},
}

# The `tiny` preset is a learning recipe (many samples per prompt, group advantages, a high
# learning rate, an evaluation every epoch). Tests of the mechanics pin the plain settings they
# were written against (the schema's defaults), so the recipe can change without moving them.
PLAIN = [
    "num_epochs=5", "save_freq=1", "sample.num_steps=20", "sample.batch_size=8", "sample.num_batches_per_epoch=4",
    "sample.samples_per_prompt=1", "sample.initial_noise=per_sample", "advantage.mode=batch", "train.batch_size=8", "train.learning_rate=3e-4",
    "train.clip_range=1e-4", "train.lr_schedule=constant", "train.step_weighting=uniform", "eval.every=5",
    "eval.prompts_per_group=4", "eval.eta=0",
]

# A small run of the tiny model (config overrides): small epochs; half-CPU actors (one torch
# thread each) so a distributed run fits the shared test cluster. The single-process loop
# ignores the cluster.* entries.
SMALL = [
    *PLAIN,
    "sample.num_steps=4", "sample.batch_size=4", "sample.num_batches_per_epoch=2", "train.batch_size=4",
    "cluster.cpus_per_sampler=0.5", "cluster.cpus_per_learner_worker=0.5",
]


@dataclass
class ServeInstance:
    http_url: str  # http://127.0.0.1:<port>
    gcs_address: str
    metrics_url: str  # http://127.0.0.1:<port>/metrics: the node's metrics agent (Prometheus text)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def randomize_lora(unet: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """LoRA B starts at zero (adapter = identity); give it values so it changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def sample_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Images with structure (gradients + a rectangle) and noise of varying strength, so that
    JPEG sizes and model outputs differ from image to image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for i in range(n):
        base = np.stack([x, y, (x + y) / 2], axis=-1) * rng.uniform(60, 255, 3)
        top, left = rng.integers(0, size // 2, 2)
        base[top : top + size // 3, left : left + size // 3] = rng.uniform(0, 255, 3)
        noise = rng.normal(0, 40 * (i % 4) / 3, base.shape)
        images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return np.stack(images)


def train_worker_pids() -> list[int]:
    """Live Ray Train worker processes on this machine (the cluster runs here; no dashboard, so
    no state API: Ray titles its worker processes `ray::<ActorClass>...`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(entry.name))
        except OSError:
            continue  # exited while we looked
    return pids


def wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.5, what: str = "condition"):
    """Poll `predicate` until it returns something truthy (returned); fail after `timeout_s`.
    The timeout only bounds a hang: no assertion depends on how long the wait took."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# --- Ray Serve (import ray lazily: the pure tests never load it) ----------------------------


def expected_replicas(config_path: Path) -> dict[str, dict[str, int]]:
    """app -> deployment -> num_replicas, as a serve config file asks."""
    import yaml

    config = yaml.safe_load(config_path.read_text())
    return {
        app["name"]: {d["name"]: d.get("num_replicas", 1) for d in app.get("deployments", [])}
        for app in config["applications"]
    }


def replica_actor_names(app_name: str, deployment_name: str) -> list[str]:
    """Names of the live replica actors of one deployment (Serve names them SERVE_REPLICA::app#dep#id)."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{deployment_name}#"
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    )


def running_replicas(app_name: str) -> dict[str, int]:
    """deployment name -> RUNNING replica count, from serve.status()."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items()}


def serve_run_config(config_path: Path, instance: ServeInstance, timeout_s: float = 300.0) -> None:
    """`serve run --non-blocking --address <this cluster> FILE` (the real CLI, in a subprocess),
    then wait until every application runs the replica counts the file asks for."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    serve_cli = Path(sys.executable).parent / "serve"
    result = subprocess.run(
        [str(serve_cli), "run", "--non-blocking", "--address", instance.gcs_address, str(config_path)],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Submitted deploy config successfully" in result.stdout + result.stderr
    expected = expected_replicas(config_path)

    def all_running() -> bool:
        apps = serve.status().applications
        return all(
            name in apps
            and apps[name].status == ApplicationStatus.RUNNING
            and running_replicas(name) == counts
            for name, counts in expected.items()
        )

    wait_for(all_running, timeout_s=timeout_s, what=f"the applications of {config_path.name}")


def mean_over_ranks_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank of a real gloo process group reducing metrics (torch.multiprocessing.spawn target)."""
    import json

    import torch.distributed as dist

    from ddpo_ray.training.collectives import mean_over_ranks, reduction_device

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        device = reduction_device(dist.get_backend(), "cpu")
        metrics = {"loss": float(rank + 1), "ratio_max_dev": 0.1 * rank, "clipfrac": 0.5 * rank}
        reduced = mean_over_ranks(metrics, device)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"device": str(device), **reduced}))
    finally:
        dist.destroy_process_group()


def run_bench_script(name: str, *args: str, timeout: float) -> "subprocess.CompletedProcess":
    """`python bench/<name> ARGS` from the repo, offline, with every GPU hidden
    (CUDA_VISIBLE_DEVICES=""), so "no CUDA" holds on every machine."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(REPO / "bench" / name), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
