"""The call machinery every gRPC client shares: channels, deadlines, retries, errors.

Why not gRPC's built-in retry policy: it retries only within one call's deadline, cannot report
how many attempts it made, and stays silent while a server is still starting. A client that
scores text from a batch job wants the opposite: an overall deadline per call, a bounded number
of attempts with exponential backoff and jitter (so many clients that lost the same server do
not reconnect in lock-step), and an error that says what happened. Built-in retries are turned
off on the channel so the two never multiply.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

log = logging.getLogger("clients")

T = TypeVar("T")

# The services' own default (services refuse bigger messages anyway); stated here so a client
# never depends on gRPC's 4 MiB default receive limit.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
KEEPALIVE_TIME_MS = 30_000  # >= the services' grpc.http2.min_ping_interval_without_data_ms (10 s)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter.

    Attempt ``k`` (1-based) that fails with a retryable code waits
    ``min(max_backoff, initial_backoff * multiplier**(k-1))`` scaled by a random factor in
    ``[1 - jitter, 1]`` and tries again, until ``max_attempts`` attempts were made or the call's
    overall deadline would pass during the wait.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5  # fraction of each wait that is random
    retry_codes: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE})
    )

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


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class TLSConfig:
    """Transport security for a channel. All fields optional: with none set, the system's root
    certificates verify the server. ``client_cert``/``client_key`` enable mutual TLS."""

    root_certificates: str | Path | None = None
    client_cert: str | Path | None = None
    client_key: str | Path | None = None
    server_name: str | None = None  # overrides the name checked against the certificate

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: str | Path | None) -> bytes | None:
            return Path(p).read_bytes() if p else None

        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both client_cert and client_key")
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.root_certificates),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )


class ClientError(Exception):
    """A call failed. ``code`` is the final gRPC status, ``attempts`` how many were made."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, attempts: int):
        self.method = method
        self.code = code
        self.details = details
        self.attempts = attempts
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{method} failed{tries}: {code.name}: {details}")


def channel_options(max_message_bytes: int, max_backoff: float, *,
                    keepalive_time_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, Any]]:
    """Explicit size limits; built-in retries off; reconnects as eager as our own backoff (by
    default a channel that failed to connect waits up to two minutes before trying again,
    which would make our retries fail fast against a server that is already back)."""
    backoff_ms = max(100, int(max_backoff * 1000))
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
        # Keepalive at the pace the services accept (services/common/server.py allows a ping per
        # 10 s, idle or not; faster pings get GOAWAY "too_many_pings"): the same figures as
        # services/common/client.py, repeated because this package depends on grpcio only.
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", min(10_000, keepalive_time_ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class GrpcClient:
    """Base of the typed clients: one channel, an overall deadline per call, retries."""

    #: full service name, for the health check (set by subclasses)
    service_name = ""

    def __init__(
        self,
        addr: str,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: TLSConfig | bool | None = None,
        admin_token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        on_retry: Callable[[str, int, grpc.StatusCode, float], None] | None = None,
    ):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.addr = addr
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_message_bytes = max_message_bytes
        self._admin_token = admin_token
        self._metadata = tuple(metadata)
        self._on_retry = on_retry
        self._rng = random.Random()
        self._lock = threading.Lock()
        self.attempts_total = 0  # every attempt made by this client (for tests and metrics)
        opts = channel_options(max_message_bytes, self.retry.max_backoff)
        if tls:
            creds = (tls if isinstance(tls, TLSConfig) else TLSConfig()).credentials()
            if isinstance(tls, TLSConfig) and tls.server_name:
                opts.append(("grpc.ssl_target_name_override", tls.server_name))
            self.channel = grpc.secure_channel(addr, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(addr, options=opts)

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:  # never shows the admin token
        return f"{type(self).__name__}({self.addr!r})"

    # -- calls ----------------------------------------------------------------------------

    def _meta(self, admin: bool) -> tuple[tuple[str, str], ...]:
        md = self._metadata
        if admin and self._admin_token:
            md = (*md, ("authorization", f"Bearer {self._admin_token}"))
        return md

    def _count(self) -> None:
        with self._lock:
            self.attempts_total += 1

    def _call(
        self,
        method: str,
        fn: Callable[..., T],
        request: Any,
        *,
        timeout: float | None = None,
        admin: bool = False,
        retry: RetryPolicy | None = None,
    ) -> T:
        """``fn(request, timeout=remaining, metadata=...)`` under one overall deadline, retried
        on the policy's codes with backoff while attempts and time remain."""
        policy = retry or self.retry
        total = self.timeout if timeout is None else timeout
        if total <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {total}")
        deadline = time.monotonic() + total
        md = self._meta(admin)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            self._count()
            try:
                return fn(request, timeout=max(remaining, 0.001), metadata=md)
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
                details = (e.details() if hasattr(e, "details") else "") or code.name
                wait = policy.backoff(attempt, self._rng)
                left = deadline - time.monotonic()
                if code not in policy.retry_codes or attempt >= policy.max_attempts or wait >= left:
                    raise ClientError(method, code, details, attempt) from None
                log.info("%s: %s on attempt %d, retrying in %.2fs", method, code.name, attempt, wait)
                if self._on_retry:
                    self._on_retry(method, attempt, code, wait)
                time.sleep(wait)

    def _stream(
        self,
        method: str,
        fn: Callable[..., Any],
        request: Any,
        *,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """Iterate a server stream; retries happen only before the first message arrives (after
        that a retry would repeat what the caller has already seen)."""
        policy = self.retry
        total = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + total
        attempt = 0
        while True:
            attempt += 1
            self._count()
            call = fn(request, timeout=max(deadline - time.monotonic(), 0.001), metadata=self._meta(False))
            received = False
            try:
                for item in call:
                    received = True
                    yield item
                return
            except grpc.RpcError as e:
                code = e.code()
                wait = policy.backoff(attempt, self._rng)
                left = deadline - time.monotonic()
                if received or code not in policy.retry_codes or attempt >= policy.max_attempts or wait >= left:
                    raise ClientError(method, code, e.details() or code.name, attempt) from None
                if self._on_retry:
                    self._on_retry(method, attempt, code, wait)
                time.sleep(wait)
            finally:
                call.cancel()

    def health(self, timeout: float = 2.0) -> str:
        """The ``grpc.health.v1`` status of the server ("SERVING", "NOT_SERVING", ...), or
        "UNAVAILABLE" when it cannot be reached. Never retried: a probe reports the present."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as e:
            return "UNAVAILABLE" if e.code() != grpc.StatusCode.NOT_FOUND else "SERVICE_UNKNOWN"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Poll the health service until SERVING (TimeoutError when ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.health(timeout=min(2.0, max(0.1, deadline - time.monotonic()))) == "SERVING":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.addr} not SERVING after {timeout}s")
            time.sleep(0.05)
