"""The default rate limit: a person chatting and rating every answer never reaches it, a flood
from one client does (429 with Retry-After), and buckets stay per API key.

Requests are charged by cost (``request_cost``): a chat completion takes 1 unit of the bucket,
a feedback row or a read 0.1, so the thumbs on each candidate plus a preference that one chat
may produce cost half a chat together."""

from __future__ import annotations

import argparse

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import GatewayConfig, create_app
from services.gateway.auth import (
    DEFAULT_RATE_LIMIT,
    GENERATION_COST,
    LIGHT_COST,
    RateLimit,
    RateLimiter,
    request_cost,
)

CHAT = "/v1/chat/completions"
FEEDBACK = "/v1/feedback"
MESSAGES = [{"role": "user", "content": "How was your day?"}]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def default_limiter() -> tuple[RateLimiter, Clock]:
    clock = Clock()
    limit = RateLimit.parse(DEFAULT_RATE_LIMIT)
    assert limit is not None
    return RateLimiter(limit, clock=clock), clock


def test_request_costs():
    assert request_cost("POST", CHAT) == GENERATION_COST == 1.0
    assert request_cost("GET", "/v1/feedback/export") == GENERATION_COST
    assert request_cost("POST", "/api" + CHAT + "/") == GENERATION_COST  # behind a mount prefix
    assert request_cost("POST", FEEDBACK) == LIGHT_COST < GENERATION_COST / 5
    assert request_cost("GET", FEEDBACK) == request_cost("GET", "/v1/models") == LIGHT_COST
    assert request_cost("GET", "/v1/chat/completions/chatcmpl-1") == LIGHT_COST  # reading one back


# seconds per chat completion: the fastest a sequential client got from the demo model on two
# CPU cores (max_tokens=1: 12.3 chats/s with five feedback posts each), the low end of a real
# answer, and a typical best-of-4 answer
@pytest.mark.parametrize("chat_s", [0.066, 0.1, 0.5])
def test_a_sequential_client_chatting_and_rating_is_never_refused(chat_s):
    lim, clock = default_limiter()
    feedback_s, per_chat = 0.003, 5  # thumbs on each of 4 candidates plus a preference
    chats = 0
    end = clock.t + 600.0  # ten minutes
    while clock.t < end:
        assert lim.acquire("key:alice", request_cost("POST", CHAT)) == 0, f"chat {chats} refused"
        clock.t += chat_s
        chats += 1
        for i in range(per_chat):
            assert lim.acquire("key:alice", request_cost("POST", FEEDBACK)) == 0, (
                f"feedback {i} of chat {chats}"
            )
            clock.t += feedback_s
    assert chats >= 600 / (0.5 + per_chat * feedback_s) - 1


def test_a_flood_from_one_client_is_refused_with_a_wait():
    lim, clock = default_limiter()
    waits = []
    for _ in range(1000):  # 1000 chat requests within one second
        waits.append(lim.acquire("key:flood", request_cost("POST", CHAT)))
        clock.t += 0.001
    refused = [w for w in waits if w > 0]
    assert len(refused) >= 600 and all(w > 0 for w in refused)
    assert 0 < min(refused) <= max(refused) <= 1.0  # Retry-After: about one chat's worth of refill
    assert lim.acquire("key:other", request_cost("POST", CHAT)) == 0  # another client is unaffected

    lim, clock = default_limiter()  # a tight loop of cheap feedback posts: 1000 a second for 10 s
    refused_fb = 0
    for _ in range(10_000):
        refused_fb += lim.acquire("key:flood", request_cost("POST", FEEDBACK)) > 0
        clock.t += 0.001
    assert refused_fb >= 5000


# --------------------------------------------------------------------------------------------
# over HTTP, against the real app


def app_client(backends, store, **config) -> TestClient:
    return TestClient(create_app(backends, store, GatewayConfig(**config)))


