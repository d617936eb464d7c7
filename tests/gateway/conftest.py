"""Shared fixtures of the gateway tests: feedback stores on SQLite and PostgreSQL, an honest
in-memory implementation of the Backends interface, and servers on ephemeral ports."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.common.feedback_store import CandidateRecord, CompletionRecord, FeedbackStore, open_store
from services.gateway.backends import (
    BackendError,
    GeneratedCandidate,
    Generation,
    SamplingOptions,
    ScoreResult,
    StreamEvent,
)

PG_BASE = os.environ.get("PALM_RLHF_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

# --------------------------------------------------------------------------------------------
# stores


def _pg_reachable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_BASE, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as e:  # noqa: BLE001 -- any failure means: skip with the reason
        return f"PostgreSQL not reachable at {PG_BASE}: {type(e).__name__}: {e}"


@pytest.fixture(scope="session")
def pg_unreachable() -> str | None:
    return _pg_reachable()


@pytest.fixture
def pg_url(pg_unreachable) -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped afterwards."""
    if pg_unreachable:
        pytest.skip(pg_unreachable)
    import psycopg

    schema = f"gw_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_BASE, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_BASE, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(store_url) -> Iterator[FeedbackStore]:
    s = open_store(store_url)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path) -> Iterator[FeedbackStore]:
    s = open_store(f"sqlite:///{tmp_path / 'feedback.db'}")
    yield s
    s.close()


def make_completion(cid: str | None = None, best_of: int = 3, n: int = 1) -> CompletionRecord:
    """A plausible stored completion with ``best_of`` candidates in rank order."""
    cid = cid or "chatcmpl-" + uuid.uuid4().hex
    texts = [f"answer number {i}" for i in range(best_of)]
    return CompletionRecord(
        id=cid,
        seq=0,
        created_at=time.time(),
        model="palm-rlhf",
        messages=[{"role": "user", "content": "hello"}],
        prompt_text="User: hello\nAssistant:",
        prompt_token_ids=[1, 5, 6, 7],
        sampling={"temperature": 0.7, "best_of": best_of, "n": n},
        n=n,
        best_of=best_of,
        policy_version="v0001",
        reward_version="v0002",
        client_id="key:test",
        latency_ms=12.5,
        candidates=[
            CandidateRecord(
                index=i,
                sample_index=best_of - 1 - i,
                text=t,
                raw_text=" " + t,
                token_ids=[b + 4 for b in t.encode()],
                logprobs=[-0.5 - 0.01 * j for j in range(len(t))],
                finish_reason="stop",
                reward=1.0 - i * 0.25,
                shown=i < n,
                policy_version="v0001",
            )
            for i, t in enumerate(texts)
        ],
    )


# --------------------------------------------------------------------------------------------
# an honest Backends implementation (no model): deterministic text from a seeded RNG, a
# rule-based score, stop sequences and length limits applied as the policy contract says

WORDS = ["good", "great", "fine", "bad", "awful", "day", "sun", "rain", "walk", "tea", "yes", "no"]
POSITIVE = {"good": 1.0, "great": 2.0, "fine": 0.5, "sun": 0.5, "yes": 0.3}
NEGATIVE = {"bad": -1.0, "awful": -2.0, "rain": -0.5, "no": -0.3}


def fake_score(text: str) -> float:
    """The fake reward: word sentiment plus a small length term (so ties are rare)."""
    words = text.split()
    return sum(POSITIVE.get(w, 0.0) + NEGATIVE.get(w, 0.0) for w in words) + 0.01 * len(words)


