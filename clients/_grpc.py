"""The call machinery every gRPC client shares: channels, deadlines, retries, errors.

Channels come from the services' one channel factory and calls go through their one retry
policy (services/common/client.py): an overall deadline per call, a bounded number of attempts
with exponential backoff and jitter (so many clients that lost the same server do not
reconnect in lock-step), and an error that says what happened. gRPC's built-in retries are
turned off on the channel so the two never multiply: they retry only within one call's
deadline, cannot report how many attempts they made, and stay silent while a server is still
starting.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from services.common.client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    KEEPALIVE_TIME_MS,
    NO_RETRY,
    RetryPolicy,
    call_with_retry_sync,
    create_sync_channel,
    stream_with_retry_sync,
)
from services.common.client import channel_options as _service_channel_options

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "NO_RETRY", "ClientError", "GrpcClient", "RetryPolicy", "TLSConfig",
           "channel_options"]

log = logging.getLogger("clients")

T = TypeVar("T")


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


def _reconnect(max_backoff: float) -> dict[str, int]:
    # reconnects as eager as our own backoff: by default a channel that failed to connect waits
    # up to two minutes before trying again, which would make our retries fail fast against a
    # server that is already back
    return {"initial_reconnect_backoff_ms": 100, "max_reconnect_backoff_ms": max(100, int(max_backoff * 1000))}


def channel_options(max_message_bytes: int, max_backoff: float, *,
                    keepalive_time_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, Any]]:
    """The options of a client's channel: the services' channel options with built-in retries
    off and reconnects paced by ``max_backoff``."""
    return _service_channel_options(max_message_bytes, 0, keepalive_time_ms=keepalive_time_ms,
                                    **_reconnect(max_backoff))


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
        creds, extra = None, []
        if tls:
            creds = (tls if isinstance(tls, TLSConfig) else TLSConfig()).credentials()
            if isinstance(tls, TLSConfig) and tls.server_name:
                extra.append(("grpc.ssl_target_name_override", tls.server_name))
        self.channel = create_sync_channel(addr, max_message_bytes=max_message_bytes, retries=0, credentials=creds,
                                           options=extra, **_reconnect(self.retry.max_backoff))

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
        md = self._meta(admin)
        attempts = 0

        def attempt(remaining: float | None) -> T:
            nonlocal attempts
            attempts += 1
            self._count()
            return fn(request, timeout=remaining, metadata=md)

        try:
            return call_with_retry_sync(attempt, timeout=total, policy=policy, on_retry=self._retrying(method),
                                        rng=self._rng)
        except grpc.RpcError as e:
            raise self._client_error(method, e, attempts) from None

    def _retrying(self, method: str) -> Callable[[int, grpc.StatusCode, float], None]:
        def on_retry(attempt: int, code: grpc.StatusCode, wait: float) -> None:
            log.info("%s: %s on attempt %d, retrying in %.2fs", method, code.name, attempt, wait)
            if self._on_retry:
                self._on_retry(method, attempt, code, wait)

        return on_retry

    @staticmethod
    def _client_error(method: str, e: grpc.RpcError, attempts: int) -> ClientError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = (e.details() if hasattr(e, "details") else "") or code.name
        return ClientError(method, code, details, attempts)

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
        total = self.timeout if timeout is None else timeout
        attempts = 0

        def open_call(remaining: float | None):
            nonlocal attempts
            attempts += 1
            self._count()
            return fn(request, timeout=remaining, metadata=self._meta(False))

        try:
            yield from stream_with_retry_sync(open_call, timeout=total, policy=self.retry,
                                              on_retry=self._retrying(method), rng=self._rng)
        except grpc.RpcError as e:
            raise self._client_error(method, e, attempts) from None

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
