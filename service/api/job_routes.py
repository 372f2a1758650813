"""The job API: ``POST /jobs`` (202), ``GET /jobs/{id}``, ``GET /jobs/{id}/events`` (SSE, resumable
with Last-Event-ID), ``DELETE /jobs/{id}`` and ``POST /jobs/{id}/cancel``, ``GET /jobs``.

A job takes any body ``/generate`` takes. At submission it is checked as far as this replica can
(the schema; the model's name; every field against the model when it is loaded here; the webhook's
URL and address), its seed is fixed (a re-run after a crash draws the same images), and it is stored;
a runner (this replica's or another's) claims it when its engine has room. With API keys on, a job
is its key's alone (another key gets 404).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import secrets
import time
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response

from service.api.deps import RegistryDep, SettingsDep, require_key
from service.api.routes import ERRORS, field_errors
from service.api.streaming import HEARTBEAT_S, KEEP_ALIVE, EventStream
from service.generation import FieldErrors, prepare_async
from service.images import TooLarge
from service.job_schemas import JobLinks, JobList, JobRequest, JobStatus, JobStatusName, WebhookState
from service.jobs.store import IdempotencyConflict, JobRecord, QueueLimit, StoreUnavailable, new_id
from service.jobs.webhooks import WebhookRefused, check_syntax, resolve_checked
from service.registry import UnknownModel
from service.schemas import ErrorResponse
from service.settings import Settings

router = APIRouter(tags=["jobs"])

EVENTS_POLL_S = 0.5  # a follower's poll for new events (followers are woken at once by this replica's runner, or
#                      by the store's notifications when another replica runs the job: this is a backstop)
JOB_ERRORS = {**ERRORS, 404: {"model": ErrorResponse, "description": "Unknown job (or another key's), or unknown model"},
              409: {"model": ErrorResponse, "description": "The job has finished: nothing to cancel"},
              429: {"model": ErrorResponse, "description": "The job queue is full (max_jobs_queued); see Retry-After"},
              503: {"model": ErrorResponse, "description": "The job store is unreachable; see Retry-After"}}
MAX_KEY = 255


def owner_of(request: Request, settings: Settings) -> str:
    """Whose jobs: a digest of the bearer key when keys are on (never the key itself), else everyone's."""
    if not settings.api_keys:
        return "public"
    _, _, token = request.headers.get("authorization", "").partition(" ")
    return hashlib.sha256(token.strip().encode()).hexdigest()[:24]


def get_jobs(request: Request):
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise HTTPException(503, "the job service is not running", headers={"Retry-After": "5"})
    return jobs


def unavailable(e: StoreUnavailable) -> HTTPException:
    return HTTPException(503, str(e), headers={"Retry-After": "5"})


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def status_of(record: JobRecord, base: str, full: bool = True) -> JobStatus:
    hook = record.webhook
    return JobStatus(
        id=record.id, status=record.status, model=record.model, created_at=iso(record.created_at),
        started_at=iso(record.started_at), finished_at=iso(record.finished_at), attempts=record.attempts,
        position=record.position if record.status == "queued" else None,
        progress=record.progress if record.status == "running" else None,
        result=record.result if full and record.status == "succeeded" else None,
        error=record.error if record.status in ("failed", "cancelled") else None,
        webhook=WebhookState(url=hook["url"], events=hook["events"], delivered=record.deliveries,
                             failed_attempts=record.delivery_failures, last_error=record.delivery_error)
        if hook else None,
        links=JobLinks(**{"self": f"{base}/jobs/{record.id}", "events": f"{base}/jobs/{record.id}/events",
                          "cancel": f"{base}/jobs/{record.id}/cancel"}))


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def body_hash(body: JobRequest) -> str:
    """The body as given (before the seed is fixed), canonical: the same key with the same body."""
    return hashlib.sha256(json.dumps(body.model_dump(mode="json", exclude_unset=True), sort_keys=True,
                                     separators=(",", ":")).encode()).hexdigest()


def idempotency(key: str | None) -> str | None:
    if key is None:
        return None
    if not key or len(key) > MAX_KEY or not all(33 <= ord(c) <= 126 for c in key):
        raise HTTPException(422, [{"field": "Idempotency-Key", "msg": f"must be 1 to {MAX_KEY} printable ASCII "
                                   "characters without spaces", "type": "value_error",
                                   "loc": ["header", "Idempotency-Key"]}])
    return key


