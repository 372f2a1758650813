"""The HTTP API's request and response bodies (pydantic; they are also the OpenAPI at /docs).

Limits that come from the settings or the model (``num_images``, ``steps``, prompt length) are
checked after parsing, in :mod:`service.generation`, and reported in the same 422 format.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from diffusion import SAMPLERS
from diffusion.guidance import CLIP_MODES
from diffusion.schedules import SPACINGS

SchedulerName = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]
MAX_SEED = 2**53  # exact in every JSON client (JavaScript numbers)


class Sampling(BaseModel):
    """How to sample: the fields the native API and the OpenAI-compatible one share."""
    model_config = ConfigDict(extra="forbid")

    scheduler: SchedulerName | None = Field(None, description="Sampler; default: the model's (ddim for this "
                                            "project's and pixel diffusers models, dpmpp_2m for Stable Diffusion).")
    steps: int | None = Field(None, strict=True, ge=1, description="Denoising steps, 1 … the model's T "
                              "(and the service's limit); default: the model's.")
    guidance: float | None = Field(None, strict=True, ge=0, allow_inf_nan=False,
                                   description="Classifier-free guidance rate w ≥ 0 (at most the service's "
                                   "max_guidance), ε̄ = (1 + w)·ε(c) − w·ε(∅); default: the model's.")
    guidance_scale: float | None = Field(None, strict=True, ge=1, allow_inf_nan=False,
                                         description="diffusers' convention instead of guidance: s = w + 1 "
                                         "(7.5 is w = 6.5); give one of the two.")
    negative_prompt: str | None = Field(None, description="Text models: what to guide away from; its encoding "
                                        "replaces the null condition of classifier-free guidance.")
    width: int | None = Field(None, strict=True, ge=1, description="Image width in pixels; default: the model's "
                              "own. Resizable (latent) models: a multiple of 8 up to the service's max_size.")
    height: int | None = Field(None, strict=True, ge=1, description="Image height in pixels (as width).")
    preview_decode: bool = Field(False, strict=True, description="Streamed previews decoded in full by a latent "
                                 "model's VAE (slower) instead of its cheap latent→RGB map.")
    timeout_s: float | None = Field(None, strict=True, gt=0, allow_inf_nan=False, description="This request's "
                                    "deadline in seconds from now (at most the service's max_timeout_s; default: its "
                                    "request_timeout_s). A request the service predicts cannot finish by it is "
                                    "refused at once (503, Retry-After; a 422 if it could not finish even alone) "
                                    "instead of timing out.")
    bulk: bool = Field(False, strict=True, description="No deadline: the request runs in the capacity that "
                       "requests with deadlines leave, and yields to them (waits up to max_timeout_s).")
    eta: float | None = Field(None, strict=True, ge=0, allow_inf_nan=False,
                              description="DDIM only: 0 deterministic, 1 ancestral. Default 0.")
    seed: int | None = Field(None, strict=True, ge=0, le=MAX_SEED, description="Image k uses seed + k; "
                             "default: random. The seeds used are always returned.")
    clip: Literal[CLIP_MODES] | None = Field(None, description="x̂0 thresholding at every step: none, "  # type: ignore[valid-type]
                                             "static ([-1, 1]) or dynamic (Imagen); default: the model's.")
    percentile: float = Field(0.995, strict=True, gt=0, le=1, allow_inf_nan=False,
                              description="Dynamic thresholding percentile.")
    spacing: Literal[SPACINGS] | None = Field(None, description="Timestep spacing; default: the "  # type: ignore[valid-type]
                                               "sampler's own (trailing, from σ = 80 for pndm; karras for heun).")


class Editing(BaseModel):
    """What an edit adds to a request: the native API's and the OpenAI endpoints' share."""
    model_config = ConfigDict(extra="forbid")

    strength: float | None = Field(None, strict=True, gt=0, le=1, allow_inf_nan=False, description="Edits: how "
                                   "far down the plan the image is noised before denoising (SDEdit), 0 < s ≤ 1: "
                                   "the row starts at the planned step nearest s·T; 1 redraws from noise. Default: "
                                   "1 with a mask, the service's variation_strength without one.")
    jump_length: int | None = Field(None, strict=True, ge=1, description="Inpainting: RePaint's resampling, "
                                    "jump back up this many planned steps (with jump_n_sample ≥ 2; ddpm or ddim).")
    jump_n_sample: int | None = Field(None, strict=True, ge=1, description="Inpainting: RePaint's resampling, "
                                      "how often each stretch is denoised (1: no resampling).")


class GenerateRequest(Sampling, Editing):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"prompt": "nine", "scheduler": "ddim", "steps": 50, "seed": 0},
                     {"model": "sd15", "prompt": "a lighthouse at dusk", "negative_prompt": "blurry",
                      "guidance_scale": 7.5, "width": 768, "height": 512},
                     {"class_label": 7, "scheduler": "dpmpp_2m", "steps": 20, "guidance": 3.0, "num_images": 4},
                     {"prompt": "nine", "steps": 20, "stream": True, "preview_every": 5},
                     {"prompt": "nine", "image": "data:image/png;base64,…", "strength": 0.6}]})

    image: str | None = Field(None, description="Edits: the image to start from, a base64 PNG, JPEG or WebP (or a "
                              "data: URL of one); converted to the model's size and mode (centre-cropped, resized; "
                              "L or RGB).")
    mask: str | None = Field(None, description="Inpainting: where to repaint the image, same size as it, base64 "
                             "as the image. With an alpha channel, repaint where alpha = 0 (OpenAI's "
                             "convention); without one, where it is white (≥ 128).")

    prompt: str | None = Field(None, description="Text. A class-conditional model accepts a prompt that names one "
                               "of its classes (\"nine\", \"Sneaker\", case-insensitive).")
    class_label: StrictInt | StrictStr | None = Field(None, description="Class index or class name. A text model "
                                          "turns it into its class name and uses that as the prompt.")
    model: str | None = Field(None, description="Model name (see GET /models); default: the service's default model.")
    num_images: int = Field(1, strict=True, ge=1, description="Images for this request (1 … the service's limit).")
    stream: bool = Field(False, strict=True, description="Answer with Server-Sent Events (queued, progress, "
                         "preview, done, error) instead of one JSON body; so does `Accept: text/event-stream`.")
    preview_every: int | None = Field(None, strict=True, ge=1, description="Streamed requests: a preview (x̂0 of "
                                      "every image as PNG) every this many model evaluations (at least the "
                                      "service's min_preview_every).")
    preview_at: list[Annotated[float, Field(strict=True, gt=0, lt=1)]] | None = Field(
        None, max_length=16, description="Streamed requests: previews at these fractions of the work (0 < f < 1), "
        "rounded to multiples of the service's min_preview_every; instead of preview_every.")


class Timings(BaseModel):
    queued_s: float = Field(description="Waiting for rows in the running batch.")
    generating_s: float = Field(description="From joining the batch to the last image.")
    total_s: float = Field(description="Request received to response ready.")


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="Base64-encoded PNG images, one per seed.")
    seeds: list[int]
    model: str
    scheduler: str
    steps: int
    guidance: float
    guidance_scale: float = Field(description="The same guidance in diffusers' convention, w + 1.")
    width: int
    height: int
    evaluations: int = Field(description="Model evaluations per image (an edit runs only its share of the plan).")
    strength: float | None = Field(None, description="Edits: the strength used.")
    timings: Timings
    request_id: str


class ModelInfo(BaseModel):
    name: str
    default: bool
    conditioning: str = Field(description="class, text, class+text or none.")
    guidance: bool = Field(description="Classifier-free guidance possible (the model has a null condition).")
    class_names: list[str]
    image_shape: list[int] = Field(description="[channels, height, width] of its images at the native size.")
    sample_shape: list[int] = Field(description="[channels, height, width] of what the engine denoises at the "
                                    "native size: the image itself, or a latent model's latents.")
    size: str = Field(description="WIDTHxHEIGHT (the OpenAI endpoints' size), the native one.")
    sizes: str = Field(description="Other sizes: 'native only', or the rule ('multiples of 8 up to 1536').")
    size_multiple: int | None = Field(description="Resizable models: width and height are multiples of this.")
    max_size: int | None = Field(description="Resizable models: width and height at most (the service's max_size).")
    text_encoders: list[str] = Field(description="Text models: what encodes a prompt.")
    negative_prompt: bool = Field(description="Takes a negative prompt.")
    default_scheduler: str
    parameters: int = Field(description="Parameters of the network (and its conditioning).")
    architecture: str
    source: str = Field(description="The format it was loaded from: diffusion-serve checkpoint, diffusers "
                        "pipeline folder or diffusers model folder.")
    schedule: str
    num_timesteps: int
    prediction: str
    default_steps: int
    default_guidance: float
    default_guidance_scale: float = Field(description="default_guidance in diffusers' convention (w + 1).")
    default_clip: str
    max_prompt_tokens: int | None = Field(description="Text models: the longest prompt, in tokens.")
    schedulers: list[str]
    state: str = Field("resident", description="resident (on the device), available (loaded at its next "
                       "request), loading, or failed (its last load failed: see error)")
    error: str | None = Field(None, description="Why its last load or reload failed (a failed reload keeps the "
                              "old weights serving).")


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo] = Field(description="Every model a request may name whose details are known (it was "
                                    "loaded once).")
    not_loaded_yet: list[str] = Field(default_factory=list, description="Models a request may name that were never "
                                      "loaded (their details come with their first load; a failed first load: GET "
                                      "/admin/models shows its error).")
    aliases: dict[str, str] = Field(default_factory=dict, description="Names that stand for a model "
                                    "(the checkpoint directory's aliases.json).")


class ErrorItem(BaseModel):
    field: str = Field(description="The offending field (dotted path into the body; \"body\" for the body itself).")
    msg: str
    type: str
    loc: list[str | int]


class ErrorResponse(BaseModel):
    detail: list[ErrorItem] | str


# --- the events of a streamed /generate (text/event-stream; each event's data is one of these, as JSON) ---

class QueuedEvent(BaseModel):
    position: int = Field(description="Requests waiting ahead of this one (0 once it runs).")


class ProgressEvent(BaseModel):
    done: int = Field(description="Model evaluations done (of the request's slowest image).")
    total: int = Field(description="Model evaluations needed: steps (heun 2·steps−1, pndm steps+9).")
    elapsed_s: float = Field(description="Since the request joined the running batch.")


class PreviewEvent(BaseModel):
    done: int
    total: int
    images: list[str] = Field(description="Base64 PNGs of the current prediction x̂0 of each image.")


class StreamError(BaseModel):
    detail: list[ErrorItem] | str
    status: int = Field(description="The HTTP status this error would have had before the stream began.")


STREAM_EVENTS = {"queued": QueuedEvent, "progress": ProgressEvent, "preview": PreviewEvent,
                 "done": GenerateResponse, "error": StreamError}
