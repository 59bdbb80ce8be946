"""The API's request and response models and their OpenAPI documentation."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from .settings import FILE_FIELD, FORM_SLACK, IMAGE_FORMAT, ServeSettings, megabytes, pixels_doc


# ----------------------------------------------------------------------------- schemas (OpenAPI docs)

def request_models(settings: ServeSettings) -> tuple[type[BaseModel], type[BaseModel]]:
    """The JSON request bodies of /predict (and /explain) and /predict/batch, with the limits of ``settings``.

    These models ARE the validation (:func:`_validated`), so the schema cannot drift from what is enforced.
    """
    image_doc = (f"the image file (JPEG, PNG, WebP, BMP, GIF, TIFF...) in base64; a data:image/...;base64, URL, "
                 f"URL-safe base64 and wrapped lines are fine. At most {megabytes(settings.max_bytes)} once decoded "
                 f"(413 above); {pixels_doc(settings)}.")
    b64 = Annotated[str, Field(min_length=1, max_length=settings.max_image_chars,
                               json_schema_extra={"format": IMAGE_FORMAT})]

    class ImageRequest(BaseModel):
        image: b64 = Field(description=image_doc)

    # a batch item may be any string: an empty or undecodable one is that item's error (its slot of
    # results), never the whole batch's; hence no format either (nothing is refused for it)
    item = Annotated[str, Field(max_length=settings.max_image_chars,
                                description="as 'image' of /predict; an unusable one is an error in its slot")]

    class BatchRequest(BaseModel):
        images: list[item] = Field(min_length=1, max_length=settings.max_batch_images,
                                  description=f"1 to {settings.max_batch_images} images, each as 'image' of "
                                              f"/predict; the whole body at most {megabytes(settings.max_batch_bytes)}")

    return ImageRequest, BatchRequest


ImageRequest, BatchRequest = request_models(ServeSettings())  # with the default limits, for reference

Verdict = Literal["likely real", "uncertain", "likely fake"]


DEMO_DOC = ("true: the model was trained on the synthetic demo data, so its scores say nothing about real fakes; "
            "null: its card does not say (made before stage 5 recorded it)")
WARNING_DOC = "a warning to show with the scores (a demo model), or null"


class Prediction(BaseModel):
    result: float = Field(ge=0, le=1, description="ensemble score in [0, 1]; higher = more likely fake")
    verdict: Verdict = Field(description="from the card's thresholds: likely real | uncertain | likely fake")
    model: str = Field(description="the ensemble that scored it: expert names @ card digest")
    demo: bool | None = Field(description=DEMO_DOC)
    warning: str | None = Field(description=WARNING_DOC)


class BatchItem(BaseModel):
    result: float | None = Field(default=None, ge=0, le=1, description="as /predict; null if the image failed")
    verdict: Verdict | None = Field(default=None, description="as /predict; null if the image failed")
    error: str | None = Field(default=None, description="why this image could not be scored; null if it was")


class BatchPrediction(BaseModel):
    results: list[BatchItem] = Field(description="one per image, in the order sent")
    model: str = Field(description="as /predict")
    demo: bool | None = Field(description=DEMO_DOC)
    warning: str | None = Field(description=WARNING_DOC)


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
    min_side: int = Field(description="the experts' stage-1 minimum shorter side, in pixels")


class InputInfo(BaseModel):
    mode: str = Field(description="how the expert takes its input from the stage-1 image: resize | "
                                  "resize_short_crop | crop")
    size: int = Field(description="the expert's input side, in pixels")


class IdentityInfo(BaseModel):
    """Which model this is, in plain words (from the ensemble card: dfpipe.serve.identity)."""

    id: str = Field(description="expert names @ card digest (as 'model' of every response)")
    demo: bool | None = Field(description=DEMO_DOC)
    trained_on: str = Field(description="the training data in one line, or 'unknown'")
    commit: str = Field(description="the code's commit when stage 5 ran, or 'unknown'")
    header: str = Field(description="the page's title line: models, training data, commit")
    warning: str | None = Field(description=WARNING_DOC)


class Health(BaseModel):
    status: Literal["ok"]
    model: str = Field(description="expert names @ card digest")
    identity: IdentityInfo = Field(description="the model in plain words, and whether it is a demo model")
    experts: list[str]
    combine: str = Field(description="how the experts' scores are combined (mean_prob | mean_logit | stack)")
    tta: list[str] = Field(description="test-time augmentation views averaged per expert")
    device: str
    thresholds: dict[str, float] = Field(description="the card's thresholds (t_real, t_fake, t_decision...)")
    max_bytes: int = Field(description="largest image accepted, in bytes")
    max_pixels: int = Field(description="most pixels an image may have (the model's limit, or a lower one of this "
                                        "server's)")
    min_side: int = Field(description="shortest shorter side an image may have, in pixels (the model's)")
    max_batch_images: int = Field(description="most images in one /predict/batch request")
    mean_batch: float | None = Field(description="mean images per model call so far (null before the first)")
    stage1: Stage1Info = Field(description="the stage-1 part of the preprocessing contract, from the checkpoints")
    inputs: dict[str, InputInfo] = Field(description="each expert's input policy, by expert name")


class Error(BaseModel):
    detail: str = Field(description="what is wrong, in one line")


def error_responses(settings: ServeSettings, many: bool) -> dict[int | str, dict[str, Any]]:
    """The 4xx responses of an image endpoint, for ``responses=``."""
    body = megabytes(settings.max_batch_bytes if many else settings.max_body_bytes)
    n = settings.max_batch_images if many else 1
    too_large = (f"request body over {body}" + ("" if many else f", the image over {megabytes(settings.max_bytes)}") +
                 f", or a multipart form of more than {n + FORM_SLACK} text fields or files")
    docs = {400: "body is not valid JSON or not a well-formed multipart form" +
                 ("" if many else "; the image is not valid base64 or decodes to 0 bytes"),
            411: "multipart upload without a Content-Length header",
            413: too_large,
            415: "content type is neither application/json nor multipart/form-data",
            422: "body does not match the request schema (missing field, wrong type, empty string or list, "
                 f"a multipart field other than '{FILE_FIELD}'" + (f", more than {n} images)" if many else ")") +
                 ("; an item that is no usable image (empty, not base64, over "
                  f"{megabytes(settings.max_bytes)}, unknown format, truncated, too many or too few pixels) is not a "
                  "422 here but an error in its slot of the 200 response, with its index" if many else
                  ", or the bytes are not a usable image (unknown format, truncated, too many or too few pixels)")}
    return {code: {"model": Error, "description": text} for code, text in docs.items()}


def body_doc(schema: type[BaseModel], many: bool, settings: ServeSettings) -> dict:
    """Both accepted request bodies, for /docs (the handlers read and validate the body themselves)."""
    file_schema = {"type": "string", "format": "binary",
                   "description": f"an image file, at most {megabytes(settings.max_bytes)}"}
    prop = ({"type": "array", "items": file_schema, "minItems": 1, "maxItems": settings.max_batch_images}
            if many else file_schema)
    # the server refuses any other field (422 naming it): the schema says so, rather than let clients think a
    # stray field is ignored
    form = {"type": "object", "properties": {FILE_FIELD: prop}, "required": [FILE_FIELD],
            "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema.model_json_schema()},
        "multipart/form-data": {"schema": form, "encoding": {FILE_FIELD: {"contentType": "image/*"}}}}}}
