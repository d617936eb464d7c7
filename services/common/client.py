"""Client helpers for calling the palm_rlhf.v1 services: the one channel factory (explicit
message-size limits, keepalive, reconnect backoff, TLS), the one retry policy with its call
and stream wrappers (blocking and asyncio), admin metadata and readiness waits.

Usable by the gateway, the trainer and other programs; they depend only on grpcio and the
generated contracts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import DEFAULT_MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter: the one retry policy of every
    palm_rlhf client (the gateway's backends, the Python clients, the trainer's calls to the
    reference and reward services, a policy following the trainer).

    Attempt ``k`` (1-based) that fails with a code in ``retry_codes`` waits
    ``min(max_backoff, initial_backoff * multiplier**(k-1))`` scaled by a random factor in
    ``[1 - jitter, 1]`` and tries again, until ``max_attempts`` attempts were made, the call's
    overall deadline would pass during the wait, or (with ``budget``) the waits would add up
    to more than ``budget`` seconds. Other codes are never retried.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5  # fraction of each wait that is random
    budget: float | None = None  # most seconds spent waiting across one call's retries
    retry_codes: frozenset[grpc.StatusCode] = field(default_factory=lambda: frozenset(RETRYABLE))

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        r = (rng or random).random()
        return base * (1.0 - self.jitter * r)

    def next_wait(self, attempt: int, code: grpc.StatusCode, left: float | None, waited: float,
                  rng: random.Random | None = None) -> float | None:
        """The wait before attempt ``attempt + 1`` after attempt ``attempt`` failed with ``code``
        with ``left`` seconds of the deadline remaining (None: no deadline) and ``waited`` seconds
        already spent waiting; None to give up."""
        if code not in self.retry_codes or attempt >= self.max_attempts:
            return None
        wait = self.backoff(attempt, rng)
        if left is not None and wait >= left:
            return None
        if self.budget is not None and waited + wait > self.budget:
            return None
        return wait


NO_RETRY = RetryPolicy(max_attempts=1)
#: what the services use between themselves: a replica restarting or draining is retried
DEFAULT_RETRY = RetryPolicy(max_attempts=5, initial_backoff=0.2, max_backoff=5.0)

# on_retry(attempt, code, wait): called before each wait
OnRetry = Callable[[int, grpc.StatusCode, float], None]


def _code(e: grpc.RpcError) -> grpc.StatusCode:
    return e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN


def call_with_retry_sync(call: Callable[[float | None], T], *, timeout: float | None = 30.0,
                         policy: RetryPolicy = DEFAULT_RETRY, on_retry: OnRetry | None = None,
                         rng: random.Random | None = None) -> T:
    """``call(remaining_seconds)`` under one overall deadline (``timeout``; None: none), retried
    per ``policy``; the last ``grpc.RpcError`` is raised when it gives up."""
    deadline = None if timeout is None else time.monotonic() + timeout
    attempt, waited = 0, 0.0
    while True:
        attempt += 1
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        try:
            return call(remaining)
        except grpc.RpcError as e:
            left = None if deadline is None else deadline - time.monotonic()
            wait = policy.next_wait(attempt, _code(e), left, waited, rng)
            if wait is None:
                raise
            log.info("%s on attempt %d, retrying in %.2fs", _code(e).name, attempt, wait)
            if on_retry is not None:
                on_retry(attempt, _code(e), wait)
            time.sleep(wait)
            waited += wait


async def call_with_retry(call: Callable[[float | None], Awaitable[T]], *, timeout: float | None = 30.0,
                          policy: RetryPolicy = DEFAULT_RETRY, on_retry: OnRetry | None = None,
                          rng: random.Random | None = None) -> T:
    """The asyncio form of :func:`call_with_retry_sync`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    attempt, waited = 0, 0.0
    while True:
        attempt += 1
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        try:
            return await call(remaining)
        except grpc.RpcError as e:
            left = None if deadline is None else deadline - time.monotonic()
            wait = policy.next_wait(attempt, _code(e), left, waited, rng)
            if wait is None:
                raise
            log.info("%s on attempt %d, retrying in %.2fs", _code(e).name, attempt, wait)
            if on_retry is not None:
                on_retry(attempt, _code(e), wait)
            await asyncio.sleep(wait)
            waited += wait


def stream_with_retry_sync(open_call: Callable[[float | None], Any], *, timeout: float | None = 30.0,
                           policy: RetryPolicy = DEFAULT_RETRY, on_retry: OnRetry | None = None,
                           rng: random.Random | None = None) -> Iterator[Any]:
    """Iterate the server stream ``open_call(remaining_seconds)``, retried per ``policy`` only
    until its first message arrives (after that a retry would repeat what the caller saw)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    attempt, waited = 0, 0.0
    while True:
        attempt += 1
        call = open_call(None if deadline is None else max(deadline - time.monotonic(), 0.001))
        received = False
        try:
            for item in call:
                received = True
                yield item
            return
        except grpc.RpcError as e:
            left = None if deadline is None else deadline - time.monotonic()
            wait = None if received else policy.next_wait(attempt, _code(e), left, waited, rng)
            if wait is None:
                raise
            if on_retry is not None:
                on_retry(attempt, _code(e), wait)
            time.sleep(wait)
            waited += wait
        finally:
            call.cancel()


async def stream_with_retry(open_call: Callable[[float | None], Any], *, timeout: float | None = 30.0,
                            policy: RetryPolicy = DEFAULT_RETRY, on_retry: OnRetry | None = None,
                            rng: random.Random | None = None) -> AsyncIterator[Any]:
    """The asyncio form of :func:`stream_with_retry_sync`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    attempt, waited = 0, 0.0
    while True:
        attempt += 1
        call = open_call(None if deadline is None else max(deadline - time.monotonic(), 0.001))
        received = False
        try:
            async for item in call:
                received = True
                yield item
            return
        except grpc.RpcError as e:
            left = None if deadline is None else deadline - time.monotonic()
            wait = None if received else policy.next_wait(attempt, _code(e), left, waited, rng)
            if wait is None:
                raise
            if on_retry is not None:
                on_retry(attempt, _code(e), wait)
            await asyncio.sleep(wait)
            waited += wait
        finally:
            call.cancel()


