"""The policy service over the wire: every RPC, its errors, batching and version swaps."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from palm_rlhf.generation import SamplingParams, generate_tokens
from palm_rlhf.proto.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services.common.client import admin_metadata, create_channel, create_sync_channel

from .conftest import ADMIN_TOKEN, metric_value, rpc_error

P = policy_pb2


@pytest.fixture(scope="module")
def stub(policy_proc):
    with create_sync_channel(policy_proc.addr) as ch:
        yield policy_pb2_grpc.PolicyStub(ch)


def gen(stub, prompts, **params):
    ps = [P.Prompt(text=p) if isinstance(p, str) else P.Prompt(token_ids=common_pb2.TokenIds(ids=p)) for p in prompts]
    return stub.Generate(P.GenerateRequest(prompts=ps, params=P.SamplingParams(**params)), timeout=60)


def test_generate_returns_n_candidates_with_logprobs_and_version(stub):
    r = gen(stub, ["User: hi\nAssistant:", [1, 40, 41]], n=3, max_new_tokens=5, seed=7, return_logprobs=True)
    assert r.policy_version == "v0001"
    assert len(r.results) == 2
    assert list(r.results[1].prompt_token_ids) == [1, 40, 41]
    assert r.results[0].prompt_token_ids[0] == 1  # text prompts get BOS
    for res in r.results:
        assert len(res.candidates) == 3
        for c in res.candidates:
            assert 1 <= len(c.token_ids) <= 5
            assert len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0 for lp in c.logprobs)
            assert c.finish_reason in (P.FINISH_REASON_STOP, P.FINISH_REASON_LENGTH)
    assert r.usage.completion_tokens == sum(len(c.token_ids) for res in r.results for c in res.candidates)


def test_logprobs_are_omitted_unless_asked(stub):
    r = gen(stub, ["hello"], max_new_tokens=3, seed=1)
    assert list(r.results[0].candidates[0].logprobs) == []


def test_greedy_generation_matches_in_process_generate_tokens(stub, tiny_model):
    prompt = [1, 76, 105, 108, 108, 112]
    r = gen(stub, [prompt], temperature=0, max_new_tokens=12, return_logprobs=True)
    ref = generate_tokens(tiny_model, [prompt], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(2,)))
    ref_ids = [t for t in ref[0][0].token_ids if t != 2]
    c = r.results[0].candidates[0]
    assert list(c.token_ids) == ref_ids
    assert list(c.logprobs) == pytest.approx(ref[0][0].logprobs[: len(ref_ids)], abs=1e-4)


def test_same_seed_gives_same_samples(stub):
    a = gen(stub, ["abc"], n=2, max_new_tokens=6, seed=123, temperature=1.0)
    b = gen(stub, ["abc"], n=2, max_new_tokens=6, seed=123, temperature=1.0)
    assert [list(c.token_ids) for c in a.results[0].candidates] == [list(c.token_ids) for c in b.results[0].candidates]


def test_stop_token_ids_end_a_candidate_without_the_stop_token(stub):
    prompt = [1, 50, 60, 70]
    free = gen(stub, [prompt], temperature=0, max_new_tokens=8).results[0].candidates[0]
    assert len(free.token_ids) >= 3
    stop_at = free.token_ids[2]
    first = list(free.token_ids).index(stop_at)
    stopped = gen(stub, [prompt], temperature=0, max_new_tokens=8, stop_token_ids=[stop_at]).results[0].candidates[0]
    assert stopped.finish_reason == P.FINISH_REASON_STOP
    assert list(stopped.token_ids) == list(free.token_ids[:first])


def _printable_after_first(text: str) -> list[str]:
    return [ch for ch in text[1:] if ch.isascii() and ch.isprintable()]


def test_text_stop_sequence_truncates_text(stub, tiny_model):
    from palm_rlhf.tokenizer import ByteTokenizer

    # a prompt whose greedy answer (same weights as the service's v0001) has a printable
    # character to stop on, chosen in-process so that the test never depends on luck
    tok = ByteTokenizer()
    sp = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=(tok.eos_id,))
    prompt = next(
        (p for p in ([1, 50, 60, 70], [1, 72, 105], [1, 40, 41, 42], [1, 100, 101], [1, 33, 44, 55], [1, 80])
         if _printable_after_first(tok.decode(generate_tokens(tiny_model, [p], sp)[0][0].token_ids))),
        None,
    )
    assert prompt is not None, "no candidate prompt makes the test model write printable ASCII"
    free = gen(stub, [prompt], temperature=0, max_new_tokens=16).results[0].candidates[0]
    ascii_chars = _printable_after_first(free.text)
    assert ascii_chars, f"the service's greedy answer {free.text!r} differs from the in-process one"
    stop = ascii_chars[0]
    stopped = gen(stub, [prompt], temperature=0, max_new_tokens=16, stop=[stop]).results[0].candidates[0]
    assert stopped.finish_reason == P.FINISH_REASON_STOP
    assert stopped.matched_stop == stop
    assert stop not in stopped.text
    assert free.text.startswith(stopped.text)
    assert len(stopped.token_ids) < len(free.token_ids)


def test_stream_yields_the_same_tokens_as_generate(stub):
    prompt = [1, 33, 44, 55]
    full = gen(stub, [prompt], temperature=0, max_new_tokens=10, n=2).results[0]
    req = P.GenerateRequest(prompts=[P.Prompt(token_ids=common_pb2.TokenIds(ids=prompt))],
                            params=P.SamplingParams(temperature=0, max_new_tokens=10, n=2, return_logprobs=True))
    tokens: dict[int, list[int]] = {0: [], 1: []}
    finish: dict[int, int] = {}
    versions = set()
    prompt_seen = []
    for chunk in stub.GenerateStream(req, timeout=60):
        assert chunk.sample_index not in finish, "no chunk may follow a candidate's final chunk"
        tokens[chunk.sample_index] += list(chunk.token_ids)
        assert len(chunk.logprobs) == len(chunk.token_ids)
        versions.add(chunk.policy_version)
        if chunk.prompt_token_ids:
            prompt_seen.append(list(chunk.prompt_token_ids))
        if chunk.finish_reason:
            finish[chunk.sample_index] = chunk.finish_reason
    assert versions == {"v0001"}
    assert prompt_seen == [prompt]
    for j in (0, 1):
        # the stream may carry a stop id the unary reply strips; compare the answer tokens
        assert [t for t in tokens[j] if t != 2] == list(full.candidates[j].token_ids)
        assert finish[j] == full.candidates[j].finish_reason


@pytest.mark.parametrize(
    "prompts, params, code",
    [
        ([], {}, grpc.StatusCode.INVALID_ARGUMENT),
        ([""], {}, grpc.StatusCode.INVALID_ARGUMENT),
        ([[]], {}, grpc.StatusCode.INVALID_ARGUMENT),
        ([[1, 999]], {}, grpc.StatusCode.INVALID_ARGUMENT),
        ([[1, -3]], {}, grpc.StatusCode.INVALID_ARGUMENT),
        (["x"], {"temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT),
        (["x"], {"top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT),
        (["x"], {"top_k": -2}, grpc.StatusCode.INVALID_ARGUMENT),
        (["x"], {"n": 0}, grpc.StatusCode.INVALID_ARGUMENT),
        (["x"], {"max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT),
        (["x"], {"stop_token_ids": [5000]}, grpc.StatusCode.INVALID_ARGUMENT),
        (["x"], {"n": 5}, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (["x"], {"max_new_tokens": 49}, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (["x"] * 5, {}, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (["y" * 80], {}, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_bad_requests_get_the_right_status(stub, prompts, params, code):
    err = rpc_error(gen, stub, prompts, **params)
    assert err.code() == code, err.details()
    assert "Traceback" not in (err.details() or "")


def test_stream_reports_bad_requests_too(stub):
    req = P.GenerateRequest(prompts=[P.Prompt(text="x")], params=P.SamplingParams(n=99))
    err = rpc_error(lambda: list(stub.GenerateStream(req, timeout=10)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadline_is_honoured(stub):
    err = rpc_error(gen_with_timeout := lambda: stub.Generate(  # noqa: F841
        P.GenerateRequest(prompts=[P.Prompt(text="x")], params=P.SamplingParams(max_new_tokens=48, n=4)),
        timeout=0.01))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_model_info_describes_model_limits_and_versions(stub):
    info = stub.ModelInfo(common_pb2.ModelInfoRequest(), timeout=10)
    assert info.kind == "policy"
    assert info.version == "v0001"
    assert list(info.available_versions) == ["v0001", "v0002"]
    assert info.tokenizer.kind == "byte" and info.tokenizer.vocab_size == 260 and info.tokenizer.eos_id == 2
    assert info.max_seq_len == 256 and info.num_parameters > 0
    assert (info.max_prompt_tokens, info.max_new_tokens, info.max_n, info.max_batch) == (64, 48, 4, 4)
    assert '"dim": 32' in info.config_json


def test_load_version_needs_the_admin_token_and_knows_versions(stub):
    err = rpc_error(stub.LoadVersion, common_pb2.LoadVersionRequest(version="v0002"), timeout=10)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = rpc_error(stub.LoadVersion, common_pb2.LoadVersionRequest(version="v0042"), timeout=10,
                    metadata=admin_metadata(ADMIN_TOKEN))
    assert err.code() == grpc.StatusCode.NOT_FOUND


_MISSING = object()


def scrape(url: str) -> list:
    """The samples of a Prometheus endpoint, parsed (HELP and TYPE lines are not samples)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def scrape_until(url: str, ready, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def sample(samples: list, name: str, labels: dict[str, str] | None = None, default=_MISSING) -> float:
    """The value of the one sample ``name`` whose labels include ``labels``; a missing sample
    fails the test unless a ``default`` is given."""
    labels = labels or {}
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    if not found:
        assert default is not _MISSING, f"no sample {name}{labels} in the metrics"
        return default
    return found[0]


def test_health_reflection_and_metrics(policy_proc, stub):
    with create_sync_channel(policy_proc.addr) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
        names = {s.name for s in replies[0].list_services_response.service}
    assert {"palm_rlhf.v1.Policy", "grpc.health.v1.Health"} <= names

    url = policy_proc.metrics_url
    before = scrape(url)
    reply = gen(stub, ["metrics"], max_new_tokens=4)
    tokens = sum(len(c.token_ids) for r in reply.results for c in r.candidates)
    assert tokens >= 1
    assert rpc_error(gen, stub, []).code() == grpc.StatusCode.INVALID_ARGUMENT

    def grown(samples, name, labels=None, default=_MISSING) -> float:
        return sample(samples, name, labels, default) - sample(before, name, labels, default=0.0)

    ok = {"method": "Generate", "code": "OK"}
    bad = {"method": "Generate", "code": "INVALID_ARGUMENT"}
    # the counters move when a call has ended, which may be just after the client has its reply
    after = scrape_until(url, lambda s: grown(s, "palm_rlhf_grpc_requests_total", ok, 0.0) >= 1
                         and grown(s, "palm_rlhf_grpc_requests_total", bad, 0.0) >= 1
                         and grown(s, "palm_rlhf_tokens_generated_total", None, 0.0) >= tokens)
    assert grown(after, "palm_rlhf_grpc_requests_total", ok) == 1
    assert grown(after, "palm_rlhf_grpc_requests_total", bad) == 1
    assert grown(after, "palm_rlhf_grpc_request_seconds_count", {"method": "Generate"}) == 2
    assert grown(after, "palm_rlhf_tokens_generated_total") == tokens
    assert grown(after, "palm_rlhf_batch_size_count") >= 1
    assert sample(after, "palm_rlhf_queue_depth") == 0  # nothing left waiting
    assert sample(after, "palm_rlhf_model_version") == 1  # v0001
    assert sample(after, "palm_rlhf_model_version_info", {"version": "v0001"}) == 1


async def _concurrent(addr: str, k: int, **params):
    async with create_channel(addr) as ch:
        stub = policy_pb2_grpc.PolicyStub(ch)
        reqs = [P.GenerateRequest(prompts=[P.Prompt(text=f"prompt {i}")], params=P.SamplingParams(**params))
                for i in range(k)]
        return await asyncio.gather(*[stub.Generate(r, timeout=60) for r in reqs])


def test_concurrent_requests_share_batches(policy_proc):
    before = urllib.request.urlopen(policy_proc.metrics_url, timeout=5).read().decode()
    replies = asyncio.run(_concurrent(policy_proc.addr, 8, max_new_tokens=6, n=2, seed=3))
    assert all(len(r.results[0].candidates) == 2 for r in replies)
    after = urllib.request.urlopen(policy_proc.metrics_url, timeout=5).read().decode()
    batches = (metric_value(after, "palm_rlhf_batch_size_count")
               - metric_value(before, "palm_rlhf_batch_size_count", default=0.0))
    singles = (metric_value(after, "palm_rlhf_batch_size_bucket", le="1.0")
               - metric_value(before, "palm_rlhf_batch_size_bucket", default=0.0, le="1.0"))
    assert batches < 8, "8 concurrent requests should not need 8 separate batches"
    assert batches - singles >= 1, "at least one batch should hold more than one request"


def test_version_swap_is_atomic_and_reported(policy_proc):
    async def scenario():
        async with create_channel(policy_proc.addr) as ch:
            stub = policy_pb2_grpc.PolicyStub(ch)
            probe = P.GenerateRequest(prompts=[P.Prompt(token_ids=common_pb2.TokenIds(ids=[1, 20, 30]))],
                                      params=P.SamplingParams(temperature=0, max_new_tokens=8))
            before = await stub.Generate(probe, timeout=60)
            inflight = [asyncio.ensure_future(stub.Generate(probe, timeout=60)) for _ in range(6)]
            swap = await stub.LoadVersion(common_pb2.LoadVersionRequest(version="v0002"), timeout=60,
                                          metadata=admin_metadata(ADMIN_TOKEN))
            after = await stub.Generate(probe, timeout=60)
            during = await asyncio.gather(*inflight)
            back = await stub.LoadVersion(common_pb2.LoadVersionRequest(version="v0001"), timeout=60,
                                          metadata=admin_metadata(ADMIN_TOKEN))
            return before, swap, after, during, back

    before, swap, after, during, back = asyncio.run(scenario())
    assert (swap.previous_version, swap.version) == ("v0001", "v0002")
    assert before.policy_version == "v0001" and after.policy_version == "v0002"
    # different weights, greedy decoding: what each response says matches what produced it
    a_ids = list(before.results[0].candidates[0].token_ids)
    b_ids = list(after.results[0].candidates[0].token_ids)
    assert a_ids != b_ids
    for r in during:
        assert r.policy_version in ("v0001", "v0002")
        expected = a_ids if r.policy_version == "v0001" else b_ids
        assert list(r.results[0].candidates[0].token_ids) == expected
    assert back.version == "v0001"


def test_a_short_request_joins_a_running_batch_instead_of_waiting_for_it(spawn, policy_data, tiny_model):
    """Continuous batching: a request sent while a long generation runs is admitted between
    decode steps and answered while the long one is still streaming. (With batches that run
    to completion, it would wait for the long one to end.)"""
    from palm_rlhf.tokenizer import ByteTokenizer

    eos = ByteTokenizer().eos_id
    # a prompt whose greedy continuation runs the full 240 tokens (no end-of-sequence)
    long_ids = next(ids for ids in ([1, 2, 3], [7, 7], [40, 41, 42], [100], [200, 3])
                    if len(generate_tokens(tiny_model, [ids], SamplingParams(max_new_tokens=240, temperature=0,
                                                                             stop_token_ids=(eos,)))[0][0].token_ids) == 240)
    proc = spawn("policy", policy_data, "--max-new-tokens", "240", "--max-prompt-tokens", "16",
                 "--batch-window-ms", "0").wait_ready()

    async def scenario():
        async with create_channel(proc.addr) as ch:
            stub = policy_pb2_grpc.PolicyStub(ch)
            long_req = P.GenerateRequest(prompts=[P.Prompt(token_ids=common_pb2.TokenIds(ids=long_ids))],
                                         params=P.SamplingParams(n=4, max_new_tokens=240, temperature=0))
            short = P.GenerateRequest(prompts=[P.Prompt(token_ids=common_pb2.TokenIds(ids=[5, 6, 7, 8, 9]))],
                                      params=P.SamplingParams(max_new_tokens=3, temperature=0))
            events: list[str] = []
            first_chunk = asyncio.Event()
            long_tokens = [0] * 4

            async def read_long():
                async for chunk in stub.GenerateStream(long_req, timeout=120):
                    first_chunk.set()
                    long_tokens[chunk.sample_index] += len(chunk.token_ids)
                    if chunk.finish_reason != P.FINISH_REASON_UNSPECIFIED:
                        events.append("long finished")

            reader = asyncio.ensure_future(read_long())
            await first_chunk.wait()
            reply = await stub.Generate(short, timeout=60)
            events.append("short answered")
            await reader
            return reply, events, long_tokens

    try:
        reply, events, long_tokens = asyncio.run(scenario())
    finally:
        proc.terminate()
    assert list(reply.results[0].candidates[0].token_ids) == generate_tokens(
        tiny_model, [[5, 6, 7, 8, 9]], SamplingParams(max_new_tokens=3, temperature=0, stop_token_ids=(eos,)))[0][0].token_ids
    assert long_tokens == [240] * 4 and events.count("long finished") == 4
    assert events.index("short answered") < events.index("long finished"), events


def test_int8_policy_decodes_with_the_quantized_weights(spawn, policy_data, tiny_model):
    import copy

    from palm_rlhf import cpu_linear

    if not cpu_linear.int8_available():
        pytest.skip("no working torch._weight_int8pack_mm in this PyTorch build")
    proc = spawn("policy", policy_data, "--quantize", "int8").wait_ready()
    prompt = [1, 76, 105, 108, 108, 112]
    sp = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(2,))
    quantized = generate_tokens(copy.deepcopy(tiny_model).quantize_int8(), [prompt], sp)[0][0]
    full = generate_tokens(tiny_model, [prompt], sp)[0][0]
    try:
        with create_sync_channel(proc.addr) as ch:
            r = gen(policy_pb2_grpc.PolicyStub(ch), [prompt], temperature=0, max_new_tokens=12, return_logprobs=True)
    finally:
        proc.terminate()
    c = r.results[0].candidates[0]
    n = len(c.token_ids)
    assert list(c.token_ids) == [t for t in quantized.token_ids if t != 2]
    assert list(c.logprobs) == pytest.approx(quantized.logprobs[:n], abs=1e-4)
    assert list(c.logprobs) != pytest.approx(full.logprobs[:n], abs=1e-6)
