"""A corpus of malformed requests over HTTP (gateway) and gRPC (policy, reward, trainer).

Each one must get a clear client error (4xx; INVALID_ARGUMENT, RESOURCE_EXHAUSTED, NOT_FOUND,
OUT_OF_RANGE) -- or, for odd but valid input such as SQL-looking text, a normal answer -- and
never a 5xx/INTERNAL/UNKNOWN. Afterwards every process still answers its health check.
"""

from __future__ import annotations

import json
import socket
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest

from palm_rlhf.proto.v1 import (
    common_pb2,
    policy_pb2,
    policy_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

harness = sys.modules["palm_rlhf_test_harness"]
ADMIN_TOKEN, API_KEY, MAX_MESSAGE_BYTES = harness.ADMIN_TOKEN, harness.API_KEY, harness.MAX_MESSAGE_BYTES

CLIENT_ERRORS = frozenset(range(400, 500)) - {401, 403, 429}  # auth and shedding are not judgements of input


@dataclass
class HttpCase:
    category: str
    name: str
    method: str
    path: str
    kw: dict[str, Any] = field(default_factory=dict)
    ok: frozenset[int] = CLIENT_ERRORS  # acceptable statuses


def chat(**body) -> dict[str, Any]:
    return {"json": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}}


def raw(text: str | bytes) -> dict[str, Any]:
    return {"content": text.encode() if isinstance(text, str) else text,
            "headers": {"Content-Type": "application/json"}}


def nested(depth: int) -> str:
    return '{"messages": ' + "[" * depth + "]" * depth + "}"


VALID = frozenset({200})


