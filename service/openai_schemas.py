"""The OpenAI Images API's bodies, as far as this service speaks it (``/v1/images/generations``,
``/v1/images/edits``, ``/v1/images/variations``, ``/v1/models``): OpenAI's fields and shapes, and this
service's own sampling (and editing) fields as extra body fields. The reference is the official
``openai`` package's types."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas import Editing, Sampling


class ImageGenerationRequest(Sampling):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "mnist-text-compact", "prompt": "nine", "n": 2, "size": "28x28"},
        {"prompt": "nine", "stream": True, "partial_images": 2, "scheduler": "dpmpp_2m", "steps": 20, "seed": 0}]})

    prompt: str = Field(description="Text; a class-conditional model accepts a prompt that names one of its classes; "
                        "an unconditional model takes the empty prompt.")
    model: str | None = Field(None, description="A model id from GET /v1/models; default: the service's default.")
    n: int | None = Field(None, strict=True, ge=1, description="Images, 1 … the service's max_images. Default 1.")
    size: str | None = Field(None, description="`auto` or the model's own `WIDTHxHEIGHT`; a resizable (latent) "
                             "model makes any `WIDTHxHEIGHT` in multiples of 8 up to the service's max_size; another "
                             "is a 400 naming it.")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="`b64_json` only: this service "
                                                                "returns images inline, never as URLs.")
    stream: bool | None = Field(None, strict=True, description="Server-Sent Events: "
                                "`image_generation.partial_image`, then `image_generation.completed` per image.")
    partial_images: int | None = Field(None, strict=True, ge=0, le=3, description="Streamed: partial images "
                                       "(x̂0 previews) spread over the run; fewer when the run is short.")
    user: str | None = Field(None, description="An end-user id (accepted; not stored).")


class ImageEditRequest(Sampling, Editing):
    """The text parts of an edit's multipart body (the files are ``image`` or ``image[]``, and ``mask``)."""
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="Text; an unconditional model takes the empty prompt.")
    model: str | None = None
    n: int | None = Field(None, strict=True, ge=1)
    size: str | None = Field(None, description="`auto` or the model's own `WIDTHxHEIGHT`; the image is converted "
                             "to it (centre-cropped, resized). A resizable (latent) model edits at the image's own "
                             "size, and a `size` given must be that size.")
    response_format: Literal["b64_json", "url"] | None = None
    stream: bool | None = Field(None, strict=True, description="Server-Sent Events: `image_edit.partial_image`, "
                                "then `image_edit.completed` per image.")
    partial_images: int | None = Field(None, strict=True, ge=0, le=3)
    user: str | None = None


class ImageVariationRequest(Sampling, Editing):
    """The text parts of a variation's multipart body (the file is ``image``): OpenAI's fields, and this
    service's own as extra ones, ``prompt`` or ``class_label`` among them (default: no condition)."""
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    n: int | None = Field(None, strict=True, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    user: str | None = None
    prompt: str | None = Field(None, description="This service's: vary toward this prompt (or class name).")
    class_label: int | str | None = Field(None, description="This service's: vary toward this class.")


class ImageData(BaseModel):
    b64_json: str = Field(description="A base64-encoded PNG.")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time, seconds.")
    data: list[ImageData]
    size: str = Field(description="WIDTHxHEIGHT.")
    output_format: Literal["png"] = "png"


class Usage(BaseModel):
    """OpenAI's token usage; this service counts no tokens, so every number is 0."""
    input_tokens: int = 0
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"image_tokens": 0, "text_tokens": 0})
    output_tokens: int = 0
    total_tokens: int = 0


class ImageEvent(BaseModel):
    """What both streamed image events carry; with n > 1 each round comes in image order."""
    b64_json: str = Field(description="A base64-encoded PNG.")
    created_at: int
    size: str
    quality: Literal["auto"] = "auto"
    background: Literal["opaque"] = "opaque"
    output_format: Literal["png"] = "png"


class _Partial(ImageEvent):
    partial_image_index: int = Field(description="0-based: which of the partial images.")


class _Completed(ImageEvent):
    usage: Usage = Field(default_factory=Usage)


class PartialImageEvent(_Partial):
    type: Literal["image_generation.partial_image"] = "image_generation.partial_image"


class CompletedImageEvent(_Completed):
    type: Literal["image_generation.completed"] = "image_generation.completed"


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When the checkpoint was saved (Unix time; 0 when it does not say).")
    owned_by: str = "diffusion-serve"
    # this service's own fields (the openai client keeps them as extra attributes)
    size: str = Field(description="The model's native WIDTHxHEIGHT.")
    image_shape: list[int] = Field(description="[channels, height, width] at the native size.")
    sample_shape: list[int] = Field(description="[channels, height, width] of what is denoised: the image, or latents.")
    resizable: bool = Field(description="Makes other sizes (`size`: multiples of 8 up to the service's max_size).")
    text_encoders: list[str]
    default_scheduler: str
    default_steps: int
    default_guidance_scale: float = Field(description="diffusers' convention, w + 1.")
    conditioning: str = Field(description="class, text, class+text or none.")
    parameters: int
    source: str = Field(description="diffusion-serve checkpoint, diffusers pipeline folder or diffusers model folder.")


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


class OpenAIStreamError(BaseModel):
    type: Literal["error"] = "error"
    error: OpenAIErrorDetail


class EditPartialImageEvent(_Partial):
    type: Literal["image_edit.partial_image"] = "image_edit.partial_image"


class EditCompletedEvent(_Completed):
    type: Literal["image_edit.completed"] = "image_edit.completed"


STREAM_EVENTS = {"image_generation.partial_image": PartialImageEvent,
                 "image_generation.completed": CompletedImageEvent, "error": OpenAIStreamError}
EDIT_STREAM_EVENTS = {"image_edit.partial_image": EditPartialImageEvent, "image_edit.completed": EditCompletedEvent,
                      "error": OpenAIStreamError}
