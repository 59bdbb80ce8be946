"""HTTP API and web page (FastAPI, served by uvicorn).

- ``POST /predict``: JSON ``{"image": "<base64 or data URL>"}`` (the original Flask clients' format)
  or a multipart upload (field ``file``) -> ``{"result": score, "verdict": ..., "model": ...}``.
- ``POST /predict/batch``: JSON ``{"images": [...]}`` or several ``file`` fields -> one result (or
  error) per image, in order.
- ``POST /explain``: as ``/predict``, plus an occlusion heatmap over the image (PNG data URL).
- ``GET /health``; ``GET /`` the web page; ``GET /docs`` the OpenAPI documentation.

Bad input is a 4xx with ``{"detail": message}``, never a 500. The ensemble is loaded once at
start-up (lifespan) and every model call runs on one worker thread through :class:`MicroBatcher`.
Several processes: ``DFPIPE_MODELS=models DFPIPE_CARD=submissions/ensemble.json uvicorn --factory
dfpipe.serve.api:app_from_env --workers 2``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from .explain import occlusion_map, overlay, png_bytes
from .service import (DEFAULT_CARD, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MODELS, InputError,
                      MicroBatcher, b64_to_bytes, check_size, decode_upload, load_ensemble, model_id)

if TYPE_CHECKING:
    from ..predict import Ensemble

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
FILE_FIELDS = ("file", "image", "files", "images")


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


# ----------------------------------------------------------------------------- schemas (OpenAPI docs)
class ImageRequest(BaseModel):
    image: str = Field(description="the image file's bytes in base64 (a data:image/...;base64, URL is fine)")


class BatchRequest(BaseModel):
    images: list[str] = Field(description="images in base64, as for /predict")


class Prediction(BaseModel):
    result: float = Field(description="ensemble score in [0, 1]; higher = more likely fake")
    verdict: str = Field(description="likely real | uncertain | likely fake")
    model: str = Field(description="the ensemble that scored it: expert names @ card digest")


class BatchItem(BaseModel):
    result: float | None = None
    verdict: str | None = None
    error: str | None = None


class BatchPrediction(BaseModel):
    results: list[BatchItem]
    model: str


class Explanation(Prediction):
    heatmap: str = Field(description="PNG data URL: the image with red (towards fake) / blue (towards real) regions")
    heatmap_scale: float = Field(description="largest score change one occluded region caused")
    method: str


def _body_doc(schema: type[BaseModel], many: bool) -> dict:
    """Both accepted request bodies, for /docs (the handlers read the body themselves)."""
    file_schema = {"type": "string", "format": "binary"}
    form = {"type": "object", "properties": {"file": {"type": "array", "items": file_schema} if many else file_schema},
            "required": ["file"]}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema.model_json_schema()},
        "multipart/form-data": {"schema": form}}}}


# ----------------------------------------------------------------------------- request parsing
async def _read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise InputError(413, f"request body is larger than the {limit / 2**20:g} MB limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(413, f"request body is larger than the {limit / 2**20:g} MB limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _json_images(request: Request, key: str, limit: int, max_bytes: int) -> list[bytes]:
    try:
        payload = json.loads(await _read_capped(request, limit))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(400, "request body is not valid JSON") from None
    if not isinstance(payload, dict) or key not in payload:
        want = '{"image": "<base64>"}' if key == "image" else '{"images": ["<base64>", ...]}'
        raise InputError(422, f"missing field '{key}': send {want}")
    values = payload[key] if key == "images" else [payload[key]]
    if not isinstance(values, list):
        raise InputError(422, "'images' must be a list of base64 strings")
    return [b64_to_bytes(v, max_bytes) for v in values]


async def _form_images(request: Request, limit: int, max_bytes: int, max_files: int) -> list[bytes]:
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():  # the form parser spools whole parts: only a declared size bounds them
        raise InputError(411, "a multipart upload needs a Content-Length header")
    if int(declared) > limit:
        raise InputError(413, f"request body is larger than the {limit / 2**20:g} MB limit")
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 8, max_part_size=limit)
    except Exception as exc:  # noqa: BLE001 - starlette raises several types for a malformed form
        raise InputError(400, f"malformed multipart form: {getattr(exc, 'detail', exc)}") from None
    out = []
    for name in FILE_FIELDS:
        for v in form.getlist(name):
            if isinstance(v, UploadFile):
                out.append(check_size(await v.read(max_bytes + 1), max_bytes))
            else:  # a text field holding base64
                out.append(b64_to_bytes(v, max_bytes))
    if not out:
        raise InputError(422, "missing field 'file': upload the image as multipart field 'file'")
    return out


async def _request_images(request: Request, settings: ServeSettings, many: bool) -> list[bytes]:
    ctype = _content_type(request)
    limit = settings.max_batch_bytes if many else settings.max_bytes * 4 // 3 + 65536  # base64 is 4/3 larger
    cap = settings.max_batch_images if many else 1
    if ctype == "application/json":
        images = await _json_images(request, "images" if many else "image", limit, settings.max_bytes)
    elif ctype == "multipart/form-data":
        images = await _form_images(request, limit, settings.max_bytes, cap)
    else:
        raise InputError(415, f"unsupported content type {ctype or '(none)'}: send application/json "
                              "{\"image\": \"<base64>\"} or multipart/form-data with a 'file' field")
    if not images:
        raise InputError(422, "'images' is empty")
    if len(images) > cap:
        raise InputError(413, f"{len(images)} images in one request; the limit is {cap}")
    return images


# ----------------------------------------------------------------------------- the app
@dataclass
class _State:
    ensemble: Ensemble
    model: str
    batcher: MicroBatcher


def create_app(settings: ServeSettings | None = None, ensemble: Ensemble | None = None) -> FastAPI:
    """The app; the ensemble is loaded from ``settings`` at start-up unless one is given."""
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ens = ensemble if ensemble is not None else load_ensemble(settings.card, settings.models_dir, settings.device)
        batcher = MicroBatcher(ens.score_images, settings.max_batch)
        await batcher.start()
        app.state.dfpipe = _State(ens, model_id(settings.card, ens.names), batcher)
        yield
        await batcher.stop()

    app = FastAPI(title="dfpipe deepfake detector", version="0.1.0", lifespan=lifespan,
                  description="Scores images with the stage-5 ensemble (higher = more likely fake).")
    app.add_exception_handler(InputError, _input_error)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _routes(app, settings)
    return app


async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)


def _routes(app: FastAPI, settings: ServeSettings) -> None:
    def state(request: Request) -> _State:
        return request.app.state.dfpipe

    async def decode(data: bytes) -> np.ndarray:
        return await run_in_threadpool(decode_upload, data, settings.max_bytes, settings.max_pixels)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health(request: Request) -> dict:
        s = state(request)
        ens = s.ensemble
        return {"status": "ok", "model": s.model, "experts": ens.names, "combine": ens.combine, "tta": ens.tta,
                "device": str(ens.device), "thresholds": ens.thresholds, "max_bytes": settings.max_bytes,
                "max_pixels": settings.max_pixels,
                "mean_batch": float(np.mean(s.batcher.batch_sizes)) if s.batcher.batch_sizes else None}

    @app.post("/predict", response_model=Prediction, openapi_extra=_body_doc(ImageRequest, False),
              responses={400: {}, 413: {}, 415: {}, 422: {}})
    async def predict(request: Request) -> Prediction:
        s = state(request)
        img = await decode((await _request_images(request, settings, many=False))[0])
        score = (await s.batcher.score([img]))[0]
        return Prediction(result=score, verdict=s.ensemble.verdict(score), model=s.model)

    @app.post("/predict/batch", response_model=BatchPrediction, openapi_extra=_body_doc(BatchRequest, True),
              responses={400: {}, 413: {}, 415: {}, 422: {}})
    async def predict_batch(request: Request) -> BatchPrediction:
        s = state(request)
        datas = await _request_images(request, settings, many=True)
        items: list[Any] = list(await asyncio.gather(*(decode(d) for d in datas), return_exceptions=True))
        for i, it in enumerate(items):  # one bad image is reported in its slot; the others are still scored
            if isinstance(it, InputError):
                items[i] = BatchItem(error=str(it))
            elif isinstance(it, BaseException):
                raise it
        good = [i for i, it in enumerate(items) if isinstance(it, np.ndarray)]
        scores = await s.batcher.score([items[i] for i in good])
        for i, sc in zip(good, scores):
            items[i] = BatchItem(result=sc, verdict=s.ensemble.verdict(sc))
        return BatchPrediction(results=items, model=s.model)

    @app.post("/explain", response_model=Explanation, openapi_extra=_body_doc(ImageRequest, False),
              responses={400: {}, 413: {}, 415: {}, 422: {}})
    async def explain(request: Request) -> Explanation:
        s = state(request)
        img = await decode((await _request_images(request, settings, many=False))[0])
        score = (await s.batcher.score([img]))[0]  # the /predict score, batched like any other
        _, heat = await s.batcher.run(occlusion_map, s.ensemble.score_images, img, s.ensemble.cache_size,
                                      settings.explain_grid)
        rgb, scale = await run_in_threadpool(overlay, img, heat)
        png = base64.b64encode(await run_in_threadpool(png_bytes, rgb)).decode()
        return Explanation(result=score, verdict=s.ensemble.verdict(score), model=s.model,
                           heatmap=f"data:image/png;base64,{png}", heatmap_scale=scale,
                           method=f"occlusion (blur, {settings.explain_grid}x{settings.explain_grid} grid)")


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory``: settings from DFPIPE_MODELS, DFPIPE_CARD, DFPIPE_DEVICE,
    DFPIPE_MAX_BYTES."""
    return create_app(ServeSettings(models_dir=os.environ.get("DFPIPE_MODELS", DEFAULT_MODELS),
                                    card=os.environ.get("DFPIPE_CARD", DEFAULT_CARD),
                                    device=os.environ.get("DFPIPE_DEVICE", "auto"),
                                    max_bytes=int(os.environ.get("DFPIPE_MAX_BYTES", DEFAULT_MAX_BYTES))))
