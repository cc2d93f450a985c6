"""Deployment files: docker-compose.yml (validated by Debian's docker-compose v1, offline), the
Dockerfile, the Prometheus config, the Grafana dashboard and provisioning, the KubeRay manifests.
No Docker engine or Kubernetes runs here; the metrics test scrapes a live run with this
Prometheus config and checks the dashboard's queries against it."""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema
from setuptools import find_packages

from ddpo_ray.config import build_config
from ddpo_ray.infra.reward_names import GOLD_REWARDS
from ddpo_ray.records.metrics import metric_names
from reward_services.registry import REWARD_APPS
from tests.helpers import REPO, SERVE_YAML

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

COMPOSE = REPO / "docker-compose.yml"
GRAFANA = REPO / "deploy" / "grafana"
KUBERAY = REPO / "deploy" / "kuberay"
IMAGE = "ddpo-ray:latest"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"


def compose_config() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # YAML merge keys (<<: *ray-node) resolved


@dataclass(frozen=True)
class Mount:
    source: str  # a named volume, or a host path resolved against the compose file's directory
    target: str
    read_only: bool
    named: bool  # a named volume (shared between services), not a bind mount


def mounts(service: dict) -> list[Mount]:
    """A service's volumes, short ("src:dst[:ro]") or long syntax, as Mounts."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume["target"]
            read_only = bool(volume.get("read_only"))
        else:
            source, target, *mode = volume.split(":")
            read_only = "ro" in mode
        named = volume.get("type") == "volume" if isinstance(volume, dict) else not source.startswith((".", "/", "~"))
        if not named:
            source = str((COMPOSE.parent / source).resolve())
        found.append(Mount(source, target, read_only, named))
    return found


def mount_holding(service: dict, path: str) -> tuple[Mount, str]:
    """The mount a container path lies in (the deepest one), and the path relative to it."""
    within = [m for m in mounts(service) if path == m.target or path.startswith(m.target.rstrip("/") + "/")]
    assert within, f"nothing is mounted at {path} ({service.get('volumes')})"
    mount = max(within, key=lambda m: len(m.target))
    return mount, posixpath.relpath(path, mount.target)


def flags(command: str | list[str]) -> dict[str, str | bool]:
    """--name=value / --name value / --name of a command line, by name."""
    words = shlex.split(command) if isinstance(command, str) else list(command)
    found: dict[str, str | bool] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if eq:
                found[name] = value
            elif i + 1 < len(words) and not words[i + 1].startswith("--"):
                found[name] = words[i + 1]
            else:
                found[name] = True
    return found


def published_container_ports(service: dict) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).split("/")[0].rsplit(":", 1)[-1]))
    return ports


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed (make test installs it)")
def test_docker_compose_validates():
    env = {**os.environ, "RAY_AUTH_TOKEN": "test-token", "GRAFANA_ADMIN_PASSWORD": "test-password"}
    for name in ("DDPO_BIND_ADDRESS", "GRAFANA_ANONYMOUS"):
        env.pop(name, None)
    result = subprocess.run(["docker-compose", "config", "-q"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Without the token the file refuses to start a cluster (token auth is on), and without a
    # Grafana admin password it refuses to start Grafana (there is no default one).
    for required in ("RAY_AUTH_TOKEN", "GRAFANA_ADMIN_PASSWORD"):
        missing = {k: v for k, v in env.items() if k != required}
        result = subprocess.run(["docker-compose", "config", "-q"], cwd=REPO, env=missing, capture_output=True, text=True)
        assert result.returncode != 0 and required in result.stderr


def _resolved_compose(env: dict[str, str]) -> dict:
    result = subprocess.run(["docker-compose", "config"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "RAY_AUTH_TOKEN": "t", "GRAFANA_ADMIN_PASSWORD": "p", **env})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed (make test installs it)")
def test_docker_compose_publishes_on_loopback_and_grafana_needs_a_login_by_default(monkeypatch):
    monkeypatch.delenv("DDPO_BIND_ADDRESS", raising=False)
    monkeypatch.delenv("GRAFANA_ANONYMOUS", raising=False)
    services = _resolved_compose({})
    published = {name: [str(p) for p in s.get("ports", [])] for name, s in services.items()}
    assert sum(map(len, published.values())) == 4, published  # 8265, 8000, 9090, 3000
    for name, ports in published.items():
        for port in ports:
            assert port.startswith("127.0.0.1:"), (name, port)  # job submission runs any code
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "p" and grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    # Opening them up is one documented switch each.
    opened = _resolved_compose({"DDPO_BIND_ADDRESS": "0.0.0.0", "GRAFANA_ANONYMOUS": "true"})
    assert all(str(p).startswith("0.0.0.0:") for s in opened.values() for p in s.get("ports", []))
    assert opened["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert "DDPO_BIND_ADDRESS" in COMPOSE.read_text() and "GRAFANA_ADMIN_PASSWORD" in COMPOSE.read_text()


def test_docker_compose_builds_from_files_in_the_repo():
    services = compose_config()["services"]
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert built, "no service builds the image"
    for name, build in built.items():
        build = {"context": build} if isinstance(build, str) else build
        context = (COMPOSE.parent / build.get("context", ".")).resolve()
        assert context.is_dir(), (name, context)
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), (name, build)
    # Every Ray node runs the image the head builds, the one the KubeRay manifests name.
    head, worker = services["ray-head"], services["ray-gpu-worker"]
    assert "build" in head and head["image"] == worker["image"] == IMAGE


def test_docker_compose_wires_ray_prometheus_and_grafana():
    services = compose_config()["services"]
    assert set(services) == {"ray-head", "ray-gpu-worker", "prometheus", "grafana"}
    head, worker = services["ray-head"], services["ray-gpu-worker"]
    head_flags, worker_flags = flags(head["command"]), flags(worker["command"])
    assert shlex.split(head["command"])[:2] == ["ray", "start"] and head_flags.get("head") is True
    assert shlex.split(worker["command"])[:2] == ["ray", "start"] and "head" not in worker_flags
    # The worker joins the head: its service name and GCS port.
    assert worker_flags["address"] == f"ray-head:{head_flags.get('port', 6379)}"
    # Every node exports metrics on a fixed port (the service-discovery file lists it per node).
    for node_flags in (head_flags, worker_flags):
        assert int(node_flags["metrics-export-port"]) > 0
    # The dashboard (and job submission) listens beyond the container's loopback and is published.
    assert head_flags["dashboard-host"] == "0.0.0.0"
    assert int(head_flags.get("dashboard-port", 8265)) in published_container_ports(head)
    for node in (head, worker):
        assert node["environment"]["RAY_AUTH_MODE"] == "token"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]

    # Prometheus reads the service-discovery file from the volume the head writes it into: the
    # path its config names lies, read-only, in the same named volume, at the same place in it.
    prometheus = services["prometheus"]
    prom_config_file = flags(prometheus["command"])["config.file"]
    config_mount, rest = mount_holding(prometheus, prom_config_file)
    assert config_mount.read_only and not config_mount.named
    assert Path(config_mount.source, rest).resolve() == PROMETHEUS_CONFIG.resolve()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (discovery,) = config["scrape_configs"][0]["file_sd_configs"][0]["files"]
    head_temp_dir = head_flags.get("temp-dir", "/tmp/ray")  # where the head writes the file
    assert posixpath.dirname(discovery) == head_temp_dir
    written, written_at = mount_holding(head, discovery)
    read, read_at = mount_holding(prometheus, discovery)
    assert written.named and read.source == written.source and read_at == written_at
    assert read.read_only and not written.read_only

    # Grafana provisions from the repo's provisioning directory, and its dashboard provider
    # reads the repo's dashboards directory, both mounted read-only.
    grafana = services["grafana"]
    provisioning, rest = mount_holding(grafana, grafana.get("environment", {}).get(
        "GF_PATHS_PROVISIONING", "/etc/grafana/provisioning"))  # Grafana's default
    assert provisioning.read_only and Path(provisioning.source, rest).resolve() == (GRAFANA / "provisioning").resolve()
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "ddpo.yml").read_text())
    dashboards, rest = mount_holding(grafana, provider["providers"][0]["options"]["path"])
    assert dashboards.read_only and Path(dashboards.source, rest).resolve() == (GRAFANA / "dashboards").resolve()
    home, rest = mount_holding(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert Path(home.source, rest).is_file()  # the home dashboard is a file of the repo
    for service in services.values():
        for mount in mounts(service):
            if not mount.named and mount.read_only:
                assert Path(mount.source).exists(), mount  # a config the repo must hold


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, args = (current + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def copy_args(args: str) -> tuple[dict[str, str], list[str], str]:
    """COPY's --flags, sources and destination (shell or JSON form)."""
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    options = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return options, paths[:-1], paths[-1]


