"""API keys, admin tokens, secrets kept out of logs, and checkpoints that fail their sha256."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import grpc
import httpx
import pytest

from clients import ClientError, PolicyClient, RetryPolicy, RewardClient, TrainerClient

harness = sys.modules["palm_rlhf_test_harness"]
ADMIN_TOKEN, API_KEY = harness.ADMIN_TOKEN, harness.API_KEY
WRONG_TOKENS = ("rel-admin-9b1e44c0d8", "Bearer", "", "x" * 300)  # near misses and junk
NO_RETRY = RetryPolicy(max_attempts=1)


def test_gateway_requires_a_valid_api_key_when_keys_are_configured(keyed_gateway):
    url = keyed_gateway.url
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert httpx.get(f"{url}/healthz").status_code == 200  # probes stay open
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {API_KEY}"},
                    {"Authorization": f"Bearer {API_KEY}x"}, {"Authorization": "Bearer"},
                    {"X-Api-Key": API_KEY}):
        for method, path, kw in (("POST", "/v1/chat/completions", {"json": body}), ("GET", "/v1/models", {}),
                                 ("POST", "/v1/feedback", {"json": {"completion_id": "c", "choice_index": 0,
                                                                    "thumbs": "up"}}),
                                 ("GET", "/v1/feedback", {"params": {"completion_id": "c"}})):
            r = httpx.request(method, url + path, headers=headers, timeout=30, **kw)
            assert r.status_code == 401, (headers, path, r.status_code, r.text)
            assert API_KEY not in r.text
            assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
    ok = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert ok.status_code == 200


def test_gateway_refuses_to_listen_on_all_interfaces_without_keys(stack, tmp_path):
    cmd = [sys.executable, "-m", "palm_rlhf.cli", "serve", "gateway", "--host", "0.0.0.0", "--port", "0",
           "--data-dir", str(tmp_path), "--policy-addr", stack.policy.addr, "--reward-addr", stack.reward.addr]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALM_RLHF_")}
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=harness.REPO, check=False)
    assert r.returncode != 0
    assert "API key" in (r.stdout + r.stderr)
    assert "listening" not in r.stdout
    assert time.monotonic() - t0 < 60
    # with a key it does start there (and is stopped again at once)
    gw = harness.ServiceProcess("gateway", tmp_path, tmp_path, "--policy-addr", stack.policy.addr,
                                "--reward-addr", stack.reward.addr, env={"PALM_RLHF_API_KEYS": "k-0123456789"})
    gw.flags = [*gw.flags, "--host", "0.0.0.0"]
    try:
        gw.start()
        assert httpx.get(f"http://127.0.0.1:{gw.port}/v1/models", timeout=30).status_code == 401
    finally:
        gw.stop()


@pytest.mark.parametrize("call", ["policy.LoadVersion", "reward.LoadVersion", "trainer.Rollback",
                                  "trainer.Trigger"])
def test_admin_rpcs_need_the_admin_token(stack, call):
    service, method = call.split(".")
    addr = getattr(stack, service).addr
    cls = {"policy": PolicyClient, "reward": RewardClient, "trainer": TrainerClient}[service]

    def invoke(client):
        if method == "LoadVersion":
            return client.load_version("v0001")
        if method == "Rollback":
            return client.rollback("v0001")
        return client.trigger(wait=True)

    for token in (None, *WRONG_TOKENS):
        with cls(addr, admin_token=token, retry=NO_RETRY, timeout=30) as c, pytest.raises(ClientError) as ei:
            invoke(c)
        assert ei.value.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), token
        assert ADMIN_TOKEN not in str(ei.value) and (len(token or "") <= 8 or token not in ei.value.details)
    with cls(addr, admin_token=ADMIN_TOKEN, retry=NO_RETRY, timeout=60) as c:
        invoke(c)  # the right token works


def test_checkpoint_with_a_wrong_sha256_is_refused_by_load_version(stack):
    """A copy of a good version whose weights were altered after the manifest was written."""
    root = stack.data_dir / "checkpoints"
    cases = []
    for kind, good in (("policy", "v0002"), ("reward", "v0001")):
        store = root / kind
        versions = sorted(p.name for p in store.iterdir() if p.name.startswith("v"))
        bad = f"v{int(versions[-1][1:]) + 1:04d}"
        shutil.copytree(store / good, store / bad)
        weights = store / bad / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # same size, different content
        weights.write_bytes(bytes(data))
        cases.append((kind, bad))
    for kind, bad in cases:
        cls = PolicyClient if kind == "policy" else RewardClient
        with cls(getattr(stack, kind).addr, admin_token=ADMIN_TOKEN, retry=NO_RETRY, timeout=60) as c:
            before = c.model_info().version
            with pytest.raises(ClientError) as ei:
                c.load_version(bad)
            assert ei.value.code not in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
            assert "sha256" in ei.value.details or "match" in ei.value.details, ei.value.details
            assert c.model_info().version == before  # still serving the good version
            assert c.health() == "SERVING"


def test_no_secret_appears_in_any_log(stack, keyed_gateway, limited_gateway):
    """Runs after the other security tests in this module have thrown keys and tokens at every
    process: none of them may have been written to a log."""
    # make sure each process has seen the secrets in this session, right or wrong
    with PolicyClient(stack.policy.addr, admin_token="Bearer-" + ADMIN_TOKEN[::-1], retry=NO_RETRY) as c, \
            pytest.raises(ClientError):
        c.load_version("v0001")
    httpx.get(f"{keyed_gateway.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}-wrong"})
    httpx.get(f"{keyed_gateway.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    secrets = [ADMIN_TOKEN, API_KEY, *[t for t in WRONG_TOKENS if len(t) > 8]]
    procs = [*stack.services, *stack.gateways]
    for p in procs:
        text = p.logs()
        assert text, f"no log captured for {p.role}"
        for s in secrets:
            assert s not in text, f"a secret appears in the {p.role} log"
