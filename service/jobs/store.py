"""Where jobs live: the record, the store's contract, and the embedded SQLite store.

A job moves ``queued → running → succeeded | failed | cancelled`` (and ``running → queued`` again
when its replica stops or dies). Every store guarantees the same things, which the runner and the
routes rely on:

- **Exactly one terminal result.** :meth:`JobStore.finish` writes a result only while the job is not
  terminal, in one transaction with its terminal event; a second finish (a re-run after a reclaim, a
  cancel racing a success) changes nothing and returns False.
- **At-least-once execution.** A claim is a lease (``visibility_s``); a worker renews its leases while
  it runs them (:meth:`extend`). A lease that lapses (its worker died) is taken back by
  :meth:`reclaim`, and the job runs again: its seeds were fixed at submission, so it draws the same
  images.
- **Events in order, resumable.** Each job's events have increasing sequence numbers from 1 (the
  SSE ``id``); :meth:`events` returns those after a given one.
- **Idempotent submission.** (owner, Idempotency-Key) names at most one job; the same key with the
  same body (``body_hash``) returns that job, with another body :class:`IdempotencyConflict`.

:class:`SqliteStore` is the default (``python -m service`` alone, WAL, one process per data
directory, which a lock file enforces: a process that finds running jobs at start-up knows their
worker is gone and queues them again). :mod:`service.jobs.redis_store` shares one queue between
replicas.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import asyncio

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
LANES = ("short", "long")  # claimed in this order
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
TERMINAL_EVENT = {"succeeded": "done", "failed": "error", "cancelled": "cancelled"}


class StoreUnavailable(RuntimeError):
    """The store cannot be reached (Redis down): a 503, never a 500; nothing accepted is lost."""


class IdempotencyConflict(ValueError):
    """The Idempotency-Key names a job made from another body."""

    def __init__(self, job_id: str):
        super().__init__(f"this Idempotency-Key was used for job {job_id} with a different body")
        self.job_id = job_id


class StoreLocked(RuntimeError):
    """Another process serves this data directory."""


@dataclass
class JobRecord:
    id: str
    owner: str
    status: str
    request: dict  # the body as accepted: seed fixed, so a re-run draws the same images
    model: str = ""
    body_hash: str = ""
    idempotency_key: str | None = None
    webhook: dict | None = None  # {"url": ..., "events": [...]}
    created_at: float = 0.0  # unix seconds
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    worker: str | None = None
    progress: dict | None = None  # the last {"done", "total", "elapsed_s"}
    result: dict | None = None  # the /generate answer
    error: dict | None = None  # {"status", "detail"}
    cancel_requested: bool = False
    deliveries: int = 0  # webhook deliveries that succeeded
    delivery_failures: int = 0  # failed attempts
    delivery_error: str | None = None  # the last failure
    rows: int = 1  # images: what a worker's capacity is charged
    lane: str = "long"  # "short": latency-sensitive (few evaluations), claimed first and into reserved rows
    position: int | None = None  # queued: jobs ahead (filled in by get)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class Event:
    seq: int
    event: str
    data: dict


@dataclass
class Claimed:
    records: list[JobRecord] = field(default_factory=list)
    reclaimed: int = 0  # of them, taken back from a worker that stopped renewing its lease


def new_id() -> str:
    return "job_" + uuid.uuid4().hex


class JobStore:
    """The contract (synchronous; :meth:`run` calls a method off the event loop)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="job-store")

    _threads = 1

    async def run(self, method: str, *args, **kwargs):
        """``await store.run("get", id)``: the call on the store's own threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: getattr(self, method)(*args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    # --- the contract ---------------------------------------------------------------------------
    def create(self, record: JobRecord, max_queued: int) -> tuple[JobRecord, bool]:
        """Store a queued job; (the job, True), or (the existing job, False) when its owner's
        idempotency key names one with the same body. Raises IdempotencyConflict, QueueLimit."""
        raise NotImplementedError

    def get(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        """The job (its queue position filled in when queued); None if unknown or another owner's."""
        raise NotImplementedError

    def list(self, owner: str, status: str | None = None, limit: int = 20,
             before: str | None = None) -> tuple[list[JobRecord], str | None]:
        """An owner's jobs, newest first, after the cursor ``before``; (page, next cursor or None)."""
        raise NotImplementedError

    def claim(self, worker: str, limit: int, visibility_s: float, lane: str = "long") -> list[JobRecord]:
        """Up to ``limit`` queued jobs of ``lane``, oldest first, now running on ``worker`` for ``visibility_s``."""
        raise NotImplementedError

    def extend(self, worker: str, job_ids: list[str], visibility_s: float) -> dict[str, bool]:
        """Renew the leases of ``worker``'s running jobs; per id, whether a cancel was asked for.
        Ids no longer running on this worker are left out."""
        raise NotImplementedError

    def reclaim(self, worker: str, visibility_s: float, limit: int) -> list[JobRecord]:
        """Jobs whose lease lapsed (their worker died): claimed by ``worker`` (SQLite: queued again)."""
        raise NotImplementedError

    def release(self, job_id: str, worker: str) -> bool:
        """Give a running job back to the queue (a replica draining at shutdown, an engine refusal)."""
        raise NotImplementedError

    def append(self, job_id: str, event: str, data: dict, progress: dict | None = None) -> int:
        """Add a non-terminal event (and the job's latest progress); its sequence number."""
        raise NotImplementedError

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[Event]:
        raise NotImplementedError

    def finish(self, job_id: str, status: str, result: dict | None = None, error: dict | None = None) -> bool:
        """Write the terminal result and event, once. False: it already had one."""
        raise NotImplementedError

    def request_cancel(self, job_id: str, owner: str | None) -> JobRecord | None:
        """Cancel: a queued job at once (terminal), a running one asked to stop (its worker finishes it)."""
        raise NotImplementedError

    def delivered(self, job_id: str, ok: bool, detail: str | None) -> None:
        """Count a webhook attempt in the job."""
        raise NotImplementedError

    def purge(self, older_than_s: float, now: float | None = None, limit: int = 500) -> int:
        """Delete at most ``limit`` terminal jobs finished more than ``older_than_s`` ago; how many."""
        raise NotImplementedError

    def counts(self) -> tuple[dict[str, int], float]:
        """(jobs by status, age in seconds of the oldest queued job or 0)."""
        raise NotImplementedError

    def healthy(self) -> bool:
        return True

    shared = False  # True: other processes claim from the same queue (Redis)

    def listen(self, on_new, on_event) -> None:
        """Call ``on_new()`` when another process queues a job and ``on_event(job_id)`` when it stores an
        event (a shared store); a store of one process has nothing to listen to."""


