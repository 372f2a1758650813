"""Prometheus metrics: the fixed names dashboards rely on, fed by engine stats and request outcomes.

The engine reports through the :class:`service.engine.Observer` methods (queue wait, forward
passes, images); the HTTP layer reports each finished request (:meth:`Metrics.request`); the two
gauges are read from the engine when Prometheus scrapes. Every app gets its own registry (with the
process, platform and GC collectors), so several apps can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# From a few milliseconds (a tiny model's few steps on a GPU) to minutes (1000 steps, a long queue).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
FORWARD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, queue_depth: Callable[[], float] = lambda: 0, rows_in_flight: Callable[[], float] = lambda: 0):
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter("diffusion_requests_total", "Generation and edit requests by kind (generation, "
                                "edit, variation) and outcome (HTTP status code)", ["model", "scheduler", "kind",
                                                                                    "status"], registry=r)
        self.duration = Histogram("diffusion_request_duration_seconds", "End-to-end /generate latency",
                                  ["model", "scheduler"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait_s = Histogram("diffusion_queue_wait_seconds", "Time from submission to the first step",
                                      ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("diffusion_batch_rows", "Image rows per batched forward pass "
                                    "(guided rows are evaluated twice inside it)", ["model"], buckets=ROW_BUCKETS,
                                    registry=r)
        self.forward_s = Histogram("diffusion_forward_duration_seconds", "One engine iteration of a model: "
                                   "forward pass and sampler updates", ["model"], buckets=FORWARD_BUCKETS, registry=r)
        self.images_total = Counter("diffusion_images_generated_total", "Images returned", ["model"], registry=r)
        self.streams = Counter("diffusion_streamed_requests_total", "Generation requests answered as a "
                               "Server-Sent Event stream", ["model"], registry=r)
        self.previews_total = Counter("diffusion_previews_total", "Streamed previews: sent, or dropped because "
                                      "the client read too slowly", ["model", "outcome"], registry=r)
        self.goodput_total = Counter("diffusion_goodput_total", "Requests answered: within their deadline "
                                     "(on_time=true) or after it (false)", ["model", "on_time"], registry=r)
        self.refusals_total = Counter("diffusion_refusals_total", "Requests refused before running, by reason: "
                                      "deadline (predicted to miss it), queue_full", ["model", "reason"], registry=r)
        self.prediction_ratio = Histogram("diffusion_prediction_ratio", "Actual over predicted seconds from "
                                          "admission to the last image (the cost model's error; 1 is exact)",
                                          ["model"], buckets=RATIO_BUCKETS, registry=r)
        self.model_loads = Counter("diffusion_model_loads_total", "Models loaded onto the device: kind=load (a "
                                   "first load, or after an eviction) or reload (new weights swapped in)",
                                   ["model", "kind"], registry=r)
        self.model_failures = Counter("diffusion_model_load_failures_total", "Loads and reloads that failed (a "
                                      "failed reload keeps the old weights serving)", ["model", "kind"], registry=r)
        self.model_evictions = Counter("diffusion_model_evictions_total", "Idle models evicted from the device to "
                                       "make room within the model memory budget", ["model"], registry=r)
        self.model_unloads = Counter("diffusion_model_unloads_total", "Models taken out of service (admin unload, "
                                     "or their files removed)", ["model"], registry=r)
        self.model_load_s = Histogram("diffusion_model_load_seconds", "Seconds to load a model (read, build, "
                                      "hand to the engine)", ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.model_bytes = Gauge("diffusion_model_resident_bytes", "Bytes of a model's weights on the device",
                                 ["model"], registry=r)
        # --- jobs (service/jobs): the store's counts are read every few seconds by the job runner
        self.jobs = Gauge("diffusion_jobs", "Jobs in the job store by status (every replica sees the same store)",
                          ["status"], registry=r)
        self.jobs_queue_age = Gauge("diffusion_jobs_queue_age_seconds", "Age of the oldest queued job", registry=r)
        self.jobs_submitted = Counter("diffusion_jobs_submitted_total", "Jobs accepted by this replica", registry=r)
        self.jobs_finished = Counter("diffusion_jobs_finished_total", "Terminal results written by this replica",
                                     ["status"], registry=r)
        self.jobs_claimed = Counter("diffusion_jobs_claimed_total", "Jobs this replica claimed to run", registry=r)
        self.jobs_reclaimed = Counter("diffusion_jobs_reclaimed_total", "Jobs taken back from a replica that stopped "
                                      "renewing its lease (died), or found running at a restart", registry=r)
        self.webhooks = Counter("diffusion_webhook_deliveries_total", "Webhook delivery attempts by outcome: "
                                "delivered, failed (retried), gave_up (the last attempt failed), refused (address "
                                "not allowed)", ["outcome"], registry=r)
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            self.jobs.labels(status)
        for status in ("succeeded", "failed", "cancelled"):
            self.jobs_finished.labels(status)
        for outcome in ("delivered", "failed", "gave_up", "refused"):
            self.webhooks.labels(outcome)
        self.depth = Gauge("diffusion_queue_depth", "Requests waiting for rows", registry=r)
        self.depth.set_function(queue_depth)
        self.in_flight = Gauge("diffusion_rows_in_flight", "Images being denoised", registry=r)
        self.in_flight.set_function(rows_in_flight)

    def watch(self, queue_depth: Callable[[], float], rows_in_flight: Callable[[], float]) -> None:
        """Read the two gauges from these callables (the engine) at every scrape."""
        self.depth.set_function(queue_depth)
        self.in_flight.set_function(rows_in_flight)

    def declare(self, models: list[str], schedulers: list[str]) -> None:
        """Create the labelled series at zero so dashboards show them before the first request."""
        for m in models:
            self.queue_wait_s.labels(m)
            self.batch_rows.labels(m)
            self.forward_s.labels(m)
            self.images_total.labels(m)
            self.streams.labels(m)
            for outcome in ("sent", "dropped"):
                self.previews_total.labels(m, outcome)
            for on_time in ("true", "false"):
                self.goodput_total.labels(m, on_time)
            for reason in ("deadline", "queue_full"):
                self.refusals_total.labels(m, reason)
            self.prediction_ratio.labels(m)
            for kind in ("load", "reload"):
                self.model_loads.labels(m, kind)
                self.model_failures.labels(m, kind)
            self.model_evictions.labels(m)
            self.model_unloads.labels(m)
            self.model_load_s.labels(m)
            self.model_bytes.labels(m)
            for s in schedulers:
                self.duration.labels(m, s)

    # --- the model registry's observer ---------------------------------------------------------------
    def declared(self, name: str) -> None:
        """A model appeared: its series start at zero."""
        from diffusion import SAMPLERS

        self.declare([name], list(SAMPLERS))

    def loaded(self, name: str, kind: str, seconds: float, nbytes: int) -> None:
        self.model_loads.labels(name, kind).inc()
        self.model_load_s.labels(name).observe(seconds)
        self.model_bytes.labels(name).set(nbytes)

    def load_failed(self, name: str, kind: str) -> None:
        self.model_failures.labels(name, kind).inc()

    def evicted(self, name: str) -> None:
        self.model_evictions.labels(name).inc()
        self.model_bytes.labels(name).set(0)

    def unloaded(self, name: str) -> None:
        self.model_unloads.labels(name).inc()
        self.model_bytes.labels(name).set(0)

    # --- the engine's Observer ------------------------------------------------------------------
    def queue_wait(self, model: str, seconds: float) -> None:
        self.queue_wait_s.labels(model).observe(seconds)

    def forward(self, model: str, rows: int, seconds: float) -> None:
        self.batch_rows.labels(model).observe(rows)
        self.forward_s.labels(model).observe(seconds)

    def images(self, model: str, count: int) -> None:
        self.images_total.labels(model).inc(count)

    def refused(self, model: str, reason: str) -> None:
        self.refusals_total.labels(model, reason).inc()

    def finished(self, model: str, on_time: bool, predicted_s: float | None, actual_s: float) -> None:
        self.goodput_total.labels(model, "true" if on_time else "false").inc()
        if predicted_s:
            self.prediction_ratio.labels(model).observe(actual_s / predicted_s)

    # --- the HTTP layer ---------------------------------------------------------------------------
    def request(self, model: str, scheduler: str, status: int, seconds: float | None = None,
                kind: str = "generation") -> None:
        """One finished generation or edit request (/generate, /v1/images/generations, /edits,
        /variations); ``status`` is its HTTP status code (200 for a stream, whatever its last event)."""
        self.requests.labels(model, scheduler, kind, str(status)).inc()
        if seconds is not None and status == 200:
            self.duration.labels(model, scheduler).observe(seconds)

    def streamed(self, model: str) -> None:
        self.streams.labels(model).inc()

    def previews(self, model: str, sent: int = 0, dropped: int = 0) -> None:
        if sent:
            self.previews_total.labels(model, "sent").inc(sent)
        if dropped:
            self.previews_total.labels(model, "dropped").inc(dropped)

    # --- jobs -----------------------------------------------------------------------------------
    def job_counts(self, by_status: dict[str, int], oldest_queued_s: float) -> None:
        for status, n in by_status.items():
            self.jobs.labels(status).set(n)
        self.jobs_queue_age.set(oldest_queued_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