def _service_config(max_attempts: int) -> str:
    # gRPC's built-in retries cover the transparent case (a replica restarting or draining)
    # for callers that do not use RetryPolicy; channels whose callers retry themselves turn
    # them off (retries=0) so that the two never multiply.
    return json.dumps({
        "methodConfig": [{
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": max(2, min(max_attempts, 5)),
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    })


# Keepalive: clients ping every KEEPALIVE_TIME_MS, also on idle connections and quiet streams
# (a policy's WatchVersions stream to the trainer can be silent for hours), and servers
# (services/common/server.py) accept pings as often as MIN_PING_INTERVAL_MS. A client that pings
# faster than its server allows gets GOAWAY "too_many_pings" and a dropped connection, so the
# client interval must stay above the server's.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
MIN_PING_INTERVAL_MS = 10_000


def keepalive_options(keepalive_time_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, Any]]:
    """Client keepalive settings that the services' servers accept (see server_options)."""
    return [
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", min(KEEPALIVE_TIMEOUT_MS, keepalive_time_ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging a quiet connection
    ]


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, retries: int = 4, *,
                    keepalive_time_ms: int = KEEPALIVE_TIME_MS, initial_reconnect_backoff_ms: int = 200,
                    max_reconnect_backoff_ms: int = 2_000) -> list[tuple[str, Any]]:
    """Options for a channel to a palm_rlhf service: explicit size limits, built-in retries
    (``retries`` > 0) or none, keepalive at the servers' pace, and reconnects soon after a
    backend comes back (gRPC's default reconnect backoff grows to two minutes)."""
    opts: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1 if retries > 0 else 0),
    ]
    if retries > 0:
        opts.append(("grpc.service_config", _service_config(retries + 1)))
    return [
        *opts,
        *keepalive_options(keepalive_time_ms),
        ("grpc.initial_reconnect_backoff_ms", initial_reconnect_backoff_ms),
        ("grpc.max_reconnect_backoff_ms", max_reconnect_backoff_ms),
    ]


def client_credentials(tls_ca: str | None = None, tls_client_cert: str | None = None,
                       tls_client_key: str | None = None) -> grpc.ChannelCredentials | None:
    """Credentials for channels between the services: TLS when a CA that signed the servers'
    certificates is known (``tls_ca``, else ``PALM_RLHF_TLS_CA``), mutual TLS with this
    process's own certificate and key (``PALM_RLHF_TLS_CLIENT_CERT``/``_KEY``)."""
    if tls_ca is None and tls_client_cert is None and tls_client_key is None:
        from services.common.settings import TLSClientSettings

        t = TLSClientSettings.load()
        tls_ca, tls_client_cert, tls_client_key = t.tls_ca, t.tls_client_cert, t.tls_client_key

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    ca = read(tls_ca)
    if ca is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=read(tls_client_key), certificate_chain=read(tls_client_cert)
    )


_DEFAULT = object()


def create_channel(addr: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, retries: int = 4,
                   credentials: Any = _DEFAULT, options: Sequence[tuple[str, Any]] = (),
                   **option_kw: Any) -> grpc.aio.Channel:
    """An asyncio channel to ``addr`` (host:port) with :func:`channel_options`; TLS with
    ``credentials`` (default: :func:`client_credentials`; None: plaintext)."""
    creds = client_credentials() if credentials is _DEFAULT else credentials
    opts = [*channel_options(max_message_bytes, retries, **option_kw), *options]
    if creds is not None:
        return grpc.aio.secure_channel(addr, creds, options=opts)
    return grpc.aio.insecure_channel(addr, options=opts)


def create_sync_channel(addr: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, retries: int = 4,
                        credentials: Any = _DEFAULT, options: Sequence[tuple[str, Any]] = (),
                        **option_kw: Any) -> grpc.Channel:
    """The blocking-API twin of :func:`create_channel`."""
    creds = client_credentials() if credentials is _DEFAULT else credentials
    opts = [*channel_options(max_message_bytes, retries, **option_kw), *options]
    if creds is not None:
        return grpc.secure_channel(addr, creds, options=opts)
    return grpc.insecure_channel(addr, options=opts)


create_blocking_channel = create_sync_channel


def admin_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata for admin RPCs (empty when no token is configured)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


async def wait_until_serving(addr: str, timeout: float = 60.0, service: str = "") -> None:
    """Poll the standard health service of ``addr`` until SERVING (raises TimeoutError)."""
    deadline = time.monotonic() + timeout
    async with create_channel(addr, retries=0) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{addr} not SERVING after {timeout}s")
            await asyncio.sleep(0.1)


def wait_until_serving_sync(addr: str, timeout: float = 60.0, service: str = "") -> None:
    """Blocking twin of :func:`wait_until_serving`."""
    deadline = time.monotonic() + timeout
    with create_sync_channel(addr, retries=0) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{addr} not SERVING after {timeout}s")
            time.sleep(0.1)