class QueueLimit(RuntimeError):
    def __init__(self, queued: int, retry_after_s: int = 5):
        super().__init__(f"{queued} jobs are queued, the service's limit (max_jobs_queued); retry later")
        self.retry_after_s = retry_after_s


def dumps(value) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def loads(text):
    return None if text is None else json.loads(text)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    body_hash TEXT NOT NULL,
    idem TEXT,
    webhook TEXT,
    rows INTEGER NOT NULL,
    lane TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_until REAL,
    progress TEXT,
    result TEXT,
    error TEXT,
    cancel INTEGER NOT NULL DEFAULT 0,
    deliveries INTEGER NOT NULL DEFAULT 0,
    delivery_failures INTEGER NOT NULL DEFAULT 0,
    delivery_error TEXT,
    last_event INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    job TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job, seq)
) WITHOUT ROWID;
"""

_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs(owner, idem) WHERE idem IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, lane, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
"""


class SqliteStore(JobStore):
    """Jobs in one SQLite file (WAL: readers never wait for the writer; ``synchronous=NORMAL``: a
    committed job survives a crash of the process, SIGKILL included; a power cut may lose the last
    transactions). One connection, used by the store's one
    thread, so every method is a serialised transaction. The data directory is locked for the
    process's life (``flock``, released by the kernel when the process dies, SIGKILL included)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_key = str(self.path.resolve())
        first = self._acquire(self._lock_key)
        self._db: sqlite3.Connection | None = None
        self.recovered = self._executor.submit(self._open, first).result()

    # One process per data directory, across processes: an flock held for the process's life (the
    # kernel drops it when the process dies, SIGKILL included). Within one process (tests run
    # several apps) later stores share the first one's lock and do not recover its running jobs.
    _held: dict[str, list] = {}
    _held_lock = threading.Lock()

    @classmethod
    def _acquire(cls, key: str) -> bool:
        with cls._held_lock:
            if key in cls._held:
                cls._held[key][1] += 1
                return False
            handle = open(key + ".lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise StoreLocked(f"{key} is in use by another process: one service per data directory (set "
                                  "DIFFUSION_DATA_DIR, or share jobs between replicas with "
                                  "DIFFUSION_JOBS_URL=redis://…)") from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            cls._held[key] = [handle, 1]
            return True

    @classmethod
    def _release_lock(cls, key: str) -> None:
        with cls._held_lock:
            held = cls._held.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                held[0].close()
                del cls._held[key]

    def _open(self, recover: bool) -> int:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        if "lane" not in columns:  # a file from before lanes
            db.execute("ALTER TABLE jobs ADD COLUMN lane TEXT NOT NULL DEFAULT 'long'")
        db.executescript(_INDEXES)
        self._db = db
        if not recover:
            return 0
        # We hold the directory's lock: whatever was running belonged to a process that is gone.
        with self._tx() as c:
            stale = c.execute("SELECT id FROM jobs WHERE status = 'running'").fetchall()
            for row in stale:
                self._requeue(c, row["id"], "the worker stopped")
        return len(stale)

    def close(self) -> None:
        def shut():
            if self._db is not None:
                self._db.close()
                self._db = None
        self._executor.submit(shut).result()
        super().close()
        self._release_lock(self._lock_key)

    # --- helpers ----------------------------------------------------------------------------------
    class _Tx:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, kind, value, tb):
            if kind is not None:
                self.db.execute("ROLLBACK")
                return
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:  # (a full disk): never leave the transaction open for the next one
                self.db.execute("ROLLBACK")
                raise

    def _tx(self):
        return self._Tx(self._db)

    def _run(self, fn, *args):
        """Every public method runs on the store's thread (the connection's)."""
        if threading.current_thread().name.startswith("job-store"):
            return fn(*args)
        return self._executor.submit(fn, *args).result()

    @staticmethod
    def _record(row) -> JobRecord:
        return JobRecord(
            id=row["id"], owner=row["owner"], status=row["status"], request=loads(row["request"]),
            model=row["model"], body_hash=row["body_hash"], idempotency_key=row["idem"],
            webhook=loads(row["webhook"]), created_at=row["created_at"], started_at=row["started_at"],
            finished_at=row["finished_at"], attempts=row["attempts"], worker=row["worker"],
            progress=loads(row["progress"]), result=loads(row["result"]), error=loads(row["error"]),
            cancel_requested=bool(row["cancel"]), deliveries=row["deliveries"],
            delivery_failures=row["delivery_failures"], delivery_error=row["delivery_error"], rows=row["rows"],
            lane=row["lane"])

    def _event(self, c, job_id: str, event: str, data: dict) -> int:
        seq = c.execute("UPDATE jobs SET last_event = last_event + 1 WHERE id = ? RETURNING last_event",
                        (job_id,)).fetchone()[0]
        c.execute("INSERT INTO events (job, seq, event, data) VALUES (?, ?, ?, ?)", (job_id, seq, event, dumps(data)))
        return seq

    def _requeue(self, c, job_id: str, why: str) -> None:
        c.execute("UPDATE jobs SET status = 'queued', worker = NULL, lease_until = NULL, progress = NULL "
                  "WHERE id = ?", (job_id,))
        self._event(c, job_id, "requeued", {"reason": why})

    # --- the contract -------------------------------------------------------------------------------
    def create(self, record: JobRecord, max_queued: int) -> tuple[JobRecord, bool]:
        return self._run(self._create, record, max_queued)

    def _create(self, record: JobRecord, max_queued: int) -> tuple[JobRecord, bool]:
        with self._tx() as c:
            if record.idempotency_key is not None:
                row = c.execute("SELECT * FROM jobs WHERE owner = ? AND idem = ?",
                                (record.owner, record.idempotency_key)).fetchone()
                if row is not None:
                    if row["body_hash"] != record.body_hash:
                        raise IdempotencyConflict(row["id"])
                    return self._record(row), False
            queued = c.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            if queued >= max_queued:
                raise QueueLimit(queued)
            c.execute("INSERT INTO jobs (id, owner, status, model, request, body_hash, idem, webhook, rows, lane, "
                      "created_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                      (record.id, record.owner, record.model, dumps(record.request), record.body_hash,
                       record.idempotency_key, dumps(record.webhook), record.rows, record.lane, record.created_at))
            record.position = self._position(c, record.id, record.lane)
            self._event(c, record.id, "queued", {"position": record.position})
        return record, True

    @staticmethod
    def _position(c, job_id: str, lane: str) -> int:
        """Queued jobs claimed before this one: those ahead in its lane, and a long job has every short
        one ahead of it."""
        seq = c.execute("SELECT seq FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
        ahead = c.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND lane = ? AND seq < ?",
                          (lane, seq)).fetchone()[0]
        if lane == "long":
            ahead += c.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND lane = 'short'").fetchone()[0]
        return ahead

    def get(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        return self._run(self._get, job_id, owner)

    def _get(self, job_id: str, owner: str | None) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        record = self._record(row)
        if record.status == "queued":
            record.position = self._position(self._db, job_id, record.lane)
        return record

    def list(self, owner: str, status: str | None = None, limit: int = 20,
             before: str | None = None) -> tuple[list[JobRecord], str | None]:
        return self._run(self._list, owner, status, limit, before)

    def _list(self, owner, status, limit, before):
        where, args = ["owner = ?"], [owner]
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if before is not None:
            where.append("seq < (SELECT seq FROM jobs WHERE id = ?)")
            args.append(before)
        rows = self._db.execute(f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
                                (*args, limit + 1)).fetchall()
        page = [self._record(r) for r in rows[:limit]]
        return page, (page[-1].id if len(rows) > limit else None)

    def claim(self, worker: str, limit: int, visibility_s: float, lane: str = "long") -> list[JobRecord]:
        return self._run(self._claim, worker, limit, visibility_s, lane)

    def _claim(self, worker, limit, visibility_s, lane):
        now = time.time()
        with self._tx() as c:
            rows = c.execute("UPDATE jobs SET status = 'running', worker = ?, lease_until = ?, "
                             "attempts = attempts + 1, started_at = COALESCE(started_at, ?) WHERE seq IN "
                             "(SELECT seq FROM jobs WHERE status = 'queued' AND lane = ? ORDER BY seq LIMIT ?) "
                             "RETURNING *", (worker, now + visibility_s, now, lane, limit)).fetchall()
        return sorted((self._record(r) for r in rows), key=lambda r: r.created_at)

    def extend(self, worker: str, job_ids: list[str], visibility_s: float) -> dict[str, bool]:
        return self._run(self._extend, worker, list(job_ids), visibility_s)

    def _extend(self, worker, job_ids, visibility_s):
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        with self._tx() as c:
            rows = c.execute(f"UPDATE jobs SET lease_until = ? WHERE status = 'running' AND worker = ? AND id IN "
                             f"({marks}) RETURNING id, cancel", (time.time() + visibility_s, worker, *job_ids))
            return {r["id"]: bool(r["cancel"]) for r in rows.fetchall()}

    def reclaim(self, worker: str, visibility_s: float, limit: int) -> list[JobRecord]:
        return self._run(self._reclaim, limit)

    def _reclaim(self, limit):
        with self._tx() as c:
            stale = c.execute("SELECT id FROM jobs WHERE status = 'running' AND lease_until < ? ORDER BY seq "
                              "LIMIT ?", (time.time(), limit)).fetchall()
            for row in stale:
                self._requeue(c, row["id"], "the worker's lease lapsed")
        return [JobRecord(id=r["id"], owner="", status="queued", request={}) for r in stale]

    def release(self, job_id: str, worker: str) -> bool:
        return self._run(self._release, job_id, worker)

    def _release(self, job_id, worker):
        with self._tx() as c:
            row = c.execute("SELECT 1 FROM jobs WHERE id = ? AND status = 'running' AND worker = ?",
                            (job_id, worker)).fetchone()
            if row is None:
                return False
            self._requeue(c, job_id, "its worker stopped before it finished")
            return True

    def append(self, job_id: str, event: str, data: dict, progress: dict | None = None) -> int:
        return self._run(self._append, job_id, event, data, progress)

    def _append(self, job_id, event, data, progress):
        with self._tx() as c:
            status = c.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if status is None or status[0] in TERMINAL:
                return 0  # nothing after the terminal event
            if progress is not None:
                c.execute("UPDATE jobs SET progress = ? WHERE id = ?", (dumps(progress), job_id))
            return self._event(c, job_id, event, data)

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[Event]:
        return self._run(self._events, job_id, after, limit)

    def _events(self, job_id, after, limit):
        rows = self._db.execute("SELECT seq, event, data FROM events WHERE job = ? AND seq > ? ORDER BY seq LIMIT ?",
                                (job_id, after, limit)).fetchall()
        return [Event(r["seq"], r["event"], loads(r["data"])) for r in rows]

    def finish(self, job_id: str, status: str, result: dict | None = None, error: dict | None = None) -> bool:
        return self._run(self._finish, job_id, status, result, error)

    def _finish(self, job_id, status, result, error):
        assert status in TERMINAL
        with self._tx() as c:
            row = c.execute("UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ?, worker = NULL, "
                            "lease_until = NULL WHERE id = ? AND status IN ('queued', 'running') RETURNING id",
                            (status, dumps(result), dumps(error), time.time(), job_id)).fetchone()
            if row is None:
                return False
            # the result is in the job; the terminal event refers to it (not a second copy of the images)
            self._event(c, job_id, TERMINAL_EVENT[status], error or {})
            return True

    def request_cancel(self, job_id: str, owner: str | None) -> JobRecord | None:
        return self._run(self._request_cancel, job_id, owner)

    def _request_cancel(self, job_id, owner):
        record = self._get(job_id, owner)
        if record is None:
            return None
        if record.status == "queued":
            self._finish(job_id, "cancelled", None, {"status": 499, "detail": "cancelled before it ran"})
        elif record.status == "running":
            with self._tx() as c:
                c.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
        return self._get(job_id, owner)

    def delivered(self, job_id: str, ok: bool, detail: str | None) -> None:
        self._run(self._delivered, job_id, ok, detail)

    def _delivered(self, job_id, ok, detail):
        with self._tx() as c:
            if ok:
                c.execute("UPDATE jobs SET deliveries = deliveries + 1 WHERE id = ?", (job_id,))
            else:
                c.execute("UPDATE jobs SET delivery_failures = delivery_failures + 1, delivery_error = ? "
                          "WHERE id = ?", (detail, job_id))

    def purge(self, older_than_s: float, now: float | None = None, limit: int = 500) -> int:
        return self._run(self._purge, older_than_s, now, limit)

    def _purge(self, older_than_s, now, limit):
        cutoff = (time.time() if now is None else now) - older_than_s
        with self._tx() as c:
            ids = [r[0] for r in c.execute("SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ? "
                                           "LIMIT ?", (cutoff, limit)).fetchall()]
            for job_id in ids:
                c.execute("DELETE FROM events WHERE job = ?", (job_id,))
                c.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return len(ids)

    def counts(self) -> tuple[dict[str, int], float]:
        return self._run(self._counts)

    def _counts(self):
        by = dict.fromkeys(STATUSES, 0)
        for row in self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
            by[row[0]] = row[1]
        oldest = self._db.execute("SELECT MIN(created_at) FROM jobs WHERE status = 'queued'").fetchone()[0]
        return by, (max(0.0, time.time() - oldest) if oldest is not None else 0.0)
