"""The gateway's configuration and the state one app holds (``app.state.gateway``), with the
request dependencies that read it: the state itself, the authorized client, the admin check."""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.common.feedback_store import FeedbackStore

from .admission import Admission
from .auth import KeyRing, RateLimit, RateLimiter, request_cost
from .backends import Backends
from .conversation import ContextSource, ConversationFitter
from .errors import APIError
from .metrics import GatewayMetrics
from .ranking import RankingService
from .storage import StorageService

ADMIN_TOKEN_HELP = (
    "start the gateway with --admin-token TOKEN, PALM_RLHF_ADMIN_TOKEN or PALM_RLHF_ADMIN_TOKEN_FILE "
    "and send it as 'Authorization: Bearer TOKEN'"
)


@dataclass
class GatewayConfig:
    """What one app is built with (see :class:`~services.gateway.settings.GatewaySettings` for
    where a served gateway's values come from)."""

    api_keys: list[str] = field(default_factory=list)  # hashed on app creation
    rate_limit: RateLimit | None = None
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0  # a request body must arrive within this (0: no deadline)
    # chat completions in flight at once; one more is answered 503 + Retry-After (0: no cap)
    max_inflight: int = 32
    # Host header values served ("*.example.com" allowed); empty: any
    allowed_hosts: tuple[str, ...] = ()
    admin_token: str | None = None  # admin-only reads (the log export) need it as bearer token
    # without an admin token: whether admin-only reads are open to every client (only for a
    # gateway run with --insecure-no-auth on a loopback address)
    open_admin: bool = False
    model_name: str = "palm-rlhf"  # the id GET /v1/models lists
    # other names accepted for it in a chat completion's "model" (README's examples send "palm")
    model_aliases: tuple[str, ...] = ("palm",)
    # the least room for an answer a conversation is shortened to leave (max_tokens unset)
    min_answer_tokens: int = 32


def same_secret(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison of a presented token with the configured one."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class GatewayState:
    """Everything the routes of one app share."""

    def __init__(
        self,
        backends: Backends,
        store: FeedbackStore,
        config: GatewayConfig,
        context: ContextSource | None = None,
    ):
        self.config = config
        self.backends = backends
        self.store = store
        self.metrics = GatewayMetrics()
        self.keyring = KeyRing(config.api_keys)
        config.api_keys = []  # keep only the digests
        self.limiter = RateLimiter(config.rate_limit) if config.rate_limit else None
        self.ranking = RankingService(backends, self.metrics)
        self.storage = StorageService(store, self.metrics)
        self.fitter = ConversationFitter(context, config.min_answer_tokens)
        self.known_models = {config.model_name, *config.model_aliases}
        self.admission = Admission(config.max_inflight, self.metrics)

    def is_admin(self, token: str | None) -> bool:
        return same_secret(token, self.config.admin_token)


@dataclass
class Client:
    id: str
    bearer: str | None


def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway


State = Annotated[GatewayState, Depends(get_state)]

bearer = HTTPBearer(auto_error=False, description="An API key, when the gateway requires them")


async def authorize(
    request: Request,
    state: State,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Client:
    """The client behind a request: its API key (or the admin token) when the gateway has
    keys, else its address; charged to its rate-limit bucket."""
    token = creds.credentials if creds else None
    if len(state.keyring):
        if token is None:
            raise APIError(
                401,
                "missing API key: send it as 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        client_id = state.keyring.identify(token)
        if client_id is None and state.is_admin(token):
            client_id = "admin"
        if client_id is None:
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    else:
        client_id = f"ip:{request.client.host if request.client else 'unknown'}"
    if state.limiter is not None:  # charged by cost: a chat completion 1, a feedback row 0.1
        wait = state.limiter.acquire(client_id, request_cost(request.method, request.url.path))
        if wait > 0:
            state.metrics.rate_limited.inc()
            raise APIError(
                429,
                f"rate limit exceeded for this client; retry in {wait:.1f}s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
    return Client(id=client_id, bearer=token)


Authorized = Annotated[Client, Depends(authorize)]


async def require_admin(client: Authorized, state: State) -> Client:
    """Admin-only reads: the admin token as bearer token. Without a configured admin token
    they are refused, unless the gateway was started open on loopback (``open_admin``)."""
    if state.config.admin_token:
        if not state.is_admin(client.bearer):
            raise APIError(
                403, "exporting the log needs the admin token as bearer token", type="permission_error"
            )
    elif not state.config.open_admin:
        raise APIError(
            403,
            f"this gateway has no admin token, so admin-only reads such as the log export are off: {ADMIN_TOKEN_HELP}",
            type="permission_error",
        )
    return client


Admin = Annotated[Client, Depends(require_admin)]