async def check_webhook(body: JobRequest, settings: Settings, allowlist) -> dict | None:
    if body.webhook is None:
        if body.webhook_events:
            raise HTTPException(422, [{"field": "webhook_events", "msg": "needs a webhook", "type": "value_error",
                                       "loc": ["body", "webhook_events"]}])
        return None
    try:
        check_syntax(body.webhook)
        await asyncio.wait_for(resolve_checked(body.webhook, allowlist), settings.webhook_timeout_s)
    except asyncio.TimeoutError:
        raise HTTPException(422, [{"field": "webhook", "msg": "its host could not be resolved in "
                                   f"{settings.webhook_timeout_s:g} s", "type": "value_error",
                                   "loc": ["body", "webhook"]}]) from None
    except WebhookRefused as e:
        raise HTTPException(422, [{"field": "webhook", "msg": str(e), "type": "value_error",
                                   "loc": ["body", "webhook"]}]) from None
    return {"url": body.webhook, "events": sorted(set(body.webhook_events or ["completed"]))}


def lane_of(body: JobRequest, card, settings: Settings) -> str:
    """"short" when the job needs at most ``short_request_evaluations`` model evaluations per image
    (the engine's latency-sensitive requests; an edit's plan is its strength's share), else "long"."""
    steps = body.steps if body.steps is not None else (card.default_steps if card is not None else None)
    scheduler = body.scheduler or (card.default_scheduler if card is not None else None)
    if steps is None or scheduler is None:
        return "long"
    evaluations = {"heun": 2 * steps - 1, "pndm": steps + 9}.get(scheduler, steps)
    if body.image is not None:
        evaluations = math.ceil(evaluations * (body.strength or settings.variation_strength))
    if body.jump_n_sample and body.jump_n_sample > 1:
        return "long"
    return "short" if evaluations <= settings.short_request_evaluations else "long"


@router.post("/jobs", status_code=202, response_model=JobStatus, dependencies=[Depends(require_key)],
             responses=JOB_ERRORS)
async def create_job(body: JobRequest, request: Request, response: Response, settings: SettingsDep,
                     registry: RegistryDep,
                     idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None) -> JobStatus:
    """Queue a job: any body /generate takes (edits too), plus an optional webhook. Answers 202 with its
    id and links; the same Idempotency-Key with the same body returns the same job."""
    jobs = get_jobs(request)
    key = idempotency(idempotency_key)
    request.state.log.update(kind="job", images=body.num_images)
    try:
        name = registry.resolve(body.model)
    except UnknownModel as e:
        raise HTTPException(404, str(e)) from None
    request.state.log["model"] = name
    hook = await check_webhook(body, settings, jobs.allowlist)
    entry = registry.entry(name)
    if entry.state == "resident":  # check every field against the model now (else when it runs)
        try:
            await prepare_async(body.model_copy(update={"model": name}), registry, settings, True)
        except FieldErrors as e:
            raise field_errors(e) from None
        except TooLarge as e:
            raise HTTPException(413, [{"field": e.field, "msg": str(e), "type": "too_large",
                                       "loc": ["body", e.field]}]) from None
        except (UnknownModel, KeyError) as e:  # (KeyError: taken out of service meanwhile)
            raise HTTPException(404, str(e)) from None
    stored = body.model_dump(mode="json", exclude_unset=True, exclude={"webhook", "webhook_events", "stream"})
    stored["model"] = name
    if stored.get("seed") is None:
        stored["seed"] = secrets.randbelow(2**31)  # fixed now: a re-run draws the same images
    if stored.get("timeout_s") is None:
        stored["bulk"] = True  # a job waits for room; it has no deadline unless it names one
    record = JobRecord(id=new_id(), owner=owner_of(request, settings), status="queued", request=stored, model=name,
                       body_hash=body_hash(body), idempotency_key=key, webhook=hook, created_at=time.time(),
                       rows=body.num_images, lane=lane_of(body, registry.card(name), settings))
    try:
        record, created = await jobs.store.run("create", record, settings.max_jobs_queued)
    except IdempotencyConflict as e:
        raise HTTPException(422, [{"field": "Idempotency-Key", "msg": str(e), "type": "value_error",
                                   "loc": ["header", "Idempotency-Key"]}]) from None
    except QueueLimit as e:
        raise HTTPException(429, str(e), headers={"Retry-After": str(e.retry_after_s)}) from None
    except StoreUnavailable as e:
        raise unavailable(e) from None
    if created:
        jobs.metrics.jobs_submitted.inc()
        jobs.runner.wake()
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/jobs/{record.id}"
    request.state.log["job"] = record.id
    return status_of(record, base_url(request))


async def _get(request: Request, settings: Settings, job_id: str) -> JobRecord:
    jobs = get_jobs(request)
    try:
        record = await jobs.store.run("get", job_id, owner_of(request, settings))
    except StoreUnavailable as e:
        raise unavailable(e) from None
    if record is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return record


@router.get("/jobs/{job_id}", response_model=JobStatus, dependencies=[Depends(require_key)], responses=JOB_ERRORS)
async def get_job(job_id: str, request: Request, settings: SettingsDep) -> JobStatus:
    """A job's status: queued (with its position), running (with progress), succeeded (with the images
    and seeds), failed (with the error) or cancelled; timestamps, attempts, webhook deliveries."""
    return status_of(await _get(request, settings, job_id), base_url(request))


