"""The HTTP gateway: OpenAI-style best-of-n chat completions, the feedback log, a web page.

A chat request becomes one prompt (:func:`palm_rlhf.chat.format_chat`); the policy samples
``best_of`` candidates, each is cleaned to one answer line, the reward service scores them, and
the ``n`` best are returned, best first. The whole interaction (every candidate with its tokens,
log-probs and reward) is committed to the feedback store before the client gets its answer, so
feedback can always be tied to it.

The app is built by :func:`create_app` from a :class:`~services.gateway.backends.Backends`
implementation and a :class:`~services.common.feedback_store.FeedbackStore`; :func:`run_gateway` wires
the gRPC backends and serves it with uvicorn.
"""

# no "from __future__ import annotations": FastAPI reads the route signatures, whose
# Annotated dependencies are local to create_app

import asyncio
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from palm_rlhf.chat import clean_response, format_chat, strip_control
from services.common.feedback_store import (
    CandidateRecord,
    CompletionNotFound,
    CompletionRecord,
    FeedbackRecord,
    FeedbackStore,
    IdempotencyConflict,
    InvalidFeedback,
    default_database_url,
    open_store,
)

from .auth import (
    DEFAULT_RATE_LIMIT,
    KeyRing,
    RateLimit,
    RateLimiter,
    is_loopback,
    load_api_keys,
    request_cost,
)
from .backends import BackendError, Backends, GeneratedCandidate, Generation, SamplingOptions, StreamEvent
from .metrics import GatewayMetrics
from .schemas import (
    AssistantMessage,
    CandidateView,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    CompletionView,
    ErrorResponse,
    FeedbackList,
    FeedbackRequest,
    FeedbackResponse,
    Health,
    ModelCard,
    ModelList,
    NotReady,
    Readiness,
    Usage,
)

log = logging.getLogger("palm_rlhf.gateway")

STATIC_DIR = Path(__file__).parent / "static"

# One server-sent event of a streamed completion: ``data`` holds a chat.completion.chunk as
# JSON, or the final ``[DONE]``.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    "required": ["data"],
}


@dataclass
class GatewayConfig:
    api_keys: list[str] = field(default_factory=list)  # hashed on app creation
    rate_limit: RateLimit | None = None
    max_body_bytes: int = 1 << 20
    admin_token: str | None = None  # when set, the log export needs it as bearer token
    model_name: str = "palm-rlhf"  # the id GET /v1/models lists
    # other names accepted for it in a chat completion's "model" (README's examples send "palm")
    model_aliases: tuple[str, ...] = ("palm",)


# --------------------------------------------------------------------------------------------
# errors in OpenAI's shape


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
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(
    status: int, message: str, type: str | None = None, param: str | None = None, code: str | None = None
):
    return {
        "error": {
            "message": message,
            "type": type or _TYPES.get(status, "api_error"),
            "param": param,
            "code": code,
        }
    }


