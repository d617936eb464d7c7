"""The one retry policy (services/common/client.py) against a real gRPC server on a real port:
UNAVAILABLE is retried with growing waits until the call succeeds, the attempts run out or the
deadline would pass; other codes are never retried."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest

from services.common.client import (
    RetryPolicy,
    call_with_retry,
    call_with_retry_sync,
    create_channel,
    create_sync_channel,
    stream_with_retry_sync,
)

METHOD = "/palm_rlhf.test.Flaky/Call"
STREAM = "/palm_rlhf.test.Flaky/Stream"
NO_JITTER = RetryPolicy(max_attempts=6, initial_backoff=0.05, max_backoff=1.0, multiplier=2.0, jitter=0.0)


class Flaky:
    """Answers ``code`` to the first ``failures`` calls, then b"ok"; records when each came."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.failures, self.code = failures, code
        self.times: list[float] = []
        self._lock = threading.Lock()

    def call(self, request: bytes, context) -> bytes:
        with self._lock:
            self.times.append(time.monotonic())
            n = len(self.times)
        if n <= self.failures:
            context.abort(self.code, f"failure {n}")
        return b"ok:" + request

    def stream(self, request: bytes, context):
        with self._lock:
            self.times.append(time.monotonic())
            n = len(self.times)
        if n <= self.failures:
            context.abort(self.code, f"failure {n}")
        yield b"first"
        if n == self.failures + 1 and self.code == grpc.StatusCode.UNAVAILABLE:
            context.abort(grpc.StatusCode.UNAVAILABLE, "lost after the first message")
        yield b"second"

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


@pytest.fixture
def serve():
    servers = []

    def start(flaky: Flaky) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("palm_rlhf.test.Flaky", {
            "Call": grpc.unary_unary_rpc_method_handler(flaky.call),
            "Stream": grpc.unary_stream_rpc_method_handler(flaky.stream),
        })])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)


def test_unavailable_is_retried_with_growing_waits_until_it_succeeds(serve):
    flaky = Flaky(failures=3)
    addr = serve(flaky)
    waits = []
    with create_sync_channel(addr, retries=0, credentials=None) as ch:
        call = ch.unary_unary(METHOD)
        out = call_with_retry_sync(lambda t: call(b"x", timeout=t), timeout=20, policy=NO_JITTER,
                                   on_retry=lambda attempt, code, wait: waits.append((attempt, code, wait)))
    assert out == b"ok:x"
    assert len(flaky.times) == 4
    assert [(a, c) for a, c, _ in waits] == [(1, grpc.StatusCode.UNAVAILABLE), (2, grpc.StatusCode.UNAVAILABLE),
                                             (3, grpc.StatusCode.UNAVAILABLE)]
    assert [w for _, _, w in waits] == pytest.approx([0.05, 0.1, 0.2])
    gaps = flaky.gaps()
    assert all(g >= w for g, (_, _, w) in zip(gaps, waits)), gaps
    assert gaps[0] < gaps[1] < gaps[2]


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL])
def test_other_codes_are_not_retried(serve, code):
    flaky = Flaky(failures=1, code=code)
    addr = serve(flaky)
    with create_sync_channel(addr, retries=0, credentials=None) as ch, pytest.raises(grpc.RpcError) as ei:
        call = ch.unary_unary(METHOD)
        call_with_retry_sync(lambda t: call(b"x", timeout=t), timeout=20, policy=NO_JITTER)
    assert ei.value.code() == code
    assert len(flaky.times) == 1


def test_retries_stop_at_the_attempt_limit_and_before_the_deadline(serve):
    flaky = Flaky(failures=1_000)
    addr = serve(flaky)
    with create_sync_channel(addr, retries=0, credentials=None) as ch:
        call = ch.unary_unary(METHOD)
        few = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02, jitter=0.0)
        with pytest.raises(grpc.RpcError) as ei:
            call_with_retry_sync(lambda t: call(b"x", timeout=t), timeout=20, policy=few)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and len(flaky.times) == 3

        flaky.times.clear()
        slow = RetryPolicy(max_attempts=100, initial_backoff=0.1, max_backoff=0.4, jitter=0.0)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError):
            call_with_retry_sync(lambda t: call(b"x", timeout=t), timeout=1.0, policy=slow)
        took = time.monotonic() - t0
        # waits 0.1, 0.2, 0.4 (0.7 s in all); the next 0.4 s wait would pass the 1 s deadline
        assert len(flaky.times) == 4
        assert 0.7 <= took < 1.0

        flaky.times.clear()
        budget = RetryPolicy(max_attempts=100, initial_backoff=0.1, max_backoff=0.4, jitter=0.0, budget=0.35)
        with pytest.raises(grpc.RpcError):
            call_with_retry_sync(lambda t: call(b"x", timeout=t), timeout=20, policy=budget)
        assert len(flaky.times) == 3  # waits 0.1 + 0.2; a further 0.4 would exceed the 0.35 s budget


def test_the_asyncio_form_retries_the_same_way(serve):
    flaky = Flaky(failures=2)
    addr = serve(flaky)

    async def main() -> bytes:
        async with create_channel(addr, retries=0, credentials=None) as ch:
            call = ch.unary_unary(METHOD)
            return await call_with_retry(lambda t: call(b"y", timeout=t), timeout=20, policy=NO_JITTER)

    assert asyncio.run(main()) == b"ok:y"
    assert len(flaky.times) == 3
    gaps = flaky.gaps()
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[0] < gaps[1]


def test_a_call_waiting_for_a_server_that_comes_up_succeeds(serve):
    """Nothing listens at first; the retries run until a server binds the port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flaky = Flaky(failures=0)
    started: list[str] = []

    def later() -> None:
        time.sleep(0.6)
        server = grpc.server(futures.ThreadPoolExecutor(2))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "palm_rlhf.test.Flaky", {"Call": grpc.unary_unary_rpc_method_handler(flaky.call)})])
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        started.append("yes")
        time.sleep(5)
        server.stop(0)

    t = threading.Thread(target=later, daemon=True)
    t.start()
    attempts = []
    policy = RetryPolicy(max_attempts=50, initial_backoff=0.05, max_backoff=0.2, jitter=0.0)
    with create_sync_channel(f"127.0.0.1:{port}", retries=0, credentials=None,
                             initial_reconnect_backoff_ms=100, max_reconnect_backoff_ms=200) as ch:
        call = ch.unary_unary(METHOD)
        out = call_with_retry_sync(lambda t: call(b"z", timeout=t), timeout=20, policy=policy,
                                   on_retry=lambda a, c, w: attempts.append(c))
    assert out == b"ok:z" and started == ["yes"]
    assert attempts and set(attempts) == {grpc.StatusCode.UNAVAILABLE}


def test_a_stream_is_retried_only_before_its_first_message(serve):
    flaky = Flaky(failures=2)
    addr = serve(flaky)
    with create_sync_channel(addr, retries=0, credentials=None) as ch:
        call = ch.unary_stream(STREAM)
        got = []
        with pytest.raises(grpc.RpcError) as ei:
            got.extend(stream_with_retry_sync(lambda t: call(b"", timeout=t), timeout=20, policy=NO_JITTER))
    # two refusals retried; the third call sent a message and then failed: not retried
    assert got == [b"first"] and ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(flaky.times) == 3


def test_policy_arguments_are_checked():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=1.5)
    p = RetryPolicy(initial_backoff=0.1, max_backoff=0.3, jitter=0.0)
    assert [p.backoff(k) for k in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
