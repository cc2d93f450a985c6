"""Deployment files: docker-compose.yml (validated by Debian's docker-compose v1, offline), the
Dockerfile, the Prometheus config, the Grafana dashboard and provisioning, the KubeRay manifests.
No Docker engine or Kubernetes runs here; the metrics test scrapes a live run with this
Prometheus config and checks the dashboard's queries against it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from ddpo_ray.config import build_config
from ddpo_ray.metrics import metric_names
from reward_services.registry import REWARD_APPS
from tests.ray_fixtures import REPO

COMPOSE = REPO / "docker-compose.yml"
GRAFANA = REPO / "deploy" / "grafana"
KUBERAY = REPO / "deploy" / "kuberay"
IMAGE = "ddpo-ray:latest"


def compose_config() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed (make test installs it)")
def test_docker_compose_validates():
    env = {**os.environ, "RAY_AUTH_TOKEN": "test-token"}
    result = subprocess.run(["docker-compose", "config", "-q"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Without the token the file refuses to start a cluster (token auth is on).
    env.pop("RAY_AUTH_TOKEN")
    result = subprocess.run(["docker-compose", "config", "-q"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "RAY_AUTH_TOKEN" in result.stderr


def test_docker_compose_wires_ray_prometheus_and_grafana():
    services = compose_config()["services"]
    assert set(services) == {"ray-head", "ray-gpu-worker", "prometheus", "grafana"}
    head, worker = services["ray-head"], services["ray-gpu-worker"]
    assert head["build"]["dockerfile"] == "deploy/Dockerfile"
    assert head["image"] == worker["image"] == IMAGE
    assert "--head" in head["command"] and "--metrics-export-port=8080" in head["command"]
    assert "8265:8265" in head["ports"]
    for node in (head, worker):
        assert node["environment"]["RAY_AUTH_MODE"] == "token"
    assert "--address=ray-head:6379" in worker["command"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # Prometheus reads the service-discovery file the head writes into the shared /tmp/ray.
    assert "ray-tmp:/tmp/ray" in head["volumes"]
    assert "ray-tmp:/tmp/ray:ro" in services["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    grafana_volumes = services["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana_volumes
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana_volumes


def test_dockerfile_installs_this_package():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    for line in ("COPY ddpo_ray ddpo_ray", "COPY reward_services reward_services", "RUN pip install ."):
        assert line in dockerfile


def test_prometheus_config_uses_rays_service_discovery_file():
    from ray._private import ray_constants

    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == [f"/tmp/ray/{ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE}"]


def test_grafana_dashboard_and_provisioning():
    dashboard = json.loads((GRAFANA / "dashboards" / "ddpo-ray.json").read_text())
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "ddpo.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    (source,) = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090"
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert len(set(titles)) == len(titles)
    for wanted in ("Reward per epoch", "Sampling throughput", "Epoch time by phase", "Reward latency per pool",
                   "Replicas per pool", "PPO health"):
        assert any(title.startswith(wanted) for title in titles), wanted
    defined = set(metric_names())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"\b(ray_ddpo_[a-z0-9_]+)", target["expr"]):
                base = re.sub(r"_(total|bucket|sum|count)$", "", name[len("ray_"):])
                assert base in defined, f"panel {panel['title']!r} queries {name}, which no ddpo metric defines"


def kuberay_docs(name: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((KUBERAY / name).read_text())}


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec["template"]["spec"]["containers"]


def cluster_images(cluster: dict) -> set[str]:
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return {c["image"] for pod in pods for c in containers(pod)}


def check_serve_config(config: dict) -> None:
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        spec = REWARD_APPS[app["name"]]
        assert app["import_path"] == spec.import_path and app["route_prefix"] == spec.route_prefix
        assert {d["name"] for d in app["deployments"]} <= set(spec.deployments)


def test_kuberay_rayjob_runs_the_training_entrypoint(tmp_path):
    docs = kuberay_docs("rayjob.yaml")
    job = docs["RayJob"]["spec"]
    assert "python -m ddpo_ray.run --config /etc/ddpo/train.yaml" in job["entrypoint"]
    assert cluster_images(job["rayClusterSpec"]) == {IMAGE}
    assert job["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert job["submitterPodTemplate"]["spec"]["containers"][0]["image"] == IMAGE
    data = docs["ConfigMap"]["data"]
    (tmp_path / "train.yaml").write_text(data["train.yaml"])
    cfg = build_config(config_file=tmp_path / "train.yaml")  # what the entrypoint's --config loads
    check_serve_config(yaml.safe_load(data["serve.yaml"]))
    assert set(cfg.reward.components()) <= {app["name"] for app in yaml.safe_load(data["serve.yaml"])["applications"]}
    gpus = sum(g["replicas"] for g in job["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus >= cfg.cluster.num_samplers + cfg.cluster.learner_workers


def test_kuberay_rayservice_hosts_every_reward_pool():
    service = kuberay_docs("rayservice.yaml")["RayService"]["spec"]
    config = yaml.safe_load(service["serveConfigV2"])
    check_serve_config(config)
    assert {app["name"] for app in config["applications"]} == set(REWARD_APPS)
    assert cluster_images(service["rayClusterConfig"]) == {IMAGE}
    assert service["rayClusterConfig"]["rayVersion"] == ray.__version__
