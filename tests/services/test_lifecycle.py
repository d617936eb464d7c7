"""Start-up and shutdown: SIGTERM drains (NOT_SERVING, new calls refused, in-flight finished)
and exits 0; ``palm-rlhf up`` starts and stops the whole set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from palm_rlhf.proto.v1 import policy_pb2, policy_pb2_grpc
from services.common.client import create_sync_channel

from .conftest import REPO, make_data_dir

P = policy_pb2


def test_sigterm_drains_in_flight_work_and_exits_zero(spawn, policy_data):
    proc = spawn("policy", policy_data, "--drain-delay", "1.5", "--grace", "20", "--max-new-tokens", "200",
                 "--max-batch-rows", "64").wait_ready()
    with create_sync_channel(proc.addr, retries=0) as ch:
        stub = policy_pb2_grpc.PolicyStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        long_req = P.GenerateRequest(prompts=[P.Prompt(text="long")],
                                     params=P.SamplingParams(n=16, max_new_tokens=200, temperature=1.0))
        fut = stub.Generate.future(long_req, timeout=120)
        stream = stub.GenerateStream(long_req, timeout=120)
        next(stream)  # the work is running before the signal
        proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.02)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            stub.Generate(P.GenerateRequest(prompts=[P.Prompt(text="late")]), timeout=5)
            raise AssertionError("a new call was accepted while draining")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE
        reply = fut.result(timeout=120)  # in-flight work completes
        assert len(reply.results[0].candidates) == 16
        rest = list(stream)
        assert sum(1 for c in rest if c.finish_reason) == 16
    assert proc.proc.wait(60) == 0


def test_up_starts_every_service_and_stops_them(tmp_path):
    data = make_data_dir(tmp_path / "data")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PALM_RLHF_DEMO_AUTOBUILD="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "palm_rlhf.cli", "up", "--data-dir", str(data), "--free-ports", "--no-gateway",
         "--grace", "5", "--ready-timeout", "120"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "| ready: " in line:
                ready.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        assert ready.wait(150), "\n".join(lines[-40:])
        for name in ("policy", "reference", "reward", "trainer"):
            assert any(line.startswith(f"{name:<9}| ") for line in lines), f"no prefixed log lines from {name}"
        ready_line = next(line for line in lines if "| ready: " in line)
        policy_addr = ready_line.split("policy=")[1].split(",")[0]
        with create_sync_channel(policy_addr) as ch:
            r = policy_pb2_grpc.PolicyStub(ch).Generate(
                P.GenerateRequest(prompts=[P.Prompt(text="hi")], params=P.SamplingParams(max_new_tokens=3)), timeout=30)
        assert r.policy_version == "v0001"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        t.join(5)
    assert code == 0, "\n".join(lines[-40:])
    assert any("all services stopped" in line for line in lines)
    assert not any("killing it" in line for line in lines), "a child needed SIGKILL"
