"""Errors in OpenAI's shape: the exception routes raise, the body every error has, the
documented error responses, and the handlers that render them."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .backends import BackendError
from .schemas import ErrorResponse

log = logging.getLogger("palm_rlhf.gateway")


class APIError(StarletteHTTPException):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.type, self.param, self.code = type, param, code


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(
    status: int, message: str, type: str | None = None, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": type or _TYPES.get(status, "api_error"),
            "param": param,
            "code": code,
        }
    }


def doc(status: int, description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    400: doc(400, "Malformed or invalid request"),
    401: doc(401, "Missing or invalid API key"),
    413: doc(413, "Request body too large"),
    429: doc(429, "Rate limit exceeded (see Retry-After)"),
}

_EXTRA = {
    404: doc(404, "Unknown completion id"),
    409: doc(409, "Idempotency key reused with a different body"),
    422: doc(422, "Index out of range for the stored completion"),
    503: doc(503, "A backend is unavailable or timed out"),
    403: doc(403, "Admin token required"),
}


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of a route: the common ones plus ``codes``."""
    out = dict(COMMON_ERRORS)
    out.update({c: _EXTRA[c] for c in codes})
    return out


def backend_http_error(e: BackendError) -> APIError:
    """The HTTP status a failed backend call becomes."""
    if e.kind == "invalid_argument":
        return APIError(400, e.message, code=f"invalid_{e.backend}_request")
    if e.kind == "limit":
        return APIError(
            400, f"the request exceeds a {e.backend} service limit: {e.message}", code="limit_exceeded"
        )
    if e.kind == "overloaded":  # the system is at capacity (not this client's fault): shed, retry soon
        return APIError(
            503,
            f"the {e.backend} service is at capacity: {e.message}",
            type="service_unavailable",
            code="overloaded",
            headers={"Retry-After": "1"},
        )
    return APIError(
        503,
        e.message,
        type="service_unavailable",
        code=f"{e.backend}_{e.kind}",
        headers={"Retry-After": "1"},
    )


def in_band_error(e: Exception) -> dict[str, Any]:
    """The error body of a failure after a stream's headers were sent."""
    if isinstance(e, BackendError):
        err = backend_http_error(e)
        return error_body(err.status_code, str(err.detail), err.type, code=err.code)
    from services.common.feedback_store import StoreUnavailable

    if isinstance(e, StoreUnavailable):
        return error_body(503, str(e), "service_unavailable", code="store_unavailable")
    log.error("error while streaming", exc_info=e)
    return error_body(500, "internal error in the gateway", "api_error")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    body = error_body(
        exc.status_code,
        str(exc.detail),
        getattr(exc, "type", None),
        getattr(exc, "param", None),
        getattr(exc, "code", None),
    )
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    bad_json = next((e for e in errs if e.get("type") == "json_invalid"), None)
    if bad_json is not None:  # as OpenAI answers it: the parser's words, no param
        pos = bad_json.get("loc", ())[-1] if bad_json.get("loc") else 0
        reason = str((bad_json.get("ctx") or {}).get("error", "invalid JSON"))
        text = exc.body if isinstance(exc.body, str) else ""
        if isinstance(pos, int) and 0 <= pos <= len(text):
            reason = str(json.JSONDecodeError(reason, text, pos))  # adds line, column and char
        message = f"We could not parse the JSON body of your request: {reason}"
        return JSONResponse(error_body(400, message), status_code=400)
    parts, param = [], None
    for e in errs[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header")]
        where = ".".join(loc)
        param = param or (where or None)
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    message = "; ".join(parts) or "invalid request"
    return JSONResponse(error_body(400, message, param=param), status_code=400)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body(500, "internal error in the gateway", "api_error"), status_code=500)


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("feedback store unavailable on %s %s: %s", request.method, request.url.path, exc)
    body = error_body(503, str(exc), "service_unavailable", code="store_unavailable")
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


def install_error_handlers(app: FastAPI) -> None:
    from services.common.feedback_store import StoreUnavailable

    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    app.add_exception_handler(Exception, _unexpected)
