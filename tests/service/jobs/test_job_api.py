"""The job API in process, on a real SQLite store and tiny real checkpoints: submission, status,
events (resumable), idempotency, cancel (queued and running), the paged list, the queue limit, keys,
purge, and the refusals at submission. Nothing here asserts wall-clock times."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.service.asgi import parse_sse, serve, until

BODY = {"prompt": "nine", "scheduler": "ddim", "steps": 4, "num_images": 2, "seed": 11}


@pytest.fixture
def settings(make_settings, tmp_path):
    def make(**kw):
        return make_settings(**{"default_model": "tiny-text", "data_dir": tmp_path / "data", "max_steps": 50,
                                "calibrate_s": 0.0, **kw})
    return make


async def finished(client, job_id: str, headers=None) -> dict:
    for _ in range(2000):
        r = await client.get(f"/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        if r.json()["status"] in ("succeeded", "failed", "cancelled"):
            return r.json()
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} never finished")


def test_a_job_runs_and_keeps_its_result_and_events(settings):
    async def body(app, client):
        r = await client.post("/jobs", json=BODY)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] in ("queued", "running") and job["links"]["events"].endswith(f"/jobs/{job['id']}/events")
        assert r.headers["location"] == f"/jobs/{job['id']}"
        done = await finished(client, job["id"])
        sync = (await client.post("/generate", json=BODY)).json()
        events = await client.get(f"/jobs/{job['id']}/events")
        resumed = await client.get(f"/jobs/{job['id']}/events", headers={"Last-Event-ID": "2"})
        return job, done, sync, events, resumed

    job, done, sync, events, resumed = serve(settings(), body)
    assert done["status"] == "succeeded" and done["attempts"] == 1 and done["error"] is None
    result = done["result"]
    assert result["seeds"] == [11, 12] and result["request_id"] == job["id"]
    assert result["images"] == sync["images"]  # a job draws what /generate draws for the same body
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
    assert events.headers["content-type"].startswith("text/event-stream")
    names = [name for name, _ in parse_sse(events.text)]
    assert names[0] == "queued" and names[-1] == "done" and "progress" in names
    assert names.count("done") == 1 and "error" not in names
    assert parse_sse(events.text)[-1][1]["images"] == result["images"]
    ids = [int(line[4:]) for line in events.text.splitlines() if line.startswith("id: ")]
    assert ids == list(range(1, len(names) + 1))
    assert [name for name, _ in parse_sse(resumed.text)] == names[2:]  # after event 2


def test_a_seed_is_fixed_when_the_job_is_accepted(settings):
    async def body(app, client):
        job = (await client.post("/jobs", json={"prompt": "nine", "steps": 3})).json()
        stored = await app.state.jobs.store.run("get", job["id"])
        done = await finished(client, job["id"])
        return stored.request, done

    request, done = serve(settings(), body)
    assert isinstance(request["seed"], int) and done["result"]["seeds"] == [request["seed"]]
    assert request["bulk"] is True  # no deadline unless the job names one


def test_idempotency_keys(settings):
    async def body(app, client):
        key = {"Idempotency-Key": "order-7"}
        first = await client.post("/jobs", json=BODY, headers=key)
        again = await client.post("/jobs", json=BODY, headers=key)
        other = await client.post("/jobs", json={**BODY, "seed": 12}, headers=key)
        bad = await client.post("/jobs", json=BODY, headers={"Idempotency-Key": "has space"})
        long = await client.post("/jobs", json=BODY, headers={"Idempotency-Key": "k" * 256})
        listed = (await client.get("/jobs")).json()
        return first, again, other, bad, long, listed

    first, again, other, bad, long, listed = serve(settings(), body)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert other.status_code == 422 and other.json()["detail"][0]["field"] == "Idempotency-Key"
    assert bad.status_code == long.status_code == 422
    assert len(listed["jobs"]) == 1


def test_cancel_a_queued_job_list_and_queue_limit(settings):
    """A replica that runs no jobs (job_workers=false) keeps them queued."""
    async def body(app, client):
        ids = [(await client.post("/jobs", json={**BODY, "seed": k})).json()["id"] for k in range(3)]
        full = await client.post("/jobs", json=BODY)
        first = (await client.get(f"/jobs/{ids[0]}")).json()
        third = (await client.get(f"/jobs/{ids[2]}")).json()
        cancelled = await client.delete(f"/jobs/{ids[1]}")
        again = await client.post(f"/jobs/{ids[1]}/cancel")
        events = await client.get(f"/jobs/{ids[1]}/events")
        third_after = (await client.get(f"/jobs/{ids[2]}")).json()
        page1 = (await client.get("/jobs", params={"limit": 2})).json()
        page2 = (await client.get("/jobs", params={"limit": 2, "after": page1["next"]})).json()
        queued = (await client.get("/jobs", params={"status": "queued"})).json()
        unknown = await client.get("/jobs/job_nope")
        bad_status = await client.get("/jobs", params={"status": "nope"})
        return ids, full, first, third, cancelled, again, events, third_after, page1, page2, queued, unknown, bad_status

    ids, full, first, third, cancelled, again, events, third_after, page1, page2, queued, unknown, bad_status = \
        serve(settings(job_workers=False, max_jobs_queued=3), body)
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert first["position"] == 0 and third["position"] == 2 and third_after["position"] == 1
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert [n for n, _ in parse_sse(events.text)] == ["queued", "cancelled"]
    assert [j["id"] for j in page1["jobs"]] == [ids[2], ids[1]] and page1["next"] == ids[1]
    assert [j["id"] for j in page2["jobs"]] == [ids[0]] and page2["next"] is None
    assert all(j["result"] is None for j in page1["jobs"])
    assert [j["id"] for j in queued["jobs"]] == [ids[2], ids[0]]
    assert unknown.status_code == 404 and bad_status.status_code == 422


def test_cancel_a_running_job_frees_its_rows(settings, gate):
    async def body(app, client):
        assert (await client.post("/generate", json=BODY)).status_code == 200  # measured before the gate closes
        gate.clear()
        job = (await client.post("/jobs", json={**BODY, "steps": 20})).json()
        await until(lambda: app.state.engine.rows_in_flight == 2, "the job's rows in flight")
        r = await client.post(f"/jobs/{job['id']}/cancel")
        gate.set()
        done = await finished(client, job["id"])
        await until(lambda: app.state.engine.rows_in_flight == 0, "rows freed")
        late = await client.delete(f"/jobs/{job['id']}")
        ok = (await client.post("/jobs", json=BODY)).json()
        await finished(client, ok["id"])
        conflict = await client.delete(f"/jobs/{ok['id']}")
        return r, done, late, conflict

    r, done, late, conflict = serve(settings(), body)
    assert r.status_code == 200 and r.json()["status"] in ("running", "cancelled")
    assert done["status"] == "cancelled" and done["error"]["status"] == 499 and done["result"] is None
    assert late.status_code == 200 and late.json()["status"] == "cancelled"
    assert conflict.status_code == 409


def test_keys_keep_jobs_apart(settings):
    a, b = {"authorization": "Bearer key-a"}, {"authorization": "Bearer key-b"}

    async def body(app, client):
        job = (await client.post("/jobs", json=BODY, headers=a)).json()
        mine = await client.get(f"/jobs/{job['id']}", headers=a)
        theirs = await client.get(f"/jobs/{job['id']}", headers=b)
        cancel = await client.delete(f"/jobs/{job['id']}", headers=b)
        events = await client.get(f"/jobs/{job['id']}/events", headers=b)
        none = await client.get("/jobs", headers=b)
        anon = await client.post("/jobs", json=BODY)
        same_key_other_owner = await client.post("/jobs", json=BODY, headers={**b, "Idempotency-Key": "x"})
        return mine, theirs, cancel, events, none, anon, same_key_other_owner

    mine, theirs, cancel, events, none, anon, other = serve(settings(api_keys="key-a,key-b", job_workers=False), body)
    assert mine.status_code == 200
    assert theirs.status_code == cancel.status_code == events.status_code == 404
    assert none.json()["jobs"] == [] and anon.status_code == 401 and other.status_code == 202


def test_purge_removes_finished_jobs_after_their_ttl(settings):
    async def body(app, client):
        store = app.state.jobs.store
        job = (await client.post("/jobs", json=BODY)).json()
        await finished(client, job["id"])
        kept = await store.run("purge", 3600.0)
        queued = await store.run("counts")
        purged = await store.run("purge", 3600.0, time.time() + 7200)
        gone = await client.get(f"/jobs/{job['id']}")
        events = await store.run("events", job["id"])
        return kept, purged, gone, events, queued

    kept, purged, gone, events, counts = serve(settings(), body)
    assert kept == 0 and purged == 1 and gone.status_code == 404 and events == []
    assert counts[0]["succeeded"] == 1


def test_refusals_at_submission(settings):
    async def body(app, client):
        out = {}
        out["loopback"] = await client.post("/jobs", json={**BODY, "webhook": "http://127.0.0.1:9/hook"})
        out["metadata"] = await client.post("/jobs", json={**BODY, "webhook": "http://169.254.169.254/latest"})
        out["scheme"] = await client.post("/jobs", json={**BODY, "webhook": "ftp://example.com/x"})
        out["events_alone"] = await client.post("/jobs", json={**BODY, "webhook_events": ["start"]})
        out["bad_event"] = await client.post("/jobs", json={**BODY, "webhook": "https://example.com/h",
                                                            "webhook_events": ["nope"]})
        out["steps"] = await client.post("/jobs", json={**BODY, "steps": 500})
        out["model"] = await client.post("/jobs", json={**BODY, "model": "nope"})
        out["extra"] = await client.post("/jobs", json={**BODY, "colour": "red"})
        out["last_event"] = await client.get("/jobs/job_x/events", headers={"Last-Event-ID": "x"})
        return out

    out = serve(settings(job_workers=False), body)
    for name in ("loopback", "metadata", "scheme", "events_alone"):
        assert out[name].status_code == 422, (name, out[name].text)
        assert out[name].json()["detail"][0]["field"] in ("webhook", "webhook_events"), name
    assert out["bad_event"].status_code == out["steps"].status_code == out["extra"].status_code == 422
    assert out["steps"].json()["detail"][0]["field"] == "steps"
    assert out["model"].status_code == 404 and out["last_event"].status_code == 404


def test_metrics_count_jobs(settings):
    async def body(app, client):
        job = (await client.post("/jobs", json=BODY)).json()
        await finished(client, job["id"])
        await until(lambda: app.state.metrics.jobs.labels("succeeded")._value.get() == 1, "gauges", tries=1000,
                    pause=0.01)
        return (await client.get("/metrics")).text

    text = serve(settings(), body)
    assert "diffusion_jobs_submitted_total 1.0" in text
    assert 'diffusion_jobs_finished_total{status="succeeded"} 1.0' in text
    assert 'diffusion_jobs{status="succeeded"} 1.0' in text and "diffusion_jobs_claimed_total 1.0" in text


def test_webhooks_are_signed_retried_and_counted(settings):
    """The receiver checks every signature (standardwebhooks, the reference), answers the completed event
    500 twice, then 200; the job and the metrics count it."""
    from tests.service.jobs.test_webhooks import SECRET, Receiver

    receiver = Receiver()
    receiver.respond = lambda path, n: 500 if n in (1, 2) else 200  # n = 0 is the start event

    async def body(app, client):
        job = (await client.post("/jobs", json={**BODY, "webhook": receiver.url("/hook"),
                                                "webhook_events": ["start", "completed"]})).json()
        done = await finished(client, job["id"])
        for _ in range(1000):
            state = (await client.get(f"/jobs/{job['id']}")).json()["webhook"]
            if state["delivered"] == 2:
                break
            await asyncio.sleep(0.01)
        return done, state, (await client.get("/metrics")).text

    try:
        done, state, metrics = serve(settings(webhook_secret=SECRET, webhook_allowlist="127.0.0.1",
                                              webhook_backoff_s=0.05), body)
    finally:
        receiver.stop()
    assert done["status"] == "succeeded"
    assert state["delivered"] == 2 and state["failed_attempts"] == 2 and state["last_error"] == "HTTP 500"
    assert state["events"] == ["completed", "start"]
    import json

    sent = [json.loads(r["body"]) for r in receiver.requests]
    assert [r["verified"] for r in receiver.requests] == [True] * 4
    assert [s["type"] for s in sent] == ["job.started"] + ["job.completed"] * 3
    assert len(set(receiver.ids()[1:])) == 1  # one delivery, retried under one webhook-id
    assert sent[-1]["data"]["result"]["images"] == done["result"]["images"]
    assert 'diffusion_webhook_deliveries_total{outcome="delivered"} 2.0' in metrics
    assert 'diffusion_webhook_deliveries_total{outcome="failed"} 2.0' in metrics


def test_redis_down_is_503_and_nothing_is_lost(settings, gate, tmp_path):
    """While Redis is down: /readyz fails, submissions and reads are 503 (never 500), and a job that
    finishes meanwhile keeps its result until Redis is back."""
    from tests.service.jobs.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()

    async def body(app, client):
        assert (await client.post("/generate", json=BODY)).status_code == 200  # measured before the gate closes
        gate.clear()
        job = (await client.post("/jobs", json=BODY)).json()
        await until(lambda: app.state.engine.rows_in_flight == 2, "the job running")
        server.kill()
        for _ in range(100):
            ready = await client.get("/readyz")
            if ready.status_code == 503:
                break
            await asyncio.sleep(0.1)
        submitted = await client.post("/jobs", json=BODY)
        read = await client.get(f"/jobs/{job['id']}")
        gate.set()
        await until(lambda: app.state.engine.rows_in_flight == 0, "the job's rows done")
        await asyncio.sleep(1.5)  # its result waits in memory
        server.start()
        done = await finished(client, job["id"])
        for _ in range(100):
            again = await client.get("/readyz")
            if again.status_code == 200:
                break
            await asyncio.sleep(0.1)
        return ready, submitted, read, done, again

    try:
        ready, submitted, read, done, again = serve(settings(jobs_url=server.url), body)
    finally:
        server.kill()
    assert ready.status_code == 503 and again.status_code == 200
    assert submitted.status_code == read.status_code == 503 and "retry-after" in submitted.headers
    assert "unreachable" in submitted.json()["detail"]
    assert done["status"] == "succeeded" and done["attempts"] == 1 and len(done["result"]["images"]) == 2


def test_short_jobs_are_claimed_into_the_reserved_rows(settings, gate):
    """Long jobs fill the engine up to the rows it keeps for latency-sensitive work (max_batch_rows 8:
    one) plus its prefetch (one: a job waiting in the engine's queue); a long job then waits in the
    store while a short one is claimed."""
    async def claimed(client, job):
        for _ in range(2000):
            if (await client.get(f"/jobs/{job['id']}")).json()["status"] == "running":
                return
            await asyncio.sleep(0.005)
        raise AssertionError("never claimed")

    async def body(app, client):
        gate.clear()  # the engine stops inside its first iteration: what it holds stays in flight or waiting
        store = app.state.jobs.store
        long_ = {**BODY, "steps": 40}
        a = (await client.post("/jobs", json={**long_, "num_images": 4})).json()
        b = (await client.post("/jobs", json={**long_, "num_images": 4})).json()
        await claimed(client, a)
        await claimed(client, b)
        await until(lambda: app.state.engine.free_rows() == 0, "the long jobs in the engine")
        c = (await client.post("/jobs", json={**long_, "num_images": 1})).json()
        s = (await client.post("/jobs", json={**BODY, "steps": 10, "num_images": 1})).json()
        await claimed(client, s)
        await asyncio.sleep(0.5)  # the runner has looked at the queue again meanwhile
        states = [(await store.run("get", j["id"])) for j in (a, b, c, s)]
        gate.set()
        done = [await finished(client, j["id"]) for j in (a, b, c, s)]
        return states, done

    states, done = serve(settings(max_batch_rows=8, max_images=4, cpu_threads="1"), body)
    assert [r.lane for r in states] == ["long", "long", "long", "short"]
    assert [r.status for r in states] == ["running", "running", "queued", "running"]
    assert [d["status"] for d in done] == ["succeeded"] * 4


def test_a_queued_job_cancelled_gets_its_completed_webhook_and_odd_event_ids_are_refused(settings):
    from tests.service.jobs.test_webhooks import SECRET, Receiver

    receiver = Receiver()

    async def body(app, client):
        job = (await client.post("/jobs", json={**BODY, "webhook": receiver.url("/hook")})).json()
        await client.delete(f"/jobs/{job['id']}")
        for _ in range(500):
            if receiver.requests:
                break
            await asyncio.sleep(0.01)
        huge = await client.get(f"/jobs/{job['id']}/events", headers={"Last-Event-ID": "9" * 20})
        return huge

    try:
        huge = serve(settings(job_workers=False, webhook_secret=SECRET, webhook_allowlist="127.0.0.1"), body)
    finally:
        receiver.stop()
    import json

    (sent,) = [json.loads(r["body"]) for r in receiver.requests]
    assert sent["type"] == "job.completed" and sent["data"]["status"] == "cancelled"
    assert huge.status_code == 422 and huge.json()["detail"][0]["field"] == "Last-Event-ID"
