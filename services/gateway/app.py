"""The HTTP gateway: OpenAI-style best-of-n chat completions, the feedback log, a web page.

A chat request becomes one prompt (:func:`palm_rlhf.chat.format_chat`), shortened to fit the
model when needed (:mod:`.conversation`); the policy samples ``best_of`` candidates, each is
cleaned to one answer (:mod:`palm_rlhf.stops` decides where it ends), the reward service
scores them, and the ``n`` best are returned, best first (:mod:`.ranking`). The whole
interaction (every candidate with its tokens, log-probs and reward) is committed to the
feedback store before the client gets its answer, so feedback can always be tied to it
(:mod:`.storage`). Streams are framed by :mod:`.streaming`. Legacy text completions
(``POST /v1/completions``) rank and store raw-text candidates the same way.

Layout: the routes are ``APIRouter``s in :mod:`.routers` (chat, completions, feedback,
models, pages);
they share one :class:`~.state.GatewayState` on ``app.state.gateway``, which holds the
configuration and the small services above. :func:`create_app` wires them together;
:func:`run_gateway` builds the :class:`~.settings.GatewaySettings` once from flags and
environment, connects the gRPC backends and serves the app with uvicorn.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from services.common.feedback_store import FeedbackStore, open_store

from .auth import RateLimit, is_loopback, load_api_keys
from .backends import Backends
from .conversation import ContextSource, PolicyContext
from .errors import APIError, error_body, install_error_handlers
from .http_protocol import protocol_with
from .metrics import GatewayMetrics
from .middleware import GatewayMiddleware
from .routers import ROUTERS
from .routers.pages import STATIC_DIR
from .settings import GatewaySettings
from .state import GatewayConfig, GatewayState

__all__ = ["APIError", "GatewayConfig", "create_app", "error_body", "listening_socket", "run_gateway"]

log = logging.getLogger("palm_rlhf.gateway")


def create_app(
    backends: Backends,
    store: FeedbackStore,
    config: GatewayConfig | None = None,
    context: ContextSource | None = None,
) -> FastAPI:
    """The FastAPI app over the given backends and store (neither is closed by the app).
    ``context`` tells the served model's context limits, for fitting conversations (None:
    conversations are sent whole and the policy's own checks decide)."""
    state = GatewayState(backends, store, config or GatewayConfig(), context)
    app = FastAPI(
        title="palm-rlhf gateway",
        version="1.0.0",
        description="OpenAI-compatible best-of-n chat completions over the PaLM policy and reward "
        "services, with a durable feedback log.",
    )
    app.state.gateway = state
    app.state.metrics = state.metrics
    app.state.store = store
    app.state.backends = backends
    app.add_middleware(
        GatewayMiddleware,
        metrics=state.metrics,
        max_body_bytes=state.config.max_body_bytes,
        body_timeout_s=state.config.body_timeout_s,
    )
    if state.config.allowed_hosts:  # outermost: a request for another Host gets 400 before anything
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(state.config.allowed_hosts))
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents a 422 HTTPValidationError on every route with inputs, but this
    gateway answers malformed input with a 400 in OpenAI's error shape (documented on each
    route); drop the phantom response so the schema says what the server does."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
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


# --------------------------------------------------------------------------------------------
# process entry point


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


def app_config(settings: GatewaySettings) -> GatewayConfig:
    """The app's configuration from the settings (reads the key and token files). Refuses
    (SystemExit) to serve beyond loopback without API keys unless insecure_no_auth is set."""
    keys = load_api_keys(settings.api_keys_file, settings.api_keys.get_secret_value())
    loopback = is_loopback(settings.host)
    if not keys and not loopback:
        if not settings.insecure_no_auth:
            raise SystemExit(
                f"refusing to serve on {settings.host} without API keys: give --api-keys-file or "
                "PALM_RLHF_API_KEYS, bind to 127.0.0.1, or pass --insecure-no-auth "
                "(PALM_RLHF_INSECURE_NO_AUTH=1) to accept anyone"
            )
        log.warning("serving on %s WITHOUT authentication (--insecure-no-auth)", settings.host)
    admin_token = settings.admin_token_value()
    return GatewayConfig(
        api_keys=keys,
        rate_limit=RateLimit.parse(settings.rate_limit),
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout,
        max_inflight=settings.max_inflight,
        allowed_hosts=tuple(h.strip() for h in settings.allowed_hosts.split(",") if h.strip()),
        admin_token=admin_token,
        open_admin=admin_token is None and settings.insecure_no_auth and loopback,
        min_answer_tokens=settings.min_answer_tokens,
    )


def run_gateway(args: Any = None, settings: GatewaySettings | None = None) -> int:
    """Serve the gateway (``palm-rlhf serve gateway``, ``python -m services.gateway``).
    ``args`` (parsed flags) and the ``PALM_RLHF_*`` environment make the settings, unless
    ``settings`` is given."""
    import uvicorn

    from .backends import BackendTimeouts, GrpcBackends

    settings = settings or GatewaySettings.from_args(args)
    config = app_config(settings)
    nkeys = len(config.api_keys)
    store = open_store(settings.resolved_database_url())
    timeouts = BackendTimeouts(generate_s=settings.generate_timeout, score_s=settings.score_timeout)
    sock = listening_socket(settings.host, settings.port)
    bound = sock.getsockname()[1]

    async def serve() -> None:
        metrics_ref: dict[str, GatewayMetrics] = {}

        def on_error(backend: str, kind: str) -> None:
            if "m" in metrics_ref:
                metrics_ref["m"].backend_errors.labels(backend, kind).inc()

        backends = GrpcBackends(settings.policy_addr, settings.reward_addr, timeouts=timeouts, on_error=on_error)
        context = PolicyContext(settings.policy_addr)
        app = create_app(backends, store, config, context)
        metrics_ref["m"] = app.state.metrics
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level=settings.log_level.lower(),
                access_log=False,
                timeout_graceful_shutdown=10,
                lifespan="off",
                # longer than the idle expiry of common HTTP clients (httpx 5 s, aiohttp 15 s) and
                # load balancers (60 s): the client, not the server, closes an idle connection, so a
                # request never races the server's close of the connection it was sent on
                timeout_keep_alive=settings.keep_alive,
                http=protocol_with(settings.header_timeout),  # slow request headers are cut off
                limit_concurrency=settings.max_connections or None,
            )
        )
        log.info(
            "gateway on http://%s:%d (policy %s, reward %s, store %s, auth %s)",
            settings.host,
            bound,
            settings.policy_addr,
            settings.reward_addr,
            store.dialect,
            f"{nkeys} key(s)" if nkeys else "off",
        )
        print(f"gateway listening on {settings.host}:{bound} (http)", flush=True)
        try:
            await server.serve(sockets=[sock])
        finally:
            await context.close()
            await backends.close()

    try:
        asyncio.run(serve())
    finally:
        store.close()
    return 0