@dataclass
class FakeBackends:
    policy_status: str = "SERVING"
    reward_status: str = "SERVING"
    max_n: int = 16
    max_new_tokens: int = 256
    fail_generate: BackendError | None = None
    fail_score: BackendError | None = None
    delay_s: float = 0.0
    calls: list[tuple[str, int]] = field(default_factory=list)

    def _sample(self, prompt_text: str, n: int, p: SamplingOptions) -> Generation:
        if self.fail_generate:
            raise self.fail_generate
        if n > self.max_n:
            raise BackendError("policy", "limit", f"n = {n} samples per prompt; the limit is {self.max_n}")
        max_tokens = p.max_tokens or 32
        if max_tokens > self.max_new_tokens:
            raise BackendError(
                "policy", "limit", f"max_new_tokens = {max_tokens}; the limit is {self.max_new_tokens}"
            )
        seed = p.seed if p.seed is not None else random.randrange(1 << 30)
        prompt_ids = [1] + [b + 4 for b in prompt_text.encode()]
        cands = []
        for i in range(n):
            rng = random.Random(f"{seed}/{i}/{prompt_text}")
            text = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
            if rng.random() < 0.3:
                text += "\nUser: more"  # the model running on into a new turn
            finish = "stop"
            for s in p.stop:
                j = text.find(s)
                if j >= 0:
                    text = text[:j]
            ids = [b + 4 for b in text.encode()]
            if len(ids) > max_tokens:
                ids = ids[:max_tokens]
                text = bytes(t - 4 for t in ids).decode("utf-8", errors="replace")
                finish = "length"
            logprobs = [-rng.random() * 3 for _ in ids]
            token_bytes = [bytes([t - 4]) for t in ids]
            # alternatives: the sampled token first, then the next byte values, less likely
            tops = [
                [(t, lp, bytes([t - 4]))]
                + [(4 + (t - 4 + k) % 256, lp - k, bytes([(t - 4 + k) % 256])) for k in range(1, p.top_logprobs)]
                for t, lp in zip(ids, logprobs)
            ] if p.top_logprobs else []
            cands.append(GeneratedCandidate(i, text, ids, logprobs, finish, token_bytes, tops))
        return Generation(
            prompt_token_ids=prompt_ids,
            candidates=cands,
            policy_version="v0007",
            prompt_tokens=len(prompt_ids),
            completion_tokens=sum(len(c.token_ids) for c in cands),
        )

    async def generate(self, prompt_text: str, n: int, params: SamplingOptions) -> Generation:
        self.calls.append(("generate", n))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self._sample(prompt_text, n, params)

    async def generate_stream(
        self, prompt_text: str, n: int, params: SamplingOptions
    ) -> AsyncIterator[StreamEvent]:
        self.calls.append(("generate_stream", n))
        gen = self._sample(prompt_text, n, params)
        # interleave the candidates' tokens, a few bytes at a time, as the policy does
        pos = [0] * n
        first = True
        while any(p >= 0 for p in pos):
            for i, c in enumerate(gen.candidates):
                if pos[i] < 0:
                    continue
                ids = c.token_ids[pos[i] : pos[i] + 3]
                pos[i] += 3
                done = pos[i] >= len(c.token_ids)
                yield StreamEvent(
                    sample_index=i,
                    text=bytes(t - 4 for t in ids).decode("utf-8", errors="replace"),
                    token_ids=ids,
                    logprobs=c.logprobs[pos[i] - 3 : pos[i]],
                    finish_reason=c.finish_reason if done else None,
                    policy_version=gen.policy_version,
                    prompt_token_ids=gen.prompt_token_ids if first else [],
                    token_bytes=c.token_bytes[pos[i] - 3 : pos[i]],
                    top_logprobs=c.top_logprobs[pos[i] - 3 : pos[i]],
                )
                first = False
                if done:
                    pos[i] = -1
            await asyncio.sleep(0)

    async def score(self, prompt_text: str, responses: list[str]) -> ScoreResult:
        self.calls.append(("score", len(responses)))
        if self.fail_score:
            raise self.fail_score
        return ScoreResult(scores=[fake_score(r) for r in responses], reward_version="v0003")

    async def health(self) -> dict[str, str]:
        return {"policy": self.policy_status, "reward": self.reward_status}

    async def close(self) -> None:
        pass


@dataclass
class RecordingBackends(FakeBackends):
    """FakeBackends that also keep the sampling options of every generate call."""

    params: list[SamplingOptions] = field(default_factory=list)

    async def generate(self, prompt_text, n, params):
        self.params.append(params)
        return await super().generate(prompt_text, n, params)

    def generate_stream(self, prompt_text, n, params):
        self.params.append(params)
        return super().generate_stream(prompt_text, n, params)


class FakeContext:
    """The served model's context as the policy would report it: byte tokens plus BOS."""

    def __init__(self, max_seq_len: int = 256, max_new_tokens: int | None = 48, max_prompt_tokens: int | None = None):
        from services.gateway.conversation import ContextLimits

        self.value = ContextLimits(
            max_seq_len=max_seq_len,
            count_tokens=lambda text: 1 + len(text.encode("utf-8")),
            max_prompt_tokens=max_prompt_tokens,
            max_new_tokens=max_new_tokens,
        )

    async def limits(self):
        return self.value


@pytest.fixture
def fake_backends() -> FakeBackends:
    return FakeBackends()


