"""The HTTP API against its own OpenAPI schema, by schemathesis (in-process, through the ASGI app).

For every operation, requests generated from the schema must get:

- no 5xx (``not_a_server_error``);
- a status code the operation documents, a documented content type and a body matching the response
  schema (``status_code_conformance``, ``content_type_conformance``, ``response_schema_conformance``);
- for schema-valid requests, a 2xx (``positive_data_acceptance``): the schema may not be looser than the
  server (``{"image": ""}`` and ``{"images": []}`` were schema-valid but refused);
- for schema-violating requests, a 4xx (``negative_data_rejection``): nor stricter.

A schema cannot say "these bytes are an image": its string ``format: image-base64`` and the form parts'
``contentType: image/*`` name it, and the strategies registered here for them make real images (PNG / JPEG /
BMP of random size and pixels, in each base64 variant the API accepts). Everything else is generated from the
schema alone. Bounded: a few dozen examples per operation, well under a minute on two busy cores.

Deterministic (``derandomize=True``): CI runs the same examples every time, so a failure is a change in the code,
not a seed. To search further, set ``DFPIPE_FUZZ_EXAMPLES`` (e.g. 200) and ``DFPIPE_FUZZ_RANDOM=1`` (then
``--hypothesis-seed`` picks the examples).
"""

import base64
import dataclasses
import io
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from PIL import Image
from test_serve_api import make_card

schemathesis = pytest.importorskip("schemathesis")

from dfpipe.serve.api import IMAGE_FORMAT, ServeSettings, create_app  # noqa: E402

MAX_EXAMPLES = int(os.environ.get("DFPIPE_FUZZ_EXAMPLES", 30))  # per operation, media type and generation mode
DERANDOMIZE = os.environ.get("DFPIPE_FUZZ_RANDOM", "") in ("", "0")
SETTINGS = ServeSettings(device="cpu", max_bytes=64 * 1024, max_batch_images=4, explain_grid=2)
CONFIG = {
    "checks": {
        # Schema-violating requests are refused with these; 413 is the documented answer for an image or a batch
        # over the limits, which the schema states as maxLength / maxItems.
        "negative_data_rejection": {"expected-statuses": ["400", "411", "413", "415", "422"]},
        "positive_data_acceptance": {"expected-statuses": ["2xx"]},
    },
    "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    "generation": {"max-examples": MAX_EXAMPLES},
}


