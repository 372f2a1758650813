"""Server-Sent Events on POST /generate, on tiny real checkpoints with the app started as in
production: the events and their order, previews when asked (and only then), errors before and
after the stream starts, a slow reader dropping previews (never progress), a disconnect freeing
rows, and the metrics. Nothing here asserts wall-clock times."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from diffusion import SAMPLERS
from service.api import create_app
from service.api.streaming import EventBuffer
from service.engine import Preview, Progress
from service.generation import preview_points
from tests.service.asgi import parse_sse, raw_request, serve, until

SSE = {"accept": "text/event-stream"}


@pytest.fixture(scope="module")
def client(checkpoint_dir):
    from service.settings import Settings

    app = create_app(Settings(checkpoint_dir=checkpoint_dir, device="cpu", default_model="tiny-digits",
                              max_images=4, max_steps=50, min_preview_every=2, preview_buffer=2))
    with TestClient(app) as c:
        yield c


def stream(client, body: dict, headers=None) -> list[tuple[str, dict]]:
    r = client.post("/generate", json={**body, "stream": True}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream") and r.headers["cache-control"] == "no-cache"
    return parse_sse(r.text)


def png_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_events_in_order_and_done_is_the_json_answer(client):
    body = {"class_label": 3, "steps": 6, "seed": 3, "num_images": 2}
    events = stream(client, {**body, "preview_every": 2})
    names = [n for n, _ in events]
    assert names[0] == "queued" and events[0][1]["position"] == 0 and names[-1] == "done"
    progress = [d for n, d in events if n == "progress"]
    assert [p["done"] for p in progress] == [1, 2, 3, 4, 5, 6] and {p["total"] for p in progress} == {6}
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(progress, progress[1:]))
    previews = [d for n, d in events if n == "preview"]
    assert [p["done"] for p in previews] == [2, 4]  # never at the end: the result comes then
    assert all(len(p["images"]) == 2 and png_size(p["images"][0]) == (16, 16) for p in previews)
    # each preview comes after the progress that made it, and before the next
    assert names.index("preview") > [i for i, (n, d) in enumerate(events) if n == "progress" and d["done"] == 2][0]
    done = events[-1][1]
    plain = client.post("/generate", json=body).json()
    assert done["images"] == plain["images"] and done["seeds"] == [3, 4] and done["steps"] == 6
    assert set(done) == set(plain) and done["request_id"] != plain["request_id"]


def test_the_first_progress_comes_after_the_first_iteration(client):
    events = stream(client, {"class_label": 1, "scheduler": "heun", "steps": 4})
    progress = [d for n, d in events if n == "progress"]
    assert progress[0]["done"] == 1 and progress[-1]["done"] == progress[0]["total"] == 6  # heun: 2·4 − 2 NFE


def test_accept_header_streams_and_previews_only_when_asked(client):
    r = client.post("/generate", json={"class_label": 2, "steps": 4}, headers=SSE)
    events = parse_sse(r.text)
    assert r.headers["content-type"].startswith("text/event-stream") and events[-1][0] == "done"
    assert "preview" not in [n for n, _ in events]


@pytest.mark.parametrize("scheduler,steps,fractions", [("ddim", 10, [0.5]), ("heun", 6, [0.25, 0.5, 0.75]),
                                                       ("pndm", 5, [0.1, 0.9])])
def test_previews_at_fractions_land_on_multiples_of_the_minimum(client, scheduler, steps, fractions):
    events = stream(client, {"class_label": 4, "scheduler": scheduler, "steps": steps, "preview_at": fractions})
    total = SAMPLERS[scheduler].evaluations(steps)
    expected = sorted(preview_points(total, None, fractions, 2))
    assert [d["done"] for n, d in events if n == "preview"] == expected
    assert expected and all(p % 2 == 0 and 0 < p < total for p in expected)


@pytest.mark.parametrize("body,field", [
    ({"preview_every": 2}, "preview_every"),  # not streamed
    ({"preview_at": [0.5]}, "preview_at"),
    ({"stream": True, "preview_every": 1}, "preview_every"),  # below min_preview_every
    ({"stream": True, "preview_every": 2, "preview_at": [0.5]}, "preview_at"),
    ({"stream": True, "preview_at": [0.0]}, "preview_at.0"),
    ({"stream": True, "preview_at": [1.0]}, "preview_at.0"),
    ({"stream": True, "preview_at": [0.1] * 17}, "preview_at"),
    ({"stream": "yes"}, "stream"),
])
def test_invalid_preview_requests_are_422(client, body, field):
    r = client.post("/generate", json={"class_label": 1, "steps": 4, **body})
    assert r.status_code == 422 and r.headers["content-type"] == "application/json", r.text
    assert field in [d["field"] for d in r.json()["detail"]]


def test_errors_before_the_stream_starts_are_plain_http_errors(client):
    r = client.post("/generate", json={"class_label": 1, "scheduler": "euler", "stream": True})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "scheduler"
    r = client.post("/generate", json={"class_label": 1, "model": "nope"}, headers=SSE)
    assert r.status_code == 404 and "tiny-digits" in r.json()["detail"]


def test_a_deadline_inside_the_stream_is_an_error_event(make_settings):
    async def body(app, client):
        r = await client.post("/generate", json={"class_label": 1, "scheduler": "ddpm", "steps": 100, "stream": True})
        assert r.status_code == 200
        events = parse_sse(r.text)
        name, error = events[-1]
        assert name == "error" and error["status"] == 504 and "deadline" in error["detail"]
        assert set(error) == {"detail", "status"}
        await until(lambda: app.state.engine.rows_in_flight == 0, "rows dropped")
    serve(make_settings(request_timeout_s=0.05), body)


def test_queued_events_tell_the_position_in_the_queue(make_settings):
    async def body(app, client):
        engine = app.state.engine
        long = {"class_label": 1, "scheduler": "ddpm", "steps": 60, "seed": 0}
        running = asyncio.ensure_future(client.post("/generate", json=long))
        await until(lambda: engine.rows_in_flight == 1, "first request admitted")
        first = asyncio.ensure_future(client.post("/generate", json={**long, "stream": True}))
        await until(lambda: engine.queue_depth == 1, "second request queued")
        second = await client.post("/generate", json={**long, "stream": True})
        events = parse_sse(second.text)
        positions = [d["position"] for n, d in events if n == "queued"]
        assert positions[0] == 1 and positions == sorted(positions, reverse=True)
        assert events[-1][0] == "done" and [n for n, _ in events].count("progress") == 60
        assert (await first).status_code == 200 and (await running).status_code == 200
    serve(make_settings(max_batch_rows=1, max_images=1), body)


def test_a_slow_reader_drops_previews_never_progress(make_settings):
    """The reader takes the first event and then stalls until the job is done: the buffer keeps every
    progress event and the result, and only the newest previews (preview_buffer of them)."""
    async def body(app, client):
        engine, release, chunks = app.state.engine, asyncio.Event(), []

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                chunks.append(message["body"].decode())
                if len(chunks) == 1:
                    await release.wait()

        payload = {"class_label": 1, "steps": 40, "num_images": 2, "stream": True, "preview_every": 2}
        call = raw_request(app, "/generate", payload, send, asyncio.Event())
        await until(lambda: engine.rows_in_flight == 2, "rows admitted")
        await until(lambda: engine.rows_in_flight == 0, "rows done")
        release.set()
        await call
        events = parse_sse("".join(chunks))
        assert [d["done"] for n, d in events if n == "progress"] == list(range(1, 41))
        assert [d["done"] for n, d in events if n == "preview"] == [36, 38]  # the newest two of 19
        assert events[-1][0] == "done" and len(events[-1][1]["images"]) == 2
        metrics = (await client.get("/metrics")).text
        assert 'diffusion_previews_total{model="tiny-digits",outcome="dropped"} 17.0' in metrics
        assert 'diffusion_previews_total{model="tiny-digits",outcome="sent"} 2.0' in metrics
    serve(make_settings(preview_buffer=2, min_preview_every=2), body)


def test_a_disconnected_stream_has_its_rows_dropped(make_settings):
    async def body(app, client):
        engine, disconnect, messages = app.state.engine, asyncio.Event(), []

        async def send(message):
            messages.append(message)

        payload = {"class_label": 1, "scheduler": "ddpm", "steps": 100, "num_images": 3, "stream": True}
        call = raw_request(app, "/generate", payload, send, disconnect)
        await until(lambda: engine.rows_in_flight == 3, "rows admitted")
        at = engine.iterations
        disconnect.set()
        await call
        await until(lambda: engine.rows_in_flight == 0, "rows dropped")
        assert engine.iterations < at + 100
        assert messages[0]["status"] == 200
        assert (await client.post("/generate", json={"class_label": 2, "steps": 2})).status_code == 200
    serve(make_settings(), body)


def test_metrics_count_streamed_requests_and_previews(client):
    before = client.get("/metrics").text
    stream(client, {"class_label": 5, "steps": 6, "preview_every": 2})
    after = client.get("/metrics").text

    def value(text, series):
        return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(series + " ")))

    streams = 'diffusion_streamed_requests_total{model="tiny-digits"}'
    sent = 'diffusion_previews_total{model="tiny-digits",outcome="sent"}'
    assert value(after, streams) == value(before, streams) + 1
    assert value(after, sent) == value(before, sent) + 2
    assert 'diffusion_requests_total{kind="generation",model="tiny-digits",scheduler="ddim",status="200"}' in after


def test_event_buffer_bounds_previews_and_keeps_the_rest():
    async def main():
        buffer = EventBuffer(asyncio.get_running_loop(), max_previews=2, wanted=frozenset({2, 4, 6, 8}))
        image = torch.zeros(1, 1, 2, 2)
        for done in range(1, 10):
            buffer.put(Progress(done, 10, 0.0))
            buffer.put(Preview(done, 10, image))  # odd ones are not wanted: ignored, not dropped
        items = []
        while (item := buffer.pop()) is not None:
            items.append(item)
        assert [i.done for i in items if isinstance(i, Progress)] == list(range(1, 10))
        assert [i.done for i in items if isinstance(i, Preview)] == [6, 8] and buffer.dropped == 2
        buffer.closed = True
        buffer.listener(Progress(10, 10, 0.0))  # after the stream ended: nothing, no error
        await asyncio.sleep(0)
        assert buffer.pop() is None
    asyncio.run(main())


def test_progress_coalesces_while_the_loop_has_not_taken_it():
    """A fast engine cannot flood the event loop: one hand-over at a time, the latest progress wins."""
    from service.api.streaming import EventBuffer
    loop = asyncio.new_event_loop()
    try:
        buffer = EventBuffer(loop, max_previews=2)
        for k in range(1, 6):  # the loop is not running: none of these has been taken yet
            buffer.listener(Progress(k, 10, 0.0))
        loop.run_until_complete(asyncio.sleep(0))
        assert [i.done for i in list(buffer._items)] == [5]
        buffer.listener(Progress(6, 10, 0.0))
        loop.run_until_complete(asyncio.sleep(0))
        assert [i.done for i in list(buffer._items)] == [5, 6]
    finally:
        loop.close()