@router.get("/jobs", response_model=JobList, dependencies=[Depends(require_key)], responses=JOB_ERRORS)
async def list_jobs(request: Request, settings: SettingsDep, status: JobStatusName | None = None,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20,
                    after: Annotated[str | None, Query(max_length=64)] = None) -> JobList:
    """Your jobs, newest first (without their images: GET /jobs/{id} has them), a page at a time."""
    jobs = get_jobs(request)
    try:
        page, cursor = await jobs.store.run("list", owner_of(request, settings), status, limit, after)
    except StoreUnavailable as e:
        raise unavailable(e) from None
    base = base_url(request)
    return JobList(jobs=[status_of(r, base, full=False) for r in page], next=cursor)


async def _cancel(job_id: str, request: Request, settings: Settings) -> JobStatus:
    jobs = get_jobs(request)
    owner = owner_of(request, settings)
    try:
        before = await jobs.store.run("get", job_id, owner)
        record = await jobs.store.run("request_cancel", job_id, owner) if before is not None else None
    except StoreUnavailable as e:
        raise unavailable(e) from None
    if record is None:
        raise HTTPException(404, f"no job {job_id!r}")
    if before.status == "queued" and record.status == "cancelled":
        jobs.runner.cancelled(record)  # no runner saw it: its webhook and metrics from here
    if record.status == "running":
        jobs.runner.cancel_local(job_id)  # here: at once; elsewhere: at that replica's next heartbeat
    elif record.status in ("succeeded", "failed"):
        raise HTTPException(409, f"job {job_id} has already {record.status}")
    return status_of(record, base_url(request), full=False)


@router.delete("/jobs/{job_id}", response_model=JobStatus, dependencies=[Depends(require_key)], responses=JOB_ERRORS)
async def delete_job(job_id: str, request: Request, settings: SettingsDep) -> JobStatus:
    """Cancel a job (a queued one at once; a running one leaves the engine at its next iteration). 409
    when it has already succeeded or failed; cancelling a cancelled job is not an error."""
    return await _cancel(job_id, request, settings)


@router.post("/jobs/{job_id}/cancel", response_model=JobStatus, dependencies=[Depends(require_key)],
             responses=JOB_ERRORS)
async def cancel_job(job_id: str, request: Request, settings: SettingsDep) -> JobStatus:
    """Cancel a job (as DELETE /jobs/{id})."""
    return await _cancel(job_id, request, settings)




@router.get("/jobs/{job_id}/events", dependencies=[Depends(require_key)], responses={
    **JOB_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events, each with an id: "
                        "queued, progress, preview, requeued (its replica stopped; it runs again), then done "
                        "(the /generate answer), error or cancelled. Reconnect with Last-Event-ID to resume."}})
async def job_events(job_id: str, request: Request, settings: SettingsDep,
                     last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None) -> EventStream:
    """The job's events from the start, or after Last-Event-ID; the stream ends after the terminal event."""
    record = await _get(request, settings, job_id)
    try:
        after = max(0, int(last_event_id)) if last_event_id not in (None, "") else 0
        if after >= 2**53:
            raise ValueError
    except ValueError:
        raise HTTPException(422, [{"field": "Last-Event-ID", "msg": "must be an event id (an integer below 2**53)",
                                   "type": "value_error", "loc": ["header", "Last-Event-ID"]}]) from None
    return EventStream(_follow(request, record, after))


async def _follow(request: Request, record: JobRecord, after: int):
    jobs = request.app.state.jobs
    quiet = time.monotonic()
    with jobs.runner.watch(record.id) as stored:
        while True:
            stored.clear()
            try:
                events = await jobs.store.run("events", record.id, after)
                done = await jobs.store.run("get", record.id) if any(e.event == "done" for e in events) else None
            except StoreUnavailable:  # the stream goes on; the client's next reconnect resumes it anyway
                events = []
            for ev in events:
                after = ev.seq
                data = ev.data
                if ev.event == "done":
                    data = done.result if done is not None else {}
                yield f"id: {ev.seq}\nevent: {ev.event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
                if ev.event in ("done", "error", "cancelled"):
                    return
            if events:
                quiet = time.monotonic()
                continue
            if jobs.runner.draining or await request.is_disconnected():
                return  # shutting down: the client resumes with Last-Event-ID (another replica, or after the restart)
            if time.monotonic() - quiet >= HEARTBEAT_S:
                quiet = time.monotonic()
                yield KEEP_ALIVE
            try:  # at once for a job running here; another replica's: the next poll
                await asyncio.wait_for(stored.wait(), EVENTS_POLL_S)
            except asyncio.TimeoutError:
                pass
