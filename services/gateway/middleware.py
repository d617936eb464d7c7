"""ASGI middleware of the gateway: the request body size limit and deadline, and per-route
metrics."""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admission import body_deadline
from .errors import error_body
from .metrics import GatewayMetrics


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


# sent with every response: no response is content-sniffed into something it is not, framed,
# or leaks its address as a referrer
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
# and with the page and its files: it loads only its own script and style (/docs, FastAPI's
# Swagger UI, loads its own from a CDN and is left out)
PAGE_HEADERS = [
    (
        b"content-security-policy",
        (
            b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
        ),
    ),
]


class GatewayMiddleware:
    """Counts requests and latency per route, refuses bodies over the size limit (from
    Content-Length up front, or while reading a chunked body) and answers 408 to a body that
    does not arrive within ``body_timeout_s`` (0: no deadline)."""

    def __init__(self, app, metrics: GatewayMetrics, max_body_bytes: int, body_timeout_s: float = 0.0):
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.body_timeout = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}
        page = scope["path"] == "/" or scope["path"].startswith("/static/")

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = SECURITY_HEADERS + PAGE_HEADERS if page else SECURITY_HEADERS
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        try:
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                code = 413 if length.isdigit() else 400
                msg = (
                    f"request body exceeds the limit of {self.max_body} bytes"
                    if code == 413
                    else "invalid Content-Length header"
                )
                resp = JSONResponse(error_body(code, msg), status_code=code)
                await resp(scope, receive, send_wrapper)
                return
            seen = 0
            timed_receive = body_deadline(receive, self.body_timeout)

            async def receive_wrapper():
                nonlocal seen
                message = await timed_receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        raise _BodyTooLarge(self.max_body)
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or (
                "/static" if scope["path"].startswith("/static") else "other"
            )
            self.metrics.requests.labels(path, scope["method"], str(status["code"])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)

