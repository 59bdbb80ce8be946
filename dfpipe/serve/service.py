"""What the CLI and the HTTP API share: load the ensemble from its card with one-line errors, check
and decode uploaded bytes (to the experts' small inputs at once), memory budgets (:class:`Budget`) and a bounded
micro-batcher that runs every model call on one worker thread.

Scoring itself is :class:`dfpipe.ensemble_predict.Ensemble` (``score_images`` / ``score_files`` / ``verdict``),
the same path as the submission; nothing here computes a score. An upload is only decoded here:
``Ensemble.score_images`` applies the preprocessing contract read from the checkpoints (stage 1 with its
face crop, then each expert's input policy: :mod:`dfpipe.data.preprocess`), as every other path does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import json
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..errors import UserError
from ..layout import Layout
from ..data.images import ImageError, decode_image
from ..data.preprocess import Stage1, downscale

if TYPE_CHECKING:  # torch and the models load only when a command needs them (fast --help)
    from ..ensemble_predict import Ensemble

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_CARD = Layout().card  # where stage 5 writes the card and stage 4 the experts: the catalog's defaults
DEFAULT_MODELS = Layout().models
# The detector the repo ships (bench/build_detector.py: the benchmark's recipe trained on the five dev sources, its
# MODEL_CARD.md beside it): what the CLI, the API and the page load when no card is named.
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "detector"


def resolve_model(card: str | None, models: str | None) -> tuple[str, str]:
    """(card, models folder) to load. Neither named: the shipped detector (:data:`SHIPPED_DIR`), or the DAG's card
    and models when the install has none. A card or a models folder named: the DAG's defaults for the other."""
    if card is None and models is None and (SHIPPED_DIR / "ensemble.json").is_file():
        return str(SHIPPED_DIR / "ensemble.json"), str(SHIPPED_DIR)
    return card or DEFAULT_CARD, models or DEFAULT_MODELS
DEFAULT_MAX_BYTES = 20 * 1024 * 1024


class ServeError(UserError, RuntimeError):
    """A problem the user can fix (missing card, empty folder...): shown as one line, no traceback."""


