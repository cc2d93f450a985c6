"""The HTTP contract of every reward application: good requests score, bad ones answer 4xx.

The first half checks the parser alone (no Ray); the second sends the same bad requests over
real HTTP (127.0.0.1) to real Serve applications and checks each answers 4xx with a JSON error
naming the problem, that the replica is still the same process afterwards, and that it still
scores a good request.
"""

import base64
import io
import json
import struct
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
import requests
from PIL import Image

from ddpo_ray.infra.reward_names import REWARD_NAMES
from ddpo_ray.prompts import get_prompts
from reward_services.http_api import (
    RequestLimits,
    RewardInputError,
    encode_image,
    parse_request_body,
    validate_batch,
)
from tests.helpers import replica_actor_names, sample_images

LIMITS = RequestLimits()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims width x height: a bomb that is caught from its header alone."""
    data = bytearray(png_bytes(np.zeros((1, 1, 3), dtype=np.uint8)))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="GIF")
    return buffer.getvalue()


IMAGE = sample_images(1, size=32)[0]
GOOD = b64(png_bytes(IMAGE))
NOISE_PNG = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def body(**fields) -> bytes:
    data = {"images": [GOOD], "prompts": ["a cat"]}
    data.update(fields)
    return json.dumps(data).encode()


# (case id, raw body, expected status, a piece of the expected error message)
BAD_REQUESTS = [
    ("not_json", b"images=1", 400, "not valid JSON"),
    ("json_list", b"[1, 2]", 400, "JSON list; expected an object"),
    ("missing_prompts", json.dumps({"images": [GOOD]}).encode(), 400, "prompts: Field required"),
    ("images_not_list", body(images=GOOD), 400, "images: Input should be a valid list"),
    ("image_not_string", body(images=[5]), 400, "images[0]: Input should be a valid string"),
    ("prompt_not_string", body(prompts=[3]), 400, "prompts[0]: Input should be a valid string"),
    ("metadata_not_objects", body(metadata=["x"]), 400, "metadata[0]: Input should be a valid dictionary"),
    ("unknown_field", body(image=[GOOD]), 400, "image: Extra inputs are not permitted"),
    ("bad_base64", body(images=["not base64!!"]), 400, "images[0] is not valid base64"),
    ("not_an_image", body(images=[b64(b"hello world, not an image")]), 400, "images[0] is not a PNG or JPEG"),
    ("gif", body(images=[b64(gif_bytes())]), 400, "images[0] is not a PNG or JPEG"),
    (
        "truncated_png",
        body(images=[b64(NOISE_PNG[: len(NOISE_PNG) // 2])]),
        400,
        "images[0] could not be decoded",
    ),
    ("truncated_jpeg", body(images=[b64(jpeg_bytes(IMAGE)[:300])]), 400, "images[0] could not be decoded"),
    ("bomb_header", body(images=[b64(png_with_header_size(100_000, 100_000))]), 413, "10000000000 pixels"),
    (
        "too_many_pixels",
        body(images=[b64(png_bytes(np.zeros((1025, 1024, 3), np.uint8)))]),
        413,
        "at most 1048576",
    ),
    ("too_many_images", body(images=[GOOD] * 65, prompts=["x"] * 65), 413, "65 images in one request"),
    ("empty_batch", body(images=[], prompts=[]), 400, "images is empty"),
    (
        "fewer_prompts",
        body(images=[GOOD, GOOD], prompts=["a"]),
        400,
        "prompts has 1 entries but images has 2",
    ),
    ("metadata_length", body(metadata=[{}, {}]), 400, "metadata has 2 entries but images has 1"),
    (
        "metadata_nan",
        b'{"images": ["%s"], "prompts": ["x"], "metadata": [{"cfg": NaN}]}' % GOOD.encode(),
        400,
        "metadata[0]['cfg'] is NaN or infinite",
    ),
    (
        "metadata_inf_nested",
        b'{"images": ["%s"], "prompts": ["x"], "metadata": [{"a": {"b": [1, -Infinity]}}]}' % GOOD.encode(),
        400,
        "metadata[0]['a']['b'][1] is NaN or infinite",
    ),
    (
        "metadata_overflow",
        b'{"images": ["%s"], "prompts": ["x"], "metadata": [{"seed": 1e999}]}' % GOOD.encode(),
        400,
        "metadata[0]['seed'] is NaN or infinite",
    ),
    (
        "metadata_deep_nan",
        b'{"images": ["%s"], "prompts": ["x"], "metadata": [%s]}'
        % (GOOD.encode(), b'{"a": ' * 900 + b"NaN" + b"}" * 900),
        400,
        "is NaN or infinite",
    ),
    (
        "deep_nesting",
        b'{"images": ["%s"], "prompts": ["x"], "metadata": [%s]}' % (GOOD.encode(), b"[" * 100_000),
        400,
        "not valid JSON",
    ),
]


# --- the parser alone ---------------------------------------------------------------------


@pytest.mark.parametrize("case, raw, status, message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_parser_rejects_bad_requests(case, raw, status, message):
    with pytest.raises(RewardInputError) as info:
        parse_request_body(raw, LIMITS)
    assert info.value.status == status
    assert message in str(info.value)


def test_the_metadata_scan_does_not_grow_with_the_elements_under_a_long_key():
    """Measured before: this 29 KiB body (a 10,000-character key over 10,000 list elements)
    peaked at ~97 MiB, a path string per element; now the scan holds only the path it is on."""
    import tracemalloc

    key = "k" * 10_000
    body = json.dumps({"images": [GOOD], "prompts": ["x"], "metadata": [{key: [0] * 10_000}]}).encode()
    assert len(body) < 64 * 2**10
    tracemalloc.start()
    parse_request_body(body, LIMITS)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB to parse a {len(body) / 2**10:.0f} KiB body"
    nan = json.dumps({"images": [GOOD], "prompts": ["x"], "metadata": [{key: [0] * 10_000 + [1]}]})
    with pytest.raises(RewardInputError, match=r"metadata\[0\]\['kkk.*\.\.\.'\]\[10000\] is NaN") as info:
        parse_request_body(nan.replace(", 1]", ", NaN]").encode(), LIMITS)
    assert len(str(info.value)) < 300


def test_prompts_are_checked_before_any_image_is_decoded(monkeypatch):
    """A request with too-long prompts is refused without decoding its (up to 64) images."""
    from reward_services import http_api

    decoded = []
    monkeypatch.setattr(http_api, "decode_image", lambda i, encoded, limits: decoded.append(i))
    body = json.dumps({"images": [GOOD] * 8, "prompts": ["p" * (LIMITS.max_prompt_chars + 1)] * 8}).encode()
    with pytest.raises(RewardInputError, match=r"prompts\[0\] has 1001 characters; expected at most 1000"):
        parse_request_body(body, LIMITS)
    assert decoded == []


def test_parser_decodes_png_jpeg_and_data_urls():
    jpeg = jpeg_bytes(IMAGE)
    raw = json.dumps(
        {
            "images": [GOOD, b64(jpeg), "data:image/png;base64," + GOOD],
            "prompts": ["a", "b", "c"],
            "metadata": [{"seed": 1}, {}, {"nested": {"ok": [1.5]}}],
        }
    ).encode()
    images, prompts, metadata = parse_request_body(raw, LIMITS)
    np.testing.assert_array_equal(images[0], IMAGE)  # PNG is lossless
    np.testing.assert_array_equal(images[1], np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    np.testing.assert_array_equal(images[2], IMAGE)
    assert prompts == ["a", "b", "c"] and metadata[2] == {"nested": {"ok": [1.5]}}


def test_parser_converts_other_modes_to_rgb():
    gray = io.BytesIO()
    Image.fromarray(IMAGE).convert("L").save(gray, format="PNG")
    rgba = io.BytesIO()
    Image.fromarray(IMAGE).convert("RGBA").save(rgba, format="PNG")
    images, _, _ = parse_request_body(
        body(images=[b64(gray.getvalue()), b64(rgba.getvalue())], prompts=["a", "b"]), LIMITS
    )
    assert all(image.shape == IMAGE.shape and image.dtype == np.uint8 for image in images)


def test_body_and_image_byte_limits():
    small = RequestLimits(max_images_per_request=2, max_image_bytes=100, max_body_bytes=1000)
    with pytest.raises(
        RewardInputError, match="base64 characters; expected an encoded image of at most 100 bytes"
    ) as info:
        parse_request_body(body(), small)
    assert info.value.status == 413
    with pytest.raises(RewardInputError, match="request body has") as info:
        parse_request_body(b" " * (small.max_body_bytes + 1), small)
    assert info.value.status == 413


def test_handle_path_validation():
    """What handles deliver (arrays) is checked with the same rules and messages."""
    images = sample_images(2, size=16)
    out, prompts, metadata = validate_batch(images, ["a", "b"], None, LIMITS)
    assert len(out) == 2 and prompts == ["a", "b"] and metadata is None
    with pytest.raises(RewardInputError, match=r"images\[0\] is a float32 array"):
        validate_batch([images[0].astype(np.float32)], ["a"], None, LIMITS)
    with pytest.raises(RewardInputError, match=r"expected a uint8 array of shape \(N, H, W, 3\)"):
        validate_batch(images[0], ["a"], None, LIMITS)
    with pytest.raises(RewardInputError, match="prompts has 1 entries but images has 2"):
        validate_batch(images, ["a"], None, LIMITS)
    with pytest.raises(RewardInputError, match=r"metadata\[1\]\['x'\] is NaN"):
        validate_batch(images, ["a", "b"], [{}, {"x": float("nan")}], LIMITS)
    with pytest.raises(RewardInputError, match="prompts is str"):
        validate_batch(images, "ab", None, LIMITS)
    with pytest.raises(RewardInputError, match="at most 4 pixels") as info:
        validate_batch(images, ["a", "b"], None, RequestLimits(max_pixels_per_image=4))
    assert info.value.status == 413


# --- over real HTTP, on real applications -------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize("case, raw, status, message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_http_bad_requests_answer_4xx(reward_apps, case, raw, status, message):
    response = requests.post(f"{reward_apps.http_url}/jpeg_compressibility", data=raw, timeout=30)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


@pytest.mark.ray
def test_model_apps_share_the_error_contract_and_survive(reward_apps):
    """A few bad requests on each model app, then the same replicas still answer a good one."""
    apps = {
        "aesthetic": "AestheticScorer",
        "llava_bertscore": "LlavaBertScore",
        "jpeg_compressibility": "JpegReward",
    }
    before = {app: replica_actor_names(app, deployment) for app, deployment in apps.items()}
    picked = [
        c
        for c in BAD_REQUESTS
        if c[0]
        in ("not_json", "truncated_png", "bomb_header", "metadata_nan", "fewer_prompts", "empty_batch")
    ]
    for app in apps:
        for case, raw, status, message in picked:
            response = requests.post(f"{reward_apps.http_url}/{app}", data=raw, timeout=30)
            assert response.status_code == status, (app, case, response.text)
            assert message in response.json()["error"], (app, case)
    good = {"images": [encode_image(IMAGE)], "prompts": ["a cat"]}
    for app, deployment in apps.items():
        response = requests.post(f"{reward_apps.http_url}/{app}", json=good, timeout=60)
        assert response.status_code == 200, response.text
        assert len(response.json()["rewards"]) == 1
        assert replica_actor_names(app, deployment) == before[app]  # no replica died or was replaced


@pytest.mark.ray
def test_handle_bad_input_raises_value_error_and_replica_survives(reward_apps):
    from ray import serve

    handle = serve.get_app_handle("aesthetic")
    before = replica_actor_names("aesthetic", "AestheticScorer")
    with pytest.raises(ValueError, match=r"images\[0\] is a float64 array"):
        handle.score.remote([np.zeros((8, 8, 3))], ["a"]).result(timeout_s=30)
    with pytest.raises(ValueError, match="prompts has 2 entries but images has 1"):
        handle.score.remote(sample_images(1), ["a", "b"]).result(timeout_s=30)
    assert len(handle.score.remote(sample_images(2), ["a", "b"]).result(timeout_s=30)["rewards"]) == 2
    assert replica_actor_names("aesthetic", "AestheticScorer") == before


@pytest.mark.ray
def test_openapi_schema_and_docs_are_served(reward_apps):
    for app in REWARD_NAMES:
        schema = requests.get(f"{reward_apps.http_url}/{app}/openapi.json", timeout=30).json()
        post = schema["paths"]["/"]["post"]
        request_schema = post["requestBody"]["content"]["application/json"]["schema"]
        assert set(request_schema["properties"]) == {"images", "prompts", "metadata"}
        assert request_schema["required"] == ["images", "prompts"]
        assert {"200", "400", "413"} <= set(post["responses"])
        assert requests.get(f"{reward_apps.http_url}/{app}/docs", timeout=30).status_code == 200


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib without redirect following (as curl without -L): a 3xx is an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def post_without_redirects(url: str, data: bytes) -> tuple[int, dict]:
    """(status, JSON body) of a POST that no redirect is followed for."""
    opener = urllib.request.build_opener(_NoRedirects)
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 3xx (not followed) and 4xx/5xx
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else {}


@pytest.mark.ray
def test_documented_url_answers_without_redirect(reward_apps):
    """POST /<reward> (no trailing slash, the documented URL) answers 200 itself, as does
    POST /<reward>/; bad input on it answers 400 rather than a 307 to the slashed URL."""
    prompt = get_prompts("tiny_shapes")[0]  # the gold rewards read tiny-world prompts
    good = json.dumps({"images": [encode_image(IMAGE)], "prompts": [prompt]}).encode()
    for app in REWARD_NAMES:
        for url in (f"{reward_apps.http_url}/{app}", f"{reward_apps.http_url}/{app}/"):
            status, answer = post_without_redirects(url, good)
            assert status == 200, (url, status, answer)
            assert len(answer["rewards"]) == 1, (url, answer)
    status, answer = post_without_redirects(f"{reward_apps.http_url}/jpeg_compressibility", b"images=1")
    assert status == 400 and "not valid JSON" in answer["error"]
