"""The HTTP API over an honest in-memory Backends and a real SQLite store: ranking, the log,
feedback, errors, auth, limits, streaming, metrics, and the official openai client."""

from __future__ import annotations

import argparse
import json

import pytest
from fastapi.testclient import TestClient

from palm_rlhf.chat import clean_response, format_chat
from services.gateway.app import GatewayConfig, create_app, run_gateway
from services.gateway.auth import RateLimit, RateLimiter
from services.gateway.backends import BackendError

from .conftest import ThreadServer, fake_score

MESSAGES = [{"role": "user", "content": "How was your day?"}]


def make_client(backends, store, **config) -> TestClient:
    return TestClient(create_app(backends, store, GatewayConfig(**config)))


def chat(client, headers=None, **body):
    payload = {"model": "palm-rlhf", "messages": MESSAGES, **body}
    return client.post("/v1/chat/completions", json=payload, headers=headers or {})


def test_best_of_returns_the_n_highest_rewards_and_logs_every_candidate(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store)
    r = chat(client, n=2, best_of=6, seed=11, temperature=0.9, max_tokens=40)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert (body["policy_version"], body["reward_version"], body["best_of"]) == ("v0007", "v0003", 6)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    rec = sqlite_store.get_completion(body["id"])
    assert rec.prompt_text == format_chat(MESSAGES)
    assert len(rec.candidates) == 6 and sum(c.shown for c in rec.candidates) == 2
    # every candidate's reward is the scorer's value of its cleaned text; ranks follow reward
    all_rewards = [fake_score(c.text) for c in rec.candidates]
    assert [c.reward for c in rec.candidates] == pytest.approx(all_rewards)
    assert all_rewards == sorted(all_rewards, reverse=True)
    for choice, cand in zip(body["choices"], rec.candidates):
        assert choice["message"]["content"] == cand.text
        assert choice["reward"] == pytest.approx(fake_score(choice["message"]["content"]))
    for c in rec.candidates:
        assert c.text == clean_response(c.raw_text) and "\n" not in c.text
        assert len(c.logprobs) == len(c.token_ids) > 0
    assert sorted(c.sample_index for c in rec.candidates) == list(range(6))
    assert rec.sampling["seed"] == 11 and rec.sampling["max_tokens"] == 40
    assert body["usage"]["completion_tokens"] == sum(len(c.token_ids) for c in rec.candidates)
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    assert fake_backends.calls[:2] == [("generate", 6), ("score", 6)]


def test_invalid_requests_get_openai_shaped_400s(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store)
    cases = [
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"temperature": -1}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ]
    for extra, where in cases:
        r = chat(client, **extra)
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and where in err["message"], err
    r = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "error" in r.json()
    # the policy's own validation comes back as a 400 with its message
    r = chat(client, max_tokens=1000)
    assert r.status_code == 400 and "max_new_tokens" in r.json()["error"]["message"]


def test_backend_failures_and_overload_become_503(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store)
    fake_backends.fail_score = BackendError("reward", "unavailable", "the reward service at x is unavailable")
    r = chat(client)
    assert r.status_code == 503 and "reward" in r.json()["error"]["message"]
    fake_backends.fail_score = None
    fake_backends.fail_generate = BackendError("policy", "timeout", "no answer from the policy service")
    r = chat(client)
    assert r.status_code == 503 and r.json()["error"]["code"] == "policy_timeout"
    fake_backends.fail_generate = BackendError("policy", "overloaded", "queue full")
    r = chat(client)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "overloaded"
    assert sqlite_store.counts()["completions"] == 0  # failed requests log nothing


def test_readyz_names_the_backend_that_is_down(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store)
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["backends"] == {"policy": "SERVING", "reward": "SERVING"}
    fake_backends.reward_status = "NOT_SERVING"
    r = client.get("/readyz")
    assert r.status_code == 503
    assert (
        "reward (NOT_SERVING)" in r.json()["error"]["message"]
        and "policy" not in r.json()["error"]["message"]
    )


