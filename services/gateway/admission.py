"""Admission control: overload is shed, not queued, and work for a client that has gone is
stopped.

- :class:`Admission` caps the chat completions in flight. One over the cap is answered at once
  with 503 and ``Retry-After`` instead of waiting behind the others, so latency stays bounded
  and a load balancer can send the request elsewhere.
- :func:`until_disconnect` runs a request's work while watching its connection; when the client
  disconnects first, the work is cancelled (which cancels the gRPC call, and the policy stops
  decoding those rows) and nothing is stored.
- :func:`body_deadline` wraps an ASGI ``receive`` so that a client announcing a body and then
  stalling is cut off (slowloris) instead of holding a connection forever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import APIError
from .metrics import GatewayMetrics

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Admission:
    """At most ``limit`` chat completions in flight (0: no cap). Not a queue: a request over
    the cap is refused immediately."""

    def __init__(self, limit: int, metrics: GatewayMetrics):
        self.limit = limit
        self.metrics = metrics
        self.inflight = 0

    def enter(self) -> None:
        if self.limit and self.inflight >= self.limit:
            self.metrics.shed.labels("inflight_cap").inc()
            raise APIError(
                503,
                f"the gateway is at capacity ({self.inflight} chat completions in flight, the limit "
                f"is {self.limit}); retry shortly",
                type="service_unavailable",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)

    def leave(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.set(self.inflight)

    def slot(self) -> Slot:
        """Enter, and return the slot to release (once, however often it is called)."""
        self.enter()
        return Slot(self)


class Slot:
    def __init__(self, admission: Admission):
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.leave()
            self._admission = None


async def until_disconnect(receive: Callable[[], Awaitable[dict[str, Any]]], work: Awaitable[T]) -> T:
    """``await work``, unless the client disconnects first: then the work is cancelled and
    :class:`ClientGone` raised. ``receive`` is the request's ASGI receive, after its body was
    read (the next message it returns is ``http.disconnect``)."""

    async def watch() -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                return

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):  # nobody is left to tell
        await task
    raise ClientGone()


class BodyTimeout(StarletteHTTPException):
    """Raised from ``receive`` inside the app: answered 408 (and the connection closed, since
    the rest of its body never came)."""

    def __init__(self, seconds: float):
        super().__init__(408, f"the request body did not arrive within {seconds:g} s")
        self.seconds = seconds


def body_deadline(receive: Callable[[], Awaitable[dict[str, Any]]], seconds: float):
    """``receive`` with a deadline on the whole request body: reading it must finish within
    ``seconds`` of the first read, or :class:`BodyTimeout` is raised. Reads after the body is
    complete (waiting for a disconnect) have no deadline."""
    loop = asyncio.get_running_loop()
    state = {"deadline": None, "complete": False}

    async def wrapped() -> dict[str, Any]:
        if state["complete"] or seconds <= 0:
            return await receive()
        if state["deadline"] is None:
            state["deadline"] = loop.time() + seconds
        remaining = state["deadline"] - loop.time()
        try:
            message = await asyncio.wait_for(receive(), max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise BodyTimeout(seconds) from None
        if message.get("type") != "http.request" or not message.get("more_body", False):
            state["complete"] = True
        return message

    return wrapped
