"""In-process helpers for the streaming tests: a started app (lifespan included), one raw ASGI
request whose reading and disconnecting the test controls, and Server-Sent Events parsing."""

from __future__ import annotations

import asyncio
import json

import httpx
from asgi_lifespan import LifespanManager

from service.api import create_app


async def until(pred, what: str, tries: int = 4000, pause: float = 0.005):
    for _ in range(tries):
        if pred():
            return
        await asyncio.sleep(pause)
    raise AssertionError(f"never: {what}")


def serve(settings, body):
    """Run ``body(app, client)`` against a started app."""
    async def main():
        app = create_app(settings)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
                return await body(app, client)
    return asyncio.run(main())


def raw_request(app, path: str, payload: dict, send, disconnect: asyncio.Event, headers=()):
    """POST ``payload`` to ``path`` as a raw ASGI call: ``send`` gets every message, and the client
    disconnects when ``disconnect`` is set. Returns the task running the app."""
    body = json.dumps(payload).encode()
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"host", b"test"), *headers],
             "client": ("127.0.0.1", 1), "server": ("test", 80), "state": {}}
    return asyncio.ensure_future(app(scope, receive, send))


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """(event name, JSON data) of every event; comment lines (keep-alives) skipped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events