def http_corpus(cid: str) -> list[HttpCase]:
    C = "/v1/chat/completions"
    F = "/v1/feedback"
    fb = {"completion_id": cid, "choice_index": 0, "thumbs": "up"}
    cases = [
        # huge input
        HttpCase("huge", "message over the per-message limit", "POST", C, chat(messages=[
            {"role": "user", "content": "x" * 40_000}])),
        HttpCase("huge", "body over 1 MiB", "POST", C, raw(json.dumps({"messages": [
            {"role": "user", "content": "y" * 30_000}] * 40}))),
        HttpCase("huge", "prompt longer than the policy accepts", "POST", C, chat(messages=[
            {"role": "user", "content": "z" * 2_000}])),
        HttpCase("huge", "max_tokens beyond the policy limit", "POST", C, chat(max_tokens=4000)),
        HttpCase("huge", "300 messages", "POST", C, chat(messages=[{"role": "user", "content": "a"}] * 300)),
        # invalid encodings
        HttpCase("encoding", "invalid UTF-8 in the body", "POST", C, raw(
            b'{"messages": [{"role": "user", "content": "\xff\xfe\xfa"}]}')),
        HttpCase("encoding", "lone surrogate escape", "POST", C, raw(
            '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 4}'), VALID | CLIENT_ERRORS),
        HttpCase("encoding", "not JSON at all", "POST", C, raw("hello there")),
        HttpCase("encoding", "truncated JSON", "POST", C, raw('{"messages": [{"role": "us')),
        HttpCase("encoding", "empty body", "POST", C, raw(b"")),
        HttpCase("encoding", "form-encoded body", "POST", C, {"data": {"messages": "hi"}}),
        # wrong JSON types
        HttpCase("types", "messages is a string", "POST", C, chat(messages="hello")),
        HttpCase("types", "messages is null", "POST", C, chat(messages=None)),
        HttpCase("types", "content is a number", "POST", C, chat(messages=[{"role": "user", "content": 5}])),
        HttpCase("types", "unknown role", "POST", C, chat(messages=[{"role": "wizard", "content": "x"}])),
        HttpCase("types", "n is a string", "POST", C, chat(n="two")),
        HttpCase("types", "temperature is a list", "POST", C, chat(temperature=[1])),
        HttpCase("types", "stop is a number", "POST", C, chat(stop=7)),
        HttpCase("types", "body is a list", "POST", C, raw("[1, 2, 3]")),
        HttpCase("types", "body is null", "POST", C, raw("null")),
        HttpCase("types", "feedback thumbs sideways", "POST", F, {"json": {**fb, "thumbs": "sideways"}}),
        HttpCase("types", "feedback rating is a string", "POST", F, {"json": {
            "completion_id": cid, "choice_index": 0, "rating": "five"}}),
        HttpCase("types", "feedback completion_id is an object", "POST", F, {"json": {**fb, "completion_id": {}}}),
        # NaN / Infinity
        HttpCase("nan", "temperature NaN", "POST", C, raw('{"messages": [{"role": "user", "content": "x"}], '
                                                          '"temperature": NaN}')),
        HttpCase("nan", "temperature Infinity", "POST", C, raw('{"messages": [{"role": "user", "content": "x"}], '
                                                               '"temperature": Infinity}')),
        HttpCase("nan", "top_p -Infinity", "POST", C, raw('{"messages": [{"role": "user", "content": "x"}], '
                                                          '"top_p": -Infinity}')),
        HttpCase("nan", "n NaN", "POST", C, raw('{"messages": [{"role": "user", "content": "x"}], "n": NaN}')),
        HttpCase("nan", "seed 1e400", "POST", C, raw('{"messages": [{"role": "user", "content": "x"}], '
                                                     '"seed": 1e400}')),
        HttpCase("nan", "rating NaN", "POST", F, raw(f'{{"completion_id": "{cid}", "choice_index": 0, '
                                                     f'"rating": NaN}}')),
        # sample counts
        HttpCase("counts", "n = 0", "POST", C, chat(n=0)),
        HttpCase("counts", "n = -1", "POST", C, chat(n=-1)),
        HttpCase("counts", "n = 10**9", "POST", C, chat(n=10**9)),
        HttpCase("counts", "best_of = 10**12", "POST", C, chat(best_of=10**12)),
        HttpCase("counts", "best_of < n", "POST", C, chat(n=3, best_of=2)),
        HttpCase("counts", "n = 2**70", "POST", C, chat(n=2**70)),
        HttpCase("counts", "max_tokens = 0", "POST", C, chat(max_tokens=0)),
        # sampling parameters
        HttpCase("sampling", "negative temperature", "POST", C, chat(temperature=-0.5)),
        HttpCase("sampling", "temperature 1e309", "POST", C, raw('{"messages": [{"role": "user", "content": "x"}],'
                                                                 ' "temperature": 1e309}')),
        HttpCase("sampling", "top_p = 0", "POST", C, chat(top_p=0)),
        HttpCase("sampling", "top_p = 1.5", "POST", C, chat(top_p=1.5)),
        HttpCase("sampling", "five stop sequences", "POST", C, chat(stop=["a", "b", "c", "d", "e"])),
        HttpCase("sampling", "empty stop sequence", "POST", C, chat(stop=[""])),
        HttpCase("sampling", "negative seed", "POST", C, chat(seed=-1)),
        # feedback on things that do not exist
        HttpCase("unknown-ids", "feedback on an unknown completion", "POST", F, {"json": {
            **fb, "completion_id": "chatcmpl-doesnotexist"}}),
        HttpCase("unknown-ids", "feedback list for an unknown completion", "GET", F, {"params": {
            "completion_id": "chatcmpl-nope"}}),
        HttpCase("unknown-ids", "feedback list without completion_id", "GET", F),
        HttpCase("unknown-ids", "stored completion that does not exist", "GET", "/v1/completions/chatcmpl-none"),
        HttpCase("unknown-ids", "choice index out of range", "POST", F, {"json": {**fb, "choice_index": 99}}),
        HttpCase("unknown-ids", "negative choice index", "POST", F, {"json": {**fb, "choice_index": -1}}),
        HttpCase("unknown-ids", "preference beyond best_of", "POST", F, {"json": {
            "completion_id": cid, "preferred_index": 0, "rejected_index": 50}}),
        HttpCase("unknown-ids", "preferring a candidate to itself", "POST", F, {"json": {
            "completion_id": cid, "preferred_index": 1, "rejected_index": 1}}),
        HttpCase("unknown-ids", "two kinds of feedback at once", "POST", F, {"json": {**fb, "rating": 3}}),
        HttpCase("unknown-ids", "rating 6", "POST", F, {"json": {"completion_id": cid, "choice_index": 0,
                                                                 "rating": 6}}),
        HttpCase("unknown-ids", "unknown field", "POST", F, {"json": {**fb, "admin": True}}),
        HttpCase("unknown-ids", "over-long Idempotency-Key", "POST", F, {"json": fb,
                                                                         "headers": {"Idempotency-Key": "k" * 300}}),
        HttpCase("unknown-ids", "unknown route", "GET", "/v1/nothing-here"),
        HttpCase("unknown-ids", "wrong method", "DELETE", C),
        # SQL-looking text: valid input, stored and answered like any other
        HttpCase("sql", "SQL in a message", "POST", C, chat(messages=[
            {"role": "user", "content": "'; DROP TABLE feedback; --"}]), VALID),
        HttpCase("sql", "SQL as completion id", "POST", F, {"json": {**fb, "completion_id": "x' OR '1'='1"}},
                 frozenset({404})),
        HttpCase("sql", "SQL in the feedback list query", "GET", F, {"params": {
            "completion_id": "1; DELETE FROM feedback"}}, frozenset({404})),
        HttpCase("sql", "SQL in a comment", "POST", F, {"json": {**fb, "comment": "'); DELETE FROM completions;--"},
                                                        "headers": {"Idempotency-Key": "sql-comment"}},
                 frozenset({200, 201})),
        # NUL characters
        HttpCase("nul", "NUL inside a message", "POST", C, chat(messages=[
            {"role": "user", "content": "a\u0000b"}]), VALID | CLIENT_ERRORS),
        HttpCase("nul", "NUL in a feedback comment", "POST", F, {"json": {**fb, "comment": "x\u0000y"}},
                 frozenset({200, 201}) | CLIENT_ERRORS),
        HttpCase("nul", "NUL in a completion id", "POST", F, {"json": {**fb, "completion_id": "chatcmpl-\u0000"}}),
        HttpCase("nul", "NUL in a stop sequence", "POST", C, chat(stop=["\u0000"]), VALID | CLIENT_ERRORS),
        # empty things
        HttpCase("empty", "no messages", "POST", C, chat(messages=[])),
        HttpCase("empty", "empty content", "POST", C, chat(messages=[{"role": "user", "content": ""}]),
                 VALID | CLIENT_ERRORS),
        HttpCase("empty", "only a system message", "POST", C, chat(messages=[{"role": "system", "content": "be"}]),
                 VALID | CLIENT_ERRORS),
        HttpCase("empty", "empty object", "POST", C, raw("{}")),
        HttpCase("empty", "empty feedback", "POST", F, raw("{}")),
        HttpCase("empty", "empty completion id", "POST", F, {"json": {**fb, "completion_id": ""}}),
        # deeply nested JSON
        HttpCase("nesting", "nesting 100 deep", "POST", C, raw(nested(100))),
        HttpCase("nesting", "nesting 5,000 deep", "POST", C, raw(nested(5_000))),
        HttpCase("nesting", "nesting 100,000 deep", "POST", C, raw(nested(100_000))),
        HttpCase("nesting", "deep object in a feedback comment", "POST", F, raw(
            '{"completion_id": "x", "comment": ' + '{"a": ' * 20_000 + "1" + "}" * 20_000 + "}")),
    ]
    return cases


