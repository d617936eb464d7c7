"""``palm-rlhf up``: run every service as a child process and stop them together.

Children are started as ``python -m palm_rlhf.cli serve ROLE ...`` in their own sessions, so
Ctrl-C reaches only the supervisor, which then stops them in order: SIGTERM (each drains),
then SIGKILL after the grace period. A child that exits on its own is reported and brings
the whole set down: nothing is restarted silently.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import (
    DEFAULT_METRICS_PORTS,
    DEFAULT_PORTS,
    add_common_arguments,
    env,
    rate_limit_spec,
)

MODEL_ROLES = ("trainer", "policy", "reference", "reward")


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=env("PORT", 8000, int), help="gateway HTTP port (PALM_RLHF_PORT)")
    add_common_arguments(p)
    p.add_argument("--free-ports", action="store_true",
                   help="give the internal gRPC services and metrics free ephemeral ports instead of the defaults")
    p.add_argument("--no-gateway", action="store_true", help="start only the four model services")
    p.add_argument("--grace", type=float, default=env("GRACE", 10.0, float),
                   help="seconds each child gets to drain on shutdown before SIGKILL (PALM_RLHF_GRACE)")
    p.add_argument("--ready-timeout", type=float, default=600.0,
                   help="seconds to wait for every service to report ready (the first start may build the demo model)")
    p.add_argument("--api-keys-file", default=env("API_KEYS_FILE"), help="passed to the gateway")
    p.add_argument("--rate-limit", type=rate_limit_spec,
                   default=rate_limit_spec(env("RATE_LIMIT", "1200/min:300")),
                   help="passed to the gateway: request units per minute per API key, a chat completion 1, a "
                        "feedback row 0.1 (or N/s, N/h, N/s:BURST, off; default 1200/min:300)")
    p.add_argument("--scorer", default=env("SCORER", "learned"), help="passed to the reward service")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    cmd: list[str]
    addr: str
    proc: subprocess.Popen | None = None
    reader: threading.Thread | None = None
    lines: list[str] = field(default_factory=list)


class Supervisor:
    def __init__(self, args: argparse.Namespace, out=None):
        self.args = args
        self.out = out or sys.stdout
        self.children: list[Child] = []
        self.stopping = threading.Event()
        self._print_lock = threading.Lock()

    def say(self, name: str, line: str) -> None:
        with self._print_lock:
            print(f"{name:<9}| {line}", file=self.out, flush=True)

    # -- planning -----------------------------------------------------------------------------

    def plan(self) -> None:
        a = self.args
        host = a.host
        ports = {r: (free_port(host) if a.free_ports else DEFAULT_PORTS[r]) for r in MODEL_ROLES}
        mports = {r: (free_port(host) if a.free_ports else DEFAULT_METRICS_PORTS[r]) for r in MODEL_ROLES}
        addrs = {r: f"{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{ports[r]}" for r in MODEL_ROLES}
        base = [sys.executable, "-m", "palm_rlhf.cli", "serve"]
        shared = [
            "--host", host, "--data-dir", str(a.data_dir), "--device", a.device,
            "--policy-addr", addrs["policy"], "--reference-addr", addrs["reference"],
            "--reward-addr", addrs["reward"], "--trainer-addr", addrs["trainer"],
            "--max-message-bytes", str(a.max_message_bytes), "--torch-threads", str(a.torch_threads),
        ]
        if a.admin_token:
            shared += ["--admin-token", a.admin_token]
        if a.database_url:
            shared += ["--database-url", a.database_url]
        for role in MODEL_ROLES:
            cmd = base + [role, "--port", str(ports[role]), "--metrics-port", str(mports[role]), *shared]
            if role == "policy" and a.checkpoint:
                cmd += ["--checkpoint", a.checkpoint]
            if role == "reward":
                cmd += ["--scorer", a.scorer]
            self.children.append(Child(role, cmd, addrs[role]))
        if not a.no_gateway and importlib.util.find_spec("services.gateway.app") is not None:
            cmd = base + ["gateway", "--port", str(a.port), *shared, "--rate-limit", str(a.rate_limit)]
            if a.api_keys_file:
                cmd += ["--api-keys-file", a.api_keys_file]
            gw_host = host if host not in ("0.0.0.0", "::") else "127.0.0.1"
            self.children.append(Child("gateway", cmd, f"{gw_host}:{a.port}"))

    # -- processes ----------------------------------------------------------------------------

    def start(self, child: Child) -> None:
        env_vars = dict(os.environ, PYTHONUNBUFFERED="1")
        child.proc = subprocess.Popen(
            child.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env=env_vars, start_new_session=True,  # Ctrl-C reaches the supervisor only
        )

        def pump() -> None:
            for line in child.proc.stdout:
                line = line.rstrip("\n")
                child.lines.append(line)
                self.say(child.name, line)

        child.reader = threading.Thread(target=pump, name=f"log-{child.name}", daemon=True)
        child.reader.start()
        self.say("up", f"started {child.name} (pid {child.proc.pid}) on {child.addr}")

    def exited(self) -> Child | None:
        for c in self.children:
            if c.proc is not None and c.proc.poll() is not None:
                return c
        return None

    def wait_ready(self, child: Child, deadline: float) -> bool:
        """Poll until ``child`` is ready; False if it died, the deadline passed or we are stopping."""
        if child.name == "gateway":
            check = lambda: _http_ready(child.addr)
        else:
            from services.common.client import wait_until_serving_sync

            def check() -> bool:
                try:
                    wait_until_serving_sync(child.addr, timeout=0.5)
                    return True
                except TimeoutError:
                    return False
        while time.monotonic() < deadline and not self.stopping.is_set():
            if child.proc.poll() is not None:
                return False
            if check():
                return True
            time.sleep(0.2)
        return False

    def stop_all(self) -> None:
        """SIGTERM everyone (gateway first), then SIGKILL whoever outlives the grace period."""
        for c in reversed(self.children):
            if c.proc is not None and c.proc.poll() is None:
                self.say("up", f"stopping {c.name}")
                try:
                    c.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self.args.grace + 5
        for c in self.children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say("up", f"{c.name} did not stop within the grace period: killing it")
                c.proc.kill()
                c.proc.wait()
        for c in self.children:
            if c.reader is not None:
                c.reader.join(timeout=2)

    def run(self) -> int:
        a = self.args
        Path(a.data_dir).mkdir(parents=True, exist_ok=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())
        self.say("up", f"data directory {Path(a.data_dir).resolve()}")
        # Seed the policy store once, before the children race to do it.
        from services.common.models import ensure_policy_store

        version = ensure_policy_store(a.data_dir, a.checkpoint if a.checkpoint and Path(a.checkpoint).is_dir() else None)
        self.say("up", f"policy store at {version}")
        self.plan()
        status = 0
        try:
            models = [c for c in self.children if c.name != "gateway"]
            for c in models:
                self.start(c)
            deadline = time.monotonic() + a.ready_timeout
            for c in models:
                if not self.wait_ready(c, deadline):
                    return self._fail(c)
            for c in self.children:
                if c.name == "gateway":
                    self.start(c)
                    if not self.wait_ready(c, deadline):
                        return self._fail(c)
            if any(c.name == "gateway" for c in self.children):
                url = f"http://{self.children[-1].addr}"
            else:
                url = ", ".join(f"{c.name}={c.addr}" for c in self.children)
            self.say("up", f"ready: {url}")
            while not self.stopping.is_set():
                dead = self.exited()
                if dead is not None:
                    self.say("up", f"{dead.name} exited with status {dead.proc.returncode}; stopping everything "
                                   "(nothing is restarted automatically)")
                    status = 1
                    break
                self.stopping.wait(0.2)
        finally:
            self.stop_all()
            self.say("up", "all services stopped")
        return status

    def _fail(self, child: Child) -> int:
        if self.stopping.is_set():
            return 0
        if child.proc.poll() is not None:
            self.say("up", f"{child.name} exited with status {child.proc.returncode} before becoming ready")
        else:
            self.say("up", f"{child.name} did not become ready within {self.args.ready_timeout:.0f}s")
        return 1


def _http_ready(addr: str) -> bool:
    for path in ("/healthz", "/"):
        try:
            with urllib.request.urlopen(f"http://{addr}{path}", timeout=1) as r:
                return r.status < 500
        except urllib.error.HTTPError as e:
            if e.code == 404 and path == "/healthz":
                continue
            return e.code < 500
        except (urllib.error.URLError, OSError):
            return False
    return False


def run_supervisor(args: argparse.Namespace) -> int:
    return Supervisor(args).run()
