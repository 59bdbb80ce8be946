"""What the CLI and the HTTP API share: load the ensemble from its card with one-line errors, check
and decode uploaded bytes, and a micro-batcher that runs every model call on one worker thread.

Scoring itself is :class:`dfpipe.ensemble_predict.Ensemble` (``score_images`` / ``score_files`` / ``verdict``),
the same path as the submission; nothing here computes a score. An upload is only decoded here:
``Ensemble.score_images`` applies the preprocessing contract read from the checkpoints (stage 1 with its
face crop, then each expert's input policy: :mod:`dfpipe.data.preprocess`), as every other path does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..errors import UserError
from ..layout import Layout
from ..data.images import ImageError, decode_image

if TYPE_CHECKING:  # torch and the models load only when a command needs them (fast --help)
    from ..ensemble_predict import Ensemble

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_CARD = Layout().card  # where stage 5 writes the card and stage 4 the experts: the catalog's defaults
DEFAULT_MODELS = Layout().models
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
# A server decodes several uploads at once: 50 MP (~150 MB as RGB) bounds each decode's memory.
DEFAULT_MAX_PIXELS = 50_000_000


class ServeError(UserError, RuntimeError):
    """A problem the user can fix (missing card, empty folder...): shown as one line, no traceback."""


class InputError(ValueError):
    """A bad upload: ``status`` is the HTTP status (4xx), the message says what is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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


# ----------------------------------------------------------------------------- uploads
def b64_to_bytes(text: Any, max_bytes: int) -> bytes:
    """Base64 text (plain, URL-safe, wrapped lines, or a ``data:image/...;base64,`` URL) -> bytes."""
    if not isinstance(text, str):
        raise InputError(422, f"'image' must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):  # the original web UI posted canvas.toDataURL() strings
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise InputError(400, "data URL is not base64-encoded (expected 'data:<type>;base64,...')")
    text = "".join(text.split())  # clients that wrap lines (base64.encodebytes)
    if len(text) * 3 // 4 > max_bytes + 3:  # refuse before decoding: no 4/3 x copy of an oversized body
        raise InputError(413, f"image is larger than the {_mb(max_bytes)} limit")
    try:
        data = base64.b64decode(text.translate(_URLSAFE) + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, "'image' is not valid base64") from None
    return check_size(data, max_bytes)


_URLSAFE = str.maketrans("-_", "+/")


def check_size(data: bytes, max_bytes: int) -> bytes:
    if not data:
        raise InputError(400, "empty image (0 bytes)")
    if len(data) > max_bytes:
        raise InputError(413, f"image is larger than the {_mb(max_bytes)} limit")
    return data


def decode_upload(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Checked bytes -> RGB uint8 (H, W, 3) with stage 1's decoder (EXIF, alpha, bombs handled)."""
    check_size(data, max_bytes)
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageError as exc:
        raise InputError(422, f"not a usable image: {exc}") from None


def _mb(n: int) -> str:
    return f"{n / 2**20:g} MB"


# ----------------------------------------------------------------------------- batching
class MicroBatcher:
    """Scores images of concurrent requests in shared batches on ONE worker thread.

    Torch inference stays off the event loop, and one model call at a time uses all intra-op threads
    without oversubscribing the cores. Whatever queued while the model was busy forms the next batch
    (up to ``max_batch``), so a lone request waits for nothing and a busy server batches by itself;
    ``max_wait_s`` > 0 additionally waits that long for company.
    """

    def __init__(self, score_fn: Callable[[list[np.ndarray]], np.ndarray], max_batch: int = 16,
                 max_wait_s: float = 0.0):
        self.score_fn, self.max_batch, self.max_wait_s = score_fn, max(1, max_batch), max_wait_s
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="dfpipe-model")
        self.batch_sizes: list[int] = []  # for /health and tests: proof that batching happens
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def score(self, images: list[np.ndarray]) -> list[float]:
        """Ensemble scores of ``images``, batched with other requests' images."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
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
            try:
                scores = await loop.run_in_executor(self.executor, self.score_fn, [b[0] for b in batch])
            except Exception as exc:  # noqa: BLE001 - the requests get the error, the loop lives on
                log.exception("scoring a batch of %d failed", len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), s in zip(batch, scores):
                if not fut.done():
                    fut.set_result(float(s))
