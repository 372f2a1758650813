"""Every option of the service, validated in one place.

Each field is an environment variable with the ``DIFFUSION_`` prefix (``DIFFUSION_PORT=8000``) and a
command-line option of ``python -m service`` (``--port 8000``); the command line wins. The object is
built by ``python -m service`` (or a test) and handed to :func:`service.api.app.create_app`; nothing
creates it at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from diffusion import Acceleration
from diffusion.runner import COMPILE_MODES, power_of_two_buckets
from service.engine.scheduler import ORDERS, Policy


def _split(value):
    """Lists come from the environment or the command line as comma-separated strings."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIFFUSION_", env_file=None, extra="ignore")

    # --- where and what ------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    checkpoint_dir: Path = Field(Path("checkpoints"), description="every *.safetensors and diffusers model folder "
                                 "directly in it is served")
    default_model: str | None = Field(None, description="model used when a request names none "
                                      "(default: mnist-text-compact if present, else the first by name)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto: cuda when available)")
    model_control: str = Field("poll", description="how models change while the service runs: poll (rescan "
                               "checkpoint_dir every poll_s: new models appear, changed ones reload, removed ones "
                               "unload) | explicit (only through the admin API) | none (scanned once at start-up; "
                               "a broken file stops the start)")
    poll_s: float = Field(5.0, gt=0, description="seconds between two scans of checkpoint_dir (model_control=poll)")
    model_memory: str = Field("0.6", description="device memory that model weights may take: a fraction of the "
                              "GPU's memory (on the CPU, of the RAM), or a size such as 8GB or 512MiB; the least "
                              "recently used idle model is evicted to load another")
    admin_key: SecretStr | None = Field(None, description="bearer key of the admin API (/admin/models: load, "
                                        "unload, reload); unset: the admin API is off")

    compile: str = Field("off", description="torch.compile the network and the sampler math (one dynamic-batch "
                         "compilation, batches padded to buckets): off | default | max-autotune-no-cudagraphs | "
                         "max-autotune; reduce-overhead means default plus --cuda-graphs. Compiled at start-up, "
                         "before /readyz turns ready")
    cuda_graphs: bool = Field(False, description="capture each bucket's whole iteration (sampler math, noise, "
                              "guidance, network) as a CUDA graph at start-up; CUDA only")
    compile_buckets: Annotated[list[int], NoDecode] = Field(
        default_factory=list, description="comma-separated padded row counts for --compile / --cuda-graphs "
        "(default: powers of two up to max_batch_rows)")

    # --- limits --------------------------------------------------------------------------------
    max_batch_rows: int = Field(64, ge=1, le=4096, description="images denoised together per forward pass, per model")
    max_queue: int = Field(256, ge=1, description="requests waiting for rows; more get 429")
    request_timeout_s: float = Field(120.0, gt=0, description="a request's deadline when it names none (timeout_s)")
    max_timeout_s: float = Field(600.0, gt=0, description="a request's timeout_s, at most; also how long a bulk "
                                 "request (no deadline) may wait")
    goodput: bool = Field(True, description="admit by deadline: a request joins only if it and every running one are "
                          "predicted to finish in time (an online cost model); one that cannot is refused at once "
                          "(503); batches stay within the cost model's knee")
    calibrate_s: float = Field(3.0, ge=0, description="seconds spent timing a model's iterations at its first request "
                               "to seed the cost model (0: learn from the first iterations only)")
    max_images: int = Field(8, ge=1, description="num_images per request")
    max_steps: int = Field(1000, ge=1, description="steps per request (also at most the model's T)")
    max_prompt_chars: int = Field(300, ge=1, description="prompt length in characters (tokens: the model's own limit)")
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="an edit's image or mask file, at most "
                                 "(more is a 413; OpenAI's limit is 4 MB)")
    max_image_pixels: int = Field(4096 * 4096, ge=64, description="an edit's image or mask, width x height at most, "
                                  "checked before decoding")
    max_guidance: float = Field(30.0, ge=0, allow_inf_nan=False, description="classifier-free guidance rate w "
                                "per request, at most")
    max_size: int = Field(1536, ge=8, description="width and height of a resizable (latent) model's images, at "
                          "most, in pixels")
    decode_chunk_pixels: int = Field(2 * 1024 * 1024, ge=1, description="image pixels a latent model's VAE decodes "
                                     "at once (at least one image): bounds the decoder's memory and how long one "
                                     "decode holds back the other rows' next step")
    condition_cache_mb: float = Field(256.0, ge=0, description="encoded prompts kept per model, in MiB (an SD 1.5 "
                                      "prompt is 0.24 MB in float32, an SDXL one 0.64 MB)")
    min_preview_every: int = Field(2, ge=1, description="streamed previews are at least this many model "
                                   "evaluations apart (a smaller preview_every is refused)")
    preview_buffer: int = Field(2, ge=1, description="previews waiting for a slow streaming client; a newer "
                                "one pushes out the oldest (progress and results are never dropped)")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on shutdown, time for in-flight work to finish")
    variation_strength: float = Field(0.4, gt=0, le=1, description="strength of a variation (and of an edit "
                                      "without a mask that names none); chosen by measurement (docs/edits.md)")
    cpu_threads: str = Field("auto", description="intra-op threads of the engine on the CPU: auto (one for an "
                             "iteration under 0.5 GFLOP, every core above) or a number")

    # --- latency / throughput ------------------------------------------------------------------
    admission: str = Field("short-first", description="short-first (latency-sensitive requests go first, "
                           "with a starvation bound) | fifo")
    short_request_evaluations: int = Field(25, ge=0, description="requests needing at most this many model "
                                           "evaluations per image are latency-sensitive (10-step DDIM: 10)")
    reserve_rows: int = Field(-1, ge=-1, description="rows per model kept for latency-sensitive requests "
                              "(-1: max_batch_rows / 8)")
    latency_rows: int = Field(0, ge=0, description="while latency-sensitive rows are in flight, step at most "
                              "this many rows per iteration (their own always; 0: no cap)")
    starvation_s: float = Field(30.0, gt=0, description="a request waiting this long is admitted next, "
                                "whatever its size")

    # --- jobs (POST /jobs) -------------------------------------------------------------------------
    jobs_url: str = Field("", description="where jobs live: empty (SQLite in data_dir, this process only), "
                          "sqlite:///path/jobs.sqlite3, or redis://host:6379/0 (every replica pulls from one queue)")
    data_dir: Path = Field(Path("data"), description="the service's own files (jobs.sqlite3); one process per "
                           "directory")
    job_ttl_s: float = Field(86400.0, gt=0, description="seconds a finished job (its result and events) is kept, "
                             "then purged")
    max_jobs_queued: int = Field(10000, ge=1, description="queued jobs, at most; more get 429")
    visibility_timeout_s: float = Field(30.0, gt=0, description="a replica renews its claim on a running job every "
                                        "third of this; a claim not renewed this long (the replica died) is taken "
                                        "by another, and the job runs again with its seeds")
    job_workers: bool = Field(True, description="this process runs jobs (false: it only accepts and answers "
                              "about them, e.g. an API-only replica)")
    webhook_secret: SecretStr | None = Field(None, description="Standard Webhooks signing secret (whsec_<base64> "
                                             "or any string); unset: deliveries are not signed")
    webhook_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated CIDRs and host names webhooks may reach although "
        "private, loopback or link-local (everything else public is allowed; those are refused)")
    webhook_timeout_s: float = Field(10.0, gt=0, description="one webhook delivery attempt, at most")
    webhook_attempts: int = Field(5, ge=1, le=20, description="attempts per webhook event (exponential backoff)")
    webhook_backoff_s: float = Field(1.0, gt=0, description="wait before a webhook's second attempt; doubled for "
                                     "each further one (with jitter), up to a minute")

    # --- access and operations -----------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer keys; empty: no authentication")
    metrics_require_key: bool = Field(False, description="key /metrics behind the API keys too")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated CORS origins")
    log_prompts: bool = Field(False, description="include prompts in the request log lines")
    log_level: str = Field("info", description="debug | info | warning | error")

    @field_validator("default_model", mode="before")
    @classmethod
    def _unset_when_empty(cls, value):
        """``DIFFUSION_DEFAULT_MODEL=`` (a ConfigMap or env file listing every setting) means the default rule."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_keys", "cors_origins", "compile_buckets", "webhook_allowlist", mode="before")
    @classmethod
    def _lists(cls, value):
        return _split(value)

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, keys: list[SecretStr]):
        if any(not k.get_secret_value() for k in keys):
            raise ValueError("API keys must not be empty")
        return keys

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        v = value.strip().lower()
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")

    @field_validator("compile")
    @classmethod
    def _compile(cls, value: str) -> str:
        v = value.strip().lower()
        if v not in COMPILE_MODES and v != "reduce-overhead":
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)} or reduce-overhead, got {value!r}")
        return v

    @field_validator("compile_buckets")
    @classmethod
    def _buckets(cls, sizes: list[int]) -> list[int]:
        if any(s < 1 for s in sizes):
            raise ValueError(f"compile bucket sizes must be >= 1, got {sizes}")
        return sorted(set(sizes))

    @field_validator("cpu_threads")
    @classmethod
    def _threads(cls, value) -> str:
        v = str(value).strip().lower()
        if v != "auto" and not (v.isdigit() and int(v) >= 1):
            raise ValueError(f"cpu_threads must be auto or a number >= 1, got {value!r}")
        return v

    @field_validator("admission")
    @classmethod
    def _admission(cls, value: str) -> str:
        v = value.strip().lower()
        if v not in ORDERS:
            raise ValueError(f"admission must be one of {', '.join(ORDERS)}, got {value!r}")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        v = value.strip().lower()
        if v not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level must be debug, info, warning or error, got {value!r}")
        return v

    @field_validator("model_control")
    @classmethod
    def _control(cls, value: str) -> str:
        from service.registry import MODES

        v = value.strip().lower()
        if v not in MODES:
            raise ValueError(f"model_control must be one of {', '.join(MODES)}, got {value!r}")
        return v

    @field_validator("model_memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        from service.registry import memory_budget

        try:
            if memory_budget(value, torch.device("meta")) <= 0:
                raise ValueError
        except (ValueError, TypeError):
            raise ValueError(f"model_memory must be a fraction (0.6) or a size (8GB, 512MiB), got {value!r}") from None
        return value

    @field_validator("jobs_url")
    @classmethod
    def _jobs_url(cls, value: str) -> str:
        v = value.strip()
        if v and not v.startswith(("sqlite:///", "redis://", "rediss://", "unix://")):
            raise ValueError(f"jobs_url must be empty, sqlite:///PATH or redis://HOST:PORT/DB, got {value!r}")
        return v

    @field_validator("admin_key", "webhook_secret", mode="before")
    @classmethod
    def _no_empty_key(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _consistent(self):
        if self.cuda_graphs and self.device == "cpu":
            raise ValueError("cuda_graphs needs a CUDA device")
        if self.request_timeout_s > self.max_timeout_s:
            raise ValueError(f"request_timeout_s ({self.request_timeout_s:g}) cannot exceed max_timeout_s "
                             f"({self.max_timeout_s:g})")
        if self.max_images > self.max_batch_rows:
            raise ValueError(f"max_images ({self.max_images}) cannot exceed max_batch_rows ({self.max_batch_rows}): "
                             "a request's images are admitted together")
        return self

    def buckets(self) -> list[int]:
        """The padded row counts an accelerated engine runs at."""
        return [b for b in self.compile_buckets if b <= self.max_batch_rows] or \
            list(power_of_two_buckets(self.max_batch_rows))

    def acceleration(self, device_type: str) -> Acceleration:
        """How the engine runs its iterations on this device (CUDA graphs only on CUDA)."""
        graphs = (self.cuda_graphs or self.compile == "reduce-overhead") and device_type == "cuda"
        mode = "default" if self.compile == "reduce-overhead" else self.compile
        return Acceleration(compile=mode, cuda_graphs=graphs, buckets=tuple(self.buckets()))

    def policy(self) -> Policy:
        reserve = self.max_batch_rows // 8 if self.reserve_rows < 0 else self.reserve_rows
        return Policy(order=self.admission, short_work=self.short_request_evaluations,
                      reserve_rows=min(reserve, self.max_batch_rows - 1), starvation_s=self.starvation_s,
                      goodput=self.goodput)

    def max_body_bytes(self) -> int:
        """A request body, at most: an image and a mask at the byte limit, base64-encoded, and the rest."""
        return 3 * self.max_image_bytes + 1024 * 1024

    def key_values(self) -> list[bytes]:
        return [k.get_secret_value().encode() for k in self.api_keys]
