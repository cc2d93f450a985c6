"""Shared fixtures. Everything runs on the CPU, offline (HF_HUB_OFFLINE=1), with tiny models.

The Ray fixtures: one real Ray cluster and Serve instance per test session, started only when
a test asks for one (about 10 s here). Its CPUs are logical, for bookkeeping (the replicas run
one torch thread each); HTTP listens on 127.0.0.1 on a free port. The four reward applications
are deployed once per session the way users deploy them: `serve run --non-blocking` of
deploy/serve.yaml (tiny offline models). Tests that take an application down or redeploy it put
it back, or `reward_apps` restarts it. A test that uses one of them is marked `ray` here, so
`-m "not ray"` leaves it out even where its module forgot the marker.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from ddpo_ray.models.pipelines import build_tiny_random_pipeline
from tests.helpers import (
    ALL_REWARDS,
    SERVE_YAML,
    TEST_APP_ARGS,
    ServeInstance,
    free_port,
    serve_run_config,
)

RAY_FIXTURES = {"serve_instance", "yaml_apps", "reward_apps"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(item.fixturenames) and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)


@pytest.fixture
def tiny_pipe():
    """A fresh tiny pipeline (fp32, CPU, frozen); tests may add LoRA and change weights."""
    pipe = build_tiny_random_pipeline(seed=0)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return pipe


@pytest.fixture(scope="session")
def serve_instance() -> ServeInstance:
    """Ray and Serve in this process, for the whole session; shut down at its end."""
    import ray
    from ray import serve

    if ray.is_initialized():
        pytest.fail("a Ray cluster is already running in this process; the reward tests start their own")
    from ddpo_ray.distributed.cluster import set_local_cluster_env

    set_local_cluster_env()  # as the product's own local clusters: a patient Serve proxy check
    port, metrics_port = free_port(), free_port()
    # The dashboard writes Prometheus' service-discovery file (the metrics test reads it);
    # metrics are pushed to the agent every second instead of every 10.
    ray.init(
        num_cpus=12, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
        log_to_driver=False, _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield ServeInstance(
            http_url=f"http://127.0.0.1:{port}", gcs_address=ray.get_runtime_context().gcs_address,
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        )
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def yaml_apps(serve_instance) -> ServeInstance:
    """The four applications of deploy/serve.yaml, deployed once with the serve CLI."""
    serve_run_config(SERVE_YAML, serve_instance)
    return serve_instance


@pytest.fixture
def reward_apps(yaml_apps) -> ServeInstance:
    """All four reward applications running: attached to, or restarted if a test removed one."""
    from reward_services.client import ensure_reward_apps

    ensure_reward_apps(ALL_REWARDS, TEST_APP_ARGS)
    return yaml_apps


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run in-process models on one thread, like a 1-CPU replica (and the CPU is shared: with
    2 threads on a busy 2-core machine the tiny LLaVA was 50x slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
