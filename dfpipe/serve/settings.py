"""The server's settings and the limits derived from them (bytes, pixels, memory budgets)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .service import DEFAULT_CARD, DEFAULT_MAX_BYTES, DEFAULT_MODELS


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
    # per image, from the header before decoding: None = the model's own limit (its stage-1 record, as stage 1 and
    # the CLI); an operator may set a lower one to bound memory (service.pixel_limit), never a higher one
    max_pixels: int | None = None
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


def pixels_doc(settings: ServeSettings) -> str:
    """The pixel rule for the API's documentation (the number itself comes from the model: GET /health)."""
    lower = f", or {settings.max_pixels:,} if lower (this server's limit)" if settings.max_pixels else ""
    return (f"at most the model's pixel limit{lower} and at least its shorter-side minimum, as stage 1 and "
            "dfpipe predict apply them (GET /health: max_pixels, min_side; 422 outside them)")


def megabytes(n: int) -> str:
    """A byte limit as people read it: ``20 MB``, ``30.1 MB``, ``64 KB`` (one decimal at most)."""
    return f"{round(n / 2**20, 1):g} MB" if n >= 2**20 else f"{round(n / 2**10, 1):g} KB"
