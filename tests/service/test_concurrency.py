"""The service under concurrent load, in-process (httpx + asgi-lifespan, the app started as in
production): no head-of-line blocking, 429 with Retry-After on a full queue, 504 at the deadline,
a disconnected client's rows dropped, graceful shutdown. Nothing here asserts wall-clock times."""

from __future__ import annotations

import asyncio
import json

import httpx
from asgi_lifespan import LifespanManager

from service.api import create_app
from tests.service.asgi import serve, until

LONG = {"class_label": 1, "scheduler": "ddpm", "steps": 100, "seed": 0}  # 100 engine iterations
SHORT = {"class_label": 2, "scheduler": "ddim", "steps": 2, "seed": 1}


def test_a_short_request_overtakes_a_long_one(make_settings):
    async def body(app, client):
        engine = app.state.engine
        long = asyncio.ensure_future(client.post("/generate", json=LONG))
        await until(lambda: engine.rows_in_flight == 1, "long request admitted", tries=2000)
        short = await client.post("/generate", json=SHORT)
        assert short.status_code == 200
        assert not long.done()  # still denoising: the short one did not wait behind it
        at_short = engine.iterations
        assert (await long).status_code == 200
        assert at_short < engine.iterations
    serve(make_settings(), body)


def test_a_full_queue_answers_429_with_retry_after_and_stays_bounded(make_settings):
    async def body(app, client):
        engine = app.state.engine
        depths = []
        sampling = True

        async def sample_depth():
            while sampling:
                depths.append(engine.queue_depth)
                await asyncio.sleep(0.002)

        sampler = asyncio.ensure_future(sample_depth())
        replies = await asyncio.gather(*[client.post("/generate", json={**LONG, "steps": 30, "seed": k})
                                         for k in range(8)])
        sampling = False
        await sampler
        codes = sorted(r.status_code for r in replies)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        refused = [r for r in replies if r.status_code == 429]
        assert all(int(r.headers["retry-after"]) >= 1 and "queue full" in r.json()["detail"] for r in refused)
        assert max(depths) <= 2
        metrics = (await client.get("/metrics")).text
        assert 'status="429"' in metrics
    serve(make_settings(max_batch_rows=1, max_images=1, max_queue=2), body)


def test_a_request_past_its_deadline_gets_504_and_leaves_the_engine(make_settings):
    async def body(app, client):
        r = await client.post("/generate", json={**LONG, "steps": 100, "scheduler": "heun"})
        assert r.status_code == 504 and "deadline" in r.json()["detail"]
        await until(lambda: app.state.engine.rows_in_flight == 0, "rows dropped", tries=2000)
        assert (await client.get("/readyz")).status_code == 200
    # 0.05 s for 199 forward passes: the deadline always passes first.
    serve(make_settings(request_timeout_s=0.05), body)


def test_a_disconnected_client_has_its_rows_dropped(make_settings):
    async def body(app, client):
        engine = app.state.engine
        disconnect = asyncio.Event()
        sent = False
        payload = json.dumps({**LONG, "steps": 100, "num_images": 3}).encode()

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await disconnect.wait()
            return {"type": "http.disconnect"}

        messages = []

        async def send(message):
            messages.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/generate", "raw_path": b"/generate", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
                 "client": ("127.0.0.1", 1), "server": ("test", 80), "state": {}}
        call = asyncio.ensure_future(app(scope, receive, send))
        await until(lambda: engine.rows_in_flight == 3, "rows admitted", tries=2000)
        at = engine.iterations
        disconnect.set()
        await call
        await until(lambda: engine.rows_in_flight == 0, "rows dropped", tries=2000)
        assert engine.iterations < at + 100  # dropped long before its 100 steps were done
        assert (await client.post("/generate", json=SHORT)).status_code == 200
    serve(make_settings(), body)


def test_shutdown_finishes_requests_in_flight_then_refuses(make_settings):
    async def main():
        app = create_app(make_settings())
        manager = LifespanManager(app)
        await manager.__aenter__()
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            engine = app.state.engine
            pending = asyncio.ensure_future(client.post("/generate", json={**LONG, "steps": 40}))
            await until(lambda: engine.rows_in_flight == 1, "admitted", tries=2000)
            stopping = asyncio.ensure_future(manager.__aexit__(None, None, None))
            await until(lambda: not engine.running, "admission stopped", tries=2000)
            assert (await client.get("/readyz")).status_code == 503
            late = await client.post("/generate", json=SHORT)
            assert late.status_code == 503 and "Retry-After" in late.headers
            assert (await pending).status_code == 200  # finished within the grace period
            await stopping
    asyncio.run(main())