def test_feedback_kinds_validation_and_read_back(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store)
    cid = chat(client, n=1, best_of=3).json()["id"]
    ok = [
        {"completion_id": cid, "choice_index": 0, "thumbs": "up"},
        {"completion_id": cid, "choice_index": 2, "rating": 4, "comment": "hidden one is nice"},
        {"completion_id": cid, "preferred_index": 2, "rejected_index": 0},
    ]
    for body in ok:
        r = client.post("/v1/feedback", json=body)
        assert r.status_code == 200, r.text
    r = client.post(
        "/v1/feedback", json={"completion_id": "chatcmpl-nope", "choice_index": 0, "thumbs": "up"}
    )
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.post("/v1/feedback", json={"completion_id": cid, "choice_index": 3, "thumbs": "down"})
    assert r.status_code == 422 and "out of range" in r.json()["error"]["message"]
    r = client.post("/v1/feedback", json={"completion_id": cid, "preferred_index": 0, "rejected_index": 7})
    assert r.status_code == 422
    for bad in (
        {"completion_id": cid, "choice_index": 0, "thumbs": "up", "rating": 3},  # two kinds
        {"completion_id": cid, "thumbs": "up"},  # no choice_index
        {"completion_id": cid, "choice_index": 0, "rating": 6},
        {"completion_id": cid, "choice_index": 0, "thumbs": "sideways"},
        {"completion_id": cid, "preferred_index": 1},
    ):
        assert client.post("/v1/feedback", json=bad).status_code == 400, bad
    listed = client.get("/v1/feedback", params={"completion_id": cid}).json()["data"]
    assert [(f["kind"], f["thumbs"], f["rating"]) for f in listed] == [
        ("thumbs", "up", None),
        ("rating", None, 4),
        ("preference", None, None),
    ]
    assert listed[1]["comment"] == "hidden one is nice"
    assert client.get("/v1/feedback", params={"completion_id": "nope"}).status_code == 404
    assert sqlite_store.counts()["feedback"] == 3


def test_idempotency_key_makes_a_retry_count_once_with_the_same_response(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store)
    cid = chat(client).json()["id"]
    body = {"completion_id": cid, "choice_index": 0, "rating": 5}
    r1 = client.post("/v1/feedback", json=body, headers={"Idempotency-Key": "abc"})
    r2 = client.post("/v1/feedback", json=body, headers={"Idempotency-Key": "abc"})
    assert r1.status_code == r2.status_code == 200 and r1.json() == r2.json()
    r3 = client.post("/v1/feedback", json={**body, "rating": 1}, headers={"Idempotency-Key": "abc"})
    assert r3.status_code == 409
    assert sqlite_store.counts()["feedback"] == 1
    client.post("/v1/feedback", json=body)  # no key: a second, separate rating
    assert sqlite_store.counts()["feedback"] == 2


def test_export_streams_jsonl_of_the_whole_interaction(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store, admin_token="adm")
    admin = {"Authorization": "Bearer adm"}
    ids = [chat(client, best_of=2).json()["id"] for _ in range(3)]
    client.post("/v1/feedback", json={"completion_id": ids[1], "choice_index": 1, "thumbs": "down"})
    assert client.get("/v1/feedback/export").status_code == 403  # without keys, still the admin's
    r = client.get("/v1/feedback/export", headers=admin)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert [d["id"] for d in lines] == ids
    assert lines[1]["feedback"][0]["choice_index"] == 1 and len(lines[1]["candidates"]) == 2
    only = client.get("/v1/feedback/export", params={"with_feedback_only": "true"}, headers=admin)
    assert [json.loads(x)["id"] for x in only.text.splitlines()] == [ids[1]]


def test_export_without_an_admin_token_is_refused_unless_open(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store)
    chat(client)
    for headers in ({}, {"Authorization": "Bearer anything"}):
        err = client.get("/v1/feedback/export", headers=headers)
        assert err.status_code == 403, err.text
        body = err.json()["error"]
        assert body["type"] == "permission_error"
        assert "--admin-token" in body["message"] and "PALM_RLHF_ADMIN_TOKEN_FILE" in body["message"]
    # a gateway run with --insecure-no-auth on loopback (and no admin token) leaves it open
    open_client = make_client(fake_backends, sqlite_store, open_admin=True)
    r = open_client.get("/v1/feedback/export")
    assert r.status_code == 200 and len(r.text.splitlines()) == 1


