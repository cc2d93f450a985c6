"""The reward services' wire contract: request/response models, limits, validation, decoding.

Every reward application answers `POST /<reward_name>` with
    {"images": [base64 PNG or JPEG], "prompts": [str], "metadata": [object]?}
and returns {"rewards": [float], "info": {key: [one value per image]}}. Any malformed request
answers 4xx with {"error": "<what is wrong>"}; nothing a client sends may cause a 5xx or kill a
replica. Through DeploymentHandles the same `score(images, prompts, metadata)` call takes uint8
arrays directly (no encoding), and is validated by the same `validate_batch`.

Decompression bombs: the pixel count is read from the image header and checked before the image
is decoded; PIL's own limit (`Image.MAX_IMAGE_PIXELS`) is set to the same value in each replica.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
from typing import Any, Awaitable, Callable, Iterator, Mapping, Sequence

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.requests import Request

from ddpo_ray.infra.images import as_image_list

ACCEPTED_FORMATS = ("PNG", "JPEG")


class RewardInputError(ValueError):
    """A request the service refuses; `status` is the HTTP status code (always 4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class RequestLimits(BaseModel):
    """What one request may carry; each application has its own (its deployment args)."""

    model_config = ConfigDict(extra="forbid")

    max_images_per_request: int = Field(64, ge=1)
    max_pixels_per_image: int = Field(
        1024 * 1024, ge=1, description="width x height, checked before decoding"
    )
    max_image_bytes: int = Field(8 * 2**20, ge=1, description="one encoded (PNG/JPEG) image")
    max_body_bytes: int = Field(
        128 * 2**20, ge=1, description="a whole HTTP request body (base64 inflates by 4/3)"
    )
    max_prompt_chars: int = Field(1000, ge=1)


# --- the wire models (also the OpenAPI schema) --------------------------------------------


_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


def _first_non_finite(value: Any, root: str) -> str | None:
    """Where the first NaN/inf number inside a JSON value is (e.g. `metadata[3]['score']`), or None.

    Depth-first with one iterator per open container, so it holds only the keys of the path it
    is on: memory grows with nesting depth, not with the number of elements, and the path string
    is built once, for the answer. (It used to build a path string per element: a 29 KiB body
    with a 10,000-character key over 10,000 list elements took ~100 MB.) Iterative, so nesting
    as deep as the JSON parser allows cannot overflow the stack.
    """

    def children(item: Any) -> Iterator[tuple[Any, Any]] | None:
        kind = type(item)
        if kind in _JSON_SCALARS:  # the common case first: an ABC isinstance costs ~1 us
            return None
        if kind is dict or isinstance(item, Mapping):
            return iter(item.items())
        if kind is list or isinstance(item, (list, tuple)):
            return enumerate(item)
        return None

    def non_finite(item: Any) -> bool:
        return isinstance(item, float) and not math.isfinite(item)

    if non_finite(value):
        return root
    top = children(value)
    stack, keys = ([top], []) if top is not None else ([], [])
    while stack:
        for key, item in stack[-1]:  # resumes where this container was left
            if non_finite(item):
                return _render_path(root, [*keys, key])
            inner = children(item)
            if inner is not None:
                stack.append(inner)
                keys.append(key)
                break
        else:  # this container is done
            stack.pop()
            if keys:
                keys.pop()
    return None


def _render_path(root: str, keys: list[Any], max_chars: int = 200) -> str:
    """`root[0]['key']...` with long keys and deep paths shortened, so an error line stays short."""
    def part(key: Any) -> str:
        if isinstance(key, int):
            return f"[{key}]"
        text = str(key)
        return f"[{(text if len(text) <= 40 else text[:37] + '...')!r}]"

    parts = [part(k) for k in keys]
    if len(parts) > 12:
        parts = [*parts[:4], f"...({len(parts) - 8} levels)...", *parts[-4:]]
    path = root + "".join(parts)
    return path if len(path) <= max_chars else path[: max_chars // 2] + "..." + path[-max_chars // 2:]


class RewardRequest(BaseModel):
    """One batch to score. `metadata`, if given, has one JSON object per image."""

    model_config = ConfigDict(extra="forbid", strict=True)

    images: list[str] = Field(description="base64-encoded PNG or JPEG images (a data: URL prefix is allowed)")
    prompts: list[str] = Field(description="the prompt each image was generated from, one per image")
    metadata: list[dict[str, Any]] | None = Field(None, description="optional JSON object per image")

    @model_validator(mode="after")
    def _consistent(self) -> "RewardRequest":
        check_lengths(len(self.images), self.prompts, self.metadata)
        return self


class RewardResponse(BaseModel):
    rewards: list[float] = Field(description="one reward per image, in request order")
    info: dict[str, list[Any]] = Field(
        default_factory=dict, description="per-image extras (captions, BERTScore P/R/F1, ...), each a list"
    )


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong with the request")


# --- validation shared by HTTP and handle calls --------------------------------------------


def check_lengths(num_images: int, prompts: Sequence[Any], metadata: Sequence[Any] | None) -> None:
    if num_images == 0:
        raise RewardInputError("images is empty; expected at least one image")
    if len(prompts) != num_images:
        raise RewardInputError(
            f"prompts has {len(prompts)} entries but images has {num_images}; expected one prompt per image"
        )
    if metadata is not None:
        if len(metadata) != num_images:
            raise RewardInputError(
                f"metadata has {len(metadata)} entries but images has {num_images}; "
                "expected one object per image (or no metadata)"
            )
        bad = _first_non_finite(list(metadata), "metadata")
        if bad:
            raise RewardInputError(f"{bad} is NaN or infinite; expected finite numbers only")


def validate_batch(
    images: np.ndarray | Sequence[np.ndarray],
    prompts: Sequence[str],
    metadata: Sequence[Mapping[str, Any]] | None,
    limits: RequestLimits,
) -> tuple[list[np.ndarray], list[str], list[dict[str, Any]] | None]:
    """Check a batch as handles deliver it: uint8 (H, W, 3) arrays, one prompt per image."""
    try:
        images = as_image_list(images, allow_pil=False)
    except ValueError as exc:
        raise RewardInputError(str(exc)) from None
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise RewardInputError(f"prompts is {type(prompts).__name__}; expected a list of strings")
    images, prompts = list(images), list(prompts)
    metadata = None if metadata is None else [dict(m) if isinstance(m, Mapping) else m for m in metadata]
    check_lengths(len(images), prompts, metadata)
    if len(images) > limits.max_images_per_request:
        raise RewardInputError(
            f"{len(images)} images in one request; expected at most {limits.max_images_per_request}",
            status=413,
        )
    for i, image in enumerate(images):
        check_pixels(i, image.shape[1], image.shape[0], limits)
    check_prompts(prompts, limits)
    if metadata is not None:
        for i, item in enumerate(metadata):
            if not isinstance(item, dict):
                raise RewardInputError(f"metadata[{i}] is {type(item).__name__}; expected an object")
    return images, prompts, metadata


def check_prompts(prompts: Sequence[Any], limits: RequestLimits) -> None:
    """Every prompt a string of at most `limits.max_prompt_chars` (checked before any image is decoded)."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise RewardInputError(f"prompts[{i}] is {type(prompt).__name__}; expected a string")
        if len(prompt) > limits.max_prompt_chars:
            raise RewardInputError(
                f"prompts[{i}] has {len(prompt)} characters; expected at most {limits.max_prompt_chars}"
            )


def check_pixels(index: int, width: int, height: int, limits: RequestLimits) -> None:
    if width < 1 or height < 1:
        raise RewardInputError(f"images[{index}] is {width}x{height}; expected a non-empty image")
    if width * height > limits.max_pixels_per_image:
        raise RewardInputError(
            f"images[{index}] is {width}x{height} = {width * height} pixels; expected at most "
            f"{limits.max_pixels_per_image} pixels per image",
            status=413,
        )


# --- HTTP: body -> validated, decoded batch ------------------------------------------------


def decode_image(index: int, encoded: str, limits: RequestLimits) -> np.ndarray:
    """base64 PNG/JPEG -> (H, W, 3) uint8; the pixel count is checked before decoding."""
    if encoded.startswith("data:"):
        _, _, encoded = encoded.partition(",")
    if len(encoded) > limits.max_image_bytes * 4 // 3 + 4:
        raise RewardInputError(
            f"images[{index}] has {len(encoded)} base64 characters; expected an encoded image of at most "
            f"{limits.max_image_bytes} bytes",
            status=413,
        )
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RewardInputError(f"images[{index}] is not valid base64 ({exc})") from None
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            check_pixels(index, image.width, image.height, limits)  # from the header only
            image.load()
            if image.mode != "RGB":
                image = image.convert("RGB")
            return np.asarray(image, dtype=np.uint8)
    except RewardInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise RewardInputError(f"images[{index}] is a decompression bomb ({exc})", status=413) from None
    except UnidentifiedImageError:
        raise RewardInputError(f"images[{index}] is not a PNG or JPEG image") from None
    except Exception as exc:  # truncated/corrupt data, odd modes: any decoder error is the input's fault
        raise RewardInputError(f"images[{index}] could not be decoded: {exc}") from None


def _format_validation_error(exc: ValidationError) -> str:
    """`images[2]: Input should be a valid string (got 5)`; problems joined by "; "."""
    problems = []
    for err in exc.errors():
        path = ""
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("value_error", "missing") and not isinstance(err.get("input"), (dict, list)):
            message += f" (got {err.get('input')!r:.80})"
        problems.append(f"{path}: {message}" if path else message)
    return "; ".join(problems)


def parse_request_body(
    body: bytes, limits: RequestLimits
) -> tuple[list[np.ndarray], list[str], list[dict[str, Any]] | None]:
    """Raw HTTP body -> (images, prompts, metadata), or RewardInputError saying what is wrong."""
    if len(body) > limits.max_body_bytes:
        raise RewardInputError(
            f"request body has {len(body)} bytes; expected at most {limits.max_body_bytes}", status=413
        )
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise RewardInputError(f"request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RewardInputError(
            f"request body is a JSON {type(data).__name__}; expected an object with images, prompts, metadata"
        )
    if isinstance(data.get("images"), list) and len(data["images"]) > limits.max_images_per_request:
        raise RewardInputError(
            f"{len(data['images'])} images in one request; expected at most {limits.max_images_per_request}",
            status=413,
        )
    try:
        request = RewardRequest.model_validate(data)
    except ValidationError as exc:
        raise RewardInputError(_format_validation_error(exc)) from None
    check_prompts(request.prompts, limits)  # cheap checks first: decoding is what costs
    images = [decode_image(i, encoded, limits) for i, encoded in enumerate(request.images)]
    return images, request.prompts, request.metadata


def encode_image(image: np.ndarray, format: str = "PNG") -> str:
    """(H, W, 3) uint8 -> base64 PNG (lossless, the default) or JPEG, for HTTP clients."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --- the FastAPI ingress every application uses -------------------------------------------

ScoreFunction = Callable[
    [list[np.ndarray], list[str], list[dict[str, Any]] | None], Awaitable[dict[str, Any]]
]

# The request body is parsed by hand (NaN checks, size limits, 4xx for everything), so the
# schema is declared here for /openapi.json and /docs.
OPENAPI_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": RewardRequest.model_json_schema()}},
    }
}
OPENAPI_ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "malformed request"},
    413: {"model": ErrorResponse, "description": "too many images, pixels or bytes"},
}