class RequestError(ValueError):
    """A bad request (upload, body, form): ``status`` is the HTTP status (4xx), the message says what is wrong. Not
    :class:`dfpipe.errors.InputError` (a stage's missing or unreadable input file)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Busy(RequestError):
    """The server is at one of its bounds (memory budget, queue): 503 with ``Retry-After`` seconds."""

    def __init__(self, message: str, retry_after: int = 2):
        super().__init__(503, message)
        self.retry_after = retry_after


def load_ensemble(card: str | Path, models_dir: str | Path, device: str = "auto", serving: bool = False) -> Ensemble:
    """The ensemble stage 5 wrote ``card`` for, loaded once; every failure is a one-line ServeError.

    ``serving``: for the HTTP API, which refuses a card it cannot serve (:func:`check_servable`).
    """
    import torch

    from ..ensemble_predict import Ensemble

    card, models_dir = Path(card), Path(models_dir)
    if not models_dir.is_dir():
        raise ServeError(f"{models_dir}: model folder not found (train the experts with dvc repro, or pass --models)")
    if not card.is_file():
        raise ServeError(f"{card}: ensemble card not found (make it with dvc repro ensemble_predict, or pass --card)")
    if serving:  # before loading the models: a card that cannot be served fails at once
        try:
            combine = json.loads(card.read_text()).get("combine")
        except (OSError, ValueError, AttributeError):
            combine = None  # reported below, by from_card
        if combine == "rank":
            raise ServeError(_RANK_REFUSED.format(card=card))
    dev = None if device == "auto" else torch.device(device)
    try:
        ens = Ensemble.from_card(card, models_dir, dev)
    except json.JSONDecodeError as exc:
        raise ServeError(f"{card}: not a JSON ensemble card ({exc})") from None
    except KeyError as exc:
        raise ServeError(f"{card}: ensemble card has no {exc} entry (rerun stage 5)") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise ServeError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if serving:
        check_servable(ens, card)
    elif ens.combine == "rank":
        log.warning("combine 'rank' scores are ranks within a batch: single-image scores and verdicts mean little")
    log.info("loaded %s (%s, %d TTA views) on %s", "+".join(ens.names), ens.combine, len(ens.views), ens.device)
    return ens


def check_servable(ens: Ensemble, card: str | Path) -> None:
    """Refuse (ServeError) an ensemble whose score for one image depends on the other images scored with it.

    ``combine: rank`` turns each expert's scores into ranks within the scored batch: behind the API a
    user's score, and verdict, would depend on whichever requests the micro-batcher grouped with theirs.
    """
    if ens.combine == "rank":
        raise ServeError(_RANK_REFUSED.format(card=card))


_RANK_REFUSED = ("{card}: combine 'rank' cannot be served: it scores an image by its rank among the images scored "
                 "with it, so one request's score would depend on other requests in the same batch. Re-run stage 5 "
                 "with ensemble_predict.combine: mean_prob, mean_logit or stack (in params.yaml, then dvc repro "
                 "ensemble_predict) and serve the new card")


def model_id(card: str | Path, names: list[str]) -> str:
    """``expert+expert@<card sha256[:8]>``: names the exact ensemble that scored a request."""
    digest = hashlib.sha256(Path(card).read_bytes()).hexdigest()[:8] if Path(card).is_file() else "nocard"
    return f"{'+'.join(names)}@{digest}"


def read_card(card: str | Path) -> tuple[dict, list[str]]:
    """(the ensemble card as JSON, its experts' names), before any model loads; a ServeError naming the card when
    it is missing or not a card."""
    try:
        raw = json.loads(Path(card).read_text(encoding="utf-8"))
        names = [str(e["name"]) for e in raw["experts"]]
    except FileNotFoundError:
        raise ServeError(f"{card}: ensemble card not found (make it with dvc repro ensemble_predict, or pass --card)"
                         ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ServeError(f"{card}: not a JSON ensemble card ({type(exc).__name__}: {exc})") from None
    return raw, names


def card_model_id(card: str | Path) -> str:
    """:func:`model_id` from the card alone (its experts' names), before any model loads (:func:`read_card`)."""
    return model_id(card, read_card(card)[1])


# ----------------------------------------------------------------------------- uploads
def b64_to_bytes(text: Any, max_bytes: int) -> bytes:
    """Base64 text (plain, URL-safe, wrapped lines, or a ``data:image/...;base64,`` URL) -> bytes."""
    if not isinstance(text, str):
        raise RequestError(422, f"'image' must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):  # the original web UI posted canvas.toDataURL() strings
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(400, "data URL is not base64-encoded (expected 'data:<type>;base64,...')")
    text = "".join(text.split())  # clients that wrap lines (base64.encodebytes)
    if len(text) * 3 // 4 > max_bytes + 3:  # refuse before decoding: no 4/3 x copy of an oversized body
        raise RequestError(413, f"image is larger than the {_mb(max_bytes)} limit")
    try:
        data = base64.b64decode(text.translate(_URLSAFE) + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "'image' is not valid base64") from None
    return check_size(data, max_bytes)


_URLSAFE = str.maketrans("-_", "+/")


def check_size(data: bytes, max_bytes: int) -> bytes:
    if not data:
        raise RequestError(400, "empty image (0 bytes)")
    if len(data) > max_bytes:
        raise RequestError(413, f"image is larger than the {_mb(max_bytes)} limit")
    return data


def pixel_limit(requested: int | None, stage1: Stage1) -> int:
    """The server's pixel limit per image: the model's (its stage-1 record, what stage 1 and ``dfpipe predict`` /
    ``scan`` accept: one rule, :func:`dfpipe.data.images.check_dimensions`), or a lower one an operator set to bound
    memory (``--max-pixels``); never higher, since nothing larger was ever stored for training."""
    if requested is None or requested >= stage1.max_pixels:
        if requested is not None and requested > stage1.max_pixels:
            log.warning("--max-pixels %d is above the model's limit: the model's %d applies", requested,
                        stage1.max_pixels)
        return stage1.max_pixels
    return max(1, int(requested))


def decode_upload(data: bytes, max_bytes: int, max_pixels: int, min_side: int = 1) -> np.ndarray:
    """Checked bytes -> RGB uint8 (H, W, 3) with stage 1's decoder and size rule (EXIF, alpha, bombs handled)."""
    check_size(data, max_bytes)
    try:
        return decode_image(data, max_pixels=max_pixels, min_side=min_side)
    except ImageError as exc:
        raise RequestError(422, f"not a usable image: {exc}") from None


# ----------------------------------------------------------------------------- prepared inputs
# What a served image is kept as between its decode and the model call: each input policy's (S, S, 3) uint8
# array, as Ensemble.score_prepared computes it (fit of the stage-1 image). A 49 MP upload is decoded, turned
# into these few KB and dropped at once, instead of waiting full-size in the micro-batch queue.
ModelInputs = dict[str, np.ndarray]


@dataclass
class Prepared:
    inputs: ModelInputs
    pixels: int  # of the upload, for the access log
    explain_image: np.ndarray | None = None  # the stage-1 image within the explanation's pixel budget
    explain_region: str = "whole image"  # or "face crop": what stage 1 made of the upload
    explain_scaled: bool = False  # explain_image is a downscaled copy of the stage-1 image


def model_inputs(ens: Ensemble, img: np.ndarray) -> ModelInputs:
    """A decoded image -> each input policy's array: :meth:`Ensemble.fit_inputs` of :meth:`Ensemble.stage1_image`,
    the first half of :meth:`Ensemble.score_images` (tests/test_serve_limits.py holds both to the same scores)."""
    return ens.fit_inputs(ens.stage1_image(img))


def score_inputs(ens: Ensemble, items: list[ModelInputs]) -> np.ndarray:
    """Ensemble scores (N,) of :func:`model_inputs` outputs: :meth:`Ensemble.score_inputs`."""
    return ens.score_inputs(items)


def explain_copy(ens: Ensemble, s1: np.ndarray, max_pixels: int) -> np.ndarray:
    """The stage-1 image ``s1`` downscaled (area filter) to at most ``max_pixels``, but never to a shorter side
    below the largest expert input: the heatmap of a 49 MP upload is made on ~1 MP, in seconds."""
    h, w = s1.shape[:2]
    if h * w <= max_pixels:
        return s1
    need = max(p.size for p in ens.policies)
    f = max(math.sqrt(max_pixels / (h * w)), need / min(h, w))
    return s1 if f >= 1 else downscale(s1, max(1, round(max(h, w) * f)))


def prepare_upload(ens: Ensemble, data: bytes, max_bytes: int, max_pixels: int,
                   explain_pixels: int = 0) -> Prepared:
    """Checked bytes -> :class:`Prepared` (decode, stage 1, input policies); the full-size image is dropped here.
    ``explain_pixels`` > 0 also keeps the explanation's copy of the stage-1 image."""
    img = decode_upload(data, max_bytes, max_pixels, ens.stage1.min_side)
    s1 = ens.stage1_image(img)
    out = Prepared(ens.fit_inputs(s1), img.shape[0] * img.shape[1])
    if explain_pixels > 0:
        whole = s1.shape[:2] == downscale(img, ens.stage1.max_side).shape[:2]
        out.explain_image = explain_copy(ens, s1, explain_pixels)
        out.explain_region = "whole image" if whole else "face crop"
        out.explain_scaled = out.explain_image.shape != s1.shape
    return out


# ----------------------------------------------------------------------------- memory budget
class Budget:
    """An asyncio token bucket of ``capacity`` units (bytes) that requests hold while they use that memory.

    First come, first served; a reservation above ``capacity`` takes the whole bucket (so one image at the pixel
    limit still goes through, alone). A request waits at most ``timeout_s`` and at most ``max_waiting`` wait at
    once; beyond either it is refused with :class:`Busy` (503 + Retry-After) instead of queueing without bound.
    """

    def __init__(self, name: str, capacity: int, max_waiting: int = 64, timeout_s: float = 30.0):
        self.name, self.capacity, self.max_waiting, self.timeout_s = name, max(1, int(capacity)), max_waiting, timeout_s
        self.free = self.capacity
        self.peak_used = 0  # for /health and tests
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @asynccontextmanager
    async def hold(self, amount: int):
        n = min(max(0, int(amount)), self.capacity)
        await self._acquire(n)
        try:
            yield n
        finally:
            self.free += n
            self._wake()

    async def _acquire(self, n: int) -> None:
        if not self._waiters and self.free >= n:
            self._take(n)
            return
        if len(self._waiters) >= self.max_waiting:
            raise Busy(f"server busy: {len(self._waiters)} requests already wait for {self.name} memory; retry later")
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            self._give_up(n, fut)
            raise Busy(f"server busy: no {self.name} memory free within {self.timeout_s:g} s; retry later",
                       retry_after=max(1, round(self.timeout_s / 4))) from None
        except BaseException:  # the client went away (cancelled): leave the queue
            self._give_up(n, fut)
            raise

    def _give_up(self, n: int, fut: asyncio.Future) -> None:
        if fut.done() and not fut.cancelled():
            self.free += n  # granted just as we gave up: give it back
        else:
            self._waiters = collections.deque(w for w in self._waiters if w[1] is not fut)
        self._wake()

    def _take(self, n: int) -> None:
        self.free -= n
        self.peak_used = max(self.peak_used, self.capacity - self.free)

    def _wake(self) -> None:
        while self._waiters and (self._waiters[0][1].done() or self._waiters[0][0] <= self.free):
            n, fut = self._waiters.popleft()
            if not fut.done():
                self._take(n)
                fut.set_result(None)


def _mb(n: int) -> str:
    return f"{n / 2**20:g} MB"


# ----------------------------------------------------------------------------- batching
class MicroBatcher:
    """Scores items (images, or their prepared inputs) of concurrent requests in shared batches on ONE worker
    thread.

    Torch inference stays off the event loop, and one model call at a time uses all intra-op threads
    without oversubscribing the cores. Whatever queued while the model was busy forms the next batch
    (up to ``max_batch``), so a lone request waits for nothing and a busy server batches by itself;
    ``max_wait_s`` > 0 additionally waits that long for company. ``max_queue`` > 0 bounds the items waiting:
    a request that would go past it is refused with :class:`Busy` (503), not queued (unless the queue is empty).
    """

    def __init__(self, score_fn: Callable[[list[Any]], np.ndarray], max_batch: int = 16,
                 max_wait_s: float = 0.0, max_queue: int = 0):
        self.score_fn, self.max_batch, self.max_wait_s = score_fn, max(1, max_batch), max_wait_s
        self.max_queue = max_queue
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="dfpipe-model")
        self.batch_sizes: list[int] = []  # for /health and tests: proof that batching happens
        self.running = 0  # items in the model call now
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    @property
    def idle(self) -> bool:
        """Nothing queued and no model call running (read from other threads: a hint, not a lock)."""
        return self.running == 0 and (self._queue is None or self._queue.empty())

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def score(self, images: list[Any]) -> list[float]:
        """Ensemble scores of ``images``, batched with other requests' images."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        # an empty queue takes any request (a batch larger than the bound is not refused forever)
        if self.max_queue and not self._queue.empty() and self._queue.qsize() + len(images) > self.max_queue:
            raise Busy(f"server busy: {self._queue.qsize()} images already wait for the model (the queue holds "
                       f"{self.max_queue}); retry later", retry_after=1)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for img, fut in zip(images, futures):
            self._queue.put_nowait((img, fut))
        return list(await asyncio.gather(*futures))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run other model work (the explanation map) on the model thread, in turn with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _next_batch(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        if self.max_wait_s > 0:
            await asyncio.sleep(self.max_wait_s)
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return [(img, fut) for img, fut in batch if not fut.done()]  # skip requests already cancelled

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
            self.running = len(batch)
            try:
                scores = await loop.run_in_executor(self.executor, self.score_fn, [b[0] for b in batch])
            except Exception as exc:  # noqa: BLE001 - the requests get the error, the loop lives on
                log.exception("scoring a batch of %d failed", len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            finally:
                self.running = 0
            for (_, fut), s in zip(batch, scores):
                if not fut.done():
                    fut.set_result(float(s))
