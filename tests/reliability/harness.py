"""Real service processes for the client and reliability tests.

Every service runs as its own ``python -m palm_rlhf.cli serve ROLE`` process (as ``palm-rlhf
up`` starts them), so a test can SIGKILL one and start it again on the same port. Ports are
ephemeral on first start; the bound port is read from the line each process prints. Logs go to
files so tests can grep them for secrets.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
GRPC_LISTEN_RE = re.compile(r"^(\w+) listening on \S+:(\d+) \(grpc\)")
HTTP_LISTEN_RE = re.compile(r"^gateway listening on \S+:(\d+) \(http\)")

CLIENT_ADMIN_TOKEN = "client-test-admin-token-7f3a"
# the shared reliability stack (tests/reliability/conftest.py)
ADMIN_TOKEN = "rel-admin-9b1e44c0d7"
API_KEY = "rel-key-5f2d8a61c3"
RATE_LIMIT = "5/s:10"  # the limited gateway: 5 requests/s, burst 10, shared by all loopback clients
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC limit of the shared stack (the bad-input corpus crosses it)

# Small limits: requests stay cheap on two cores, and the bad-input corpus can cross them.
POLICY_FLAGS = ("--max-prompt-tokens", "128", "--max-new-tokens", "32", "--default-max-new-tokens", "8",
                "--max-n", "4", "--max-batch", "4", "--max-batch-rows", "64", "--batch-window-ms", "5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_data_dir(root: Path, versions: int = 1) -> Path:
    """A data dir whose policy store holds ``versions`` tiny random PaLMs (v0001 CURRENT); the
    reward service initialises its own store from v0001 on first start."""
    import torch

    from palm_rlhf.checkpoint import CheckpointStore
    from palm_rlhf.config import PaLMConfig
    from palm_rlhf.model import PaLM

    st = CheckpointStore(root / "checkpoints", "policy")
    for i in range(versions):
        torch.manual_seed(i)
        m = PaLM(PaLMConfig.from_name("tiny"))
        st.save(m, m.config, parent=(f"v{i:04d}" if i else None), make_current=(i == 0))
    return root


def rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc (VmRSS, VmHWM)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            fields[k] = int(v.split()[0])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


class ServiceProcess:
    """One ``palm-rlhf serve ROLE`` process that can be killed and restarted on its port."""

    def __init__(self, role: str, data_dir: Path, log_dir: Path, *flags: str, port: int = 0,
                 env: dict[str, str] | None = None):
        self.role = role
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.flags = list(flags)
        self.port = port
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log_paths: list[Path] = []
        self.starts = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ServiceProcess:
        """Start (or restart on the same port) and wait until the port is bound."""
        cmd = [sys.executable, "-m", "palm_rlhf.cli", "serve", self.role, "--host", "127.0.0.1",
               "--port", str(self.port), "--data-dir", str(self.data_dir), *self.flags]
        if self.role != "gateway":
            cmd += ["--metrics-port", "0"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PALM_RLHF_DEMO_AUTOBUILD="0")
        for k in [k for k in env if k.startswith("PALM_RLHF_") and k not in ("PALM_RLHF_DEMO_AUTOBUILD",)]:
            env.pop(k)  # the test decides every setting
        env.update(self.env)
        self.starts += 1
        log_path = self.log_dir / f"{self.role}-{self.starts}-{time.monotonic_ns()}.log"
        self.log_paths.append(log_path)
        self._log = open(log_path, "w")  # noqa: SIM115 - closed by the reader thread at EOF
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        bound = threading.Event()

        def pump(proc: subprocess.Popen, log) -> None:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                m = GRPC_LISTEN_RE.match(line) or HTTP_LISTEN_RE.match(line)
                if m:
                    self.port = int(m.group(m.lastindex))
                    bound.set()
            log.close()

        threading.Thread(target=pump, args=(self.proc, self._log), daemon=True).start()
        deadline = time.monotonic() + 120
        while not bound.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.role} did not bind (status {self.proc.poll()}):\n{self.logs()[-4000:]}")
        return self

    def wait_ready(self, timeout: float = 120.0) -> ServiceProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            if self.is_ready():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.role} not ready after {timeout}s:\n{self.logs()[-4000:]}")

    def is_ready(self) -> bool:
        if self.role == "gateway":
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False
        from clients import GrpcClient

        with GrpcClient(self.addr) as c:
            return c.health(timeout=1.0) == "SERVING"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    # -- facts --------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.log_paths if p.exists())


class Stack:
    """policy + reward (+ trainer) + gateway processes over one data dir."""

    def __init__(self, data_dir: Path, log_dir: Path, *, gateway_flags: tuple[str, ...] = (),
                 gateway_env: dict[str, str] | None = None, admin_token: str | None = None,
                 trainer: bool = False, reward_flags: tuple[str, ...] = (), service_flags: tuple[str, ...] = (),
                 policy_flags: tuple[str, ...] = ()):
        self.data_dir = data_dir
        self.log_dir = log_dir
        admin = ("--admin-token", admin_token) if admin_token else ()
        grace = ("--grace", "2", *service_flags)
        self.policy = ServiceProcess("policy", data_dir, log_dir, *POLICY_FLAGS, *grace, *policy_flags, *admin)
        self.reward = ServiceProcess("reward", data_dir, log_dir, "--max-batch", "16", *grace, *reward_flags, *admin)
        self.trainer = ServiceProcess("trainer", data_dir, log_dir, *grace, *admin) if trainer else None
        self.gateway_flags = gateway_flags
        self.gateway_env = gateway_env or {}
        self.gateways: list[ServiceProcess] = []

    @property
    def services(self) -> list[ServiceProcess]:
        return [p for p in (self.policy, self.reward, self.trainer) if p is not None]

    def start(self) -> Stack:
        # the policy seeds nothing here (the store is pre-filled); reward builds its store from it
        for p in self.services:
            p.start()
        for p in self.services:
            p.wait_ready()
        return self

    def add_gateway(self, *flags: str, env: dict[str, str] | None = None) -> ServiceProcess:
        gw = ServiceProcess(
            "gateway", self.data_dir, self.log_dir, "--policy-addr", self.policy.addr, "--reward-addr",
            self.reward.addr, *self.gateway_flags, *flags, env={**self.gateway_env, **(env or {})},
        )
        self.gateways.append(gw)
        return gw.start().wait_ready()

    def stop(self) -> None:
        for p in [*self.gateways, *self.services]:
            p.stop()
