"""The typed gRPC clients against real reward and policy processes."""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from clients import ClientError, PolicyClient, RetryPolicy, RewardClient, TLSConfig

harness = sys.modules["palm_rlhf_test_harness"]  # loaded by conftest.py
ADMIN_TOKEN = harness.CLIENT_ADMIN_TOKEN
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.2)


# --------------------------------------------------------------------------------------------
# reward


def test_reward_scores_follow_the_responses_not_their_position(reward_addr):
    prompt = "User: how are you?\nAssistant:"
    responses = [" I am great, thanks!", " Terrible.", " ok"]
    with RewardClient(reward_addr, timeout=20) as rc:
        fwd = rc.score(prompt, responses)
        rev = rc.score(prompt, responses[::-1])
    assert len(fwd.scores) == 3 and all(math.isfinite(s) for s in fwd.scores)
    assert fwd.scorer == "learned" and fwd.reward_version == "v0001"
    assert rev.scores == pytest.approx(fwd.scores[::-1], abs=1e-5)
    # a binned head reports a probability per bin, summing to one
    assert all(sum(d.bin_probs) == pytest.approx(1.0, abs=1e-4) for d in fwd.details)


def test_sentiment_scorer_prefers_cheerful_text_and_batches_match_singles(reward_addr):
    happy, gloomy = " What a wonderful, lovely day, I love it!", " This is awful and I hate it."
    with RewardClient(reward_addr) as rc:
        single = rc.score("", [happy, gloomy], scorer="sentiment")
        batch = rc.score_batch([("", [gloomy]), ("", [happy, gloomy])], scorer="sentiment")
        both = rc.score("p", [happy], all_scorers=True)
    assert single.scores[0] > 0.5 > -0.5 > single.scores[1]
    assert [r.scores for r in batch] == [[single.scores[1]], single.scores]
    assert set(both.details[0].breakdown) == {"learned", "sentiment"}


def test_model_info_describes_the_served_reward_model(reward_addr):
    with RewardClient(reward_addr) as rc:
        info = rc.model_info()
    assert info.kind == "reward" and info.version == "v0001"
    assert info.tokenizer.vocab_size == 260 and info.max_batch == 16
    assert {"learned", "sentiment"} <= set(info.scorers)
    assert info.config["dim"] == 32


def test_unknown_scorer_is_invalid_argument_and_not_retried(reward_addr):
    with RewardClient(reward_addr, retry=FAST_RETRY) as rc, pytest.raises(ClientError) as ei:
        rc.score("p", ["r"], scorer="no-such-scorer")
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and ei.value.attempts == 1
    assert "no-such-scorer" in ei.value.details


def test_client_message_size_limit_refuses_oversized_requests_locally(reward_addr):
    with RewardClient(reward_addr, max_message_bytes=1024, retry=FAST_RETRY) as rc:
        with pytest.raises(ClientError) as ei:
            rc.score("p", ["x" * 4096])
        assert ei.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and ei.value.attempts == 1
        assert len(rc.score("p", ["short"]).scores) == 1  # the channel still works


# --------------------------------------------------------------------------------------------
# policy


def test_generate_returns_n_candidates_within_the_token_budget(policy_addr):
    with PolicyClient(policy_addr) as pc:
        gen = pc.generate("User: hi\nAssistant:", n=3, max_new_tokens=5, seed=7, return_logprobs=True)
        again = pc.generate("User: hi\nAssistant:", n=3, max_new_tokens=5, seed=7, return_logprobs=True)
        by_ids = pc.generate(gen.prompt_token_ids, n=1, max_new_tokens=3, temperature=0)
    assert len(gen.candidates) == 3 and gen.policy_version == "v0001"
    assert gen.prompt_token_ids[0] == 1  # BOS prepended to a text prompt
    for c in gen.candidates:
        assert 0 < len(c.token_ids) <= 5 or c.finish_reason == "stop"
        assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
    assert again.texts == gen.texts  # same seed, same samples
    assert by_ids.prompt_token_ids == gen.prompt_token_ids  # ids are used verbatim


def test_stream_reassembles_to_the_same_text_as_generate(policy_addr):
    kw = {"n": 2, "max_new_tokens": 12, "temperature": 0.8, "seed": 11}
    with PolicyClient(policy_addr) as pc:
        whole = pc.generate("User: tell me\nAssistant:", **kw)
        parts = ["", ""]
        finished = [None, None]
        for ch in pc.generate_stream("User: tell me\nAssistant:", **kw):
            parts[ch.sample_index] += ch.text
            if ch.finish_reason:
                finished[ch.sample_index] = ch.finish_reason
    assert parts == whole.texts
    assert finished == [c.finish_reason for c in whole.candidates]


def test_invalid_sampling_parameters_fail_once_with_invalid_argument(policy_addr):
    with PolicyClient(policy_addr, retry=FAST_RETRY) as pc:
        for kw in ({"temperature": -1.0}, {"top_p": 0.0}, {"temperature": float("nan")}):
            with pytest.raises(ClientError) as ei:
                pc.generate("hi", **kw)
            assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT, kw
            assert ei.value.attempts == 1
        with pytest.raises(ClientError) as ei:
            pc.generate([5, 6, 100_000])
        assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in ei.value.details


