"""Conversation fitting and the max_tokens default, through the app with a known context; the
gateway's settings (flags over environment, the admin token file)."""

from __future__ import annotations

import argparse

import pytest
from fastapi.testclient import TestClient

from palm_rlhf.chat import format_chat
from services.gateway.app import GatewayConfig, app_config, create_app
from services.gateway.settings import GatewaySettings

from .conftest import FakeContext

CHAT = "/v1/chat/completions"


class RecordingBackends:
    """Wraps the fake backends to see the prompt and max_tokens each generation got."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    async def generate(self, prompt_text, n, params):
        self.seen.append((prompt_text, params.max_tokens))
        return await self.inner.generate(prompt_text, n, params)

    def generate_stream(self, prompt_text, n, params):
        self.seen.append((prompt_text, params.max_tokens))
        return self.inner.generate_stream(prompt_text, n, params)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def conversation(turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"question {i}: " + "x" * 30})
        msgs.append({"role": "assistant", "content": f"answer {i}: " + "y" * 30})
    msgs.append({"role": "user", "content": "last one?"})
    return msgs


@pytest.fixture
def app_of(fake_backends, sqlite_store):
    def make(context=None, **config):
        backends = RecordingBackends(fake_backends)
        return backends, TestClient(create_app(backends, sqlite_store, GatewayConfig(**config), context))

    return make


def tokens(text: str) -> int:
    return 1 + len(text.encode())


def test_a_short_conversation_is_sent_whole_with_max_tokens_the_room_left(app_of):
    backends, client = app_of(FakeContext(max_seq_len=256, max_new_tokens=None))
    msgs = conversation(1)
    r = client.post(CHAT, json={"messages": msgs, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["palm_rlhf"] == {"dropped_turns": 0} and r.headers["X-Palm-Rlhf-Dropped-Turns"] == "0"
    prompt, max_tokens = backends.seen[-1]
    assert prompt == format_chat(msgs) and max_tokens == 256 - tokens(prompt)
    # within the policy's limit when it has one
    backends, client = app_of(FakeContext(max_seq_len=256, max_new_tokens=40))
    client.post(CHAT, json={"messages": msgs, "seed": 1})
    assert backends.seen[-1][1] == 40
    # an explicit max_tokens is kept
    client.post(CHAT, json={"messages": msgs, "seed": 1, "max_tokens": 7})
    assert backends.seen[-1][1] == 7


def test_the_oldest_exchanges_are_dropped_until_the_prompt_fits(app_of, sqlite_store):
    backends, client = app_of(FakeContext(max_seq_len=256, max_new_tokens=48), min_answer_tokens=32)
    msgs = conversation(6)
    assert tokens(format_chat(msgs)) > 256
    r = client.post(CHAT, json={"messages": msgs, "seed": 2})
    assert r.status_code == 200, r.text
    dropped = r.json()["palm_rlhf"]["dropped_turns"]
    assert dropped % 2 == 0 and r.headers["X-Palm-Rlhf-Dropped-Turns"] == str(dropped)
    kept = [msgs[0], *msgs[1 + dropped :]]
    prompt, max_tokens = backends.seen[-1]
    assert prompt == format_chat(kept)
    assert tokens(prompt) + 32 <= 256  # room for the least answer
    # as few dropped as possible: one exchange more would have fit
    assert tokens(format_chat([msgs[0], *msgs[1 + dropped - 2 :]])) + 32 > 256
    assert max_tokens == min(48, 256 - tokens(prompt))
    rec = sqlite_store.get_completion(r.json()["id"])
    assert rec.messages == kept and rec.prompt_text == prompt and rec.sampling["dropped_turns"] == dropped
    # streamed: the header and the first chunks say it too
    with client.stream("POST", CHAT, json={"messages": msgs, "seed": 2, "stream": True}) as s:
        assert s.headers["X-Palm-Rlhf-Dropped-Turns"] == str(dropped)
        first = next(line for line in s.iter_lines() if line.startswith("data: "))
    assert f'"palm_rlhf":{{"dropped_turns":{dropped}}}' in first
    # an explicit max_tokens needs that much room: more is dropped
    r = client.post(CHAT, json={"messages": msgs, "seed": 2, "max_tokens": 48})
    assert r.json()["palm_rlhf"]["dropped_turns"] >= dropped
    assert tokens(backends.seen[-1][0]) + 48 <= 256


def test_a_latest_message_that_cannot_fit_alone_is_a_400(app_of):
    backends, client = app_of(FakeContext(max_seq_len=128, max_new_tokens=48), min_answer_tokens=16)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "z" * 120}]
    r = client.post(CHAT, json={"messages": msgs})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert "latest user message is too long" in err["message"] and "128" in err["message"]
    assert backends.seen == []  # refused before the policy was asked
    # the earlier turns do not matter: it is the last message alone that cannot fit
    r = client.post(CHAT, json={"messages": [*conversation(1)[:-1], msgs[1]]})
    assert r.status_code == 400


def test_without_known_limits_the_conversation_is_sent_whole(app_of):
    backends, client = app_of(None)
    msgs = conversation(6)
    r = client.post(CHAT, json={"messages": msgs, "seed": 1})
    assert r.status_code == 200 and r.json()["palm_rlhf"]["dropped_turns"] == 0
    assert backends.seen[-1] == (format_chat(msgs), None)


def test_settings_take_flags_over_environment_and_the_admin_token_from_a_file(tmp_path, monkeypatch):
    for k in ("PALM_RLHF_ADMIN_TOKEN", "PALM_RLHF_API_KEYS", "PALM_RLHF_INSECURE_NO_AUTH"):
        monkeypatch.delenv(k, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    monkeypatch.setenv("PALM_RLHF_ADMIN_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("PALM_RLHF_DATABASE_URL", "sqlite:///env.db")
    monkeypatch.setenv("PALM_RLHF_RATE_LIMIT", "10/s")
    monkeypatch.setenv("PALM_RLHF_API_KEYS", "k1, k2")
    args = argparse.Namespace(database_url="sqlite:///flag.db", rate_limit=None, admin_token=None, host=None)
    s = GatewaySettings.from_args(args)
    assert s.resolved_database_url() == "sqlite:///flag.db" and s.rate_limit == "10/s"
    assert s.admin_token_value() == "from-the-file"
    cfg = app_config(s)
    assert cfg.admin_token == "from-the-file" and sorted(cfg.api_keys) == ["k1", "k2"] and not cfg.open_admin
    # the token itself wins over the file; the data dir gives the default database
    monkeypatch.setenv("PALM_RLHF_ADMIN_TOKEN", "direct")
    monkeypatch.delenv("PALM_RLHF_DATABASE_URL")
    s = GatewaySettings.from_args(argparse.Namespace(data_dir=str(tmp_path)))
    assert s.admin_token_value() == "direct" and s.resolved_database_url().endswith(f"{tmp_path}/feedback.db")
    # --insecure-no-auth on loopback without an admin token opens admin reads; elsewhere it does not
    monkeypatch.delenv("PALM_RLHF_ADMIN_TOKEN")
    monkeypatch.delenv("PALM_RLHF_ADMIN_TOKEN_FILE")
    monkeypatch.delenv("PALM_RLHF_API_KEYS")
    cfg = app_config(GatewaySettings.from_args(argparse.Namespace(insecure_no_auth=True)))
    assert cfg.admin_token is None and cfg.open_admin
    cfg = app_config(GatewaySettings.from_args(argparse.Namespace(insecure_no_auth=True, host="0.0.0.0")))
    assert not cfg.open_admin
    monkeypatch.setenv("PALM_RLHF_ADMIN_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="admin token file"):
        GatewaySettings.from_args(None).admin_token_value()


def test_the_admin_token_is_compared_in_constant_time(monkeypatch, fake_backends, sqlite_store):
    import hmac

    from services.gateway import state as state_module

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(state_module.hmac, "compare_digest", spy)
    client = TestClient(create_app(fake_backends, sqlite_store, GatewayConfig(admin_token="adm")))
    assert client.get("/v1/feedback/export", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.get("/v1/feedback/export", headers={"Authorization": "Bearer adm"}).status_code == 200
    assert (b"nope", b"adm") in calls and (b"adm", b"adm") in calls