def test_api_keys_are_required_when_configured(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store, api_keys=["k-alpha", "k-beta"], admin_token="adm")
    r = chat(client)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert chat(client, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = chat(client, headers={"Authorization": "Bearer k-beta"})
    assert r.status_code == 200
    assert sqlite_store.get_completion(r.json()["id"]).client_id.startswith("key:")
    assert client.get("/healthz").status_code == 200  # probes stay open
    # the export is for the admin token only
    assert client.get("/v1/feedback/export", headers={"Authorization": "Bearer k-beta"}).status_code == 403
    assert client.get("/v1/feedback/export", headers={"Authorization": "Bearer adm"}).status_code == 200


def test_with_api_keys_a_completion_belongs_to_the_key_that_made_it(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store, api_keys=["k-alpha", "k-beta"], admin_token="adm")
    alpha, beta = {"Authorization": "Bearer k-alpha"}, {"Authorization": "Bearer k-beta"}
    cid = chat(client, headers=alpha).json()["id"]
    thumbs = {"completion_id": cid, "choice_index": 0, "thumbs": "up"}
    # another key sees what it would see for an id that does not exist
    for r in (
        client.get(f"/v1/completions/{cid}", headers=beta),
        client.get("/v1/feedback", params={"completion_id": cid}, headers=beta),
        client.post("/v1/feedback", json=thumbs, headers=beta),
    ):
        assert r.status_code == 404, r.text
        assert r.json()["error"]["message"] == client.get("/v1/completions/nope", headers=beta).json()["error"][
            "message"
        ].replace("nope", cid)
    assert sqlite_store.counts()["feedback"] == 0
    # the owner and the admin token may
    assert client.post("/v1/feedback", json=thumbs, headers=alpha).status_code == 200
    assert client.get(f"/v1/completions/{cid}", headers=alpha).status_code == 200
    assert client.get(f"/v1/completions/{cid}", headers={"Authorization": "Bearer adm"}).status_code == 200
    assert len(client.get("/v1/feedback", params={"completion_id": cid}, headers=alpha).json()["data"]) == 1


def test_rate_limit_answers_429_with_retry_after(fake_backends, sqlite_store):
    client = make_client(
        fake_backends, sqlite_store, api_keys=["a", "b"], rate_limit=RateLimit(rate=0.1, burst=2)
    )
    h_a, h_b = {"Authorization": "Bearer a"}, {"Authorization": "Bearer b"}
    assert chat(client, headers=h_a).status_code == 200
    assert chat(client, headers=h_a).status_code == 200
    r = chat(client, headers=h_a)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert chat(client, headers=h_b).status_code == 200  # buckets are per key


def test_token_bucket_refills_at_its_rate():
    now = [0.0]
    lim = RateLimiter(RateLimit(rate=2.0, burst=2), clock=lambda: now[0])
    assert lim.acquire("c") == 0 and lim.acquire("c") == 0
    assert lim.acquire("c") == pytest.approx(0.5)
    now[0] += 0.5
    assert lim.acquire("c") == 0
    assert RateLimit.parse("600/min:5") == RateLimit(rate=10.0, burst=5.0)
    assert RateLimit.parse("120") == RateLimit(rate=2.0, burst=20.0)  # a bare number is per minute
    assert RateLimit.parse("off") is None and RateLimit.parse(None) is None
    with pytest.raises(ValueError):
        RateLimit.parse("5/fortnight")


def test_body_size_limit_answers_413(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store, max_body_bytes=2000)
    r = chat(client, messages=[{"role": "user", "content": "x" * 5000}])
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def _sse(text: str) -> list:
    events = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_stream_live_forwards_tokens_and_stores_before_done(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store)
    r = chat(client, n=2, stream=True, seed=5, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(r.text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    cid = chunks[0]["id"]
    assert all(c["id"] == cid for c in chunks)
    text = {0: "", 1: ""}
    finals = {}
    for c in chunks:
        for ch in c["choices"]:
            text[ch["index"]] += ch["delta"].get("content", "")
            if ch["finish_reason"]:
                finals[ch["index"]] = ch
    rec = sqlite_store.get_completion(cid)
    by_sample = {c.sample_index: c for c in rec.candidates}
    for i in (0, 1):
        assert text[i] == by_sample[i].text  # what streamed is what was stored
        assert finals[i]["reward"] == pytest.approx(fake_score(text[i]))
        assert rec.candidates[finals[i]["rank"]].sample_index == i
    assert chunks[-1]["usage"]["completion_tokens"] == sum(len(c.token_ids) for c in rec.candidates)


def test_stream_with_best_of_sends_the_ranked_choices(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store)
    r = chat(client, n=1, best_of=4, stream=True, seed=3)
    chunks = _sse(r.text)
    rec = sqlite_store.get_completion(chunks[0]["id"])
    content = "".join(ch["delta"].get("content", "") for c in chunks for ch in c["choices"])
    assert content == rec.candidates[0].text
    assert chunks[-1]["choices"][0]["reward"] == pytest.approx(rec.candidates[0].reward)
    assert chunks[-1]["policy_version"] == "v0007"


def test_metrics_count_requests_best_of_and_feedback(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store)
    cid = chat(client, best_of=4).json()["id"]
    client.post("/v1/feedback", json={"completion_id": cid, "choice_index": 0, "thumbs": "up"})
    fake_backends.fail_generate = BackendError("policy", "unavailable", "down")
    chat(client)
    text = client.get("/metrics").text
    assert 'gateway_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'gateway_requests_total{method="POST",route="/v1/chat/completions",status="503"} 1.0' in text
    assert "gateway_best_of_sum 4.0" in text
    assert 'gateway_feedback_total{kind="thumbs"} 1.0' in text
    assert 'gateway_request_latency_seconds_count{route="/v1/feedback"} 1.0' in text


def test_web_page_and_openapi_are_served(fake_backends, sqlite_store):
    client = make_client(fake_backends, sqlite_store)
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "413", "429", "503"} <= set(post["responses"])
    assert "HTTPValidationError" not in json.dumps(spec)  # errors are documented in their real shape


def test_openai_client_works_unchanged(fake_backends, sqlite_store):
    import openai

    app = create_app(fake_backends, sqlite_store, GatewayConfig(api_keys=["sk-test"]))
    with ThreadServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-test", max_retries=0)
        resp = client.chat.completions.create(
            model="palm-rlhf", messages=MESSAGES, n=2, temperature=0.8, seed=1, extra_body={"best_of": 5}
        )
        assert len(resp.choices) == 2 and resp.choices[0].message.role == "assistant"
        extra = resp.model_extra
        assert extra["best_of"] == 5 and extra["policy_version"] == "v0007"
        rewards = [c.model_extra["reward"] for c in resp.choices]
        assert rewards == sorted(rewards, reverse=True)
        stream = client.chat.completions.create(model="palm-rlhf", messages=MESSAGES, stream=True, seed=2)
        chunks = list(stream)
        pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
        assert "".join(pieces) == sqlite_store.get_completion(chunks[0].id).candidates[0].text
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m", messages=MESSAGES, n=3, extra_body={"best_of": 2})
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="bad", max_retries=0).chat.completions.create(
                model="m", messages=MESSAGES
            )
        assert [m.id for m in client.models.list()] == ["palm-rlhf"]


def test_gateway_refuses_a_public_bind_without_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("PALM_RLHF_API_KEYS", raising=False)
    args = argparse.Namespace(
        host="0.0.0.0", port=0, data_dir=str(tmp_path), database_url=None, api_keys_file=None,
        policy_addr=None, reward_addr=None, reference_addr=None, trainer_addr=None,
        rate_limit=None, admin_token=None, log_level="info",
    )  # fmt: skip
    with pytest.raises(SystemExit, match="without API keys"):
        run_gateway(args)
    assert not (tmp_path / "feedback.db").exists()  # refused before touching anything
