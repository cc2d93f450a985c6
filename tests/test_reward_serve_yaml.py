"""deploy/serve.yaml: a valid Serve config whose applications deploy with the serve CLI, answer,
and scale one pool without touching any other deployment."""

import numpy as np
import pytest
import requests
import yaml
from ray.serve.schema import ServeDeploySchema

from reward_services.aesthetic import AestheticArgs
from reward_services.gold import GoldArgs
from reward_services.http_api import encode_image
from reward_services.jpeg_app import JpegArgs
from reward_services.llava_bertscore import LlavaBertScoreArgs
from reward_services.registry import REWARD_APPS
from tests.helpers import SERVE_YAML, replica_actor_names, running_replicas, sample_images, serve_run_config

ARGS_MODELS = {
    "reward_services.jpeg_app:build_app": JpegArgs,
    "reward_services.aesthetic:build_app": AestheticArgs,
    "reward_services.llava_bertscore:build_app": LlavaBertScoreArgs,
    "reward_services.gold:build_app": GoldArgs,
}


def load_config() -> dict:
    return yaml.safe_load(SERVE_YAML.read_text())


def test_serve_yaml_is_a_valid_config_for_every_reward():
    config = load_config()
    ServeDeploySchema.model_validate(config)  # what `serve deploy` / `serve run` check first
    apps = {app["name"]: app for app in config["applications"]}
    assert set(apps) == set(REWARD_APPS)
    for name, app in apps.items():
        spec = REWARD_APPS[name]
        assert app["route_prefix"] == spec.route_prefix and app["import_path"] == spec.import_path
        args = ARGS_MODELS[app["import_path"]].model_validate(app["args"])  # no typo in the args
        for key, value in spec.default_args.items():
            assert getattr(args, key) == value
        deployments = {d["name"]: d for d in app["deployments"]}
        assert set(deployments) == set(spec.deployments)
        for deployment in deployments.values():
            assert "ray_actor_options" in deployment and "num_replicas" in deployment
            batch = deployment.get("user_config", {}).get("max_batch_size")
            if batch is not None:
                assert deployment["max_ongoing_requests"] >= batch, deployment["name"]


@pytest.mark.ray
def test_serve_yaml_applications_answer_over_http(yaml_apps):
    serve_run_config(SERVE_YAML, yaml_apps)  # back to the file's state if a test changed an app
    prompts = ["a red circle", "two blue squares", "three green triangles"]  # alignment_gold reads tiny-world prompts only
    body = {"images": [encode_image(image) for image in sample_images(3)], "prompts": prompts}
    for name in REWARD_APPS:
        response = requests.post(f"{yaml_apps.http_url}/{name}", json=body, timeout=120)
        assert response.status_code == 200, (name, response.text)
        rewards = response.json()["rewards"]
        assert len(rewards) == 3 and np.all(np.isfinite(rewards))


@pytest.mark.ray
@pytest.mark.slow  # starts and stops a second captioner replica
def test_scaling_one_pool_leaves_every_other_deployment_alone(yaml_apps, tmp_path):
    serve_run_config(SERVE_YAML, yaml_apps)
    before = {
        (app, deployment): replica_actor_names(app, deployment)
        for app, spec in REWARD_APPS.items()
        for deployment in spec.deployments
    }
    counts_before = {app: running_replicas(app) for app in REWARD_APPS}
    assert counts_before["llava_bertscore"]["LlavaCaptioner"] == 1

    config = load_config()
    llava = next(app for app in config["applications"] if app["name"] == "llava_bertscore")
    next(d for d in llava["deployments"] if d["name"] == "LlavaCaptioner")["num_replicas"] = 2
    scaled = tmp_path / "serve.yaml"
    scaled.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        serve_run_config(scaled, yaml_apps)
        assert running_replicas("llava_bertscore") == {
            "LlavaBertScore": 1,
            "LlavaCaptioner": 2,
            "BertScorer": 1,
        }
        for (app, deployment), actors in before.items():
            if (app, deployment) == ("llava_bertscore", "LlavaCaptioner"):
                assert set(actors) < set(replica_actor_names(app, deployment))  # the old one kept, one added
            else:
                assert replica_actor_names(app, deployment) == actors, (app, deployment)  # not even restarted
        for app in REWARD_APPS:
            if app != "llava_bertscore":
                assert running_replicas(app) == counts_before[app]
    finally:
        serve_run_config(SERVE_YAML, yaml_apps)
    assert running_replicas("llava_bertscore")["LlavaCaptioner"] == 1
