"""HTTP API and web page (FastAPI, served by uvicorn).

- ``POST /predict``: JSON ``{"image": "<base64 or data URL>"}`` (the original Flask clients' format)
  or a multipart upload (field ``file``) -> ``{"result": score, "verdict": ..., "model": ..., "demo": ...,
  "warning": ...}`` (``demo``: the model was trained on the synthetic demo data; every scoring response says it).
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
  field ``file`` and nothing else), or the bytes are not a usable image (unknown format, truncated, outside
  the model's pixel rule: :func:`dfpipe.data.images.check_dimensions`, the words stage 1 and the CLI use).

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
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..data.images import image_pixels
from .explain import occlusion_map, overlay, paced, png_bytes
from .identity import Identity, ensemble_identity
from .service import (DEFAULT_MAX_BYTES, Budget, Busy, RequestError,
                      MicroBatcher, Prepared, check_servable, load_ensemble, pixel_limit, prepare_upload, resolve_model,
                      score_inputs)
from .guard import Guard
from .requests import content_type, request_images
from .schemas import (BatchItem, BatchPrediction, Explanation, Health, IdentityInfo, InputInfo, Prediction, Stage1Info,
                      body_doc, error_responses, request_models)
from .settings import BODY_FACTOR, STATIC, ServeSettings, megabytes
from .settings import DECODE_BYTES_PER_PIXEL, IMAGE_FORMAT  # noqa: F401  (re-exported for clients and tests)

if TYPE_CHECKING:
    from ..ensemble_predict import Ensemble

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the app
@dataclass
class _State:
    ensemble: Ensemble
    identity: Identity
    max_pixels: int   # per image: the model's limit, or the lower one of the settings (service.pixel_limit)
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
        identity = ensemble_identity(settings.card, ens.names)
        if identity.demo:
            log.warning("%s", identity.warning)
        max_pixels = pixel_limit(settings.max_pixels, ens.stage1)
        _warn_past_budget(max_pixels, settings)
        app.state.dfpipe = _State(ens, identity, max_pixels, batcher,
                                  Budget("request body", settings.body_memory, **wait),
                                  Budget("image decoding", settings.decode_memory, **wait), explainer)
        yield
        await batcher.stop()
        explainer.shutdown(wait=True)

    app = FastAPI(title="dfpipe deepfake detector", version="0.1.0", lifespan=lifespan,
                  description="Scores images with the stage-5 ensemble (higher = more likely fake). Every error "
                              "is a 4xx with {\"detail\": message} (503 with Retry-After when the server is at "
                              "its bounds); the codes are listed per endpoint.")
    app.add_exception_handler(RequestError, _request_error)
    app.add_middleware(Guard, settings=settings)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _routes(app, settings)
    return app


async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
    headers = {}
    if isinstance(exc, Busy):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status in (408, 411, 413):  # the body is not read to its end: the connection cannot carry another
        headers["Connection"] = "close"
    return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)


def _warn_past_budget(max_pixels: int, settings: ServeSettings) -> None:
    """Say so when one image at the pixel limit needs more decoding memory than the budget holds: it then takes the
    whole budget, alone, and the process goes past ``max_memory`` by the difference (docs/serving.md)."""
    need = max_pixels * DECODE_BYTES_PER_PIXEL
    if need > settings.decode_memory:
        log.warning("an image at the %d-pixel limit needs %s to decode, more than the %s decoding budget of "
                    "--max-memory %s: such an image is decoded alone, past that budget; raise --max-memory or lower "
                    "--max-pixels to stay within it", max_pixels, megabytes(need), megabytes(settings.decode_memory),
                    megabytes(settings.max_memory))


def _body_cost(request: Request, settings: ServeSettings) -> int:
    """Memory a request's body will hold (its declared length, else the route's limit, times BODY_FACTOR)."""
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else settings.body_limit(request.url.path)
    return min(size, settings.body_limit(request.url.path)) * BODY_FACTOR.get(content_type(request), 1)


def _routes(app: FastAPI, settings: ServeSettings) -> None:
    image_model, batch_model = request_models(settings)

    def state(request: Request) -> _State:
        return request.app.state.dfpipe

    def decode_cost(data: bytes, max_pixels: int) -> int:
        """Decode memory of one upload, from its header (an image over the pixel limit is refused unread)."""
        pixels = image_pixels(data)
        return (pixels if pixels <= max_pixels else 0) * DECODE_BYTES_PER_PIXEL + len(data)

    async def prepare(request: Request, datas: list[bytes | RequestError], explain: bool = False
                      ) -> list[Prepared | RequestError]:
        """The uploads of a request decoded one after another, each to the experts' inputs (the full image is
        dropped at once), under ONE reservation of the decode budget sized for the largest: a request waits for
        its turn once, then runs to its end (interleaved per image, concurrent batches would all time out half
        done). A bad image (or an item that was no image to begin with: an RequestError already) is its RequestError in
        its slot; Busy is raised."""
        s = state(request)
        out: list[Prepared | RequestError] = []
        sizes = [decode_cost(d, s.max_pixels) for d in datas if isinstance(d, bytes)]
        async with s.decodes.hold(max(sizes, default=0)):
            for i in range(len(datas)):
                if isinstance(datas[i], RequestError):
                    out.append(datas[i])
                    continue
                try:
                    p = await run_in_threadpool(prepare_upload, s.ensemble, datas[i], settings.max_bytes,
                                                s.max_pixels, settings.explain_max_pixels if explain else 0)
                    request.state.pixels = getattr(request.state, "pixels", 0) + p.pixels
                    out.append(p)
                except Busy:
                    raise
                except RequestError as exc:
                    out.append(exc)
                datas[i] = b""  # its bytes are no longer needed
        return out

    async def one_image(request: Request, explain: bool = False) -> Prepared:
        s = state(request)
        async with s.bodies.hold(_body_cost(request, settings)):
            (p,) = await prepare(request, await request_images(request, settings, many=False), explain)
        if isinstance(p, RequestError):
            raise p
        return p

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health", response_model=Health)
    async def health(request: Request) -> Health:
        s = state(request)
        ens = s.ensemble
        who = s.identity
        return Health(status="ok", model=who.id, experts=ens.names, combine=ens.combine, tta=ens.tta,
                      identity=IdentityInfo(id=who.id, demo=who.demo, trained_on=who.trained_on, commit=who.commit,
                                            header=who.header, warning=who.warning),
                      device=str(ens.device), thresholds=ens.thresholds or {}, max_bytes=settings.max_bytes,
                      max_pixels=s.max_pixels, min_side=ens.stage1.min_side, max_batch_images=settings.max_batch_images,
                      mean_batch=float(np.mean(s.batcher.batch_sizes)) if s.batcher.batch_sizes else None,
                      stage1=Stage1Info(**dataclasses.asdict(ens.stage1)),
                      inputs={e.name: InputInfo(mode=p.input.mode, size=p.input.size)
                              for e, p in zip(ens.experts, ens.preps)})

    @app.post("/predict", response_model=Prediction, openapi_extra=body_doc(image_model, False, settings),
              responses=error_responses(settings, False))
    async def predict(request: Request) -> Prediction:
        s = state(request)
        p = await one_image(request)
        score = (await s.batcher.score([p.inputs]))[0]
        return Prediction(result=score, verdict=s.ensemble.verdict(score), **s.identity.fields())

    @app.post("/predict/batch", response_model=BatchPrediction, openapi_extra=body_doc(batch_model, True, settings),
              responses=error_responses(settings, True))
    async def predict_batch(request: Request) -> BatchPrediction:
        s = state(request)
        async with s.bodies.hold(_body_cost(request, settings)):
            items: list[Any] = await prepare(request, await request_images(request, settings, many=True))
        for i, it in enumerate(items):  # one bad image is reported in its slot; the others are still scored
            if isinstance(it, RequestError):
                items[i] = BatchItem(error=str(it))
        good = [i for i, it in enumerate(items) if isinstance(it, Prepared)]
        scores = await s.batcher.score([items[i].inputs for i in good])
        for i, sc in zip(good, scores):
            items[i] = BatchItem(result=sc, verdict=s.ensemble.verdict(sc))
        return BatchPrediction(results=items, **s.identity.fields())

    @app.post("/explain", response_model=Explanation, openapi_extra=body_doc(image_model, False, settings),
              responses=error_responses(settings, False))
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
        return Explanation(result=score, verdict=s.ensemble.verdict(score), **s.identity.fields(),
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
    card, models = resolve_model(env("DFPIPE_CARD"), env("DFPIPE_MODELS"))  # neither set: the shipped detector
    return create_app(ServeSettings(models_dir=models, card=card,
                                    device=env("DFPIPE_DEVICE", "auto"),
                                    max_bytes=int(env("DFPIPE_MAX_BYTES", DEFAULT_MAX_BYTES)),
                                    max_memory=int(float(env("DFPIPE_MAX_MEMORY_MB", 1024)) * 2**20),
                                    token=env("DFPIPE_TOKEN") or None))
