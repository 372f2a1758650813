"""``create_app(settings)``: the FastAPI application, its lifespan (load models, start the engine;
on exit stop admitting and drain), its routers (native, OpenAI-compatible, playground), error
handlers, CORS and the request log."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException

from diffusion import SAMPLERS
from service.api import admin, job_routes, openai_api, playground
from service.api.errors import http_error, too_large, validation_error
from service.api.middleware import BodyLimit, BodyTooLarge, RequestLog
from service.api.openapi import add_models
from service.api.routes import router
from service.engine import Engine
from service.images import TooLarge
from service.jobs import JobService, open_store
from service.jobs.runner import JobRunner
from service.jobs.webhooks import Allowlist, Deliverer
from service.metrics import Metrics
from service.openai_schemas import EDIT_STREAM_EVENTS
from service.openai_schemas import STREAM_EVENTS as OPENAI_STREAM_EVENTS
from service.registry import ModelRegistry, memory_budget, resolve_device
from service.schemas import STREAM_EVENTS
from service.settings import Settings

log = logging.getLogger("service")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    device = resolve_device(settings.device)
    metrics: Metrics = app.state.metrics
    registry = await asyncio.to_thread(
        ModelRegistry.load, settings.checkpoint_dir, device, settings.default_model,
        int(settings.condition_cache_mb * 2**20), budget_bytes=memory_budget(settings.model_memory, device),
        mode=settings.model_control, poll_s=settings.poll_s, room_wait_s=settings.max_timeout_s, observer=metrics)
    accel = settings.acceleration(device.type)
    engine = Engine(registry.pipelines, max_rows=settings.max_batch_rows, max_queue=settings.max_queue,
                    observer=metrics, max_steps=settings.max_steps, accel=accel, policy=settings.policy(),
                    latency_rows=settings.latency_rows, cpu_threads=settings.cpu_threads,
                    decode_pixels=settings.decode_chunk_pixels,
                    calibrate_s=settings.calibrate_s if settings.goodput else 0.0)
    if accel.padded:  # compile and capture before /readyz turns ready
        started = time.monotonic()
        await asyncio.to_thread(engine.warm_up)
        log.info({"event": "warmed_up", "seconds": round(time.monotonic() - started, 1), "compile": accel.compile,
                  "cuda_graphs": accel.cuda_graphs, "buckets": list(accel.buckets)})
    metrics.watch(lambda: engine.queue_depth, lambda: engine.rows_in_flight)
    metrics.declare(registry.names(), list(SAMPLERS))
    engine.start()
    registry.attach(engine)
    app.state.registry, app.state.engine = registry, engine
    app.state.jobs = jobs = await asyncio.to_thread(start_jobs, settings, engine, registry, metrics)
    await jobs.runner.start()
    log.info({"event": "ready", "models": registry.names(), "default": registry.default, "device": str(device),
              "max_batch_rows": settings.max_batch_rows, "max_queue": settings.max_queue})
    try:
        yield
    finally:
        log.info({"event": "shutdown", "queued": engine.queue_depth, "rows_in_flight": engine.rows_in_flight})
        started = time.monotonic()
        await jobs.runner.stop(settings.shutdown_grace_s)  # running jobs finish, or go back to the queue
        registry.close()
        left = max(0.0, settings.shutdown_grace_s - (time.monotonic() - started))
        await asyncio.to_thread(engine.shutdown, left)
        jobs.store.close()


def start_jobs(settings: Settings, engine: Engine, registry: ModelRegistry, metrics: Metrics) -> JobService:
    """The job store (SQLite by default, Redis with jobs_url), webhooks and the runner."""
    store = open_store(settings.jobs_url, settings.data_dir)
    allowlist = Allowlist.parse(settings.webhook_allowlist)

    def attempted(job_id: str, event: str, attempt: int, ok: bool, final: bool, detail: str) -> None:
        refused = not ok and detail.startswith("refused")
        metrics.webhooks.labels("delivered" if ok else "refused" if refused else "failed").inc()
        if not ok and final and not refused:
            metrics.webhooks.labels("gave_up").inc()
        if attempt > 0:  # counted in the job (best effort: the store may be down)
            asyncio.ensure_future(store.run("delivered", job_id, ok, None if ok else detail[:500]))

    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    deliverer = Deliverer(secret, allowlist, timeout_s=settings.webhook_timeout_s, attempts=settings.webhook_attempts,
                          backoff_s=settings.webhook_backoff_s, on_attempt=attempted)
    runner = JobRunner(store, engine, registry, settings, metrics, deliverer, run_jobs=settings.job_workers)
    return JobService(store=store, runner=runner, allowlist=allowlist, metrics=metrics)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service. ``settings`` default: read from the environment (``DIFFUSION_*``)."""
    settings = settings if settings is not None else Settings()
    app = FastAPI(title="diffusion-serve", version="0.1.0", lifespan=lifespan,
                  description="Class- and text-guided image generation with a step-level batching engine.")
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.registry = app.state.engine = app.state.jobs = None
    app.include_router(router)
    app.include_router(openai_api.router)
    app.include_router(playground.router)
    app.include_router(admin.router)
    app.include_router(job_routes.router)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(TooLarge, too_large)
    app.add_exception_handler(BodyTooLarge, too_large)
    add_models(app, [*STREAM_EVENTS.values(), *OPENAI_STREAM_EVENTS.values(), *EDIT_STREAM_EVENTS.values()])
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Accept", "X-Request-ID", "Idempotency-Key",
                                          "Last-Event-ID"],
                           expose_headers=["X-Request-ID", "X-Seeds", "Retry-After", "Location", "Idempotent-Replayed"])
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes())
    app.add_middleware(RequestLog, metrics=app.state.metrics)
    return app
