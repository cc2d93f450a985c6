"""One real Ray cluster and Serve instance per test session, shared by the reward-service tests.

Import the fixtures into a test module (`from tests.ray_fixtures import serve_instance, ...`).
Ray starts once (about 10 s here); its CPUs are logical, for bookkeeping (the replicas run one
torch thread each); HTTP listens on 127.0.0.1 on a free port. The four reward applications are
deployed once per session the way users deploy them: `serve run --non-blocking` of
deploy/serve.yaml (tiny offline models). Tests that take an application down or redeploy it
put it back, or `reward_apps` restarts it.
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
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SERVE_YAML = REPO / "deploy" / "serve.yaml"
ALL_REWARDS = ("jpeg_compressibility", "jpeg_incompressibility", "aesthetic", "llava_bertscore")
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
}


@dataclass
class ServeInstance:
    http_url: str  # http://127.0.0.1:<port>
    gcs_address: str
    metrics_url: str  # http://127.0.0.1:<port>/metrics: the node's metrics agent (Prometheus text)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Every test module that imports a fixture from here gets its own copy of it (pytest scopes a
# fixture by where it is defined), so the cluster is a process-wide singleton, shut down when the
# last session-scoped user is torn down (at the end of the session).
_instance: ServeInstance | None = None
_users = 0


@pytest.fixture(scope="session")
def serve_instance():
    global _instance, _users
    import ray
    from ray import serve

    if _instance is None:
        if ray.is_initialized():
            pytest.fail("a Ray cluster is already running in this process; the reward tests start their own")
        port, metrics_port = _free_port(), _free_port()
        # The dashboard writes Prometheus' service-discovery file (the metrics test reads it);
        # metrics are pushed to the agent every second instead of every 10.
        ray.init(
            num_cpus=12, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=_free_port(),
            log_to_driver=False, _metrics_export_port=metrics_port,
            _system_config={"metrics_report_interval_ms": 1000},
        )
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _instance = ServeInstance(
            http_url=f"http://127.0.0.1:{port}", gcs_address=ray.get_runtime_context().gcs_address,
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        )
    _users += 1
    try:
        yield _instance
    finally:
        _users -= 1
        if _users == 0:
            _instance = None
            serve.shutdown()
            ray.shutdown()


def expected_replicas(config_path: Path) -> dict[str, dict[str, int]]:
    """app -> deployment -> num_replicas, as a serve config file asks."""
    import yaml

    config = yaml.safe_load(config_path.read_text())
    return {
        app["name"]: {d["name"]: d.get("num_replicas", 1) for d in app.get("deployments", [])}
        for app in config["applications"]
    }


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


_yaml_deployed_on: ServeInstance | None = None


@pytest.fixture(scope="session")
def yaml_apps(serve_instance) -> ServeInstance:
    """The four applications of deploy/serve.yaml, deployed once with the serve CLI."""
    global _yaml_deployed_on
    if _yaml_deployed_on is not serve_instance:
        serve_run_config(SERVE_YAML, serve_instance)
        _yaml_deployed_on = serve_instance
    return serve_instance


@pytest.fixture
def reward_apps(yaml_apps) -> ServeInstance:
    """All four reward applications running: attached to, or restarted if a test removed one."""
    from reward_services.client import ensure_reward_apps

    ensure_reward_apps(ALL_REWARDS, TEST_APP_ARGS)
    return yaml_apps


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


def wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run in-process models on one thread, like a 1-CPU replica (and the CPU is shared: with
    2 threads on a busy 2-core machine the tiny LLaVA was 50x slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