def _doc(status: int, description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _doc(400, "Malformed or invalid request"),
    401: _doc(401, "Missing or invalid API key"),
    413: _doc(413, "Request body too large"),
    429: _doc(429, "Rate limit exceeded (see Retry-After)"),
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    extra = {
        404: _doc(404, "Unknown completion id"),
        409: _doc(409, "Idempotency key reused with a different body"),
        422: _doc(422, "Index out of range for the stored completion"),
        503: _doc(503, "A backend is unavailable or timed out"),
        403: _doc(403, "Admin token required"),
    }
    out = dict(COMMON_ERRORS)
    out.update({c: extra[c] for c in codes})
    return out


# --------------------------------------------------------------------------------------------
# ASGI middleware: body size limit and metrics


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class GatewayMiddleware:
    """Counts requests and latency per route, and refuses bodies over the size limit (from
    Content-Length up front, or while reading a chunked body)."""

    def __init__(self, app, metrics: GatewayMetrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
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

            async def receive_wrapper():
                nonlocal seen
                message = await receive()
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


# --------------------------------------------------------------------------------------------
# the app


@dataclass
class Client:
    id: str
    bearer: str | None


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _cut_at_stops(text: str, stops: list[str]) -> tuple[str, bool]:
    """The answer proper: up to the first newline or stop sequence. Returns (text, cut)."""
    cut = False
    for s in ["\n", *stops]:
        i = text.find(s)
        if i >= 0:
            text, cut = text[:i], True
    return text, cut


def create_app(backends: Backends, store: FeedbackStore, config: GatewayConfig | None = None) -> FastAPI:
    """The FastAPI app over the given backends and store (neither is closed by the app)."""
    config = config or GatewayConfig()
    metrics = GatewayMetrics()
    keyring = KeyRing(config.api_keys)
    config.api_keys = []  # keep only the digests
    limiter = RateLimiter(config.rate_limit) if config.rate_limit else None
    bearer = HTTPBearer(auto_error=False, description="An API key, when the gateway requires them")

    app = FastAPI(
        title="palm-rlhf gateway",
        version="1.0.0",
        description="OpenAI-compatible best-of-n chat completions over the PaLM policy and reward "
        "services, with a durable feedback log.",
    )
    app.state.metrics = metrics
    app.state.store = store
    app.state.backends = backends
    app.add_middleware(GatewayMiddleware, metrics=metrics, max_body_bytes=config.max_body_bytes)

    # -- errors ------------------------------------------------------------------------

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        body = error_body(
            exc.status_code,
            str(exc.detail),
            getattr(exc, "type", None),
            getattr(exc, "param", None),
            getattr(exc, "code", None),
        )
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        bad_json = next((e for e in errs if e.get("type") == "json_invalid"), None)
        if bad_json is not None:  # as OpenAI answers it: the parser's words, no param
            pos = bad_json.get("loc", ())[-1] if bad_json.get("loc") else 0
            reason = str((bad_json.get("ctx") or {}).get("error", "invalid JSON"))
            doc = exc.body if isinstance(exc.body, str) else ""
            if isinstance(pos, int) and 0 <= pos <= len(doc):
                reason = str(json.JSONDecodeError(reason, doc, pos))  # adds line, column and char
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

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal error in the gateway", "api_error"), status_code=500)

    def backend_http_error(e: BackendError) -> APIError:
        if e.kind == "invalid_argument":
            return APIError(400, e.message, code=f"invalid_{e.backend}_request")
        if e.kind == "limit":
            return APIError(
                400, f"the request exceeds a {e.backend} service limit: {e.message}", code="limit_exceeded"
            )
        if e.kind == "overloaded":
            return APIError(
                429, f"the {e.backend} service is overloaded: {e.message}", headers={"Retry-After": "1"}
            )
        return APIError(
            503,
            e.message,
            type="service_unavailable",
            code=f"{e.backend}_{e.kind}",
            headers={"Retry-After": "1"},
        )

    # -- auth and rate limiting ---------------------------------------------------------

    async def authorize(
        request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Client:
        token = creds.credentials if creds else None
        if len(keyring):
            if token is None:
                raise APIError(
                    401,
                    "missing API key: send it as 'Authorization: Bearer <key>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            client_id = keyring.identify(token)
            if client_id is None and not (config.admin_token and token == config.admin_token):
                raise APIError(
                    401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )
            client_id = client_id or "admin"
        else:
            client_id = f"ip:{request.client.host if request.client else 'unknown'}"
        if limiter is not None:  # charged by cost: a chat completion 1, a feedback row 0.1
            wait = limiter.acquire(client_id, request_cost(request.method, request.url.path))
            if wait > 0:
                metrics.rate_limited.inc()
                raise APIError(
                    429,
                    f"rate limit exceeded for this client; retry in {wait:.1f}s",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        return Client(id=client_id, bearer=token)

    Authorized = Annotated[Client, Depends(authorize)]

    async def in_thread(fn, *args, **kw):
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kw))

    # -- probes, metrics, page ----------------------------------------------------------

    @app.get("/healthz", response_model=Health, tags=["probes"])
    async def healthz() -> Health:
        """The process is up (liveness)."""
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Readiness,
        tags=["probes"],
        responses={503: {"model": NotReady, "description": "A backend or the store is not ready"}},
    )
    async def readyz():
        """Ready only when the policy and reward services report SERVING and the store answers."""
        try:
            statuses = await asyncio.wait_for(backends.health(), timeout=5.0)
        except Exception as e:  # noqa: BLE001 -- a failing health check means not ready, never a 500
            statuses = {"policy": f"UNKNOWN ({type(e).__name__})", "reward": "UNKNOWN"}
        try:
            await in_thread(store.ping)
            store_status = "ok"
        except Exception as e:  # noqa: BLE001 -- reported in the body
            store_status = f"error: {type(e).__name__}"
        down = [f"{k} ({v})" for k, v in statuses.items() if v != "SERVING"]
        if store_status != "ok":
            down.append(f"store ({store_status})")
        if down:
            body = error_body(503, "not ready: " + ", ".join(down) + " not serving", "service_unavailable")
            body.update(backends=statuses, store=store_status)
            return JSONResponse(body, status_code=503)
        return Readiness(status="ready", backends=statuses, store=store_status)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    known_models = {config.model_name, *config.model_aliases}
    also = ", ".join(repr(a) for a in config.model_aliases if a != config.model_name)
    served = f"'{config.model_name}'" + (f" (also accepted as {also})" if also else "")

    def model_not_found(name: str, param: str | None) -> APIError:
        return APIError(
            404,
            f"The model '{name}' does not exist: this gateway serves {served}",
            type="invalid_request_error",
            param=param,
            code="model_not_found",
        )

    @app.get("/v1/models", response_model=ModelList, tags=["chat"], responses=_errors())
    async def list_models(client: Authorized) -> ModelList:
        """The one model this gateway serves (for clients that list models first)."""
        return ModelList(data=[ModelCard(id=config.model_name, created=0, owned_by="palm-rlhf")])

    @app.get(
        "/v1/models/{model_id:path}",
        response_model=ModelCard,
        tags=["chat"],
        responses={**_errors(), 404: _doc(404, "Unknown model (code model_not_found)")},
    )
    async def retrieve_model(model_id: str, client: Authorized) -> ModelCard:
        """The served model, by its id or an alias; any other id is a 404 ``model_not_found``."""
        if model_id not in known_models:
            raise model_not_found(model_id, "model")
        return ModelCard(id=model_id, created=0, owned_by="palm-rlhf")

    # -- chat completions ---------------------------------------------------------------

    def sampling_of(req: ChatCompletionRequest) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=req.max_tokens or req.max_completion_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            # "\n" ends the answer (a new turn would begin): stopping there saves decoding
            stop=["\n", *[s for s in req.stop_list() if s != "\n"]],
            seed=req.seed,
        )

    def ranked(texts: list[str], scores: list[float]) -> list[int]:
        """Sample indices, best reward first; NaN scores last; ties keep sample order."""
        return sorted(
            range(len(texts)), key=lambda i: (-(scores[i] if math.isfinite(scores[i]) else -math.inf), i)
        )

    async def score(prompt_text: str, texts: list[str]):
        t0 = time.perf_counter()
        try:
            return await backends.score(prompt_text, texts)
        finally:
            metrics.backend_latency.labels("reward", "score").observe(time.perf_counter() - t0)

    async def record(
        req: ChatCompletionRequest,
        client: Client,
        prompt_text: str,
        gen: Generation,
        texts: list[str],
        scores: list[float],
        reward_version: str,
        n: int,
        started: float,
        cid: str | None = None,
    ) -> tuple[CompletionRecord, list[int]]:
        order = ranked(texts, scores)
        cid = cid or "chatcmpl-" + uuid.uuid4().hex
        by_sample = {c.sample_index: c for c in gen.candidates}
        rec = CompletionRecord(
            id=cid,
            seq=0,
            created_at=time.time(),
            model=req.model,
            messages=[m.model_dump(exclude_none=True) for m in req.messages],
            prompt_text=prompt_text,
            prompt_token_ids=gen.prompt_token_ids,
            sampling={
                "n": n,
                "best_of": len(texts),
                "temperature": req.temperature,
                "top_p": req.top_p,
                "top_k": req.top_k,
                "max_tokens": req.max_tokens or req.max_completion_tokens,
                "stop": req.stop_list(),
                "seed": req.seed,
                "stream": req.stream,
            },
            n=n,
            best_of=len(texts),
            policy_version=gen.policy_version,
            reward_version=reward_version,
            client_id=client.id,
            latency_ms=(time.perf_counter() - started) * 1000,
            candidates=[
                CandidateRecord(
                    index=rank,
                    sample_index=s,
                    text=texts[s],
                    raw_text=by_sample[s].text,
                    token_ids=by_sample[s].token_ids,
                    logprobs=by_sample[s].logprobs,
                    finish_reason=by_sample[s].finish_reason,
                    reward=_finite(scores[s]),
                    shown=rank < n,
                    policy_version=gen.policy_version,
                )
                for rank, s in enumerate(order)
            ],
        )
        await in_thread(store.add_completion, rec)
        metrics.best_of.observe(len(texts))
        metrics.choices.observe(n)
        metrics.tokens.inc(gen.completion_tokens)
        return rec, order

    def response_of(rec: CompletionRecord, gen: Generation) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=rec.id,
            created=int(rec.created_at),
            model=rec.model,
            choices=[
                Choice(
                    index=c.index,
                    message=AssistantMessage(content=c.text),
                    finish_reason="length" if c.finish_reason == "length" else "stop",
                    reward=c.reward,
                )
                for c in rec.candidates[: rec.n]
            ],
            usage=Usage(
                prompt_tokens=gen.prompt_tokens,
                completion_tokens=gen.completion_tokens,
                total_tokens=gen.prompt_tokens + gen.completion_tokens,
            ),
            policy_version=rec.policy_version,
            reward_version=rec.reward_version,
            best_of=rec.best_of,
            system_fingerprint=rec.policy_version or None,
        )

    def prompt_of(req: ChatCompletionRequest) -> str:
        try:
            return format_chat([m.model_dump() for m in req.messages])
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    async def generate(prompt_text: str, best_of: int, params: SamplingOptions) -> Generation:
        t0 = time.perf_counter()
        try:
            return await backends.generate(prompt_text, best_of, params)
        finally:
            metrics.backend_latency.labels("policy", "generate").observe(time.perf_counter() - t0)

    def clean(text: str, stops: list[str]) -> str:
        return clean_response(_cut_at_stops(text, stops)[0])

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        tags=["chat"],
        responses={
            200: {
                "description": "The completion; with stream=true, server-sent events of "
                "chat.completion.chunk objects ending with 'data: [DONE]'",
                "content": {"text/event-stream": {"schema": SSE_EVENT}},
            },
            **_errors(503),
            404: _doc(404, "Unknown model (code model_not_found)"),
        },
    )
    async def chat_completions(req: ChatCompletionRequest, client: Authorized):
        """Best-of-n chat completion: ``best_of`` candidates are sampled, scored by the reward
        service, and the ``n`` best returned, best first, each with its reward."""
        started = time.perf_counter()
        if req.model not in known_models:
            raise model_not_found(req.model, "model")
        prompt_text = prompt_of(req)
        n = req.n
        best_of = req.best_of or n
        params = sampling_of(req)
        stops = req.stop_list()
        if req.stream:
            if best_of == n:
                return await stream_live(req, client, prompt_text, n, params, stops, started)
            return await stream_ranked(req, client, prompt_text, n, best_of, params, stops, started)
        try:
            gen = await generate(prompt_text, best_of, params)
            texts = [clean(c.text, stops) for c in sorted(gen.candidates, key=lambda c: c.sample_index)]
            scored = await score(prompt_text, texts)
        except BackendError as e:
            raise backend_http_error(e) from None
        rec, _ = await record(
            req, client, prompt_text, gen, texts, scored.scores, scored.reward_version, n, started
        )
        return response_of(rec, gen)

    def chunk(rec_id: str, created: int, model: str, choices: list[dict], **extra: Any) -> str:
        body = {
            "id": rec_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    def sse_error(e: Exception) -> str:
        if isinstance(e, BackendError):
            err = backend_http_error(e)
            body = error_body(err.status_code, str(err.detail), err.type, code=err.code)
        else:
            log.exception("error while streaming")
            body = error_body(500, "internal error in the gateway", "api_error")
        return f"data: {json.dumps(body)}\n\n"

    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    async def stream_ranked(req, client, prompt_text, n, best_of, params, stops, started):
        """best_of > n: the answer is known only once every candidate is scored, so generate,
        rank and store first (errors become HTTP statuses), then send the chosen ones."""
        try:
            gen = await generate(prompt_text, best_of, params)
            texts = [clean(c.text, stops) for c in sorted(gen.candidates, key=lambda c: c.sample_index)]
            scored = await score(prompt_text, texts)
        except BackendError as e:
            raise backend_http_error(e) from None
        rec, _ = await record(
            req, client, prompt_text, gen, texts, scored.scores, scored.reward_version, n, started
        )
        resp = response_of(rec, gen)
        versions = {"policy_version": rec.policy_version, "reward_version": rec.reward_version}

        async def events() -> AsyncIterator[str]:
            for ch in resp.choices:
                yield chunk(
                    rec.id,
                    resp.created,
                    rec.model,
                    [_delta(ch.index, role="assistant", content="")],
                    **versions,
                )
                if ch.message.content:
                    yield chunk(
                        rec.id, resp.created, rec.model, [_delta(ch.index, content=ch.message.content)]
                    )
                yield chunk(
                    rec.id,
                    resp.created,
                    rec.model,
                    [_delta(ch.index, finish_reason=ch.finish_reason, reward=ch.reward)],
                    **versions,
                )
            if req.stream_options and req.stream_options.include_usage:
                yield chunk(rec.id, resp.created, rec.model, [], usage=resp.usage.model_dump(), **versions)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=sse_headers)

    async def stream_live(req, client, prompt_text, n, params, stops, started):
        """best_of == n: every candidate is shown, so tokens are forwarded as the policy makes
        them; rewards come in each choice's last chunk, and the interaction is stored before
        ``[DONE]``."""
        agen = backends.generate_stream(prompt_text, n, params).__aiter__()
        try:
            first: StreamEvent | None = await agen.__anext__()
        except StopAsyncIteration:
            first = None
        except BackendError as e:
            raise backend_http_error(e) from None
        cid_stream = "chatcmpl-" + uuid.uuid4().hex  # the id the interaction is stored under
        created = int(time.time())

        async def events() -> AsyncIterator[str]:
            raw = [""] * n
            tokens: list[list[int]] = [[] for _ in range(n)]
            logprobs: list[list[float]] = [[] for _ in range(n)]
            finish: list[str | None] = [None] * n
            sent = [""] * n
            prompt_ids: list[int] = []
            version = ""
            for i in range(n):
                yield chunk(cid_stream, created, req.model, [_delta(i, role="assistant", content="")])
            try:
                ev = first
                while ev is not None:
                    i = ev.sample_index
                    if 0 <= i < n:
                        version = version or ev.policy_version
                        prompt_ids = prompt_ids or ev.prompt_token_ids
                        raw[i] += ev.text
                        tokens[i] += ev.token_ids
                        logprobs[i] += ev.logprobs
                        if ev.finish_reason:
                            finish[i] = ev.finish_reason
                        target, _ = _cut_at_stops(raw[i], stops)
                        target = strip_control(target).lstrip()  # as clean_response does
                        if not finish[i]:
                            target = target.rstrip()  # trailing spaces wait: the answer may end here
                        if target.startswith(sent[i]) and len(target) > len(sent[i]):
                            yield chunk(
                                cid_stream, created, req.model, [_delta(i, content=target[len(sent[i]) :])]
                            )
                            sent[i] = target
                    try:
                        ev = await agen.__anext__()
                    except StopAsyncIteration:
                        ev = None
                texts = [clean(r, stops) for r in raw]
                scored = await score(prompt_text, texts)
            except Exception as e:  # noqa: BLE001 -- headers are sent: report in-band
                yield sse_error(e)
                return
            gen = Generation(
                prompt_token_ids=prompt_ids,
                candidates=[
                    GeneratedCandidate(i, raw[i], tokens[i], logprobs[i], finish[i] or "length")
                    for i in range(n)
                ],
                policy_version=version,
                prompt_tokens=len(prompt_ids),
                completion_tokens=sum(len(t) for t in tokens),
            )
            try:
                rec, order = await record(
                    req,
                    client,
                    prompt_text,
                    gen,
                    texts,
                    scored.scores,
                    scored.reward_version,
                    n,
                    started,
                    cid_stream,
                )
            except Exception as e:  # noqa: BLE001 -- headers are sent: report in-band
                yield sse_error(e)
                return
            # choices were streamed in sample order; the stored ranks map them for feedback
            rank_of = {s: r for r, s in enumerate(order)}
            versions = {"policy_version": rec.policy_version, "reward_version": rec.reward_version}
            for i in range(n):
                fr = "length" if finish[i] == "length" else "stop"
                yield chunk(
                    cid_stream,
                    created,
                    req.model,
                    [_delta(i, finish_reason=fr, reward=_finite(scored.scores[i]), rank=rank_of[i])],
                    **versions,
                )
            if req.stream_options and req.stream_options.include_usage:
                usage = Usage(
                    prompt_tokens=gen.prompt_tokens,
                    completion_tokens=gen.completion_tokens,
                    total_tokens=gen.prompt_tokens + gen.completion_tokens,
                )
                yield chunk(cid_stream, created, req.model, [], usage=usage.model_dump())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=sse_headers)

    # -- stored completions and feedback ------------------------------------------------

    @app.get(
        "/v1/completions/{completion_id}",
        response_model=CompletionView,
        tags=["feedback"],
        responses=_errors(404),
    )
    async def get_completion(completion_id: str, client: Authorized) -> CompletionView:
        """A stored completion with every candidate (shown or not) and its reward, in rank order."""
        try:
            rec = await in_thread(store.get_completion, completion_id)
        except CompletionNotFound as e:
            raise APIError(404, str(e), param="completion_id") from None
        return CompletionView(
            id=rec.id,
            created=rec.created_at,
            model=rec.model,
            messages=rec.messages,
            n=rec.n,
            best_of=rec.best_of,
            policy_version=rec.policy_version,
            reward_version=rec.reward_version,
            candidates=[
                CandidateView(
                    index=c.index, text=c.text, reward=c.reward, finish_reason=c.finish_reason, shown=c.shown
                )
                for c in rec.candidates
            ],
        )

    def feedback_view(fb: FeedbackRecord) -> FeedbackResponse:
        return FeedbackResponse(
            id=fb.id,
            completion_id=fb.completion_id,
            kind=fb.kind,
            choice_index=fb.choice_index,
            thumbs=None if fb.kind != "thumbs" else ("up" if fb.value == 1 else "down"),
            rating=fb.value if fb.kind == "rating" else None,
            preferred_index=fb.preferred_index,
            rejected_index=fb.rejected_index,
            comment=fb.comment,
            created=fb.created_at,
        )

    @app.post(
        "/v1/feedback", response_model=FeedbackResponse, tags=["feedback"], responses=_errors(404, 409, 422)
    )
    async def post_feedback(
        body: FeedbackRequest,
        client: Authorized,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                min_length=1,
                max_length=255,
                description="Retries with the same key are stored once and get the same answer",
            ),
        ] = None,
    ) -> FeedbackResponse:
        """Thumbs, a 1-5 rating, or a preference between two candidates of a stored completion.
        With an ``Idempotency-Key`` header a retried post is stored once and answered the same."""
        key = idempotency_key
        kind = body.kind
        value = None
        if kind == "thumbs":
            value = 1 if body.thumbs == "up" else -1
        elif kind == "rating":
            value = body.rating
        try:
            fb, created = await in_thread(
                store.add_feedback,
                body.completion_id,
                kind=kind,
                choice_index=body.choice_index,
                value=value,
                preferred_index=body.preferred_index,
                rejected_index=body.rejected_index,
                comment=body.comment,
                client_id=client.id,
                idempotency_key=key,
            )
        except CompletionNotFound as e:
            raise APIError(404, str(e), param="completion_id") from None
        except InvalidFeedback as e:
            raise APIError(422, str(e), code="index_out_of_range") from None
        except IdempotencyConflict as e:
            raise APIError(409, str(e), param="Idempotency-Key", code="idempotency_key_reused") from None
        if created:
            metrics.feedback.labels(kind).inc()
        return feedback_view(fb)

    @app.get("/v1/feedback", response_model=FeedbackList, tags=["feedback"], responses=_errors(404))
    async def get_feedback(
        client: Authorized, completion_id: Annotated[str, Query(min_length=1, max_length=128)]
    ) -> FeedbackList:
        """All feedback on one completion, oldest first."""
        try:
            rows = await in_thread(store.list_feedback, completion_id)
        except CompletionNotFound as e:
            raise APIError(404, str(e), param="completion_id") from None
        return FeedbackList(data=[feedback_view(f) for f in rows])

    @app.get(
        "/v1/feedback/export",
        tags=["feedback"],
        responses={
            200: {
                "description": "JSON lines: one stored completion per line, with every candidate and its feedback",
                "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
            },
            **_errors(403),
        },
        response_class=StreamingResponse,
    )
    async def export_feedback(
        client: Authorized,
        after_seq: Annotated[int, Query(ge=0, le=2**62, description="Only completions after this seq")] = 0,
        with_feedback_only: Annotated[bool, Query(description="Skip completions without feedback")] = False,
    ) -> StreamingResponse:
        """The log as JSON lines. When the gateway has an admin token, only it may export."""
        if config.admin_token and client.bearer != config.admin_token:
            raise APIError(
                403, "exporting the log needs the admin token as bearer token", type="permission_error"
            )

        it = store.iter_export(after_seq=after_seq, with_feedback_only=with_feedback_only)
        sentinel = object()

        async def lines() -> AsyncIterator[bytes]:
            while True:
                batch = await in_thread(lambda: [next(it, sentinel) for _ in range(50)])
                for d in batch:
                    if d is sentinel:
                        return
                    yield (json.dumps(jsonable_encoder(d), separators=(",", ":")) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    def openapi() -> dict[str, Any]:
        """FastAPI documents a 422 HTTPValidationError on every route with inputs, but this
        gateway answers malformed input with a 400 in OpenAI's error shape (documented on each
        route); drop the phantom response so the schema says what the server does."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            spec = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            for item in spec.get("paths", {}).values():
                for op in item.values():
                    resp = op.get("responses", {}).get("422")
                    if resp and "HTTPValidationError" in json.dumps(resp):
                        del op["responses"]["422"]
            schemas = spec.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _delta(
    index: int,
    *,
    finish_reason: str | None = None,
    reward: float | None = None,
    rank: int | None = None,
    **delta,
):
    d: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    if finish_reason is not None:
        d["reward"] = reward
        if rank is not None:
            d["rank"] = rank
    return d


# --------------------------------------------------------------------------------------------
# process entry point


def _arg(args, name: str, env: str, default=None):
    v = getattr(args, name, None)
    if v is None or v == "":
        v = os.environ.get(env, default)
    return v


def listening_socket(host: str, port: int) -> socket.socket:
    """The gateway's bound, listening TCP socket (port 0: an ephemeral one).

    Created with IPPROTO_TCP explicitly: asyncio turns Nagle's algorithm off only on sockets
    whose protocol says TCP, and a protocol of 0 would leave it on for every accepted
    connection. uvicorn writes a response's headers and body separately; with Nagle on, the body
    waits for the client's delayed ACK of the headers, about 40 ms on every response."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it on Linux
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def run_gateway(args) -> int:
    """Serve the gateway (``palm-rlhf serve gateway``). ``args`` carries host, port, data_dir,
    policy_addr, reward_addr, reference_addr, trainer_addr, database_url, api_keys_file,
    rate_limit, admin_token, log_level; and optionally insecure_no_auth, max_body_bytes."""
    import uvicorn

    from .backends import BackendTimeouts, GrpcBackends

    host = _arg(args, "host", "PALM_RLHF_HOST", "127.0.0.1")
    port = int(_arg(args, "port", "PALM_RLHF_PORT", 8000))
    data_dir = Path(_arg(args, "data_dir", "PALM_RLHF_DATA_DIR", "./data"))
    database_url = _arg(args, "database_url", "PALM_RLHF_DATABASE_URL") or default_database_url(data_dir)
    keys = load_api_keys(_arg(args, "api_keys_file", "PALM_RLHF_API_KEYS_FILE"))
    insecure = bool(getattr(args, "insecure_no_auth", False)) or os.environ.get(
        "PALM_RLHF_INSECURE_NO_AUTH", ""
    ).lower() in ("1", "true", "yes")
    if not keys and not is_loopback(host):
        if not insecure:
            raise SystemExit(
                f"refusing to serve on {host} without API keys: give --api-keys-file or PALM_RLHF_API_KEYS, "
                "bind to 127.0.0.1, or pass --insecure-no-auth (PALM_RLHF_INSECURE_NO_AUTH=1) to accept anyone"
            )
        log.warning("serving on %s WITHOUT authentication (--insecure-no-auth)", host)
    config = GatewayConfig(
        api_keys=keys,
        rate_limit=RateLimit.parse(_arg(args, "rate_limit", "PALM_RLHF_RATE_LIMIT", DEFAULT_RATE_LIMIT)),
        max_body_bytes=int(_arg(args, "max_body_bytes", "PALM_RLHF_MAX_BODY_BYTES", 1 << 20)),
        admin_token=_arg(args, "admin_token", "PALM_RLHF_ADMIN_TOKEN") or None,
    )
    store = open_store(database_url)
    timeouts = BackendTimeouts(
        generate_s=float(os.environ.get("PALM_RLHF_GENERATE_TIMEOUT", "120")),
        score_s=float(os.environ.get("PALM_RLHF_SCORE_TIMEOUT", "30")),
    )
    keep_alive = float(_arg(args, "keep_alive", "PALM_RLHF_KEEP_ALIVE", 75))
    policy_addr = _arg(args, "policy_addr", "PALM_RLHF_POLICY_ADDR", "127.0.0.1:50051")
    reward_addr = _arg(args, "reward_addr", "PALM_RLHF_REWARD_ADDR", "127.0.0.1:50053")

    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]

    holder: dict[str, Any] = {}

    async def serve() -> None:
        metrics_ref: dict[str, GatewayMetrics] = {}

        def on_error(backend: str, kind: str) -> None:
            if "m" in metrics_ref:
                metrics_ref["m"].backend_errors.labels(backend, kind).inc()

        backends = GrpcBackends(policy_addr, reward_addr, timeouts=timeouts, on_error=on_error)
        app = create_app(backends, store, config)
        metrics_ref["m"] = app.state.metrics
        level = str(_arg(args, "log_level", "PALM_RLHF_LOG_LEVEL", "info")).lower()
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level=level,
                access_log=False,
                timeout_graceful_shutdown=10,
                lifespan="off",
                # longer than the idle expiry of common HTTP clients (httpx 5 s, aiohttp 15 s) and
                # load balancers (60 s): the client, not the server, closes an idle connection, so a
                # request never races the server's close of the connection it was sent on
                timeout_keep_alive=keep_alive,
            )
        )
        holder["server"] = server
        log.info(
            "gateway on http://%s:%d (policy %s, reward %s, store %s, auth %s)",
            host,
            bound,
            policy_addr,
            reward_addr,
            store.dialect,
            f"{len(keys)} key(s)" if keys else "off",
        )
        print(f"gateway listening on {host}:{bound} (http)", flush=True)
        try:
            await server.serve(sockets=[sock])
        finally:
            await backends.close()

    try:
        asyncio.run(serve())
    finally:
        store.close()
    return 0