def test_dockerfile_installs_this_package():
    compose_build = compose_config()["services"]["ray-head"]["build"]
    context = (COMPOSE.parent / compose_build["context"]).resolve()
    instructions = dockerfile_instructions(context / compose_build["dockerfile"])
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.split(".")[0] for p in find_packages(
        where=REPO, include=pyproject["tool"]["setuptools"]["packages"]["find"]["include"])}
    assert packages >= {"ddpo_ray", "reward_services"}
    needed = {"pyproject.toml", pyproject["project"]["readme"], *packages}  # what `pip install .` reads

    workdir, in_image, installs = "/", {}, []  # in_image: path in the image -> its source in the context
    for keyword, args in instructions:
        if keyword == "WORKDIR":
            workdir = posixpath.join(workdir, args)
        elif keyword in ("COPY", "ADD"):
            options, sources, dest = copy_args(args)
            if "from" in options:
                continue  # from another build stage, not the context
            for source in sources:
                assert list(context.glob(source)), f"{keyword} {source}: not in the build context {context}"
                dest_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
                target = posixpath.join(workdir, dest, posixpath.basename(source)) if dest_dir else posixpath.join(workdir, dest)
                in_image[posixpath.normpath(target)] = source
        elif keyword == "RUN":
            words = shlex.split(args)
            if "pip" in " ".join(words) and "install" in words and ("." in words or "./" in words):
                installs.append((workdir, dict(in_image)))
    assert installs, "no RUN pip-installs the package (pip install .)"
    install_dir, copied = installs[-1]
    missing = {p for p in needed if copied.get(posixpath.join(install_dir, p)) != p}
    assert not missing, f"not copied to {install_dir} before `pip install .`: {sorted(missing)}"