@st.composite
def image_files(draw) -> bytes:
    """A small image file with random pixels (its size up to 40 x 40, so /explain stays quick), of at least the
    model's shorter side (16 px: a smaller one is not a usable image, a 422 in stage 1's words, as a truncated file
    is; the format names "an image the model takes", which no JSON schema keyword can state)."""
    h, w = draw(st.integers(16, 40)), draw(st.integers(16, 40))
    seed = draw(st.integers(0, 2**16))
    mode, fmt = draw(st.sampled_from([("RGB", "PNG"), ("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("RGB", "BMP")]))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(buf, fmt)
    return buf.getvalue()


def _as_text(data: bytes, variant: str) -> str:
    """The base64 spellings the API accepts (the original clients used each of them)."""
    if variant == "data URL":
        return "data:image/png;base64," + base64.b64encode(data).decode()
    if variant == "wrapped":
        return base64.encodebytes(data).decode()
    if variant == "url-safe":
        return base64.urlsafe_b64encode(data).decode().rstrip("=")
    return base64.b64encode(data).decode()


IMAGE_TEXT = st.builds(_as_text, image_files(), st.sampled_from(["plain", "data URL", "wrapped", "url-safe"]))


OPERATIONS = [("GET", "/health", None)] + [("POST", path, media) for path in ("/predict", "/predict/batch", "/explain")
                                           for media in ("application/json", "multipart/form-data")]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    from schemathesis.config import SchemathesisConfig
    from schemathesis.core.media_types import MEDIA_TYPE_STRATEGIES
    from schemathesis.python.asgi import shutdown_lifespans
    from schemathesis.specs.openapi.formats import unregister_string_format

    models, card = make_card(tmp_path_factory.mktemp("fuzz"), tta=("identity",))
    app = create_app(ServeSettings(**{**SETTINGS.__dict__, "models_dir": str(models), "card": str(card)}))
    schemathesis.openapi.format(IMAGE_FORMAT, IMAGE_TEXT)
    for media_type in ("image/png", "image/jpeg"):
        schemathesis.openapi.media_type(media_type, image_files())
    try:
        # loading the schema starts the app's lifespan (the ensemble) once, in schemathesis' event loop
        yield schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_dict(CONFIG))
    finally:
        unregister_string_format(IMAGE_FORMAT)
        for media_type in ("image/png", "image/jpeg"):
            MEDIA_TYPE_STRATEGIES.pop(media_type, None)
        shutdown_lifespans()  # the app's model thread, now rather than at exit


def test_every_operation_is_fuzzed(api_schema):
    ops = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert ops == {(m, p) for m, p, _ in OPERATIONS}


# An empty or undecodable batch item is not refused: it is an error in its slot of a 200 (issue 25), and the
# schema accepts it (tests/test_serve_api.py::test_batch_limits checks the slots).
REFUSED = [  # (path, JSON body) the server refuses: the schema must call each invalid, not promise it works
    ("/predict", {"image": ""}),
    ("/explain", {"image": ""}),
    ("/predict/batch", {"images": []}),
    ("/predict/batch", {"images": ["iVBORw0KGgo="] * (SETTINGS.max_batch_images + 1)}),
    ("/predict", {"image": "A" * (SETTINGS.max_image_chars + 1)}),
]


@pytest.mark.parametrize(("path", "body"), REFUSED, ids=lambda v: v if isinstance(v, str) else str(v)[:24])
def test_what_the_server_refuses_the_schema_calls_invalid(api_schema, path, body):
    """The boundary cases, deterministically (the fuzzer finds them too, but by chance)."""
    import jsonschema_rs

    operation = api_schema[path]["POST"]
    response = operation.Case(body=body, media_type="application/json").call()
    assert 400 <= response.status_code < 500, response.text
    assert str(response.status_code) in operation.definition.raw["responses"]
    request_schema = operation.definition.raw["requestBody"]["content"]["application/json"]["schema"]
    assert not jsonschema_rs.validator_for(request_schema).is_valid(body), f"{path}: schema accepts {body!r}"


def _plain(value):
    """``value`` with schemathesis' ``Binary`` file contents as plain strings (jsonschema_rs refuses str subclasses)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return str.__str__(value) if isinstance(value, str) else value


def _violation_not_sent(case, form_schema: dict) -> bool:
    """A negative form whose violations are all fields that put no part on the wire (an empty list or object), so
    that the request sent is schema-valid. schemathesis means to excuse these (``_form_body_is_valid_as_sent``) but
    cannot validate a body holding a ``Binary`` file, and reports the 2xx as ST201."""
    import jsonschema_rs

    body = case.body
    if not isinstance(body, dict):
        return False
    sent = {k: v for k, v in body.items() if not (isinstance(v, (list, dict)) and not v)}
    return len(sent) < len(body) and jsonschema_rs.validator_for(form_schema).is_valid(_plain(sent))


@pytest.mark.parametrize(("method", "path", "media_type", "mode"),
                         [(*op, mode) for op in OPERATIONS for mode in ("positive", "negative")
                          if op[2] is not None or mode == "positive"])  # GET /health takes no input to get wrong
def test_the_api_does_what_its_schema_says(api_schema, method, path, media_type, mode):
    """Driven by Hypothesis directly (operation.as_strategy): schemathesis' own pytest loader
    (schemathesis.pytest.from_fixture) reads a pytest-internal attribute that pytest 9 no longer has."""
    from hypothesis import assume, given
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                   positive_data_acceptance, response_schema_conformance,
                                                   status_code_conformance)
    from schemathesis.schemas import PayloadAlternatives

    operation = api_schema[path][method]
    if media_type is not None:  # as_strategy(media_type=...) does not choose the body it generates: keep only this one
        body = [b for b in operation.body if b.media_type == media_type]
        assert body, f"{method} {path} takes no {media_type} body"
        operation = dataclasses.replace(operation, body=PayloadAlternatives(body))
    form_schema = operation.definition.raw["requestBody"]["content"][media_type]["schema"] if media_type else None
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              positive_data_acceptance, negative_data_rejection]

    @given(case=operation.as_strategy(GenerationMode(mode)))
    @settings(max_examples=MAX_EXAMPLES, derandomize=DERANDOMIZE, deadline=None, database=None,
              phases=[Phase.generate, Phase.shrink],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    def run(case):
        assert media_type is None or case.media_type == media_type, case.media_type
        if mode == "negative" and media_type == "multipart/form-data":
            assume(not _violation_not_sent(case, form_schema))
        case.call_and_validate(checks=checks)

    run()


# ----------------------------------------------------------------------------- beyond the schema: hostile requests
def _hostile_strategy():
    """bench/bench_abuse.py's strategy (nested / huge / odd JSON, odd multipart and headers): the bench runs 1,000+
    of its examples over HTTP against a real server; here a bounded, derandomised share through the ASGI app."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_abuse.py"
    spec = importlib.util.spec_from_file_location("bench_abuse", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.hostile_request()


HOSTILE_EXAMPLES = int(os.environ.get("DFPIPE_FUZZ_EXAMPLES", 60))


@pytest.fixture(scope="module")
def hostile_client(tmp_path_factory):
    from fastapi.testclient import TestClient

    models, card = make_card(tmp_path_factory.mktemp("hostile"), tta=("identity",))
    app = create_app(ServeSettings(**{**SETTINGS.__dict__, "models_dir": str(models), "card": str(card)}))
    with TestClient(app, raise_server_exceptions=False) as client:  # a bug shows as the 500 a client would get
        yield client


def test_hostile_requests_get_a_4xx_with_a_message_never_a_5xx(hostile_client):
    from hypothesis import given

    seen = set()

    @given(_hostile_strategy())
    @settings(max_examples=HOSTILE_EXAMPLES, derandomize=DERANDOMIZE, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(req):
        path, headers, body = req
        r = hostile_client.post(path, content=body, headers=headers)
        assert r.status_code < 500, (path, headers, body[:100], r.status_code, r.text[:200])
        if r.status_code >= 400:
            assert r.json()["detail"], r.text
        seen.add(r.status_code)

    run()
    assert {400, 415, 422} <= seen  # the strategy reaches the parser, the content-type check and the schema
