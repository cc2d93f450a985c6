"""A two-node cluster on loopback, and `ray job submit` of `python -m ddpo_ray.run` against it.

`ray.cluster_utils.Cluster` starts a head node (with the dashboard, which job submission goes
through) and a second node that alone has the custom resource `sampler_node`; the run asks
for it per sampler (`cluster.sampler_resources`), so both samplers must land there. The job is
submitted with the real `ray job submit` CLI. This cluster is separate from the session's: it
is started here and shut down at the end. Token auth follows this process's RAY_AUTH_MODE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import PLAIN, REPO, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    env_before = os.environ.get("RAY_AUTH_MODE")
    dashboard_port = free_port()
    # Each node's dashboard agent on a port of its own: at Ray's default (52365) the agent of a
    # cluster already running in this session (the tests' shared one) holds it, this head's agent
    # cannot start, and every job submission is refused with "No available agent".
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "include_dashboard": True, "dashboard_port": dashboard_port,
                        "dashboard_host": "127.0.0.1", "dashboard_agent_listen_port": free_port()},
    )
    worker = cluster.add_node(num_cpus=2, resources={"sampler_node": 2}, dashboard_agent_listen_port=free_port())
    cluster.wait_for_nodes()
    try:
        yield cluster, worker, f"http://127.0.0.1:{dashboard_port}"
    finally:
        cluster.shutdown()
        if env_before is not None:
            os.environ["RAY_AUTH_MODE"] = env_before


def test_job_submit_runs_samplers_on_the_second_node(two_node_cluster, tmp_path):
    cluster, worker, dashboard = two_node_cluster
    out = tmp_path / "outputs"
    # One word per argument: `ray job submit` quotes each when it builds the shell command.
    entrypoint = [
        sys.executable, "-m", "ddpo_ray.run", f"--serve-port={free_port()}", *PLAIN,
        "num_epochs=1", "sample.num_steps=3", "sample.batch_size=2", "sample.num_batches_per_epoch=2",
        "train.batch_size=2", "cluster.num_samplers=2", "cluster.cpus_per_sampler=0.5",
        "cluster.cpus_per_learner_worker=0.5", "cluster.sampler_resources={sampler_node: 1}",
        f"output_dir={out}", "run_name=job",
    ]
    ray_cli = str(Path(sys.executable).parent / "ray")
    # A new cluster's dashboard answers before its job agent has registered; Ray then refuses the
    # submission ("No available agent to submit job, please try again later") before starting
    # anything, so trying again cannot run the job twice. Seen after other Ray tests on 2 cores.
    for attempt in range(30):
        result = subprocess.run(
            [ray_cli, "job", "submit", "--address", dashboard, "--", *entrypoint],
            cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=400,
        )
        if "No available agent to submit job" not in result.stdout + result.stderr:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout.lower(), result.stdout[-3000:]
    (line,) = (out / "job" / "metrics.jsonl").read_text().splitlines()
    metrics = json.loads(line)
    assert metrics["samples"] == 4
    assert metrics["sampler_nodes"] == [worker.node_id]