def test_http_bad_input_gets_client_errors_and_the_gateway_survives(keyed_gateway):
    gw = keyed_gateway
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=gw.url, headers=auth, timeout=60) as http:
        first = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "best_of": 3, "max_tokens": 4})
        assert first.status_code == 200, first.text
        cid = first.json()["id"]
        failures, by_category = [], Counter()
        for case in http_corpus(cid):
            kw = {**case.kw}
            kw["headers"] = {**auth, **kw.get("headers", {})}
            try:
                resp = http.request(case.method, case.path, **kw)
            except httpx.HTTPError as e:
                failures.append(f"[{case.category}] {case.name}: transport error {type(e).__name__}: {e}")
                continue
            by_category[case.category] += 1
            if resp.status_code not in case.ok or resp.status_code >= 500:
                failures.append(f"[{case.category}] {case.name}: HTTP {resp.status_code} {resp.text[:160]!r}")
            elif resp.status_code >= 400:
                # a clear error: OpenAI-shaped JSON with a message, and no traceback
                try:
                    err = resp.json()["error"]
                    assert err["message"] and "Traceback" not in resp.text
                except (ValueError, KeyError, AssertionError):
                    failures.append(f"[{case.category}] {case.name}: unclear error body {resp.text[:160]!r}")
        print(f"\nHTTP BAD INPUT {sum(by_category.values())} cases: {dict(by_category)}")
        assert gw.alive(), "the gateway process died"
        assert http.get("/healthz").status_code == 200
        # the SQL-looking text left the log intact: the first completion and its feedback are there
        assert http.get("/v1/feedback", params={"completion_id": cid}).status_code == 200
        assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "still ok?"}],
                                                        "max_tokens": 4}).status_code == 200
    assert not failures, "\n".join(failures)


