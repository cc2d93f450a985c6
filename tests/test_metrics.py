"""Prometheus metrics on real Ray: a run's ddpo_* series on the node's metrics port, a real
Prometheus server scraping them through Ray's service-discovery file, and the single-process
loop's prometheus-client endpoint.

The session's cluster exports on a fixed port and pushes metrics every second (tests/conftest.py).
Ray exports our `ddpo_x` as `ray_ddpo_x` (counters with `_total`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ddpo_ray.config import build_config
from ddpo_ray.distributed.driver import run_distributed
from ddpo_ray.records.metrics import PHASES
from tests.helpers import ALL_REWARDS, REPO, SMALL, TEST_APP_ARGS, free_port, wait_for

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "ddpo-ray.json"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
# Labels our metrics may carry; Ray adds its own (SessionName, WorkerId, ...), which start upper-case
# or with otel_. Nothing per sample (prompt, image, seed).
OUR_LABELS = {"run", "sampler", "phase", "reward", "app", "deployment", "kind", "le"}
# Counted only when something goes wrong: absent from a healthy run's scrape.
ONLY_ON_FAILURE = {
    "ray_ddpo_reward_service_errors_total", "ray_ddpo_reward_service_model_failures_total",
    "ray_ddpo_sampler_reissued_batches_total",
}


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)] from a Prometheus text endpoint."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    matches = [v for lab, v in samples.get(name, []) if all(lab.get(k) == want for k, want in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} series"
    return matches[0]


@pytest.fixture(scope="module")
def exported_run(yaml_apps, tmp_path_factory):
    """A 2-epoch run on the session cluster, and the scrape once its last epoch is exported."""
    from reward_services.client import ensure_reward_apps

    ensure_reward_apps(ALL_REWARDS, TEST_APP_ARGS)
    run_name = f"metrics-{uuid.uuid4().hex[:6]}"
    out = tmp_path_factory.mktemp("metrics")
    # Two rewards, so a model replica (aesthetic, @serve.batch) reports its batches too.
    rewards = ["reward.name=null", "reward.weights={jpeg_compressibility: 1.0, aesthetic: 0.01}",
               "eval.guard_reward=aesthetic", "eval.guard_margin=100.0"]  # a guard that never stops it (scores span 0..10)
    history = run_distributed(build_config(
        overrides=[*SMALL, *rewards, "num_epochs=2", f"output_dir={out}", f"run_name={run_name}"]))

    def total(samples, name, **labels):
        return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))

    seen: dict = {}

    def both_epochs_exported():
        # Every process pushes its metrics on its own schedule: wait for the last of each kind.
        samples = scrape(yaml_apps.metrics_url)
        seen.update(
            epochs=total(samples, "ray_ddpo_epochs_completed_total", run=run_name),
            sampled=total(samples, "ray_ddpo_trajectories_sampled_total"),
            aesthetic_images=total(samples, "ray_ddpo_reward_service_model_images_total", app="aesthetic"),
            jpeg_requests=total(samples, "ray_ddpo_reward_service_requests_total", app="jpeg_compressibility"),
        )
        done = seen["epochs"] == 2 and seen["sampled"] >= 16 and seen["aesthetic_images"] >= 16 and seen["jpeg_requests"] >= 4
        return samples if done else None

    try:
        samples = wait_for(both_epochs_exported, timeout_s=60, interval_s=1, what="the run's metrics")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {seen}") from None
    return run_name, history, samples


@pytest.mark.ray
@pytest.mark.slow  # exported_run: a 2-epoch distributed run
def test_run_exports_ddpo_series_with_the_epochs_values(exported_run):
    run, history, samples = exported_run
    last = history[-1]
    assert value(samples, "ray_ddpo_trajectories_trained_total", run=run) == 16
    assert value(samples, "ray_ddpo_epoch", run=run) == 1
    assert value(samples, "ray_ddpo_policy_version", run=run) == 2
    for name, key in [("ray_ddpo_reward_mean", "reward_mean"), ("ray_ddpo_reward_std", "reward_std"),
                      ("ray_ddpo_ppo_loss", "loss"), ("ray_ddpo_ppo_approx_kl", "approx_kl"),
                      ("ray_ddpo_ppo_clipfrac", "clipfrac"), ("ray_ddpo_advantage_std", "advantage_std"),
                      ("ray_ddpo_ppo_ratio_dev_before_update", "ratio_dev_before_update")]:
        assert value(samples, name, run=run) == pytest.approx(last[key], rel=1e-6, abs=1e-12), name
    for reward in ("jpeg_compressibility", "aesthetic"):
        assert value(samples, "ray_ddpo_reward_component_mean", run=run, reward=reward) == pytest.approx(
            last[f"reward_{reward}_mean"], rel=1e-6)
    aesthetic_calls = sum(v for lab, v in samples["ray_ddpo_reward_service_batch_size_count"] if lab["app"] == "aesthetic")
    # 4 requests of 4 images, merged by @serve.batch when they meet, + 2 held-out evaluations
    # (policy versions 0 and 2: eval.every=5 evaluates before training and after the last epoch)
    assert 3 <= aesthetic_calls <= 6
    assert value(samples, "ray_ddpo_eval_policy_version", run=run) == 2
    assert value(samples, "ray_ddpo_eval_reward_mean", run=run, reward="training") == pytest.approx(
        last["eval_reward_mean"], rel=1e-6)
    assert value(samples, "ray_ddpo_eval_reward_mean", run=run, reward="aesthetic") == pytest.approx(
        last["eval_aesthetic_mean"], rel=1e-6)
    assert value(samples, "ray_ddpo_eval_guard_drop", run=run) == pytest.approx(last["eval_guard_drop"], abs=1e-12)
    assert value(samples, "ray_ddpo_eval_best_version", run=run) == last["eval_best_version"]
    for phase, key in PHASES.items():
        assert value(samples, "ray_ddpo_epoch_phase_seconds", run=run, phase=phase) == pytest.approx(last[key], rel=1e-6)
    assert value(samples, "ray_ddpo_sampling_throughput", run=run) == pytest.approx(8 / last["time_sampling"], rel=1e-6)
    # Sampler and reward-service series are per process (other tests' samplers add theirs): at least ours.
    assert sum(v for _, v in samples["ray_ddpo_trajectories_sampled_total"]) >= 16
    assert sum(v for _, v in samples["ray_ddpo_sampler_batch_seconds_count"]) >= 4
    assert sum(v for _, v in samples["ray_ddpo_weight_sync_seconds_count"]) >= 2
    requests = [v for lab, v in samples["ray_ddpo_reward_service_requests_total"]
                if lab["app"] == "jpeg_compressibility" and lab["deployment"] == "JpegReward"]
    assert sum(requests) >= 4  # 2 epochs x 2 batches
    assert sum(v for lab, v in samples["ray_ddpo_reward_service_latency_seconds_count"]
               if lab["app"] == "jpeg_compressibility") == sum(requests)
    for name, series in samples.items():
        if name.startswith("ray_ddpo_"):
            for labels, _ in series:
                ours = {k for k in labels if not k[0].isupper() and not k.startswith("otel_")}
                assert ours <= OUR_LABELS, f"{name} has labels {sorted(ours - OUR_LABELS)}"


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return {name for expr in exprs for name in re.findall(r"\b(ray_[a-z0-9_]+)", expr)}


@pytest.mark.ray
@pytest.mark.slow  # exported_run: a 2-epoch distributed run
def test_every_dashboard_query_names_an_exported_metric(exported_run):
    _, _, samples = exported_run
    missing = dashboard_metric_names() - set(samples) - ONLY_ON_FAILURE
    assert not missing, f"the dashboard queries metrics the run did not export: {sorted(missing)}"


@pytest.mark.ray
@pytest.mark.slow  # exported_run: a 2-epoch distributed run
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus is not installed (make test installs it)")
def test_a_real_prometheus_scrapes_the_run_through_rays_service_discovery(exported_run, tmp_path):
    run, history, _ = exported_run
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    discovery = Path(config["scrape_configs"][0]["file_sd_configs"][0]["files"][0])
    # The project's config as it is, scraping every second: Ray's head writes that file.
    wait_for(discovery.is_file, timeout_s=30, what=f"Ray's service-discovery file {discovery}")
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["file_sd_configs"][0]["refresh_interval"] = "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    server = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        query = urllib.parse.urlencode({"query": f'ray_ddpo_reward_mean{{run="{run}"}}'})

        def scraped():
            try:
                answer = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=5))
            except OSError:
                return None  # not listening yet
            return answer["data"]["result"] or None

        result = wait_for(scraped, timeout_s=90, interval_s=1, what="Prometheus to scrape ray_ddpo_reward_mean")
        assert float(result[0]["value"][1]) == pytest.approx(history[-1]["reward_mean"], rel=1e-6)
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert server.returncode in (0, -15), stderr.decode()[-2000:]


@pytest.mark.slow
def test_single_process_loop_serves_the_same_metrics_with_prometheus_client(tmp_path):
    """No Ray here: ddpo_ray.local records through prometheus-client (--metrics-port serves it)."""
    from ddpo_ray.infra.metrics_backend import serve_prometheus
    from ddpo_ray.training.local_loop import run_local

    run_name = f"local-{uuid.uuid4().hex[:6]}"
    history = run_local(build_config(overrides=[*SMALL, "num_epochs=1", f"output_dir={tmp_path}", f"run_name={run_name}"]))
    port = serve_prometheus(0)
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(samples, "ddpo_epochs_completed_total", run=run_name) == 1
    assert value(samples, "ddpo_reward_mean", run=run_name) == pytest.approx(history[0]["reward_mean"])
    assert value(samples, "ddpo_epoch_phase_seconds", run=run_name, phase="training") == pytest.approx(
        history[0]["time_training"])
    assert value(samples, "ddpo_ppo_ratio_dev_before_update", run=run_name) == pytest.approx(
        history[0]["ratio_dev_before_update"], abs=1e-12)
    # The rewards computed in this process count as a reward service of their own.
    assert value(samples, "ddpo_reward_service_images_total", app="jpeg_compressibility", deployment="in_process") >= 8


def test_metric_definitions_refuse_mistakes():
    from ddpo_ray.infra.metrics_backend import MetricSpec, make_metric

    with pytest.raises(ValueError, match="must start with 'ddpo_'"):
        MetricSpec("reward_mean", "gauge", "x")
    with pytest.raises(ValueError, match="boundaries"):
        MetricSpec("ddpo_x_seconds", "histogram", "x")
    gauge = make_metric(MetricSpec("ddpo_test_gauge", "gauge", "x", ("run",)), "prometheus")
    with pytest.raises(ValueError, match=r"takes tags \('run',\)"):
        gauge.set(1.0, sampler="0")
    with pytest.raises(TypeError, match="is a gauge, not a counter"):
        gauge.inc(1.0, run="r")
    with pytest.raises(ValueError, match="already defined differently"):
        make_metric(MetricSpec("ddpo_test_gauge", "counter", "x", ("run",)), "prometheus")
    with pytest.raises(ValueError, match="metrics backend 'statsd'"):
        make_metric(MetricSpec("ddpo_test_other", "gauge", "x"), "statsd")