def test_prometheus_config_uses_rays_service_discovery_file():
    from ray._private import ray_constants

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
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
    # The driver (on the head) writes the whole run directory; workers need no shared volume.
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert cfg.output_dir in {m["mountPath"] for m in head["volumeMounts"]}
    for group in job["rayClusterSpec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert cfg.output_dir not in {m["mountPath"] for m in container["volumeMounts"]}


def test_kuberay_rayservice_hosts_every_reward_pool():
    service = kuberay_docs("rayservice.yaml")["RayService"]["spec"]
    config = yaml.safe_load(service["serveConfigV2"])
    check_serve_config(config)
    # The gold rewards read the tiny world only; a GPU cluster's service hosts the real rewards.
    assert {app["name"] for app in config["applications"]} == set(REWARD_APPS) - set(GOLD_REWARDS)
    assert cluster_images(service["rayClusterConfig"]) == {IMAGE}
    assert service["rayClusterConfig"]["rayVersion"] == ray.__version__


def test_gpu_aesthetic_replicas_share_a_gpu():
    # CLIP ViT-L/14 + the LAION MLP is ~0.6 GB in fp16: a whole GPU per replica wastes ~95% of it.
    service = yaml.safe_load(kuberay_docs("rayservice.yaml")["RayService"]["spec"]["serveConfigV2"])
    job = yaml.safe_load(kuberay_docs("rayjob.yaml")["ConfigMap"]["data"]["serve.yaml"])
    for config in (service, job):
        app = next(a for a in config["applications"] if a["name"] == "aesthetic")
        scorer = next(d for d in app["deployments"] if d["name"] == "AestheticScorer")
        assert 0 < scorer["ray_actor_options"]["num_gpus"] <= 0.25
    assert "GPU: {num_cpus: 2, num_gpus: 0.25}" in SERVE_YAML.read_text()