# --------------------------------------------------------------------------------------------
# a uvicorn server in a thread (for clients that need a real socket: openai, the browser)


class ThreadServer:
    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:  # noqa: PYI034
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# --------------------------------------------------------------------------------------------
# real processes: tiny random policy and reward services, and the gateway in front of them

REPO = Path(__file__).resolve().parents[2]
GRPC_LISTEN = re.compile(r"^(\w+) listening on \S+:(\d+) \(grpc\)")
HTTP_LISTEN = re.compile(r"^gateway listening on \S+:(\d+) \(http\)")
E2E_KEY = "sk-e2e-test-key"
E2E_ADMIN_TOKEN = "adm-e2e-test-token"  # given to the gateway through PALM_RLHF_ADMIN_TOKEN_FILE


class Proc:
    """A ``palm-rlhf serve ROLE`` child process on an ephemeral port (read from its output)."""

    def __init__(
        self, role: str, args: list[str], log_dir: Path, pattern: re.Pattern, env: dict[str, str] | None = None
    ):
        self.role = role
        self.log_path = log_dir / f"{role}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 -- closed in stop()
        extra_env = env or {}
        env = dict(os.environ, PYTHONUNBUFFERED="1", PALM_RLHF_DEMO_AUTOBUILD="0")
        for k in (
            "PALM_RLHF_API_KEYS",
            "PALM_RLHF_CHECKPOINT",
            "PALM_RLHF_TRAINER_ADDR",
            "PALM_RLHF_ADMIN_TOKEN",
        ):
            env.pop(k, None)
        env.update(extra_env)
        cmd = [
            sys.executable,
            "-m",
            "palm_rlhf.cli",
            "serve",
            role,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env
        )
        self.port: int | None = None
        self._bound = threading.Event()
        self._pattern = pattern
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._log.write(line)
            m = self._pattern.match(line)
            if m and self.port is None:
                self.port = int(m.group(m.lastindex))
                self._bound.set()

    def wait_bound(self, timeout: float = 90.0) -> Proc:
        deadline = time.monotonic() + timeout
        while not self._bound.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._log.flush()
                raise RuntimeError(f"{self.role} did not start:\n{self.log_path.read_text()[-3000:]}")
        return self

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def wait_http_ok(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.1)
    raise RuntimeError(f"{url} never answered 200: {last}")


@dataclass
class Stack:
    data_dir: Path
    policy: Proc
    reward: Proc
    gateway: Proc
    db_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.gateway.addr}"


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """Policy and reward services from a tiny random checkpoint, and a gateway with one API key
    and a SQLite log, all real processes on ephemeral ports."""
    import torch

    from palm_rlhf.checkpoint import CheckpointStore
    from palm_rlhf.config import PaLMConfig
    from palm_rlhf.model import PaLM

    root = tmp_path_factory.mktemp("gateway-stack")
    logs = tmp_path_factory.mktemp("gateway-logs")
    st = CheckpointStore(root / "checkpoints", "policy")
    torch.manual_seed(0)
    model = PaLM(PaLMConfig.from_name("tiny"))
    st.save(model, model.config)
    limits = ["--metrics-port", "0", "--data-dir", str(root), "--max-new-tokens", "48"]
    limits += ["--default-max-new-tokens", "16", "--max-n", "8", "--batch-window-ms", "2"]
    policy = Proc("policy", limits, logs, GRPC_LISTEN)
    reward = Proc("reward", ["--metrics-port", "0", "--data-dir", str(root)], logs, GRPC_LISTEN)
    procs = [policy, reward]
    try:
        policy.wait_bound()
        reward.wait_bound()
        keys = root / "api-keys.txt"
        keys.write_text(f"# test keys\n{E2E_KEY}\n")
        db = root / "feedback.db"
        admin_file = root / "admin-token"
        admin_file.write_text(E2E_ADMIN_TOKEN + "\n")
        gateway = Proc(
            "gateway",
            ["--data-dir", str(root), "--policy-addr", policy.addr, "--reward-addr", reward.addr,
             "--api-keys-file", str(keys), "--database-url", f"sqlite:///{db}", "--rate-limit", "off"],
            logs,
            HTTP_LISTEN,
            env={"PALM_RLHF_ADMIN_TOKEN_FILE": str(admin_file)},
        )  # fmt: skip
        procs.append(gateway)
        gateway.wait_bound()
        wait_http_ok(f"http://{gateway.addr}/readyz")
        yield Stack(root, policy, reward, gateway, db)
    finally:
        for p in reversed(procs):
            p.stop()