class PrefixWithoutSlash:
    """ASGI middleware: the documented `POST /<reward>` reaches the app's `/` route itself.

    Serve mounts each application at its route prefix and hands `/<reward>` (no trailing slash)
    to the app as the prefix itself, i.e. the empty path below it. Starlette would answer that
    with a 307 to `/<reward>/`, which curl without -L, urllib and most clients do not follow;
    here it is served as `/` instead (both URL forms answer; nothing else changes).
    """

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "http":
            root = scope.get("root_path", "")
            if scope.get("path", "") in ("", root):
                path = root + "/"
                scope = {**scope, "path": path, "raw_path": path.encode("latin-1")}
        await self.app(scope, receive, send)


def make_reward_api(reward_name: str, description: str) -> FastAPI:
    """A FastAPI app for one reward; the deployment class adds `POST /` with `reward_route`."""
    api = FastAPI(title=f"ddpo-ray reward: {reward_name}", description=description, version="1")
    api.add_middleware(PrefixWithoutSlash)
    return api


def reward_route(api: FastAPI):
    """Decorator for the deployment's HTTP method: `POST /` with the documented schema."""
    return api.post(
        "/",
        response_model=RewardResponse,
        responses=OPENAPI_ERROR_RESPONSES,
        openapi_extra=OPENAPI_REQUEST_BODY,
        summary="Score a batch of images",
    )


async def read_and_parse(
    request: Request, limits: RequestLimits
) -> tuple[list[np.ndarray], list[str], list[dict[str, Any]] | None]:
    """Read the body (refusing oversized ones early) and parse it off the event loop."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise RewardInputError(
            f"request body has {declared} bytes; expected at most {limits.max_body_bytes}", status=413
        )
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limits.max_body_bytes:
            raise RewardInputError(f"request body exceeds {limits.max_body_bytes} bytes", status=413)
    return await asyncio.to_thread(parse_request_body, bytes(body), limits)


async def answer_http(request: Request, limits: RequestLimits, score: ScoreFunction) -> JSONResponse:
    """The whole HTTP path: parse, score with the handle path's `score`, map bad input to 4xx."""
    try:
        images, prompts, metadata = await read_and_parse(request, limits)
        result = await score(images, prompts, metadata)
    except RewardInputError as exc:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)
    return JSONResponse(result)


def response_dict(
    rewards: Sequence[float], info: Mapping[str, Sequence[Any]] | None = None
) -> dict[str, Any]:
    """The result shape of every `score` call: plain floats and per-image lists."""
    return {
        "rewards": [float(r) for r in rewards],
        "info": {key: list(values) for key, values in (info or {}).items()},
    }
