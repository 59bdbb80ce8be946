"""HTTP API and web page (FastAPI, served by uvicorn).

- ``POST /predict``: JSON ``{"image": "<base64 or data URL>"}`` (the original Flask clients' format)
  or a multipart upload (field ``file``) -> ``{"result": score, "verdict": ..., "model": ...}``.
- ``POST /predict/batch``: JSON ``{"images": [...]}`` or several ``file`` fields -> one result (or
  error) per image, in order.
- ``POST /explain``: as ``/predict``, plus an occlusion heatmap (PNG data URL) over the *stage-1 image*:
  the upload as the experts see it before their input policy (downscaled to ``max_side``, cropped to
  the face when the experts were trained on face crops).
- ``GET /health`` (with the preprocessing the experts were trained with); ``GET /`` the web page;
  ``GET /docs`` the OpenAPI documentation.

Every upload is scored through :meth:`dfpipe.ensemble_predict.Ensemble.score_images`: the preprocessing contract
read from the checkpoints (:mod:`dfpipe.data.preprocess`: stage 1 with its face crop, then each
expert's input policy), the same steps as ``dfpipe predict`` / ``scan`` and stage 5.

The OpenAPI schema states what is enforced: the request models below are built from the settings
(non-empty strings and lists, the batch size and image size limits) and every JSON body is validated
against exactly them. Bad input is a 4xx with ``{"detail": message}``, never a 500; each endpoint
lists its 4xx codes (:data:`ERRORS`):

- 400: the body is not JSON / not a well-formed form; an image is not base64 or decodes to 0 bytes;
- 411: a multipart upload without Content-Length; 413: too large (body, image or image count, or a form
  of too many parts);
- 415: neither JSON nor multipart; 422: the body does not match the request schema (a form may hold
  field ``file`` and nothing else), or the bytes are not a usable image (unknown format, truncated, too
  many pixels).

- 401: a token is set and the request does not carry it; 408: the body did not arrive in time; 503: the
  server is at one of its bounds (memory budget, model queue, explanation queue), with ``Retry-After``.

Bounded (docs/serving.md): request bodies and decoded images hold memory from two budgets sized from
``max_memory`` (:class:`~dfpipe.serve.service.Budget`); the images of a request are decoded one after another,
each turned at once into the experts' small inputs (:class:`~dfpipe.serve.service.Prepared`), so the
micro-batch queue never holds a full-size image; the queue itself is bounded. :class:`Guard` (an ASGI
middleware) refuses ``Transfer-Encoding`` with ``Content-Length``, counts every body's bytes (JSON and
multipart alike), gives the body a deadline, checks the API token and writes one access-log line per request.

The ensemble is loaded once at start-up (lifespan) and every model call runs on one worker thread
through :class:`MicroBatcher`; explanations run on their own thread and give way to it. Several processes:
``DFPIPE_MODELS=models DFPIPE_CARD=submissions/ensemble.json uvicorn --factory dfpipe.serve.api:app_from_env
--workers 2``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from ..data.images import image_pixels
from .explain import occlusion_map, overlay, paced, png_bytes
from .service import (DEFAULT_CARD, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MODELS, Budget, Busy,
                      InputError, MicroBatcher, Prepared, b64_to_bytes, check_servable, check_size, load_ensemble,
                      model_id, prepare_upload, score_inputs)

if TYPE_CHECKING:
    from ..ensemble_predict import Ensemble

log = logging.getLogger(__name__)
access_log = logging.getLogger("dfpipe.serve.access")
STATIC = Path(__file__).with_name("static")
FILE_FIELD = "file"  # the one multipart field: the image (several parts of it for /predict/batch)
FORM_SLACK = 8  # parts a form may have beyond its images, so that a stray field is named (422), not just counted
IMAGE_FORMAT = "image-base64"  # the schema's format for "base64 (or a base64 data URL) of an image file"
JSON_OVERHEAD = 65536  # JSON syntax and escapes around the base64 text, on top of the per-image limit
# Memory a decode holds per pixel of the upload: PIL's RGBX image (4) + the RGB array (3) + the experts' inputs;
# measured 7.2 on a 49 MP JPEG (dfpipe.data.images._rgb_array), rounded up.
DECODE_BYTES_PER_PIXEL = 8
# Memory a body holds per byte received until its images are decoded: the bytes, the parsed JSON text and the
# base64-decoded images (JSON); the bytes and each part read back from starlette's spool file (multipart).
BODY_FACTOR = {"application/json": 4, "multipart/form-data": 2}
TOKEN_COOKIE = "dfpipe_token"


@dataclass(frozen=True)
class ServeSettings:
    models_dir: str = DEFAULT_MODELS
    card: str = DEFAULT_CARD
    device: str = "auto"
    max_bytes: int = DEFAULT_MAX_BYTES        # per image
    max_pixels: int = DEFAULT_MAX_PIXELS      # per image, checked from the header before decoding
    max_batch_images: int = 64                # per /predict/batch request
    max_batch_bytes: int = 64 * 1024 * 1024   # per /predict/batch request body
    max_batch: int = 16                       # images per model call (micro-batching)
    explain_grid: int = 8
    max_memory: int = 1024 * 2**20            # request bodies + decoded images held at once (the model aside)
    max_queue: int = 256                      # images waiting for the model; a request past it gets 503
    max_waiting: int = 64                     # requests waiting for memory; past it 503
    busy_timeout_s: float = 30.0              # longest wait for memory before 503
    request_timeout_s: float = 60.0           # a request's body must have arrived this long after its headers
    explain_max_pixels: int = 1_000_000       # the heatmap is made on a copy of at most this many pixels
    explain_timeout_s: float = 120.0          # an explanation that takes longer (under load) is a 503
    max_explain_waiting: int = 2              # explanations waiting for the explanation thread; past it 503
    token: str | None = None                  # required on every route but /health when set

    @property
    def max_image_chars(self) -> int:
        """Longest accepted base64 text per image: max_bytes in base64 (4/3), wrapped lines and a data URL header
        included (3/2 + 1 KB covers both); the decoded bytes are checked against max_bytes as well."""
        return self.max_bytes * 3 // 2 + 1024

    @property
    def max_body_bytes(self) -> int:
        """Largest request body of /predict and /explain."""
        return self.max_image_chars + JSON_OVERHEAD

    def body_limit(self, path: str) -> int:
        return self.max_batch_bytes if path == "/predict/batch" else self.max_body_bytes

    @property
    def body_memory(self) -> int:
        """The request bodies' budget: 3/8 of max_memory (the rest decodes images)."""
        return self.max_memory * 3 // 8

    @property
    def decode_memory(self) -> int:
        return self.max_memory - self.body_memory