def raw_http(port: int, request: bytes) -> bytes:
    """Send bytes as they are (no client library would send these) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("name, request_bytes", [
    ("Content-Length beyond the limit", (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
     b"Content-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n{}")),
    ("negative Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}"),
    ("garbage request line", b"\x00\xff\xfe GARBAGE\r\n\r\n"),
    ("header without a colon", b"GET /healthz HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n"),
])
def test_malformed_http_framing_is_refused_and_the_gateway_survives(keyed_gateway, name, request_bytes):
    answer = raw_http(keyed_gateway.port, request_bytes)
    if answer:  # closing the connection without an answer is also a refusal
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, (name, answer[:200])
    assert keyed_gateway.alive()
    assert httpx.get(f"{keyed_gateway.url}/healthz", timeout=10).status_code == 200


# --------------------------------------------------------------------------------------------
# gRPC

GRPC_CLIENT_ERRORS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
                                grpc.StatusCode.FAILED_PRECONDITION})
OK = frozenset({grpc.StatusCode.OK})


def P(text=None, ids=None) -> policy_pb2.Prompt:
    if ids is not None:
        return policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ids))
    return policy_pb2.Prompt(text=text) if text is not None else policy_pb2.Prompt()


def gen(*prompts, **params) -> policy_pb2.GenerateRequest:
    return policy_pb2.GenerateRequest(prompts=list(prompts) or [P("hi")],
                                      params=policy_pb2.SamplingParams(max_new_tokens=4, **params))


def score(*items, scorer="") -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=p, responses=rs) for p, rs in items],
                                   scorer=scorer)


def raw_bytes_call(channel, method: str, payload: bytes, timeout: float = 30, metadata=()):
    fn = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return fn(payload, timeout=timeout, metadata=metadata)


def grpc_corpus(policy, reward, trainer, channels, admin) -> list[tuple[str, str, Any, frozenset]]:
    """(category, name, thunk, acceptable codes)."""
    big = "w" * (MAX_MESSAGE_BYTES + 1024)
    pol, rew = channels["policy"], channels["reward"]
    bad_utf8_prompt = b"\x0a\x05\x0a\x03\xff\xfe\xfa"  # GenerateRequest{prompts: [Prompt{text: <bad UTF-8>}]}
    return [
        ("empty", "Generate without prompts", lambda: policy.Generate(policy_pb2.GenerateRequest()), GRPC_CLIENT_ERRORS),
        ("empty", "prompt with neither text nor ids", lambda: policy.Generate(gen(P())), GRPC_CLIENT_ERRORS),
        ("empty", "empty text prompt", lambda: policy.Generate(gen(P(""))), GRPC_CLIENT_ERRORS),
        ("empty", "empty token id list", lambda: policy.Generate(gen(P(ids=[]))), GRPC_CLIENT_ERRORS),
        ("empty", "Score without items", lambda: reward.Score(reward_pb2.ScoreRequest()), GRPC_CLIENT_ERRORS),
        ("empty", "Score item without responses", lambda: reward.Score(score(("p", []))), GRPC_CLIENT_ERRORS),
        ("empty", "empty response text", lambda: reward.Score(score(("p", [""]))), OK | GRPC_CLIENT_ERRORS),
        ("token-ids", "id = vocab size", lambda: policy.Generate(gen(P(ids=[1, 260]))), GRPC_CLIENT_ERRORS),
        ("token-ids", "id = 2**31-1", lambda: policy.Generate(gen(P(ids=[2**31 - 1]))), GRPC_CLIENT_ERRORS),
        ("token-ids", "negative id", lambda: policy.Generate(gen(P(ids=[1, -5]))), GRPC_CLIENT_ERRORS),
        ("token-ids", "stop id out of range", lambda: policy.Generate(gen(stop_token_ids=[10**6])),
         GRPC_CLIENT_ERRORS),
        ("counts", "n = 0", lambda: policy.Generate(gen(n=0)), GRPC_CLIENT_ERRORS),
        ("counts", "n = -3", lambda: policy.Generate(gen(n=-3)), GRPC_CLIENT_ERRORS),
        ("counts", "n = 2**31-1", lambda: policy.Generate(gen(n=2**31 - 1)), GRPC_CLIENT_ERRORS),
        ("counts", "max_new_tokens = 0", lambda: policy.Generate(policy_pb2.GenerateRequest(
            prompts=[P("x")], params=policy_pb2.SamplingParams(max_new_tokens=0))), GRPC_CLIENT_ERRORS),
        ("counts", "max_new_tokens = 2**31-1", lambda: policy.Generate(policy_pb2.GenerateRequest(
            prompts=[P("x")], params=policy_pb2.SamplingParams(max_new_tokens=2**31 - 1))), GRPC_CLIENT_ERRORS),
        ("counts", "more prompts than max_batch", lambda: policy.Generate(gen(*[P("a")] * 50)), GRPC_CLIENT_ERRORS),
        ("counts", "more responses than max_batch", lambda: reward.Score(score(("p", ["r"] * 500))),
         GRPC_CLIENT_ERRORS),
        ("sampling", "negative temperature", lambda: policy.Generate(gen(temperature=-1)), GRPC_CLIENT_ERRORS),
        ("nan", "temperature NaN", lambda: policy.Generate(gen(temperature=float("nan"))), GRPC_CLIENT_ERRORS),
        ("nan", "temperature inf", lambda: policy.Generate(gen(temperature=float("inf"))), GRPC_CLIENT_ERRORS),
        ("nan", "top_p NaN", lambda: policy.Generate(gen(top_p=float("nan"))), GRPC_CLIENT_ERRORS),
        ("sampling", "top_p = 0", lambda: policy.Generate(gen(top_p=0.0)), GRPC_CLIENT_ERRORS),
        ("sampling", "top_p = 2", lambda: policy.Generate(gen(top_p=2.0)), GRPC_CLIENT_ERRORS),
        ("sampling", "top_k = -1", lambda: policy.Generate(gen(top_k=-1)), GRPC_CLIENT_ERRORS),
        ("sampling", "empty stop sequence", lambda: policy.Generate(gen(stop=[""])), GRPC_CLIENT_ERRORS),
        ("sampling", "unknown scorer", lambda: reward.Score(score(("p", ["r"]), scorer="'; DROP")),
         GRPC_CLIENT_ERRORS),
        ("huge", "prompt longer than max_prompt_tokens", lambda: policy.Generate(gen(P("q" * 5000))),
         GRPC_CLIENT_ERRORS),
        ("huge", "message over the server's size limit", lambda: policy.Generate(gen(P(big))),
         frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})),
        ("huge", "reward input over the size limit", lambda: reward.Score(score(("p", [big]))),
         frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})),
        ("huge", "200 kB response to score", lambda: reward.Score(score(("p", ["long " * 40_000]))),
         OK | GRPC_CLIENT_ERRORS),
        ("encoding", "invalid UTF-8 in a string field", lambda: raw_bytes_call(
            pol, "/palm_rlhf.v1.Policy/Generate", bad_utf8_prompt), GRPC_CLIENT_ERRORS),
        ("encoding", "bytes that are not protobuf", lambda: raw_bytes_call(
            rew, "/palm_rlhf.v1.Reward/Score", b"\xff\xff\xff\xff\xff\xff"), GRPC_CLIENT_ERRORS),
        ("nul", "NUL in a text prompt", lambda: policy.Generate(gen(P("a\x00b"))), OK | GRPC_CLIENT_ERRORS),
        ("nul", "NUL in a response to score", lambda: reward.Score(score(("p\x00", ["r\x00s"]))),
         OK | GRPC_CLIENT_ERRORS),
        ("sql", "SQL-looking prompt", lambda: policy.Generate(gen(P("'; DROP TABLE x; --"))), OK),
        ("unknown-ids", "LoadVersion of an unknown version", lambda: policy.LoadVersion(
            common_pb2.LoadVersionRequest(version="v9999"), metadata=admin), GRPC_CLIENT_ERRORS),
        ("unknown-ids", "LoadVersion with a path", lambda: reward.LoadVersion(
            common_pb2.LoadVersionRequest(version="../../policy/v0001"), metadata=admin), GRPC_CLIENT_ERRORS),
        ("unknown-ids", "Rollback to an unknown version", lambda: trainer.Rollback(
            trainer_pb2.RollbackRequest(version="v0077"), metadata=admin), GRPC_CLIENT_ERRORS),
        ("unknown-ids", "Rollback to a path", lambda: trainer.Rollback(
            trainer_pb2.RollbackRequest(version="/etc/passwd"), metadata=admin), GRPC_CLIENT_ERRORS),
    ]


def test_grpc_bad_input_gets_client_status_codes_and_services_survive(stack):
    # the client allows huge messages so the servers are the ones that must refuse them
    opts = [("grpc.max_send_message_length", 256 * 1024 * 1024), ("grpc.max_receive_message_length", 64 << 20)]
    channels = {p.role: grpc.insecure_channel(p.addr, options=opts) for p in stack.services}
    try:
        policy = policy_pb2_grpc.PolicyStub(channels["policy"])
        reward = reward_pb2_grpc.RewardStub(channels["reward"])
        trainer = trainer_pb2_grpc.TrainerStub(channels["trainer"])
        admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        failures, by_category = [], Counter()
        for category, name, thunk, ok in grpc_corpus(policy, reward, trainer, channels, admin):
            by_category[category] += 1
            try:
                thunk()
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
            if code not in ok:
                failures.append(f"[{category}] {name}: {code.name} {details[:160]!r}")
            elif code != grpc.StatusCode.OK and (not details or "Traceback" in details):
                failures.append(f"[{category}] {name}: {code.name} without a clear message: {details[:160]!r}")
        print(f"\ngRPC BAD INPUT {sum(by_category.values())} cases: {dict(by_category)}")
        for p in stack.services:
            assert p.alive(), f"{p.role} died"
            assert p.is_ready(), f"{p.role} no longer SERVING"
        assert policy.Generate(gen(P("still fine?"))).results[0].candidates
    finally:
        for ch in channels.values():
            ch.close()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("role", ["policy", "reward"])
def test_metrics_endpoints_survive_junk(stack, role):
    """The Prometheus port is an HTTP server too: junk paths and methods must not kill it."""
    proc = getattr(stack, role)
    text = proc.logs()
    port = int(text.split("metrics http://127.0.0.1:")[1].split("/")[0])
    for method, path in (("GET", "/metrics"), ("GET", "/../../etc/passwd"), ("POST", "/metrics"),
                         ("GET", "/" + "a" * 10_000)):
        try:
            r = httpx.request(method, f"http://127.0.0.1:{port}{path}", timeout=10)
            assert r.status_code < 500 or r.status_code == 501 or method == "POST", (method, path, r.status_code)
        except httpx.HTTPError:
            pass  # a closed connection is an acceptable refusal; the process must survive
    assert proc.alive() and proc.is_ready()
