"""Each reward application on real Ray Serve answers, through its handle and over HTTP, the same
numbers as the plain in-process function. (Scaling: test_reward_serve_yaml.py.)"""

import io

import numpy as np
import pytest
import requests
from PIL import Image
from ray import serve

from reward_services.aesthetic_model import AestheticPredictor
from reward_services.bertscore import BertScore
from reward_services.captioner import Captioner
from reward_services.functions import llava_bertscore_rewards
from reward_services.http_api import encode_image
from tests.helpers import sample_images

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]

PROMPTS = ["a cat", "a dog riding a bike", "a fish playing chess", "a horse washing the dishes"]


def score_by_handle(app: str, images: np.ndarray, prompts: list[str]) -> dict:
    return serve.get_app_handle(app).score.remote(images, prompts).result(timeout_s=120)


def score_by_http(
    base_url: str, app: str, images: np.ndarray, prompts: list[str], format: str = "PNG"
) -> dict:
    body = {"images": [encode_image(image, format) for image in images], "prompts": prompts}
    response = requests.post(f"{base_url}/{app}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def pil_jpeg_kb(image: np.ndarray) -> float:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_jpeg_apps_equal_pil(reward_apps):
    images = sample_images(4)
    expected_kb = np.array([pil_jpeg_kb(image) for image in images])
    assert len(set(expected_kb)) == 4
    for app, sign in (("jpeg_compressibility", -1.0), ("jpeg_incompressibility", 1.0)):
        by_handle = score_by_handle(app, images, PROMPTS)
        by_http = score_by_http(reward_apps.http_url, app, images, PROMPTS)
        np.testing.assert_array_equal(by_handle["rewards"], sign * expected_kb)
        np.testing.assert_array_equal(by_http["rewards"], sign * expected_kb)  # PNG is lossless
        np.testing.assert_array_equal(by_http["info"]["jpeg_kb"], expected_kb)
    # A JPEG upload is scored on its decoded pixels.
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(_jpeg(image)))) for image in images])
    by_http = score_by_http(reward_apps.http_url, "jpeg_incompressibility", images, PROMPTS, format="JPEG")
    np.testing.assert_array_equal(by_http["rewards"], [pil_jpeg_kb(image) for image in decoded])


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_aesthetic_app_equals_in_process_predictor(reward_apps):
    images = sample_images(4)
    expected = AestheticPredictor(device="cpu")(images)  # same default seed as the deployment
    assert np.ptp(expected) > 1e-5  # the check below can tell the images apart
    np.testing.assert_allclose(
        score_by_handle("aesthetic", images, PROMPTS)["rewards"], expected, rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        score_by_http(reward_apps.http_url, "aesthetic", images, PROMPTS)["rewards"],
        expected,
        rtol=0,
        atol=1e-6,
    )


def test_llava_bertscore_app_equals_in_process_reward(reward_apps):
    images = sample_images(4)
    rewards, info = llava_bertscore_rewards(Captioner(device="cpu"), BertScore(device="cpu"), images, PROMPTS)
    for answer in (
        score_by_handle("llava_bertscore", images, PROMPTS),
        score_by_http(reward_apps.http_url, "llava_bertscore", images, PROMPTS),
    ):
        assert answer["info"]["captions"] == info["captions"]
        np.testing.assert_allclose(answer["rewards"], rewards, atol=1e-6)
        np.testing.assert_allclose(answer["info"]["bertscore_recall"], rewards, atol=1e-6)
        for key in ("bertscore_precision", "bertscore_f1"):
            np.testing.assert_allclose(answer["info"][key], info[key], atol=1e-6)


def test_concurrent_requests_are_batched_and_answered_in_order(reward_apps):
    """Many small concurrent requests (merged by @serve.batch) each get their own answers."""
    images = sample_images(12, seed=1)
    expected = AestheticPredictor(device="cpu")(images)
    handle = serve.get_app_handle("aesthetic")
    responses = [handle.score.remote(images[i : i + 2], PROMPTS[:2]) for i in range(0, 12, 2)]
    got = np.concatenate([r.result(timeout_s=120)["rewards"] for r in responses])
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_gold_apps_equal_in_process_functions(reward_apps):
    from ddpo_ray.tiny.world import make_batch
    from reward_services.attribute_model import AttributeModel
    from reward_services.tiny_aesthetic import tiny_aesthetic

    images, scenes = make_batch(np.random.default_rng(7), 4)
    prompts = [scene.caption(with_position=False) for scene in scenes]
    expected = {
        "aesthetic_gold": tiny_aesthetic(images),
        "alignment_gold": AttributeModel(device="cpu")(images, prompts),
    }
    for app, values in expected.items():
        np.testing.assert_allclose(score_by_handle(app, images, prompts)["rewards"], values, atol=1e-9)
        np.testing.assert_allclose(score_by_http(reward_apps.http_url, app, images, prompts)["rewards"], values, atol=1e-9)
    # alignment_gold reads tiny-world prompts only: another prompt is bad input (400), by index.
    body = {"images": [encode_image(image) for image in images[:2]], "prompts": [prompts[0], "a cat"]}
    response = requests.post(f"{reward_apps.http_url}/alignment_gold", json=body, timeout=60)
    assert response.status_code == 400 and "prompts[1]" in response.json()["error"]