# ----------------------------------------------------------------------------- schemas (OpenAPI docs)
def _mb(n: int) -> str:
    return f"{n / 2**20:g} MB"


def request_models(settings: ServeSettings) -> tuple[type[BaseModel], type[BaseModel]]:
    """The JSON request bodies of /predict (and /explain) and /predict/batch, with the limits of ``settings``.

    These models ARE the validation (:func:`_validated`), so the schema cannot drift from what is enforced.
    """
    image_doc = (f"the image file (JPEG, PNG, WebP, BMP, GIF, TIFF...) in base64; a data:image/...;base64, URL, "
                 f"URL-safe base64 and wrapped lines are fine. At most {_mb(settings.max_bytes)} once decoded "
                 f"(413 above) and {settings.max_pixels:,} pixels (422 above).")
    b64 = Annotated[str, Field(min_length=1, max_length=settings.max_image_chars,
                               json_schema_extra={"format": IMAGE_FORMAT})]

    class ImageRequest(BaseModel):
        image: b64 = Field(description=image_doc)

    class BatchRequest(BaseModel):
        images: list[b64] = Field(min_length=1, max_length=settings.max_batch_images,
                                  description=f"1 to {settings.max_batch_images} images, each as 'image' of "
                                              f"/predict; the whole body at most {_mb(settings.max_batch_bytes)}")

    return ImageRequest, BatchRequest


ImageRequest, BatchRequest = request_models(ServeSettings())  # with the default limits, for reference

Verdict = Literal["likely real", "uncertain", "likely fake"]


class Prediction(BaseModel):
    result: float = Field(ge=0, le=1, description="ensemble score in [0, 1]; higher = more likely fake")
    verdict: Verdict = Field(description="from the card's thresholds: likely real | uncertain | likely fake")
    model: str = Field(description="the ensemble that scored it: expert names @ card digest")


