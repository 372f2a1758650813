"""Asynchronous jobs: durable state (:mod:`.store` SQLite, :mod:`.redis_store` Redis), the runner
that pulls them into the engine (:mod:`.runner`), and signed webhooks (:mod:`.webhooks`)."""

from __future__ import annotations

from dataclasses import dataclass

from service.jobs.store import JobStore, SqliteStore


def open_store(url: str, data_dir) -> JobStore:
    """``url`` empty: SQLite at ``data_dir/jobs.sqlite3``; ``sqlite:///PATH``; ``redis://…``."""
    from pathlib import Path

    if not url:
        return SqliteStore(Path(data_dir) / "jobs.sqlite3")
    if url.startswith("sqlite:///"):
        return SqliteStore(Path(url[len("sqlite:///"):]))
    from service.jobs.redis_store import RedisStore

    return RedisStore(url)


@dataclass
class JobService:
    """What the routes need: the store, the runner (to wake it, or cancel a job it runs), the
    webhook allowlist, the metrics."""
    store: JobStore
    runner: object
    allowlist: object
    metrics: object

    @property
    def healthy(self) -> bool:
        return self.runner.healthy
