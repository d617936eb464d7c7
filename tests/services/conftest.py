"""Fixtures for the service tests: tiny random checkpoints and real service processes.

Every service runs as its own ``python -m palm_rlhf.cli serve ...`` process on an ephemeral
port of 127.0.0.1; the bound ports are read from the line each process prints at start-up.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
LISTEN_RE = re.compile(r"^(\w+) listening on \S+:(\d+) \(grpc\), metrics http://\S+:(\d+)/metrics")


def make_data_dir(root: Path) -> Path:
    """A data dir whose policy store holds two tiny random versions: v0001 (CURRENT) and
    v0002 (a child of v0001 with different weights, not current)."""
    from palm_rlhf.checkpoint import CheckpointStore
    from palm_rlhf.config import PaLMConfig
    from palm_rlhf.model import PaLM

    st = CheckpointStore(root / "checkpoints", "policy")
    torch.manual_seed(0)
    m1 = PaLM(PaLMConfig.from_name("tiny"))
    st.save(m1, m1.config)
    torch.manual_seed(1)
    m2 = PaLM(PaLMConfig.from_name("tiny"))
    st.save(m2, m2.config, parent="v0001", make_current=False)
    return root


class ServiceProcess:
    """One service process; ``addr`` and ``metrics_url`` are known once it has bound."""

    def __init__(self, role: str, data_dir: Path, *extra: str, env: dict | None = None, log_dir: Path):
        self.role = role
        cmd = [sys.executable, "-m", "palm_rlhf.cli", "serve", role, "--port", "0", "--metrics-port", "0",
               "--host", "127.0.0.1", "--data-dir", str(data_dir), *extra]
        self.log_path = log_dir / f"{role}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in terminate()
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", PALM_RLHF_DEMO_AUTOBUILD="0", **(env or {}))
        for k in ("PALM_RLHF_TRAINER_ADDR", "PALM_RLHF_ADMIN_TOKEN", "PALM_RLHF_CHECKPOINT"):
            if env is None or k not in env:
                full_env.pop(k, None)
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True, env=full_env)
        self.lines: list[str] = []
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._bound = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = LISTEN_RE.match(line)
            if m:
                self.port, self.metrics_port = int(m.group(2)), int(m.group(3))
                self._bound.set()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 90.0) -> ServiceProcess:
        from services.common.client import wait_until_serving_sync

        deadline = time.monotonic() + timeout
        while not self._bound.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.role} did not start (status {self.proc.poll()}):\n{self.logs()}")
        try:
            wait_until_serving_sync(self.addr, timeout=max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            raise RuntimeError(f"{self.role} never became SERVING:\n{self.logs()}") from None
        return self

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("service-logs")


@pytest.fixture(scope="session")
def spawn(log_dir):
    """spawn(role, data_dir, *flags, env=None) -> ServiceProcess (not yet waited for);
    every process is stopped at the end of the session."""
    started: list[ServiceProcess] = []

    def _spawn(role: str, data_dir: Path, *extra: str, env: dict | None = None) -> ServiceProcess:
        p = ServiceProcess(role, data_dir, *extra, env=env, log_dir=log_dir)
        started.append(p)
        return p

    yield _spawn
    for p in started:
        p.terminate()


@pytest.fixture(scope="session")
def policy_data(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("policy-data"))


ADMIN_TOKEN = "s3cret-admin"
POLICY_FLAGS = ("--max-prompt-tokens", "64", "--max-new-tokens", "48", "--default-max-new-tokens", "8",
                "--max-n", "4", "--max-batch", "4", "--max-batch-rows", "64", "--batch-window-ms", "30",
                "--admin-token", ADMIN_TOKEN)


@pytest.fixture(scope="session")
def policy_proc(spawn, policy_data) -> ServiceProcess:
    return spawn("policy", policy_data, *POLICY_FLAGS).wait_ready()


@pytest.fixture(scope="session")
def tiny_model(policy_data):
    from palm_rlhf.checkpoint import load_palm

    return load_palm(policy_data / "checkpoints" / "policy" / "v0001")[0]


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    """The RpcError a call raises (fails the test when it succeeds)."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as e:
        return e
    raise AssertionError("the call succeeded but an error status was expected")


def metric_value(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``. A series that is absent
    fails the test, unless ``default`` is given (a labelled series exists only once used)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    if not found:
        if default is None:
            raise AssertionError(f"no sample of {name} with labels {labels} in the metrics")
        return default
    return total
