"""The job API's bodies: a job takes what ``/generate`` takes, plus a webhook."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from service.schemas import GenerateResponse, ProgressEvent, StreamError
from service.schemas import GenerateRequest

WEBHOOK_EVENTS = ("start", "progress", "completed")
WebhookEvent = Literal[WEBHOOK_EVENTS]  # type: ignore[valid-type]
JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobRequest(GenerateRequest):
    webhook: str | None = Field(None, max_length=2048, description="An http(s) URL that receives the job's "
                                "events as signed POSTs (Standard Webhooks: webhook-id, webhook-timestamp, "
                                "webhook-signature). Private, loopback and link-local addresses are refused "
                                "unless the service's webhook_allowlist names them.")
    webhook_events: list[WebhookEvent] | None = Field(None, max_length=3, description="Which events go to the "
                                                      "webhook: start, progress, completed (default: completed).")


class JobLinks(BaseModel):
    self: str
    events: str = Field(description="Server-Sent Events, resumable with Last-Event-ID.")
    cancel: str


class WebhookState(BaseModel):
    url: str
    events: list[str]
    delivered: int = Field(description="Deliveries the receiver accepted (2xx).")
    failed_attempts: int = Field(description="Attempts that failed (each is retried with backoff).")
    last_error: str | None = None


class JobStatus(BaseModel):
    id: str
    status: JobStatusName
    model: str
    created_at: str = Field(description="ISO 8601, UTC.")
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = Field(description="Times a replica started it (more than 1: it was taken back after its "
                          "replica stopped, and ran again with the same seeds).")
    position: int | None = Field(None, description="Queued: jobs ahead of it.")
    progress: ProgressEvent | None = Field(None, description="Running: the last progress.")
    result: GenerateResponse | None = Field(None, description="Succeeded: what /generate would have answered "
                                            "(left out of lists).")
    error: StreamError | None = Field(None, description="Failed or cancelled: why, with the HTTP status it "
                                      "would have had.")
    webhook: WebhookState | None = None
    links: JobLinks


class JobList(BaseModel):
    jobs: list[JobStatus]
    next: str | None = Field(None, description="Pass as ?after= for the next page (older jobs); null at the end.")