class BatchItem(BaseModel):
    result: float | None = Field(default=None, ge=0, le=1, description="as /predict; null if the image failed")
    verdict: Verdict | None = Field(default=None, description="as /predict; null if the image failed")
    error: str | None = Field(default=None, description="why this image could not be scored; null if it was")


class BatchPrediction(BaseModel):
    results: list[BatchItem] = Field(description="one per image, in the order sent")
    model: str = Field(description="as /predict")


class Explanation(Prediction):
    heatmap: str = Field(description="PNG data URL: the stage-1 image (the upload as the experts see it: downscaled "
                                     "to max_side, cropped to the face when the experts were trained on face crops; "
                                     "at most 512 px a side here) with red (towards fake) / blue (towards real) "
                                     "regions")
    heatmap_scale: float = Field(ge=0, description="largest score change one occluded region caused")
    heatmap_region: Literal["whole image", "face crop"] = Field(
        description="what the heatmap shows: the whole upload, or the face crop stage 1 made of it")
    heatmap_size: list[int] = Field(min_length=2, max_length=2,
                                    description="[width, height] of the image the map was made on: the stage-1 "
                                                "image, or a downscaled copy of it when that is larger than the "
                                                "server's explanation pixel budget (then 'method' says so)")
    method: str = Field(description="how the map was made")


class Stage1Info(BaseModel):
    """How an upload becomes the stage-1 image: the experts' checkpoints say (dfpipe.data.preprocess.Stage1)."""

    max_side: int = Field(description="longer side above this is downscaled first (0 = never)")
    face_crop: str = Field(description="face detector (none = no face crop)")
    face_margin: float = Field(description="face crop side / face box side")
    face_policy: str = Field(description="image without a face: scored whole (whole | largest | skip)")
    max_pixels: int = Field(description="the experts' stage-1 pixel limit")


class InputInfo(BaseModel):
    mode: str = Field(description="how the expert takes its input from the stage-1 image: resize | "
                                  "resize_short_crop | crop")
    size: int = Field(description="the expert's input side, in pixels")


class Health(BaseModel):
    status: Literal["ok"]
    model: str = Field(description="expert names @ card digest")
    experts: list[str]
    combine: str = Field(description="how the experts' scores are combined (mean_prob | mean_logit | stack)")
    tta: list[str] = Field(description="test-time augmentation views averaged per expert")
    device: str
    thresholds: dict[str, float] = Field(description="the card's thresholds (t_real, t_fake, t_decision...)")
    max_bytes: int = Field(description="largest image accepted, in bytes")
    max_pixels: int = Field(description="most pixels an image may have")
    max_batch_images: int = Field(description="most images in one /predict/batch request")
    mean_batch: float | None = Field(description="mean images per model call so far (null before the first)")
    stage1: Stage1Info = Field(description="the stage-1 part of the preprocessing contract, from the checkpoints")
    inputs: dict[str, InputInfo] = Field(description="each expert's input policy, by expert name")


class Error(BaseModel):
    detail: str = Field(description="what is wrong, in one line")


def _errors(settings: ServeSettings, many: bool) -> dict[int | str, dict[str, Any]]:
    """The 4xx responses of an image endpoint, for ``responses=``."""
    body = _mb(settings.max_batch_bytes if many else settings.max_body_bytes)
    n = settings.max_batch_images if many else 1
    too_large = (f"request body over {body}, an image over {_mb(settings.max_bytes)}" +
                 (f", more than {n} images" if many else "") +
                 f", or a multipart form of more than {n + FORM_SLACK} text fields or files")
    docs = {400: "body is not valid JSON or not a well-formed multipart form; an image is not valid base64 or "
                 "decodes to 0 bytes",
            411: "multipart upload without a Content-Length header",
            413: too_large,
            415: "content type is neither application/json nor multipart/form-data",
            422: "body does not match the request schema (missing field, wrong type, empty string or list, "
                 f"a multipart field other than '{FILE_FIELD}')" +
                 ("; an image that is not usable (unknown format, truncated, too many pixels) is not a 422 here "
                  "but an error in its slot of the 200 response" if many else
                  ", or the bytes are not a usable image (unknown format, truncated, too many pixels)")}
    return {code: {"model": Error, "description": text} for code, text in docs.items()}


