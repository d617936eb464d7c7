"""Client helpers for calling the palm_rlhf.v1 services: channels with explicit message-size
limits and a retry policy, admin metadata, readiness waits, and a retry wrapper.

Usable by the gateway, the trainer and other programs; they depend only on grpcio and the
generated contracts.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import DEFAULT_MAX_MESSAGE_BYTES

T = TypeVar("T")

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


def _service_config(max_attempts: int) -> str:
    # gRPC's built-in retries cover the transparent case (a replica restarting or draining);
    # call_with_retry below adds longer, application-level backoff where a caller wants it.
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
# client interval must stay above the server's (clients/_grpc.py uses the same figures).
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
                    keepalive_time_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, Any]]:
    """Options for a channel to a palm_rlhf service."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1 if retries > 0 else 0),
        ("grpc.service_config", _service_config(retries + 1)),
        *keepalive_options(keepalive_time_ms),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def client_credentials() -> grpc.ChannelCredentials | None:
    """Credentials for channels between the services: TLS when ``PALM_RLHF_TLS_CA`` names the CA
    that signed the servers' certificates, mutual TLS when ``PALM_RLHF_TLS_CLIENT_CERT`` and
    ``PALM_RLHF_TLS_CLIENT_KEY`` name this process's own certificate and key."""

    def read(name: str) -> bytes | None:
        path = os.environ.get(f"PALM_RLHF_{name}")
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    ca = read("TLS_CA")
    if ca is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=read("TLS_CLIENT_KEY"), certificate_chain=read("TLS_CLIENT_CERT")
    )


def create_channel(addr: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, retries: int = 4) -> grpc.aio.Channel:
    """An asyncio channel to ``addr`` (host:port), with size limits and retry on UNAVAILABLE."""
    creds = client_credentials()
    if creds is not None:
        return grpc.aio.secure_channel(addr, creds, options=channel_options(max_message_bytes, retries))
    return grpc.aio.insecure_channel(addr, options=channel_options(max_message_bytes, retries))


def create_sync_channel(addr: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, retries: int = 4) -> grpc.Channel:
    """The blocking-API twin of :func:`create_channel`."""
    creds = client_credentials()
    if creds is not None:
        return grpc.secure_channel(addr, creds, options=channel_options(max_message_bytes, retries))
    return grpc.insecure_channel(addr, options=channel_options(max_message_bytes, retries))


def admin_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata for admin RPCs (empty when no token is configured)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


async def call_with_retry(
    fn: Callable[..., Awaitable[T]],
    request: Any,
    *,
    timeout: float | None = 30.0,
    attempts: int = 5,
    backoff: float = 0.2,
    max_backoff: float = 5.0,
    retry_codes: tuple[grpc.StatusCode, ...] = RETRYABLE,
    **kwargs: Any,
) -> T:
    """Call ``fn(request, timeout=..., **kwargs)``, retrying ``retry_codes`` with jittered
    exponential backoff. ``timeout`` is an overall deadline across attempts."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = backoff
    for attempt in range(1, attempts + 1):
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            break
        try:
            return await fn(request, timeout=remaining, **kwargs)
        except grpc.aio.AioRpcError as e:
            if e.code() not in retry_codes or attempt == attempts:
                raise
            sleep = min(delay, max_backoff) * (0.5 + random.random())
            if deadline is not None:
                sleep = min(sleep, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(sleep)
            delay *= 2
    raise TimeoutError(f"no successful call within {timeout}s")


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
