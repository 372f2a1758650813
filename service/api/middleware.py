"""A request id for every request (the ``X-Request-ID`` header, echoed back), one JSON log line per
request, and the per-request outcome of generation and edit requests counted in the metrics; and a
bound on every request body (:class:`BodyLimit`).

Pure ASGI (no BaseHTTPMiddleware), so it never buffers responses or interferes with disconnects.
Routes add fields to the log line through ``request.state.log`` (a dict).
"""

from __future__ import annotations

import logging
import re
import time
import uuid

log = logging.getLogger("service.requests")

_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
GENERATION_PATHS = ("/generate", "/v1/images/generations", "/v1/images/edits", "/v1/images/variations")
KIND_OF_PATH = {"/v1/images/edits": "edit", "/v1/images/variations": "variation"}


class BodyTooLarge(Exception):
    """A request body past the service's limit (answered 413 by the app's error handlers)."""

    def __init__(self, limit: int):
        super().__init__(f"the request body exceeds {limit} bytes")
        self.limit = limit


class BodyLimit:
    """Refuse a body over ``limit`` bytes before it is read: at once from its Content-Length, or, for a
    chunked body, as soon as that many bytes have come in (the read raises :class:`BodyTooLarge`)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            async def refused():  # the app answers 413 in its own shape without reading the body
                raise BodyTooLarge(self.limit)
            return await self.app(scope, refused, send)
        seen = 0

        async def bounded():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message
        return await self.app(scope, bounded, send)


class RequestLog:
    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _VALID_ID.match(incoming) else uuid.uuid4().hex
        info: dict = {}
        state = scope.setdefault("state", {})
        state["request_id"], state["log"] = rid, info
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            total = time.perf_counter() - start
            status = info.pop("status", status)  # 499: the client went away
            line = {"event": "request", "request_id": rid, "method": scope["method"], "path": scope["path"],
                    "status": status, **info, "total_s": round(total, 4)}
            log.info(line)
            if scope["path"] in GENERATION_PATHS and scope["method"] == "POST":
                self.metrics.request(info.get("model", "unknown"), info.get("scheduler", "unknown"), status, total,
                                     info.get("kind", KIND_OF_PATH.get(scope["path"], "generation")))