def chat_and_rate(client: TestClient, headers: dict | None = None) -> list[int]:
    """One chat with four candidates shown, thumbs on each, a preference, and a read-back:
    the status codes of the seven requests."""
    headers = headers or {}
    body = {"model": "palm-rlhf", "messages": MESSAGES, "n": 4, "best_of": 4}
    r = client.post(CHAT, json=body, headers=headers)
    codes = [r.status_code]
    if r.status_code != 200:
        return codes
    cid = r.json()["id"]
    for i in range(4):
        fb = {"completion_id": cid, "choice_index": i, "thumbs": "up" if i % 2 else "down"}
        codes.append(client.post(FEEDBACK, json=fb, headers=headers).status_code)
    fb = {"completion_id": cid, "preferred_index": 1, "rejected_index": 0}
    codes.append(client.post(FEEDBACK, json=fb, headers=headers).status_code)
    codes.append(client.get(FEEDBACK, params={"completion_id": cid}, headers=headers).status_code)
    return codes


def test_sequential_chat_and_feedback_never_gets_429_on_the_default_limit(fake_backends, sqlite_store):
    client = app_client(fake_backends, sqlite_store, rate_limit=RateLimit.parse(DEFAULT_RATE_LIMIT))
    codes = [c for _ in range(60) for c in chat_and_rate(client)]  # per client address, no keys
    assert codes == [200] * 60 * 7
    assert sqlite_store.counts()["feedback"] == 60 * 5


def test_default_limit_is_per_key_for_several_sequential_clients(fake_backends, sqlite_store):
    client = app_client(
        fake_backends, sqlite_store, api_keys=["k1", "k2"], rate_limit=RateLimit.parse(DEFAULT_RATE_LIMIT)
    )
    for _ in range(40):
        for key in ("k1", "k2"):
            assert chat_and_rate(client, {"Authorization": f"Bearer {key}"}) == [200] * 7


def test_a_burst_over_a_small_limit_gets_429_with_retry_after_per_key(fake_backends, sqlite_store):
    client = app_client(
        fake_backends, sqlite_store, api_keys=["a", "b"], rate_limit=RateLimit.parse("6/min:3")
    )
    h_a, h_b = {"Authorization": "Bearer a"}, {"Authorization": "Bearer b"}
    body = {"model": "palm-rlhf", "messages": MESSAGES}
    codes = [client.post(CHAT, json=body, headers=h_a).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    r = client.post(CHAT, json=body, headers=h_a)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert client.post(CHAT, json=body, headers=h_b).status_code == 200  # b has its own bucket
    r = client.post(FEEDBACK, json={"completion_id": "x", "choice_index": 0, "thumbs": "up"}, headers=h_a)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1  # a is out, even for feedback


def test_feedback_costs_a_tenth_of_a_chat_over_http(fake_backends, sqlite_store):
    client = app_client(fake_backends, sqlite_store, rate_limit=RateLimit(rate=1e-4, burst=2.0))
    r = client.post(CHAT, json={"model": "palm-rlhf", "messages": MESSAGES, "best_of": 2})
    assert r.status_code == 200
    cid = r.json()["id"]
    fb = {"completion_id": cid, "choice_index": 0, "thumbs": "up"}
    codes = [client.post(FEEDBACK, json=fb).status_code for _ in range(12)]
    assert codes[:9] == [200] * 9 and codes[-1] == 429  # 1 + 10 x 0.1 units fill a bucket of 2


def test_every_entry_point_has_the_same_default(monkeypatch):
    from services.common.config import add_serve_arguments
    from services.gateway.__main__ import build_parser
    from services.supervisor import add_up_arguments

    monkeypatch.delenv("PALM_RLHF_RATE_LIMIT", raising=False)
    serve = argparse.ArgumentParser()
    add_serve_arguments(serve)
    assert serve.parse_args(["gateway"]).rate_limit == DEFAULT_RATE_LIMIT
    up = argparse.ArgumentParser()
    add_up_arguments(up)
    assert up.parse_args([]).rate_limit == DEFAULT_RATE_LIMIT
    gateway = build_parser()
    assert gateway.parse_args([]).rate_limit is None  # run_gateway falls back to DEFAULT_RATE_LIMIT
    assert DEFAULT_RATE_LIMIT in gateway.format_help().replace("\n", " ").replace("  ", " ")
