"""Request bodies to images: JSON (base64) and multipart parsing, every client error a 4xx with a message."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from .service import RequestError, b64_to_bytes, check_size

from .schemas import request_models
from .settings import FILE_FIELD, FORM_SLACK, ServeSettings, megabytes


# ----------------------------------------------------------------------------- request parsing
async def _read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is larger than the {megabytes(limit)} limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is larger than the {megabytes(limit)} limit")
        chunks.append(chunk)
    return b"".join(chunks)


def content_type(request: Request) -> str:
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
        raise RequestError(422, f"{n} images in one request; the limit is {settings.max_batch_images} images")
    if "string_too_long" in by_type:
        raise RequestError(413, f"{_where(by_type['string_too_long']['loc'])} is longer than "
                              f"{settings.max_image_chars} characters: the image limit is {megabytes(settings.max_bytes)}")
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
    raise RequestError(422, msg)


def _where(loc: tuple) -> str:
    if len(loc) >= 2 and isinstance(loc[1], int):
        return f"'{loc[0]}' item {loc[1]}"
    return f"'{loc[0]}'" if loc else "the body"


async def _json_images(request: Request, settings: ServeSettings, many: bool) -> list[bytes | RequestError]:
    limit = settings.max_batch_bytes if many else settings.max_body_bytes
    payload = parse_json(await _read_capped(request, limit))
    image_model, batch_model = request_models(settings)
    try:
        if many:
            values = _validated(batch_model, payload, "images", settings).images  # type: ignore[attr-defined]
        else:
            values = [_validated(image_model, payload, "image", settings).image]  # type: ignore[attr-defined]
    except RecursionError:  # a structure nested deeper than the validator (or its error report) can walk
        raise RequestError(400, "request body is nested too deeply") from None
    if not many:
        return [b64_to_bytes(values[0], settings.max_bytes)]
    return [_item_bytes(i, v, settings.max_bytes) for i, v in enumerate(values)]


def _item_bytes(i: int, value: str, max_bytes: int) -> bytes | RequestError:
    """One item of a batch: its bytes, or its error (empty, not base64, too large) in its slot, so the other items
    are still scored; the message names the item."""
    if not value:
        return RequestError(422, f"images[{i}] is empty: send the image file's bytes in base64")
    try:
        return b64_to_bytes(value, max_bytes)
    except RequestError as exc:
        return RequestError(exc.status, f"images[{i}]: {exc}")


def parse_json(body: bytes) -> Any:
    """The JSON body, or a 400 naming what is wrong; every error json.loads can raise on client input is one:
    syntax, encoding, nesting deeper than the parser's recursion limit, an integer past Python's digit limit."""
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc.msg} at byte {exc.pos}") from None
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not valid JSON: not UTF-8 text") from None
    except RecursionError:
        raise RequestError(400, "request body is not valid JSON here: nested too deeply") from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise RequestError(400, f"request body is not valid JSON here: {str(exc).splitlines()[0]}") from None


async def _form_images(request: Request, limit: int, max_bytes: int, max_files: int) -> list[bytes]:
    """The images of a multipart form: up to ``max_files`` parts named ``file`` (with a filename or without),
    and no other field (422, naming it; a form of far more parts than that is a 413 before it is read)."""
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():  # the form parser spools whole parts: only a declared size bounds them
        raise RequestError(411, "a multipart upload needs a Content-Length header")
    if int(declared) > limit:
        raise RequestError(413, f"request body is larger than the {megabytes(limit)} limit")
    max_parts = max_files + FORM_SLACK  # per kind (files, fields); the images are counted below
    try:
        form = await request.form(max_files=max_parts, max_fields=max_parts, max_part_size=limit)
    except RequestError:  # from Guard's receive: too many bytes, or too slow
        raise
    except Exception as exc:  # noqa: BLE001 - starlette raises several types for a malformed form
        detail = str(getattr(exc, "detail", exc))
        if detail.startswith("Too many"):  # files or fields
            raise RequestError(413, f"too many parts in the form: the limit is {max_parts} fields or files; "
                                  f"send the image{'s' if max_files > 1 else ''} as field '{FILE_FIELD}' "
                                  "and nothing else") from None
        raise RequestError(400, f"malformed multipart form: {detail}") from None
    unexpected = [name for name in form.keys() if name != FILE_FIELD]
    stray = (f"unexpected field{'s' if len(unexpected) > 1 else ''} "
             f"{', '.join(repr(name) for name in unexpected)} in the form") if unexpected else ""
    values = form.getlist(FILE_FIELD)
    if not values:
        raise RequestError(422, f"missing field '{FILE_FIELD}': upload the image as multipart field '{FILE_FIELD}'" +
                              (f" ({stray})" if stray else ""))
    if stray:
        raise RequestError(422, f"{stray}: send the image{'s' if max_files > 1 else ''} as field '{FILE_FIELD}' "
                              "and nothing else")
    if len(values) > max_files:
        raise RequestError(422, f"{len(values)} images in one request; the limit is {max_files} images" if max_files > 1
                         else f"{len(values)} files in one request: this route takes one image (several: /predict/batch)")
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
    except RequestError as exc:
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


async def request_images(request: Request, settings: ServeSettings, many: bool) -> list[bytes | RequestError]:
    ctype = content_type(request)
    if ctype == "application/json":
        return await _json_images(request, settings, many)
    if ctype == "multipart/form-data":
        limit = settings.max_batch_bytes if many else settings.max_body_bytes
        return await _form_images(request, limit, settings.max_bytes, settings.max_batch_images if many else 1)
    raise RequestError(415, f"unsupported content type {ctype or '(none)'}: send application/json "
                          f"{{\"image\": \"<base64>\"}} or multipart/form-data with a '{FILE_FIELD}' field")
