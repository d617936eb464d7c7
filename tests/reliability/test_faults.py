"""SIGKILL the policy, then the reward service, then the trainer, under a light load.

While a backend is gone the gateway answers 503 within its backend timeout (it stays alive and
live), it recovers by itself once the process is back on the same port, and not one
acknowledged feedback row or completion is missing from the SQLite log afterwards.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx
import pytest

from clients import PolicyClient, TrainerClient

harness = sys.modules["palm_rlhf_test_harness"]

BACKEND_TIMEOUT_S = 3.0  # the gateway's generate/score deadline in this test
ADMIN = "fault-admin-token-31c7"


@dataclass
class Event:
    t: float
    kind: str  # "chat" | "feedback" | "healthz"
    status: int  # 0 = transport error
    latency: float


@dataclass
class LightLoad:
    """A few clients chatting and giving feedback on what they got, in a background thread."""

    url: str
    workers: int = 3
    events: list[Event] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)  # ids of 200 chat answers
    acked_feedback: list[int] = field(default_factory=list)  # ids of 2xx feedback answers
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> LightLoad:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()

    def since(self, t0: float, kind: str) -> list[Event]:
        return [e for e in list(self.events) if e.t >= t0 and e.kind == kind]

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30.0) as http:
            await asyncio.gather(*(self._worker(http, i) for i in range(self.workers)), self._prober(http))

    async def _timed(self, kind: str, coro) -> httpx.Response | None:
        t0 = time.monotonic()
        try:
            resp = await coro
        except httpx.HTTPError:
            self.events.append(Event(t0, kind, 0, time.monotonic() - t0))
            return None
        self.events.append(Event(t0, kind, resp.status_code, time.monotonic() - t0))
        return resp

    async def _worker(self, http: httpx.AsyncClient, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            resp = await self._timed("chat", http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"worker {i} message {n}"}], "best_of": 2, "max_tokens": 6}))
            if resp is not None and resp.status_code == 200:
                self.completions.append(resp.json()["id"])
            if self.completions:
                # feedback on any earlier answer: the feedback path does not need the backends
                cid = self.completions[(n * 7 + i) % len(self.completions)]
                body = {"completion_id": cid, "choice_index": 0, "thumbs": "up" if n % 2 else "down"} if n % 3 \
                    else {"completion_id": cid, "preferred_index": 0, "rejected_index": 1}
                fb = await self._timed("feedback", http.post(
                    "/v1/feedback", json=body, headers={"Idempotency-Key": uuid.uuid4().hex}))
                if fb is not None and fb.is_success:
                    self.acked_feedback.append(fb.json()["id"])
            await asyncio.sleep(0.05)

    async def _prober(self, http: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            await self._timed("healthz", http.get("/healthz"))
            await asyncio.sleep(0.2)


def wait_for(pred, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def fault_stack(tmp_path):
    data = harness.make_tiny_data_dir(tmp_path / "data", versions=2)
    logs = tmp_path / "logs"
    logs.mkdir()
    admin = ("--admin-token", ADMIN, "--grace", "1")
    trainer = harness.ServiceProcess("trainer", data, logs, "--store-poll", "0.5", *admin).start()
    policy = harness.ServiceProcess("policy", data, logs, *harness.POLICY_FLAGS, "--trainer-addr", trainer.addr,
                                    *admin).start()
    reward = harness.ServiceProcess("reward", data, logs, "--max-batch", "16", *admin).start()
    procs = [trainer, policy, reward]
    try:
        for p in procs:
            p.wait_ready()
        gateway = harness.ServiceProcess(
            "gateway", data, logs, "--policy-addr", policy.addr, "--reward-addr", reward.addr, "--rate-limit", "off",
            env={"PALM_RLHF_GENERATE_TIMEOUT": str(BACKEND_TIMEOUT_S),
                 "PALM_RLHF_SCORE_TIMEOUT": str(BACKEND_TIMEOUT_S)},
        ).start().wait_ready()
        procs.append(gateway)
        yield {"policy": policy, "reward": reward, "trainer": trainer, "gateway": gateway, "data": data}
    finally:
        for p in reversed(procs):
            p.stop()


def test_killed_backends_give_fast_503s_recover_on_restart_and_lose_no_feedback(fault_stack):
    gw = fault_stack["gateway"]
    load = LightLoad(gw.url).start()
    report: dict[str, dict] = {}
    try:
        wait_for(lambda: len(load.completions) >= 3 and len(load.acked_feedback) >= 2, 60, "a warm, working stack")

        for role in ("policy", "reward"):
            proc = fault_stack[role]
            proc.kill(signal.SIGKILL)
            killed = time.monotonic()
            # what cannot be served is answered 503, quickly; the gateway itself stays live
            wait_for(lambda k=killed: len([e for e in load.since(k + 0.5, "chat") if e.status == 503]) >= 3, 60,
                     f"503s while the {role} is down")
            outage = [e for e in load.since(killed + 0.5, "chat")]
            assert {e.status for e in outage} <= {200, 503}, sorted({e.status for e in outage})
            slowest_503 = max(e.latency for e in outage if e.status == 503)
            assert slowest_503 < BACKEND_TIMEOUT_S + 2.0, f"a 503 took {slowest_503:.1f}s"
            ready = httpx.get(f"{gw.url}/readyz", timeout=10)
            assert ready.status_code == 503 and role in ready.text
            proc.start()  # same port as before
            assert proc.port == int(proc.addr.rsplit(":", 1)[1])
            proc.wait_ready()
            back = time.monotonic()
            wait_for(lambda b=back: any(e.status == 200 for e in load.since(b, "chat")), 60,
                     f"the gateway to serve again after the {role} restarted")
            recovered = min(e.t + e.latency for e in load.since(back, "chat") if e.status == 200) - back
            report[role] = {"503s": sum(e.status == 503 for e in outage), "slowest_503_s": round(slowest_503, 2),
                            "recovered_after_restart_s": round(recovered, 2)}

        # the trainer is not on the chat path: chat keeps working without it
        trainer = fault_stack["trainer"]
        trainer.kill(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: sum(e.status == 200 for e in load.since(killed, "chat")) >= 3, 60,
                 "chat answers while the trainer is down")
        assert {e.status for e in load.since(killed, "chat")} == {200}
        trainer.start()
        trainer.wait_ready()
        # the policy re-subscribes by itself: a rollback announced by the restarted trainer reaches it
        with TrainerClient(trainer.addr, admin_token=ADMIN) as tc:
            assert tc.rollback("v0002").version == "v0002"
        with PolicyClient(fault_stack["policy"].addr) as pc:
            wait_for(lambda: pc.model_info().version == "v0002", 60, "the policy to follow the restarted trainer")
        report["trainer"] = {"chat_200s_while_down": sum(e.status == 200 for e in load.since(killed, "chat"))}
    finally:
        load.finish()

    assert gw.alive()
    health = [e for e in load.events if e.kind == "healthz"]
    assert health and all(e.status == 200 for e in health), "the gateway stopped answering /healthz"
    assert not [e for e in load.events if e.status == 0], "transport errors (timeouts/resets) from the gateway"
    assert not [e for e in load.events if e.status >= 500 and e.status != 503]
    assert all(200 <= e.status < 300 for e in load.events if e.kind == "feedback")

    # nothing acknowledged is missing from the durable log
    db = sqlite3.connect(f"file:{fault_stack['data'] / 'feedback.db'}?mode=ro", uri=True)
    try:
        stored_feedback = {r[0] for r in db.execute("SELECT id FROM feedback")}
        stored_completions = {r[0] for r in db.execute("SELECT id FROM completions")}
    finally:
        db.close()
    acked = set(load.acked_feedback)
    assert len(acked) == len(load.acked_feedback), "two acknowledgements named the same feedback row"
    lost = acked - stored_feedback
    assert not lost, f"{len(lost)} acknowledged feedback rows are missing"
    assert set(load.completions) <= stored_completions
    report["feedback"] = {"acknowledged": len(acked), "stored": len(stored_feedback), "lost": len(lost)}
    report["completions"] = {"answered": len(load.completions), "stored": len(stored_completions)}
    report["requests"] = {k: sum(e.kind == k for e in load.events) for k in ("chat", "feedback", "healthz")}
    print("\nFAULT REPORT " + json.dumps(report, indent=1))
