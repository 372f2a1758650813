"""The job store's contract, on both stores (a real SQLite file and a real redis-server): one
terminal result whatever races it, leases that lapse and are taken back, release, events in order
and resumable, idempotency, cancel, listing, purge, counts; and the fault cases of each store
(SQLite: one process per data directory, running jobs queued again at a restart; Redis: down is
StoreUnavailable, and a restarted server has lost nothing)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from service.jobs.store import IdempotencyConflict, JobRecord, QueueLimit, SqliteStore, StoreLocked, \
    StoreUnavailable, new_id
from tests.service.jobs.redis_server import RedisServer


@pytest.fixture(params=["sqlite", "redis"])
def kind(request):
    return request.param


@pytest.fixture
def opened(kind, tmp_path):
    """A function that opens the store (again: a restart) on the same data."""
    stores, server = [], None

    def open_():
        nonlocal server
        if kind == "sqlite":
            for s in stores:
                s.close()
            stores.clear()
            store = SqliteStore(tmp_path / "jobs.sqlite3")
        else:
            from service.jobs.redis_store import RedisStore

            if server is None:
                server = RedisServer(tmp_path / "redis").start()
            store = RedisStore(server.url)
        stores.append(store)
        return store
    yield open_
    for s in stores:
        s.close()
    if server is not None:
        server.kill()


def record(owner="o", key=None, body="b", rows=1, lane="long") -> JobRecord:
    return JobRecord(id=new_id(), owner=owner, status="queued", request={"prompt": body, "seed": 1}, model="m",
                     body_hash=body, idempotency_key=key, created_at=time.time(), rows=rows, lane=lane)


def test_one_terminal_result_whatever_races_it(opened):
    store = opened()
    job, created = store.create(record(), 10)
    assert created and job.position == 0
    (claimed,) = store.claim("w1", 5, 30)
    assert claimed.id == job.id and claimed.status == "running" and claimed.attempts == 1 and claimed.worker == "w1"
    assert store.append(job.id, "progress", {"done": 1, "total": 2}, progress={"done": 1, "total": 2}) == 2
    assert store.finish(job.id, "succeeded", result={"images": ["x"]})
    assert not store.finish(job.id, "failed", error={"status": 500, "detail": "late"})
    assert not store.finish(job.id, "succeeded", result={"images": ["y"]})
    assert store.append(job.id, "progress", {"done": 2, "total": 2}) == 0  # nothing after the end
    got = store.get(job.id)
    assert got.status == "succeeded" and got.result == {"images": ["x"]} and got.error is None
    events = store.events(job.id)
    assert [(e.seq, e.event) for e in events] == [(1, "queued"), (2, "progress"), (3, "done")]
    assert [e.seq for e in store.events(job.id, after=1)] == [2, 3]
    assert store.claim("w2", 5, 30) == []
    counts, age = store.counts()
    assert counts["succeeded"] == 1 and counts["queued"] == counts["running"] == 0 and age == 0


def test_a_lapsed_lease_is_taken_back_and_a_renewed_one_is_not(opened, kind):
    store = opened()
    a, _ = store.create(record(), 10)
    b, _ = store.create(record(), 10)
    claimed = store.claim("dead", 5, 0.3)
    assert [r.id for r in claimed] == [a.id, b.id]
    assert store.extend("alive", [a.id], 30) == {}  # not its jobs
    time.sleep(0.4)
    assert store.extend("dead", [b.id], 30) == {b.id: False}  # b renewed in time... a not
    taken = store.reclaim("w2", 0.3, 5)
    assert [r.id for r in taken] == [a.id]
    if kind == "redis":  # claimed by the taker at once
        assert taken[0].status == "running" and taken[0].worker == "w2" and taken[0].attempts == 2
    else:  # queued again, claimed as any queued job
        (again,) = store.claim("w2", 5, 30)
        assert again.id == a.id and again.attempts == 2
    assert "requeued" in [e.event for e in store.events(a.id)]
    assert store.extend("dead", [a.id], 30) == {}  # the dead worker has lost it
    assert store.finish(a.id, "succeeded", result={"by": "w2"}) and not store.finish(a.id, "succeeded", {"by": "dead"})
    assert store.get(a.id).result == {"by": "w2"}


def test_release_and_cancel(opened, kind):
    store = opened()
    a, _ = store.create(record(), 10)
    b, _ = store.create(record(), 10)
    c, _ = store.create(record(), 10)
    store.claim("w", 1, 30)
    assert not store.release(a.id, "other") and store.release(a.id, "w")
    # SQLite keeps its place in line; a Redis stream takes it back at its end
    assert store.get(a.id).status == "queued" and store.get(a.id).position == (0 if kind == "sqlite" else 2)
    assert store.get(c.id).position == (2 if kind == "sqlite" else 1)
    cancelled = store.request_cancel(b.id, "o")
    assert cancelled.status == "cancelled" and cancelled.error["status"] == 499
    assert store.request_cancel(b.id, "someone else") is None
    assert store.get(c.id).position == (1 if kind == "sqlite" else 0)
    claimed = store.claim("w", 5, 30)
    assert {r.id for r in claimed} == {a.id, c.id}  # the cancelled one is never handed out
    assert store.extend("w", [a.id, c.id], 30) == {a.id: False, c.id: False}
    running = store.request_cancel(c.id, "o")
    assert running.status == "running" and running.cancel_requested
    assert store.extend("w", [a.id, c.id], 30) == {a.id: False, c.id: True}


def test_idempotency_limit_listing_purge(opened):
    store = opened()
    first, created = store.create(record(key="k"), 3)
    again, created_again = store.create(record(key="k"), 3)
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        store.create(record(key="k", body="other"), 3)
    other_owner, created = store.create(record(owner="p", key="k"), 3)
    assert created and other_owner.id != first.id
    store.create(record(), 3)
    with pytest.raises(QueueLimit):
        store.create(record(), 3)
    ids = [first.id] + [store.create(record(), 10)[0].id for _ in range(3)]
    page, cursor = store.list("o", limit=2)
    assert [r.id for r in page] == ids[:-3:-1] and cursor == ids[-2]
    page2, cursor2 = store.list("o", limit=10, before=cursor)
    assert len(page2) == 3 and cursor2 is None  # ids[1], the job made between, and ids[0]
    store.request_cancel(ids[1], "o")
    assert [r.id for r in store.list("o", status="cancelled")[0]] == [ids[1]]
    assert store.list("p")[0][0].id == other_owner.id
    assert store.purge(3600) == 0 and store.purge(3600, now=time.time() + 7200) == 1
    assert store.get(ids[1]) is None and store.events(ids[1]) == []
    assert ids[1] not in [r.id for r in store.list("o")[0]]
    counts, age = store.counts()
    assert counts["cancelled"] == 0 and counts["queued"] == 5 and age >= 0
    store.delivered(ids[0], False, "HTTP 500")
    store.delivered(ids[0], True, None)
    got = store.get(ids[0])
    assert (got.deliveries, got.delivery_failures, got.delivery_error) == (1, 1, "HTTP 500")


def test_a_restart_keeps_jobs_and_queues_running_ones_again(opened, kind):
    store = opened()
    a, _ = store.create(record(), 10)
    b, _ = store.create(record(), 10)
    store.claim("w", 1, 30)
    store = opened()  # SQLite: a new process's store (the old one closed); Redis: another replica
    if kind == "sqlite":
        assert store.recovered == 1 and store.get(a.id).status == "queued"
        assert [r.id for r in store.claim("w2", 5, 30)] == [a.id, b.id]
    else:
        assert store.get(a.id).status == "running" and [r.id for r in store.claim("w2", 5, 30)] == [b.id]


def test_sqlite_is_one_process_per_data_directory(tmp_path):
    store = SqliteStore(tmp_path / "jobs.sqlite3")
    try:
        code = ("import sys; from service.jobs.store import SqliteStore, StoreLocked\n"
                f"try: SqliteStore({str(tmp_path / 'jobs.sqlite3')!r})\n"
                "except StoreLocked as e: print(e); sys.exit(3)")
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert other.returncode == 3 and "in use by another process" in other.stdout
    finally:
        store.close()
    SqliteStore(tmp_path / "jobs.sqlite3").close()  # free again once closed
    assert StoreLocked


def test_redis_down_is_unavailable_and_a_restarted_redis_lost_nothing(tmp_path):
    from service.jobs.redis_store import RedisStore

    server = RedisServer(tmp_path / "redis").start()
    store = RedisStore(server.url)
    try:
        job, _ = store.create(record(), 10)
        store.claim("w", 1, 30)
        store.append(job.id, "progress", {"done": 1, "total": 4})
        server.kill()
        with pytest.raises(StoreUnavailable):
            store.get(job.id)
        with pytest.raises(StoreUnavailable):
            store.create(record(), 10)
        with pytest.raises(StoreUnavailable):
            store.healthy()
        server.start()
        got = store.get(job.id)
        assert got.status == "running" and got.worker == "w"
        assert [e.event for e in store.events(job.id)] == ["queued", "progress"]
        assert store.finish(job.id, "succeeded", result={})
    finally:
        store.close()
        server.kill()


def test_short_jobs_have_a_lane_of_their_own(opened):
    store = opened()
    long1, _ = store.create(record(), 10)
    short1, _ = store.create(record(lane="short"), 10)
    long2, _ = store.create(record(), 10)
    short2, _ = store.create(record(lane="short"), 10)
    assert [store.get(j.id).position for j in (short1, short2, long1, long2)] == [0, 1, 2, 3]
    assert [r.id for r in store.claim("w", 5, 30, "short")] == [short1.id, short2.id]
    assert store.get(long2.id).position == 1
    assert [r.id for r in store.claim("w", 5, 30, "long")] == [long1.id, long2.id]
    assert store.claim("w", 5, 30, "short") == [] and store.counts()[0]["running"] == 4


def test_a_dead_workers_jobs_are_found_behind_many_live_ones(opened, kind):
    """XAUTOCLAIM scans ten entries per job asked for: the taker follows its cursor past the live claims."""
    store = opened()
    live = [store.create(record(), 100)[0] for _ in range(20)]
    dead = [store.create(record(), 100)[0] for _ in range(10)]
    store.claim("live", 20, 0.3)
    store.claim("dead", 10, 0.3)
    time.sleep(0.4)
    assert len(store.extend("live", [j.id for j in live], 30)) == 20
    taken = store.reclaim("taker", 0.3, 1)
    assert len(taken) == 1 and taken[0].id in {j.id for j in dead}


def test_redis_restarted_empty_gets_its_consumer_groups_back(tmp_path):
    from service.jobs.redis_store import RedisStore

    server = RedisServer(tmp_path / "redis").start()
    store = RedisStore(server.url)
    try:
        store.create(record(), 10)
        assert len(store.claim("w", 1, 30)) == 1
        store.r.flushall()  # a Redis that came back without its data
        job, _ = store.create(record(), 10)
        assert [r.id for r in store.claim("w", 1, 30)] == [job.id]
        assert store.reclaim("w", 30, 5) == []
    finally:
        store.close()
        server.kill()