def test_admin_load_version_sends_the_token_only_when_configured(policy_addr):
    with PolicyClient(policy_addr, retry=FAST_RETRY) as anonymous:
        with pytest.raises(ClientError) as ei:
            anonymous.load_version("v0002")
        assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert ADMIN_TOKEN not in str(ei.value)
    with PolicyClient(policy_addr, admin_token=ADMIN_TOKEN) as admin:
        try:
            change = admin.load_version("v0002")
            assert (change.version, change.previous_version) == ("v0002", "v0001")
            assert admin.generate("hi", max_new_tokens=2).policy_version == "v0002"
        finally:
            assert admin.load_version("v0001").version == "v0001"
        assert ADMIN_TOKEN not in repr(admin)


# --------------------------------------------------------------------------------------------
# retries and deadlines


def test_retries_reach_a_server_that_starts_listening_late(stack, tmp_path):
    """The client starts retrying against a dead port; only then is the reward service started
    on that port. The call must succeed, after at least one UNAVAILABLE retry."""
    port = harness.free_port()
    retried = threading.Event()
    retries: list[tuple[int, grpc.StatusCode]] = []

    def on_retry(method, attempt, code, wait):
        retries.append((attempt, code))
        retried.set()

    policy = RetryPolicy(max_attempts=200, initial_backoff=0.05, max_backoff=0.3)
    result: dict = {}
    with RewardClient(f"127.0.0.1:{port}", retry=policy, timeout=120, on_retry=on_retry) as rc:
        worker = threading.Thread(target=lambda: result.setdefault("r", rc.score("", ["good"], scorer="sentiment")))
        worker.start()
        assert retried.wait(10), "the client never retried"
        late = harness.ServiceProcess("reward", stack.data_dir, tmp_path, "--scorer", "sentiment", port=port)
        try:
            late.start()
            assert late.port == port
            worker.join(120)
        finally:
            late.stop()
        assert not worker.is_alive()
    assert "r" in result, f"the call failed after {len(retries)} retries"
    assert result["r"].scores[0] > 0
    assert len(retries) >= 1 and all(code == grpc.StatusCode.UNAVAILABLE for _, code in retries)
    assert rc.attempts_total == len(retries) + 1


def test_retries_are_bounded_by_max_attempts():
    port = harness.free_port()  # nobody listens here
    with RewardClient(f"127.0.0.1:{port}", retry=FAST_RETRY, timeout=30) as rc:
        t0 = time.monotonic()
        with pytest.raises(ClientError) as ei:
            rc.score("p", ["r"])
        elapsed = time.monotonic() - t0
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE and ei.value.attempts == 3
    assert elapsed < 10, elapsed


def test_overall_deadline_bounds_all_attempts():
    port = harness.free_port()
    many = RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.2)
    with RewardClient(f"127.0.0.1:{port}", retry=many) as rc:
        t0 = time.monotonic()
        with pytest.raises(ClientError) as ei:
            rc.score("p", ["r"], timeout=1.0)
        elapsed = time.monotonic() - t0
    assert ei.value.attempts > 1
    assert elapsed < 1.5, f"a 1 s deadline took {elapsed:.2f}s"


def test_deadline_is_honoured_against_a_server_that_never_answers():
    """A socket that accepts connections and never speaks HTTP/2: the call must end with
    DEADLINE_EXCEEDED close to its deadline, not hang."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        port = s.getsockname()[1]
        with RewardClient(f"127.0.0.1:{port}", retry=FAST_RETRY) as rc:
            t0 = time.monotonic()
            with pytest.raises(ClientError) as ei:
                rc.score("p", ["r"], timeout=0.5)
            elapsed = time.monotonic() - t0
    assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.45 < elapsed < 2.0, elapsed


# --------------------------------------------------------------------------------------------
# TLS


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_channel_verifies_the_server_certificate(tmp_path):
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )
    server = grpc.server(futures.ThreadPoolExecutor(2))
    hs = health.HealthServicer()
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    server.start()
    try:
        tls = TLSConfig(root_certificates=cert, server_name="localhost")
        with RewardClient(f"127.0.0.1:{port}", tls=tls) as rc:
            assert rc.health() == "SERVING"
        with RewardClient(f"127.0.0.1:{port}") as plain:  # plaintext to a TLS port fails
            assert plain.health(timeout=1.0) == "UNAVAILABLE"
        with RewardClient(f"127.0.0.1:{port}", tls=TLSConfig(server_name="localhost")) as untrusted:
            assert untrusted.health(timeout=1.0) == "UNAVAILABLE"  # self-signed: not in system roots
    finally:
        server.stop(0)


def test_retry_policy_backoff_grows_exponentially_with_bounded_jitter():
    p = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.5)
    for attempt, base in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)):
        waits = [p.backoff(attempt) for _ in range(200)]
        assert all(base * 0.5 <= w <= base for w in waits), (attempt, min(waits), max(waits))
        assert max(waits) - min(waits) > base * 0.2  # actually jittered
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
