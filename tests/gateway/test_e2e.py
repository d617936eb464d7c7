"""End to end over the wire: the gateway process in front of real policy and reward services
(tiny random checkpoint), driven with the official openai client and plain HTTP."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from services.common.feedback_store import open_store

from .conftest import E2E_ADMIN_TOKEN, E2E_KEY, HTTP_LISTEN, REPO, Proc, wait_http_ok

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you?"}]
AUTH = {"Authorization": f"Bearer {E2E_KEY}"}


def test_best_of_chat_through_real_services_is_logged_and_exported(stack, tmp_path):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=E2E_KEY, max_retries=0)
    resp = client.chat.completions.create(
        model="palm-rlhf",
        messages=MESSAGES,
        n=2,
        max_tokens=12,
        temperature=1.0,
        seed=7,
        extra_body={"best_of": 4},
    )
    assert len(resp.choices) == 2
    extra = resp.model_extra
    assert extra["policy_version"] == "v0001" and extra["reward_version"] == "v0001" and extra["best_of"] == 4
    rewards = [c.model_extra["reward"] for c in resp.choices]
    assert rewards == sorted(rewards, reverse=True)

    with open_store(f"sqlite:///{stack.db_path}") as store:
        rec = store.get_completion(resp.id)
    assert len(rec.candidates) == 4 and [c.shown for c in rec.candidates] == [True, True, False, False]
    all_rewards = [c.reward for c in rec.candidates]
    assert all_rewards == sorted(all_rewards, reverse=True)
    for c in rec.candidates:
        assert 0 < len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs)
    assert resp.usage.completion_tokens == sum(len(c.token_ids) for c in rec.candidates)
    assert rec.prompt_token_ids[0] == 1 and len(rec.prompt_token_ids) == resp.usage.prompt_tokens

    # the same seed gives the same candidates (the policy's contract), so the log is replayable
    again = client.chat.completions.create(
        model="palm-rlhf",
        messages=MESSAGES,
        n=2,
        max_tokens=12,
        temperature=1.0,
        seed=7,
        extra_body={"best_of": 4},
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in resp.choices]

    fb = {"completion_id": resp.id, "preferred_index": 3, "rejected_index": 0, "comment": "hidden one wins"}
    r1 = httpx.post(stack.url + "/v1/feedback", json=fb, headers={**AUTH, "Idempotency-Key": "e2e-1"})
    r2 = httpx.post(stack.url + "/v1/feedback", json=fb, headers={**AUTH, "Idempotency-Key": "e2e-1"})
    assert r1.status_code == 200 and r1.json() == r2.json()
    got = httpx.get(stack.url + "/v1/feedback", params={"completion_id": resp.id}, headers=AUTH).json()[
        "data"
    ]
    assert len(got) == 1 and got[0]["preferred_index"] == 3

    out = tmp_path / "log.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "palm_rlhf.cli",
        "feedback-export",
        "--database-url",
        f"sqlite:///{stack.db_path}",
    ]
    done = subprocess.run(
        [*cmd, "--out", str(out)], check=False, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = {d["id"]: d for d in map(json.loads, out.read_text().splitlines())}
    line = lines[resp.id]
    assert line["feedback"][0]["comment"] == "hidden one wins"
    assert [c["token_ids"] for c in line["candidates"]] == [c.token_ids for c in rec.candidates]
    # the HTTP export is the admin token's (read by the gateway from PALM_RLHF_ADMIN_TOKEN_FILE)
    assert httpx.get(stack.url + "/v1/feedback/export", headers=AUTH).status_code == 403
    admin = {"Authorization": f"Bearer {E2E_ADMIN_TOKEN}"}
    http_export = httpx.get(stack.url + "/v1/feedback/export", headers=admin).text.splitlines()
    assert {json.loads(x)["id"] for x in http_export} == set(lines)


def test_streaming_through_real_services_matches_the_log(stack):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=E2E_KEY, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="palm-rlhf", messages=MESSAGES, n=2, max_tokens=10, seed=3, stream=True
        )
    )
    text = {0: "", 1: ""}
    for ch in chunks:
        for c in ch.choices:
            text[c.index] += c.delta.content or ""
    with open_store(f"sqlite:///{stack.db_path}") as store:
        rec = store.get_completion(chunks[0].id)
    by_sample = {c.sample_index: c for c in rec.candidates}
    assert text == {0: by_sample[0].text, 1: by_sample[1].text}
    assert all(c.reward is not None for c in rec.candidates)


def _sample(url: str, name: str, labels: dict[str, str]) -> float:
    """A sample's value from the gateway's /metrics (0.0 when the labelled series does not exist yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_errors_over_the_wire(stack):
    bad = {"route": "/v1/chat/completions", "method": "POST", "status": "400"}
    before = _sample(stack.url, "gateway_requests_total", bad)
    assert httpx.post(stack.url + "/v1/chat/completions", json={"messages": MESSAGES}).status_code == 401
    # the policy refuses more tokens than its limit: a 400 carrying its reason
    r = httpx.post(
        stack.url + "/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 4000},
        headers=AUTH,
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert (
        r.json()["error"]["type"] == "invalid_request_error" and "limit is 48" in r.json()["error"]["message"]
    )
    assert _sample(stack.url, "gateway_requests_total", bad) == before + 1


def test_readyz_is_503_naming_the_reward_service_when_it_is_down(stack, tmp_path):
    gw = Proc(
        "gateway",
        ["--data-dir", str(tmp_path), "--policy-addr", stack.policy.addr, "--reward-addr", "127.0.0.1:1"],
        tmp_path,
        HTTP_LISTEN,
    )
    try:
        gw.wait_bound()
        url = f"http://{gw.addr}"
        wait_http_ok(url + "/healthz")
        r = httpx.get(url + "/readyz", timeout=10)
        assert r.status_code == 503
        assert r.json()["backends"] == {"policy": "SERVING", "reward": "UNAVAILABLE"}
        assert "reward" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "reward_unavailable"
        assert _sample(url, "gateway_backend_errors_total", {"backend": "reward", "kind": "unavailable"}) >= 1.0
    finally:
        gw.stop()


@pytest.mark.parametrize("host", ["0.0.0.0"])
def test_public_bind_without_keys_exits_with_a_clear_message(host, tmp_path):
    cmd = [sys.executable, "-m", "palm_rlhf.cli", "serve", "gateway", "--host", host, "--port", "0"]
    done = subprocess.run(
        [*cmd, "--data-dir", str(tmp_path)], check=False, cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PALM_RLHF_DEMO_AUTOBUILD": "0"},
    )  # fmt: skip
    assert done.returncode != 0 and "without API keys" in done.stderr


def test_an_idle_keep_alive_connection_outlives_the_clients_idle_expiry(stack):
    """Common HTTP clients drop an idle pooled connection after 5 s (httpx) to 15 s (aiohttp). If
    the server closed it first, a request sent just as the server closes fails with a transport
    error, so the gateway keeps idle connections open longer than that: a request on a connection
    idle for 6 s is answered on the same connection."""
    import socket
    import time

    host, port = stack.gateway.addr.rsplit(":", 1)
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    def ask(sock: socket.socket) -> bytes:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, "the gateway closed the connection"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
        while len(body) < length:
            body += sock.recv(4096)
        return head.split(b"\r\n", 1)[0]

    with socket.create_connection((host, int(port)), timeout=10) as sock:
        assert ask(sock) == b"HTTP/1.1 200 OK"
        time.sleep(6.0)
        assert ask(sock) == b"HTTP/1.1 200 OK"


def test_accepted_connections_have_nagle_off():
    """uvicorn writes headers and body in two sends; with Nagle's algorithm on, the body waits
    for the client's delayed ACK (about 40 ms per response). The gateway's listening socket must
    give asyncio's accepted transports TCP_NODELAY, as uvicorn serves it (create_server(sock=))."""
    import asyncio
    import socket

    from services.gateway.app import listening_socket

    async def accepted_nodelay() -> int:
        loop = asyncio.get_running_loop()
        seen: asyncio.Future = loop.create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        sock = listening_socket("127.0.0.1", 0)
        server = await loop.create_server(Probe, sock=sock)
        try:
            with socket.create_connection(sock.getsockname()[:2]):
                return await asyncio.wait_for(seen, 5)
        finally:
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_a_long_conversation_drops_its_oldest_turns_and_an_overlong_message_is_a_400(stack):
    # twelve turns of ~60 bytes: far more than the tiny model's 256-token context
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        messages.append({"role": "user", "content": f"Turn {i}: tell me something about the weather today."})
        messages.append({"role": "assistant", "content": f"Answer {i}: it is sunny and warm, a lovely day."})
    messages.append({"role": "user", "content": "And tomorrow?"})
    r = httpx.post(
        stack.url + "/v1/chat/completions", json={"messages": messages, "seed": 1}, headers=AUTH, timeout=60
    )
    assert r.status_code == 200, r.text
    dropped = r.json()["palm_rlhf"]["dropped_turns"]
    assert dropped > 0 and dropped % 2 == 0 and r.headers["X-Palm-Rlhf-Dropped-Turns"] == str(dropped)
    with open_store(f"sqlite:///{stack.db_path}") as store:
        rec = store.get_completion(r.json()["id"])
    # the oldest exchanges went, the system message and the latest turn stayed
    assert rec.messages == [messages[0], *messages[1 + dropped :]]
    assert len(rec.prompt_token_ids) + r.json()["usage"]["completion_tokens"] <= 256
    assert r.json()["usage"]["prompt_tokens"] == len(rec.prompt_token_ids)

    # one message that cannot fit on its own: a 400 that says so
    long = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * 80}]
    r = httpx.post(stack.url + "/v1/chat/completions", json={"messages": long}, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert "latest user message is too long" in err["message"] and "256" in err["message"]
