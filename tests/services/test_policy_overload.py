"""A full policy queue sheds load: requests beyond ``--max-queue-rows`` are refused at once as
overloaded (RESOURCE_EXHAUSTED marked retryable), the gateway turns that into 503 with
Retry-After, and the requests it admitted are answered in full."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc

from palm_rlhf.proto.v1 import policy_pb2 as P
from palm_rlhf.proto.v1 import policy_pb2_grpc
from services.common.client import create_channel
from services.common.errors import OVERLOADED_KEY

from .conftest import metric_value

FLAGS = ("--max-new-tokens", "48", "--max-n", "4", "--max-batch-rows", "4", "--max-queue-rows", "4",
         "--batch-window-ms", "0")


async def _burst(addr: str, k: int, **params):
    async with create_channel(addr, retries=0) as ch:
        stub = policy_pb2_grpc.PolicyStub(ch)

        async def one(i: int):
            req = P.GenerateRequest(prompts=[P.Prompt(text=f"prompt {i}")], params=P.SamplingParams(**params))
            try:
                return await stub.Generate(req, timeout=120)
            except grpc.aio.AioRpcError as e:
                return e

        return await asyncio.gather(*[one(i) for i in range(k)])


def test_requests_beyond_the_queue_are_refused_as_overloaded(spawn, policy_data):
    proc = spawn("policy", policy_data, *FLAGS).wait_ready()
    # 4 rows each: one request fills the batch, one the queue; the rest must be shed
    out = asyncio.run(_burst(proc.addr, 8, n=4, max_new_tokens=48, seed=1))
    ok = [r for r in out if not isinstance(r, grpc.aio.AioRpcError)]
    shed = [r for r in out if isinstance(r, grpc.aio.AioRpcError)]
    assert ok and shed, f"expected some answered and some shed, got {len(ok)} / {len(shed)}"
    for e in shed:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        assert "at capacity" in e.details()
        assert dict(e.trailing_metadata() or ()).get(OVERLOADED_KEY) == "1"
    assert all(len(r.results[0].candidates) == 4 for r in ok)
    text = urllib.request.urlopen(proc.metrics_url, timeout=5).read().decode()
    assert metric_value(text, "palm_rlhf_shed_total", service="policy") == len(shed)
    # a request over a limit is RESOURCE_EXHAUSTED too, but not marked as overload
    (over,) = asyncio.run(_burst(proc.addr, 1, n=5))
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert OVERLOADED_KEY not in dict(over.trailing_metadata() or ())
    # once the burst is over, the same request is served
    (again,) = asyncio.run(_burst(proc.addr, 1, n=4, max_new_tokens=8, seed=2))
    assert not isinstance(again, grpc.aio.AioRpcError)


def test_the_gateway_answers_an_overloaded_policy_with_503(spawn, policy_data):
    from services.gateway.backends import BackendError, GrpcBackends, SamplingOptions
    from services.gateway.errors import backend_http_error

    proc = spawn("policy", policy_data, *FLAGS).wait_ready()

    async def burst():
        b = GrpcBackends(proc.addr, "127.0.0.1:1")
        try:
            opts = SamplingOptions(max_tokens=48, temperature=1.0, top_p=1.0, stop=[], seed=3)
            return await asyncio.gather(*[b.generate(f"hi {i}", 4, opts) for i in range(8)], return_exceptions=True)
        finally:
            await b.close()

    out = asyncio.run(burst())
    errors = [r for r in out if isinstance(r, BaseException)]
    assert errors and len(errors) < len(out)
    for e in errors:
        assert isinstance(e, BackendError) and e.kind == "overloaded", e
        http = backend_http_error(e)
        assert http.status_code == 503 and http.code == "overloaded"
        assert http.headers["Retry-After"] == "1"