def _body_doc(schema: type[BaseModel], many: bool, settings: ServeSettings) -> dict:
    """Both accepted request bodies, for /docs (the handlers read and validate the body themselves)."""
    file_schema = {"type": "string", "format": "binary",
                   "description": f"an image file, at most {_mb(settings.max_bytes)}"}
    prop = ({"type": "array", "items": file_schema, "minItems": 1, "maxItems": settings.max_batch_images}
            if many else file_schema)
    # the server refuses any other field (422 naming it): the schema says so, rather than let clients think a
    # stray field is ignored
    form = {"type": "object", "properties": {FILE_FIELD: prop}, "required": [FILE_FIELD],
            "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema.model_json_schema()},
        "multipart/form-data": {"schema": form, "encoding": {FILE_FIELD: {"contentType": "image/*"}}}}}}


# ----------------------------------------------------------------------------- request parsing
async def _read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise InputError(413, f"request body is larger than the {_mb(limit)} limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(413, f"request body is larger than the {_mb(limit)} limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _validated(model: type[BaseModel], payload: Any, key: str, settings: ServeSettings) -> BaseModel:
    """``payload`` validated by the request model (the schema) -> 422, or 413 for a size limit; one line
    that names the field."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors()
    want = '{"image": "<base64>"}' if key == "image" else '{"images": ["<base64>", ...]}'
    by_type = {e["type"]: e for e in errors}
    if "too_long" in by_type:
        n = len(payload[key])
        raise InputError(413, f"{n} images in one request; the limit is {settings.max_batch_images}")
    if "string_too_long" in by_type:
        raise InputError(413, f"{_where(by_type['string_too_long']['loc'])} is longer than "
                              f"{settings.max_image_chars} characters: the image limit is {_mb(settings.max_bytes)}")
    e = errors[0]
    where = _where(e["loc"])
    if e["type"] == "model_type":
        msg = f"the JSON body must be an object: send {want}"
    elif e["type"] == "missing":
        msg = f"missing field '{key}': send {want}"
    elif e["type"] == "string_type":
        msg = f"{where} must be a base64 string, got {type(e['input']).__name__}"
    elif e["type"] == "string_too_short":
        msg = f"{where} is empty: send the image file's bytes in base64"
    elif e["type"] == "list_type":
        msg = f"'{key}' must be a list of base64 strings, got {type(e['input']).__name__}"
    elif e["type"] == "too_short":
        msg = f"'{key}' is empty: send 1 to {settings.max_batch_images} images"
    else:
        msg = f"{where}: {e['msg']}"
    raise InputError(422, msg)


def _where(loc: tuple) -> str:
    if len(loc) >= 2 and isinstance(loc[1], int):
        return f"'{loc[0]}' item {loc[1]}"
    return f"'{loc[0]}'" if loc else "the body"


async def _json_images(request: Request, settings: ServeSettings, many: bool) -> list[bytes]:
    limit = settings.max_batch_bytes if many else settings.max_body_bytes
    payload = parse_json(await _read_capped(request, limit))
    image_model, batch_model = request_models(settings)
    try:
        if many:
            values = _validated(batch_model, payload, "images", settings).images  # type: ignore[attr-defined]
        else:
            values = [_validated(image_model, payload, "image", settings).image]  # type: ignore[attr-defined]
    except RecursionError:  # a structure nested deeper than the validator (or its error report) can walk
        raise InputError(400, "request body is nested too deeply") from None
    return [b64_to_bytes(v, settings.max_bytes) for v in values]


def parse_json(body: bytes) -> Any:
    """The JSON body, or a 400 naming what is wrong; every error json.loads can raise on client input is one:
    syntax, encoding, nesting deeper than the parser's recursion limit, an integer past Python's digit limit."""
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise InputError(400, f"request body is not valid JSON: {exc.msg} at byte {exc.pos}") from None
    except UnicodeDecodeError:
        raise InputError(400, "request body is not valid JSON: not UTF-8 text") from None
    except RecursionError:
        raise InputError(400, "request body is not valid JSON here: nested too deeply") from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise InputError(400, f"request body is not valid JSON here: {str(exc).splitlines()[0]}") from None


async def _form_images(request: Request, limit: int, max_bytes: int, max_files: int) -> list[bytes]:
    """The images of a multipart form: up to ``max_files`` parts named ``file`` (with a filename or without),
    and no other field (422, naming it; a form of far more parts than that is a 413 before it is read)."""
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():  # the form parser spools whole parts: only a declared size bounds them
        raise InputError(411, "a multipart upload needs a Content-Length header")
    if int(declared) > limit:
        raise InputError(413, f"request body is larger than the {_mb(limit)} limit")
    max_parts = max_files + FORM_SLACK  # per kind (files, fields); the images are counted below
    try:
        form = await request.form(max_files=max_parts, max_fields=max_parts, max_part_size=limit)
    except InputError:  # from Guard's receive: too many bytes, or too slow
        raise
    except Exception as exc:  # noqa: BLE001 - starlette raises several types for a malformed form
        detail = str(getattr(exc, "detail", exc))
        if detail.startswith("Too many"):  # files or fields
            raise InputError(413, f"too many parts in the form: the limit is {max_parts} fields or files; "
                                  f"send the image{'s' if max_files > 1 else ''} as field '{FILE_FIELD}' "
                                  "and nothing else") from None
        raise InputError(400, f"malformed multipart form: {detail}") from None
    unexpected = [name for name in form.keys() if name != FILE_FIELD]
    stray = (f"unexpected field{'s' if len(unexpected) > 1 else ''} "
             f"{', '.join(repr(name) for name in unexpected)} in the form") if unexpected else ""
    values = form.getlist(FILE_FIELD)
    if not values:
        raise InputError(422, f"missing field '{FILE_FIELD}': upload the image as multipart field '{FILE_FIELD}'" +
                              (f" ({stray})" if stray else ""))
    if stray:
        raise InputError(422, f"{stray}: send the image{'s' if max_files > 1 else ''} as field '{FILE_FIELD}' "
                              "and nothing else")
    if len(values) > max_files:
        raise InputError(413, f"{len(values)} images in one request; the limit is {max_files}")
    out = []
    try:
        for v in values:
            if isinstance(v, UploadFile):
                out.append(check_size(await v.read(max_bytes + 1), max_bytes))
            else:  # a part without a filename: the file's bytes, or base64 text of them
                out.append(_text_part_bytes(v, max_bytes))
    finally:
        await form.close()  # starlette's spool files, now rather than at garbage collection
    return out


def _text_part_bytes(value: str, max_bytes: int) -> bytes:
    """The image in a form part sent without a filename, which starlette hands over as text: base64 text of
    the file (data URLs too) is decoded; anything else is the file's own bytes, recovered from that text."""
    try:
        return b64_to_bytes(value, max_bytes)
    except InputError as exc:
        if exc.status != 400:
            raise
    # starlette decoded the part as UTF-8, or as Latin-1 where that failed: undo whichever it did (an image
    # file is never valid UTF-8, so its Latin-1 reading is the one that round-trips)
    try:
        raw = value.encode("latin-1")
        raw.decode("utf-8")
        raw = value.encode("utf-8")  # valid UTF-8: it was decoded as UTF-8
    except UnicodeEncodeError:
        raw = value.encode("utf-8")
    except UnicodeDecodeError:
        pass  # not UTF-8: it was decoded as Latin-1
    return check_size(raw, max_bytes)


async def _request_images(request: Request, settings: ServeSettings, many: bool) -> list[bytes]:
    ctype = _content_type(request)
    if ctype == "application/json":
        return await _json_images(request, settings, many)
    if ctype == "multipart/form-data":
        limit = settings.max_batch_bytes if many else settings.max_body_bytes
        return await _form_images(request, limit, settings.max_bytes, settings.max_batch_images if many else 1)
    raise InputError(415, f"unsupported content type {ctype or '(none)'}: send application/json "
                          f"{{\"image\": \"<base64>\"}} or multipart/form-data with a '{FILE_FIELD}' field")


# ----------------------------------------------------------------------------- the guard
def _open_route(path: str) -> bool:
    return path == "/health"


class Guard:
    """ASGI middleware in front of every route: what must hold before and while a request is read.

    - ``Transfer-Encoding`` together with ``Content-Length``: 400 (which one frames the body is ambiguous, and
      the pair let a 1000 MB chunked body pass a small declared length);
    - the API token, when set, on every route but ``/health``: ``Authorization: Bearer <token>``, or the cookie
      the page sets when opened as ``/?token=<token>``; else 401;
    - a POST body is counted as it arrives, JSON and multipart alike: 413 past the route's limit, 408 when it has
      not all arrived ``request_timeout_s`` after the headers;
    - one access-log line per request: client, method, route, status, milliseconds, pixels of the images decoded.
    """

    def __init__(self, app: Any, settings: ServeSettings):
        self.app, self.settings = app, settings
        self.token = settings.token.encode() if settings.token else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status, cookie = 0, None

        async def send_logged(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if cookie:
                    message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal:
                await _send_error(send_logged, *refusal)
                return
            cookie = self._cookie_to_set(scope)
            if scope["method"] == "POST":
                receive = self._counted(receive, self.settings.body_limit(scope["path"]))
            await self.app(scope, receive, send_logged)
        finally:
            client = scope.get("client")
            pixels = scope.get("state", {}).get("pixels", 0)
            # status "-": no response was started (the client left, or the app failed past every handler)
            access_log.info("%s %s %s %s %.1fms pixels=%d", f"{client[0]}:{client[1]}" if client else "-",
                            scope["method"], scope["path"], status or "-", (time.perf_counter() - t0) * 1000, pixels)

    def _refusal(self, scope: dict) -> tuple[int, str, list] | None:
        headers = {k.lower() for k, _ in scope["headers"]}
        if b"transfer-encoding" in headers and b"content-length" in headers:
            return 400, "both Transfer-Encoding and Content-Length: send one of them", [(b"connection", b"close")]
        if self.token and not _open_route(scope["path"]) and not self._authorised(scope):
            return 401, "missing or wrong API token: send 'Authorization: Bearer <token>'", [
                (b"www-authenticate", b"Bearer")]
        return None

    def _authorised(self, scope: dict) -> bool:
        assert self.token is not None
        given = []
        for k, v in scope["headers"]:
            k = k.lower()
            if k == b"authorization" and v[:7].lower() == b"bearer ":
                given.append(v[7:].strip())
            elif k == b"cookie":
                given += _values(v.split(b";"), TOKEN_COOKIE.encode())
        if scope["path"] == "/":
            given += _values(scope.get("query_string", b"").split(b"&"), b"token")
        return any(hmac.compare_digest(g.strip(), self.token) for g in given)

    def _cookie_to_set(self, scope: dict) -> bytes | None:
        """The page opened as /?token=...: its own fetches then carry the token as a cookie (same site only)."""
        if self.token and scope["path"] == "/" and b"token=" in scope.get("query_string", b""):
            return TOKEN_COOKIE.encode() + b"=" + self.token + b"; HttpOnly; SameSite=Strict; Path=/"
        return None

    def _counted(self, receive: Any, limit: int) -> Any:
        received = 0
        deadline = time.monotonic() + self.settings.request_timeout_s

        async def counted() -> dict:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise InputError(408, f"request body not received within {self.settings.request_timeout_s:g} s"
                                 ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise InputError(413, f"request body is larger than the {_mb(limit)} limit")
            return message

        return counted


def _values(pairs: list[bytes], name: bytes) -> list[bytes]:
    """The values of ``name=value`` items (cookie pairs, query parameters)."""
    return [v for k, _, v in (p.strip().partition(b"=") for p in pairs) if k == name]


async def _send_error(send: Any, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------- the app
@dataclass
class _State:
    ensemble: Ensemble
    model: str
    batcher: MicroBatcher
    bodies: Budget    # request bodies until their images are decoded
    decodes: Budget   # images while they are decoded
    explainer: ThreadPoolExecutor
    explaining: int = 0  # explanations running or waiting for the explanation thread


def create_app(settings: ServeSettings | None = None, ensemble: Ensemble | None = None) -> FastAPI:
    """The app; the ensemble is loaded from ``settings`` at start-up unless one is given.

    Raises :class:`~dfpipe.serve.service.ServeError` for an ensemble that cannot be served (``combine: rank``):
    here for a given one, at start-up for one loaded from the card.
    """
    settings = settings or ServeSettings()
    if ensemble is not None:
        check_servable(ensemble, settings.card)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ens = (ensemble if ensemble is not None else
               load_ensemble(settings.card, settings.models_dir, settings.device, serving=True))
        batcher = MicroBatcher(lambda items: score_inputs(ens, items), settings.max_batch,
                               max_queue=settings.max_queue)
        await batcher.start()
        wait = dict(max_waiting=settings.max_waiting, timeout_s=settings.busy_timeout_s)
        explainer = ThreadPoolExecutor(1, thread_name_prefix="dfpipe-explain")
        app.state.dfpipe = _State(ens, model_id(settings.card, ens.names), batcher,
                                  Budget("request body", settings.body_memory, **wait),
                                  Budget("image decoding", settings.decode_memory, **wait), explainer)
        yield
        await batcher.stop()
        explainer.shutdown(wait=True)

    app = FastAPI(title="dfpipe deepfake detector", version="0.1.0", lifespan=lifespan,
                  description="Scores images with the stage-5 ensemble (higher = more likely fake). Every error "
                              "is a 4xx with {\"detail\": message} (503 with Retry-After when the server is at "
                              "its bounds); the codes are listed per endpoint.")
    app.add_exception_handler(InputError, _input_error)
    app.add_middleware(Guard, settings=settings)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _routes(app, settings)
    return app


async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
    headers = {}
    if isinstance(exc, Busy):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status in (408, 411, 413):  # the body is not read to its end: the connection cannot carry another
        headers["Connection"] = "close"
    return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)


def _body_cost(request: Request, settings: ServeSettings) -> int:
    """Memory a request's body will hold (its declared length, else the route's limit, times BODY_FACTOR)."""
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else settings.body_limit(request.url.path)
    return min(size, settings.body_limit(request.url.path)) * BODY_FACTOR.get(_content_type(request), 1)


def _routes(app: FastAPI, settings: ServeSettings) -> None:
    image_model, batch_model = request_models(settings)

    def state(request: Request) -> _State:
        return request.app.state.dfpipe

    def decode_cost(data: bytes) -> int:
        """Decode memory of one upload, from its header (an image over the pixel limit is refused unread)."""
        pixels = image_pixels(data)
        return (pixels if pixels <= settings.max_pixels else 0) * DECODE_BYTES_PER_PIXEL + len(data)

    async def prepare(request: Request, datas: list[bytes], explain: bool = False) -> list[Prepared | InputError]:
        """The uploads of a request decoded one after another, each to the experts' inputs (the full image is
        dropped at once), under ONE reservation of the decode budget sized for the largest: a request waits for
        its turn once, then runs to its end (interleaved per image, concurrent batches would all time out half
        done). A bad image is its InputError in its slot; Busy is raised."""
        s = state(request)
        out: list[Prepared | InputError] = []
        async with s.decodes.hold(max(map(decode_cost, datas), default=0)):
            for i in range(len(datas)):
                try:
                    p = await run_in_threadpool(prepare_upload, s.ensemble, datas[i], settings.max_bytes,
                                                settings.max_pixels, settings.explain_max_pixels if explain else 0)
                    request.state.pixels = getattr(request.state, "pixels", 0) + p.pixels
                    out.append(p)
                except Busy:
                    raise
                except InputError as exc:
                    out.append(exc)
                datas[i] = b""  # its bytes are no longer needed
        return out

    async def one_image(request: Request, explain: bool = False) -> Prepared:
        s = state(request)
        async with s.bodies.hold(_body_cost(request, settings)):
            (p,) = await prepare(request, await _request_images(request, settings, many=False), explain)
        if isinstance(p, InputError):
            raise p
        return p

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health", response_model=Health)
    async def health(request: Request) -> Health:
        s = state(request)
        ens = s.ensemble
        return Health(status="ok", model=s.model, experts=ens.names, combine=ens.combine, tta=ens.tta,
                      device=str(ens.device), thresholds=ens.thresholds or {}, max_bytes=settings.max_bytes,
                      max_pixels=settings.max_pixels, max_batch_images=settings.max_batch_images,
                      mean_batch=float(np.mean(s.batcher.batch_sizes)) if s.batcher.batch_sizes else None,
                      stage1=Stage1Info(**dataclasses.asdict(ens.stage1)),
                      inputs={e.name: InputInfo(mode=p.input.mode, size=p.input.size)
                              for e, p in zip(ens.experts, ens.preps)})

    @app.post("/predict", response_model=Prediction, openapi_extra=_body_doc(image_model, False, settings),
              responses=_errors(settings, False))
    async def predict(request: Request) -> Prediction:
        s = state(request)
        p = await one_image(request)
        score = (await s.batcher.score([p.inputs]))[0]
        return Prediction(result=score, verdict=s.ensemble.verdict(score), model=s.model)

    @app.post("/predict/batch", response_model=BatchPrediction, openapi_extra=_body_doc(batch_model, True, settings),
              responses=_errors(settings, True))
    async def predict_batch(request: Request) -> BatchPrediction:
        s = state(request)
        async with s.bodies.hold(_body_cost(request, settings)):
            items: list[Any] = await prepare(request, await _request_images(request, settings, many=True))
        for i, it in enumerate(items):  # one bad image is reported in its slot; the others are still scored
            if isinstance(it, InputError):
                items[i] = BatchItem(error=str(it))
        good = [i for i, it in enumerate(items) if isinstance(it, Prepared)]
        scores = await s.batcher.score([items[i].inputs for i in good])
        for i, sc in zip(good, scores):
            items[i] = BatchItem(result=sc, verdict=s.ensemble.verdict(sc))
        return BatchPrediction(results=items, model=s.model)

    @app.post("/explain", response_model=Explanation, openapi_extra=_body_doc(image_model, False, settings),
              responses=_errors(settings, False))
    async def explain(request: Request) -> Explanation:
        s = state(request)
        if s.explaining > settings.max_explain_waiting:
            raise Busy(f"server busy: {s.explaining} explanations already running or waiting; retry later",
                       retry_after=10)
        s.explaining += 1
        try:
            p = await one_image(request, explain=True)
            score = (await s.batcher.score([p.inputs]))[0]  # the /predict score, batched like any other
            heat = await asyncio.get_running_loop().run_in_executor(
                s.explainer, explanation_map, s.ensemble, p.explain_image, settings.explain_grid,
                lambda: s.batcher.idle, time.monotonic() + settings.explain_timeout_s)
        finally:
            s.explaining -= 1
        if heat is None:
            raise Busy(f"the explanation took longer than {settings.explain_timeout_s:g} s under the current load; "
                       "retry later", retry_after=30)
        rgb, scale = await run_in_threadpool(overlay, p.explain_image, heat)
        png = base64.b64encode(await run_in_threadpool(png_bytes, rgb)).decode()
        img = p.explain_image
        return Explanation(result=score, verdict=s.ensemble.verdict(score), model=s.model,
                           heatmap=f"data:image/png;base64,{png}", heatmap_scale=scale, heatmap_region=p.explain_region,
                           heatmap_size=[img.shape[1], img.shape[0]],
                           method=f"occlusion (blur, {settings.explain_grid}x{settings.explain_grid} grid) "
                                  f"of the {p.explain_region}" + (f", on a copy of {img.shape[1]}x{img.shape[0]} px"
                                                                   if p.explain_scaled else ""))


EXPLAIN_CHUNK = 4  # occluded copies per model call: a /predict waits for at most one such call


def explanation_map(ens: Ensemble, img: np.ndarray, grid: int, idle: Any, deadline: float) -> np.ndarray | None:
    """The occlusion map of a stage-1 image (its explanation copy), scored by the whole ensemble a few copies at a
    time, each call after the model thread has gone idle (or waited ``paced``'s pause): explanations give way to
    /predict. None when ``deadline`` (time.monotonic) passed first."""
    try:
        _, heat = occlusion_map(paced(ens.score_prepared, idle, EXPLAIN_CHUNK, deadline), img, grid)
    except TimeoutError:
        return None
    return heat


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory``: settings from DFPIPE_MODELS, DFPIPE_CARD, DFPIPE_DEVICE,
    DFPIPE_MAX_BYTES, DFPIPE_MAX_MEMORY_MB and DFPIPE_TOKEN (run uvicorn with ``--limit-concurrency`` and
    ``--timeout-keep-alive``; ``dfpipe serve`` sets those, and a deadline for request headers, itself)."""
    env = os.environ.get
    return create_app(ServeSettings(models_dir=env("DFPIPE_MODELS", DEFAULT_MODELS),
                                    card=env("DFPIPE_CARD", DEFAULT_CARD),
                                    device=env("DFPIPE_DEVICE", "auto"),
                                    max_bytes=int(env("DFPIPE_MAX_BYTES", DEFAULT_MAX_BYTES)),
                                    max_memory=int(float(env("DFPIPE_MAX_MEMORY_MB", 1024)) * 2**20),
                                    token=env("DFPIPE_TOKEN") or None))
