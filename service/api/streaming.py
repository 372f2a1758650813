"""Following a job as it runs, for Server-Sent Event streams (the native API's and OpenAI's).

The engine calls a job's listener on its own thread; :class:`EventBuffer` only hands each event over
to the event loop there (progress events coalesce while the loop has not taken the last one, so a
fast engine cannot flood the loop). On the loop side the buffer keeps every progress event and the outcome,
but at most ``max_previews`` previews: a newer one pushes out the oldest, so a slow reader costs
dropped previews, never memory. :func:`follow` turns the buffer, the queue position and the
client's disconnect into one sequence of items; the two APIs format it. Previews stay tensors until
a stream is about to send one, and are encoded in the thread pool (never on the engine's thread,
never for a preview that was dropped).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from service.engine import (DeadlineExceeded, Engine, EngineClosed, GenerationFailed, GenerationResult, Job, Preview,
                            Progress, Refused)

HEARTBEAT_S = 15.0  # a comment line after this long without an event keeps proxies from closing the stream
POLL_S = 0.5  # how often a queued request's position is looked at


@dataclass(frozen=True)
class Queued:
    position: int  # requests waiting ahead


@dataclass(frozen=True)
class Finished:
    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)


class Heartbeat:
    """Nothing happened for a while."""


HEARTBEAT = Heartbeat()
_OUTCOME = object()  # the job's future resolved
_PROGRESS = object()  # the latest progress is waiting in EventBuffer._progress


def failure(error: BaseException) -> Failed:
    """An engine error as an HTTP status and message."""
    if isinstance(error, DeadlineExceeded):
        return Failed(504, str(error))
    if isinstance(error, Refused) and error.alone:
        return Failed(422, str(error))
    if isinstance(error, Refused):
        return Failed(503, str(error), {"Retry-After": str(error.retry_after_s)})
    if isinstance(error, EngineClosed):
        return Failed(503, str(error), {"Retry-After": "5"})
    if isinstance(error, GenerationFailed):
        return Failed(500, str(error))
    return Failed(500, f"generation failed: {type(error).__name__}")


def outcome(future: Future) -> Finished | Failed:
    if future.cancelled():
        return Failed(503, "the request was cancelled")
    error = future.exception()
    return failure(error) if error is not None else Finished(future.result())


class EventBuffer:
    """One stream's events, from the engine's thread to the loop; previews bounded (drop oldest)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_previews: int, wanted: frozenset[int] = frozenset()):
        self._loop, self.max_previews, self.wanted = loop, max_previews, wanted
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._progress: Progress | None = None  # the latest progress not yet handed over
        self._wake = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def listener(self, event) -> None:
        """The job's listener, on the engine's thread: hand over, never block. While the loop has not
        yet taken a progress event, a newer one replaces it (one callback per hand-over, however
        fast the engine iterates)."""
        if self.closed:
            return
        if isinstance(event, Progress):
            with self._lock:
                pending, self._progress = self._progress is not None, event
            if pending:
                return
            event = _PROGRESS
        try:
            self._loop.call_soon_threadsafe(self.put, event)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            self.closed = True

    def watch(self, job: Job) -> None:
        """Put the job's outcome after its events, once its future resolves."""
        job.future.add_done_callback(lambda _: self.listener(_OUTCOME))

    def put(self, item) -> None:
        if item is _PROGRESS:
            with self._lock:
                item, self._progress = self._progress, None
        if isinstance(item, Preview):
            if item.done not in self.wanted:
                return  # between the points asked for (the engine previews at their common divisor)
            previews = [i for i in self._items if isinstance(i, Preview)]
            if len(previews) >= self.max_previews:
                self._items.remove(previews[0])
                self.dropped += 1
        self._items.append(item)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def pop(self):
        return self._items.popleft() if self._items else None

    async def wait(self, timeout: float) -> None:
        if self._items:
            return
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), max(timeout, 0.0))
        except asyncio.TimeoutError:
            pass


async def disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read; what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def follow(engine: Engine, job: Job, buffer: EventBuffer, request: Request,
                 timeout_s: float) -> AsyncIterator[Queued | Progress | Preview | Heartbeat | Finished | Failed]:
    """The job's life as items, ending with Finished or Failed (or nothing: the client went away).
    However it ends, a job still running is cancelled and its rows leave the engine."""
    loop = asyncio.get_running_loop()
    buffer.watch(job)
    gone = asyncio.ensure_future(disconnected(request))
    gone.add_done_callback(lambda _: buffer.wake())
    end = loop.time() + timeout_s + 1.0  # the engine's own deadline comes first; this is a backstop
    position = engine.position(job)
    quiet_since = loop.time()
    try:
        yield Queued(position or 0)  # always first; 0 too once admitted
        while not gone.done():
            item = buffer.pop()
            now = loop.time()
            if item is None:
                if now >= end:
                    yield Failed(504, f"deadline of {timeout_s:g} s passed")
                    return
                if position is not None:
                    current = engine.position(job)
                    if current is not None and current != position:
                        yield Queued(current)
                        quiet_since = now
                    position = current
                if now - quiet_since >= HEARTBEAT_S:
                    yield HEARTBEAT
                    quiet_since = now
                await buffer.wait(min(POLL_S if position is not None else HEARTBEAT_S, end - now))
                continue
            quiet_since = now
            if item is _OUTCOME:
                yield outcome(job.future)
                return
            if isinstance(item, Progress):
                position = None
            yield item
    finally:
        gone.cancel()
        buffer.closed = True
        if not job.future.done():
            engine.cancel(job)  # the engine drops its rows at its next iteration


def sse(event: str, data: BaseModel) -> bytes:
    """One Server-Sent Event, its data the model as JSON (one line)."""
    return f"event: {event}\ndata: {data.model_dump_json()}\n\n".encode()


KEEP_ALIVE = b": keep-alive\n\n"


class EventStream(StreamingResponse):
    """``text/event-stream``, unbuffered by proxies; its generator is always closed when the response
    ends (so a disconnected client's job is cancelled at once, not when the generator is collected)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None]):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
