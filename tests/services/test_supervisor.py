"""``palm-rlhf up`` as a supervisor: crashed children are restarted with backoff while the others
keep serving, a crash loop stops everything, readiness comes from each child's own ready line,
a busy port is refused before anything starts, SIGINT/SIGTERM/SIGHUP stop every child even when
stdout is gone, and the gRPC keepalive settings of clients and servers agree.

The real-process tests share one ``up`` (module fixture ``system``, tiny random checkpoints)
for the kill tests, and end it with SIGINT after closing the pipe it writes to; SIGHUP gets a
second, gateway-less ``up``. The restart policy itself is also tested in-process with fake
children, which is quicker than crashing real services.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.supervisor import Child, RestartPolicy, Supervisor

from .conftest import REPO, make_data_dir

ROLES = ("policy", "reference", "reward", "trainer", "gateway")
STARTED_RE = re.compile(r"^up\s*\| started (\w+) \(pid (\d+)\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Up:
    """``palm-rlhf up`` as a child process whose stdout is a pipe that this test reads (and can
    close, to play a reader that went away)."""

    def __init__(self, data_dir: Path, *flags: str):
        self.data_dir = data_dir
        env = dict(os.environ, PYTHONUNBUFFERED="1", PALM_RLHF_DEMO_AUTOBUILD="0")
        for k in ("PALM_RLHF_TRAINER_ADDR", "PALM_RLHF_ADMIN_TOKEN", "PALM_RLHF_CHECKPOINT", "PALM_RLHF_PORT"):
            env.pop(k, None)
        rfd, wfd = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "palm_rlhf.cli", "up", "--data-dir", str(data_dir), *flags],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=wfd, stderr=subprocess.STDOUT, env=env,
        )
        os.close(wfd)  # the pipe's only writer is now `up`
        self._rfd: int | None = rfd
        self.lines: list[str] = []
        self.pids: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while not self._stop.is_set():
            if not select.select([self._rfd], [], [], 0.1)[0]:
                continue
            chunk = os.read(self._rfd, 1 << 16)
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\n")
            for raw in done:
                line = raw.decode(errors="replace")
                m = STARTED_RE.match(line)
                if m:
                    self.pids.setdefault(m.group(1), []).append(int(m.group(2)))
                self.lines.append(line)

    def close_output(self) -> None:
        """Close the read end of the pipe: `up`'s next write fails with EPIPE."""
        self._stop.set()
        self._reader.join(5)
        if self._rfd is not None:
            os.close(self._rfd)
            self._rfd = None

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> int:
        """Index of the first line from ``start`` on that contains ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(start, len(self.lines)):
                if pattern in self.lines[i]:
                    return i
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"`up` exited ({self.proc.returncode}) before {pattern!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.tail()}")
            time.sleep(0.05)

    def pid(self, role: str) -> int:
        return self.pids[role][-1]

    def alive_children(self) -> list[tuple[str, int]]:
        """(role, pid) of every child `up` ever started that is still running."""
        return [(role, pid) for role, pids in self.pids.items() for pid in pids if self.is_ours(pid)]

    def is_ours(self, pid: int) -> bool:
        """A live (not zombie) process started for this data directory."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.data_dir).encode() in cmdline

    def wait_children_gone(self, timeout: float) -> list[tuple[str, int]]:
        deadline = time.monotonic() + timeout
        while (left := self.alive_children()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for _, pid in self.alive_children():  # only processes this test started
            os.kill(pid, signal.SIGKILL)
        self.close_output()


def chat(port: int, timeout: float = 30.0) -> int:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def up_args(**kw) -> argparse.Namespace:
    base = {"grace": 2.0, "ready_timeout": 20.0, "restart_limit": 5, "restart_window": 60.0,
            "restart_backoff": 0.05, "restart_backoff_max": 0.2}
    return argparse.Namespace(**{**base, **kw})


def fake(name: str, code: str, *argv: str) -> Child:
    return Child(name, [sys.executable, "-c", code, *argv], addr="-")


STEADY = "print('{0} ready', flush=True); import time; time.sleep(120)"
CRASHER = "import time; print('{0} ready', flush=True); time.sleep(1.0); raise SystemExit(3)"
FLAKY = ("import os, sys, time; first = not os.path.exists(sys.argv[1]); open(sys.argv[1], 'a').close(); "
         "print('{0} ready', flush=True); time.sleep(1.0); sys.exit(3) if first else time.sleep(120)")


def run_in_thread(sup: Supervisor) -> tuple[threading.Thread, dict]:
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", sup.supervise()), daemon=True)
    t.start()
    return t, result


# -- the restart policy, in-process ---------------------------------------------------------------


def test_restart_policy_backs_off_exponentially_and_gives_up_on_a_crash_loop():
    p = RestartPolicy(limit=5, window=300, backoff=1.0, max_backoff=8.0)
    delays = [p.crashed("trainer", now=t) for t in (0, 10, 20, 30, 40)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]  # doubling, capped
    assert p.crashed("policy", now=41) == 1.0  # counted per child
    assert p.crashed("trainer", now=50) is None  # the 6th crash within 300 s
    q = RestartPolicy(limit=5, window=300, backoff=1.0, max_backoff=30.0)
    for t in (0, 100, 200):
        q.crashed("reward", now=t)
    assert q.crashed("reward", now=350) == 4.0  # the crash at t=0 aged out: 3 within the window
    assert RestartPolicy(limit=0).crashed("x", now=0) is None  # restarts off


def test_crashed_child_is_restarted_while_the_others_keep_running(tmp_path):
    out = io.StringIO()
    sup = Supervisor(up_args(restart_backoff=0.1), out=out)
    steady, flaky = fake("steady", STEADY.format("steady")), fake("flaky", FLAKY.format("flaky"), str(tmp_path / "m"))
    sup.children = [steady, flaky]
    t, result = run_in_thread(sup)
    try:
        deadline = time.monotonic() + 30
        while "flaky is back" not in out.getvalue():
            assert t.is_alive() and time.monotonic() < deadline, out.getvalue()
            time.sleep(0.05)
        first_steady = steady.proc.pid
        assert steady.proc.poll() is None and flaky.proc.poll() is None
        assert flaky.restarts == 1 and steady.restarts == 0
        assert "flaky exited with status 3; restarting it in 0.1s (crash 1 of at most 5 within 60s)" in out.getvalue()
    finally:
        sup.stopping.set()
        t.join(20)
    assert result.get("rc") == 0, out.getvalue()
    assert steady.proc.pid == first_steady and steady.proc.poll() is not None and flaky.proc.poll() is not None


def test_crash_loop_stops_everything_with_a_clear_message_and_nonzero_status():
    out = io.StringIO()
    sup = Supervisor(up_args(restart_limit=3), out=out)
    steady, crasher = fake("steady", STEADY.format("steady")), fake("crasher", CRASHER.format("crasher"))
    sup.children = [steady, crasher]
    t, result = run_in_thread(sup)
    t.join(60)
    assert not t.is_alive(), "the supervisor did not give up on a crash loop:\n" + out.getvalue()
    text = out.getvalue()
    assert result["rc"] == 1, text
    assert "crash loop: crasher exited with status 3, its 4th exit within 60s (limit 3); stopping everything" in text
    assert crasher.restarts == 3
    assert steady.proc.poll() is not None, "the other children must be stopped too"
    assert "all services stopped" in text


def test_readiness_comes_from_the_childs_own_ready_line():
    out = io.StringIO()
    sup = Supervisor(up_args(ready_timeout=2.0), out=out)
    mute = fake("mute", "print('mute listening', flush=True); import time; time.sleep(60)")
    sup.children = [mute]
    t0 = time.monotonic()
    t, result = run_in_thread(sup)
    t.join(20)
    if t.is_alive():  # it took "alive" for "ready": stop it before failing
        sup.stopping.set()
        t.join(20)
        raise AssertionError("a child that never printed its ready line was taken for ready:\n" + out.getvalue())
    assert result["rc"] == 1  # alive, but never said "mute ready"
    assert time.monotonic() - t0 >= 2.0
    assert "mute did not become ready within 2s" in out.getvalue() and "ready: " not in out.getvalue()
    assert mute.proc.poll() is not None
    out = io.StringIO()
    sup = Supervisor(up_args(), out=out)
    sup.children = [fake("dead", "raise SystemExit(7)")]  # dies before its ready line
    assert sup.supervise() == 1
    assert "dead exited with status 7 before becoming ready" in out.getvalue()


def test_say_never_raises_when_stdout_is_gone():
    class Gone(io.TextIOBase):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    sup = Supervisor(up_args(), out=Gone())
    sup.say("up", "stopping policy")  # must not raise
    sup.say("up", "stopping reward")
    assert sup.out.name == os.devnull


# -- gRPC keepalive -----------------------------------------------------------------------------


def test_keepalive_settings_of_every_client_are_accepted_by_the_servers():
    import clients._grpc as standalone
    from services.common import client, server

    srv = dict(server.server_options(1 << 20))
    assert srv["grpc.keepalive_permit_without_calls"] == 1
    for opts in (client.channel_options(), standalone.channel_options(1 << 20, 2.0), client.keepalive_options()):
        o = dict(opts)
        assert o["grpc.keepalive_time_ms"] >= srv["grpc.http2.min_ping_interval_without_data_ms"], opts
        assert o["grpc.keepalive_permit_without_calls"] <= srv["grpc.keepalive_permit_without_calls"]


def test_idle_channel_and_quiet_stream_get_no_too_many_pings_goaway():
    """Both sides scaled down 50x (client pings every 0.6 s, server allows one per 0.2 s): a
    channel idle for 10 pings and one holding a silent stream stay READY (no GOAWAY, no
    reconnect), and calls after the idle period succeed."""
    from services.common import client, server

    scale = 50
    ka_ms = client.KEEPALIVE_TIME_MS // scale
    srv = grpc.server(futures.ThreadPoolExecutor(4),
                      options=server.server_options(1 << 20, min_ping_interval_ms=client.MIN_PING_INTERVAL_MS // scale))
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, srv)
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    channels, states = [], {}
    try:
        for name in ("idle", "stream"):
            ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=client.channel_options(retries=0, keepalive_time_ms=ka_ms))
            states[name] = []
            ch.subscribe(states[name].append, try_to_connect=True)
            channels.append(ch)
        stubs = [health_pb2_grpc.HealthStub(ch) for ch in channels]
        for stub in stubs:
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        watch = stubs[1].Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # then silent
        time.sleep(10 * ka_ms / 1000)
        for name, seen in states.items():
            assert seen[-1] == grpc.ChannelConnectivity.READY and seen.count(grpc.ChannelConnectivity.READY) == 1, \
                f"{name} channel left READY (GOAWAY too_many_pings?): {seen}"
        for stub in stubs:
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    finally:
        for ch in channels:
            ch.close()
        srv.stop(0)


# -- busy ports -----------------------------------------------------------------------------------


def _run_up(data_dir: Path, *flags: str, timeout: float = 60) -> tuple[int, str, float]:
    env = dict(os.environ, PALM_RLHF_DEMO_AUTOBUILD="0")
    env.pop("PALM_RLHF_PORT", None)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "palm_rlhf.cli", "up", "--data-dir", str(data_dir), *flags],
                       cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    out = p.stdout + p.stderr
    for m in re.finditer(r"started \w+ \(pid (\d+)\)", out):  # should be none; never leave any behind
        try:
            os.kill(int(m.group(1)), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return p.returncode, out, time.monotonic() - t0


def test_a_busy_port_is_a_clear_error_before_anything_starts(tmp_path):
    with socket.socket() as held:  # an older copy still serving the gateway port
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, out, _ = _run_up(tmp_path / "a", "--free-ports", "--port", str(port))
    assert code != 0, out
    assert f"port {port} is in use (another palm-rlhf up?); stop it or choose another --port" in out, out
    assert "started " not in out and "ready" not in out and not (tmp_path / "a").exists(), out

    # Without --free-ports, the default gRPC ports are checked too.
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        held.bind(("127.0.0.1", 50051))
        held.listen()
    except OSError:
        pass  # someone else holds it already: `up` must refuse all the same
    try:
        code, out, _ = _run_up(tmp_path / "b", "--port", str(free_port()))
    finally:
        held.close()
    assert code != 0, out
    assert "port 50051 is in use (another palm-rlhf up?); stop it or use --free-ports" in out, out
    assert "started " not in out and not (tmp_path / "b").exists(), out


# -- one real `up`, killed piece by piece ---------------------------------------------------------


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    data = make_data_dir(tmp_path_factory.mktemp("up-data"))
    port = free_port()
    up = Up(data, "--free-ports", "--port", str(port), "--grace", "5", "--ready-timeout", "240")
    up.port = port
    try:
        up.wait_for("| ready: ", 300)
        yield up
    finally:
        up.cleanup()


class ChatLoop:
    """Chat requests one after another in a thread; records (time, status)."""

    def __init__(self, port: int):
        self.port, self.results = port, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.results.append((time.monotonic(), chat(self.port)))
            time.sleep(0.1)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._t.join(60)
        return self.results


def test_ready_is_announced_only_after_every_child_said_so_itself(system):
    ready = system.wait_for("| ready: ", 0)
    for role in ("policy", "reference", "reward", "trainer"):
        own = system.wait_for(f"| {role} ready", 0)
        assert own < ready
    assert system.wait_for("| gateway listening on ", 0) < ready
    assert chat(system.port) == 200


def test_running_children_have_the_token_in_their_environment_only(system):
    token_file = system.data_dir / "admin-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert system.wait_for(f"admin token written to {token_file.resolve()}", 0) >= 0
    assert not any(token in line for line in system.lines)  # printed where it is, not what it is
    roles = {role for role, _ in system.alive_children()}
    assert roles >= {"policy", "reference", "reward", "trainer", "gateway"}
    for role, pid in system.alive_children():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert token.encode() not in cmdline and b"--admin-token" not in cmdline, role
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"PALM_RLHF_ADMIN_TOKEN={token}".encode() in environ, role


def test_admin_calls_need_the_generated_token(system):
    from clients import NO_RETRY, ClientError, TrainerClient

    trainer_addr = next(line.split(" on ")[-1] for line in system.lines if "started trainer (pid" in line)
    token = (system.data_dir / "admin-token").read_text().strip()
    with TrainerClient(trainer_addr, retry=NO_RETRY, timeout=30) as anonymous, pytest.raises(ClientError) as ei:
        anonymous.rollback("v0077")
    assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED
    with TrainerClient(trainer_addr, admin_token=token, retry=NO_RETRY, timeout=30) as admin, \
            pytest.raises(ClientError) as ei:
        admin.rollback("v0077")
    assert ei.value.code == grpc.StatusCode.NOT_FOUND  # past the token check: the version is unknown


def test_killed_reference_and_trainer_restart_while_chat_keeps_answering(system):
    start = len(system.lines)
    old = {r: system.pid(r) for r in ("reference", "trainer")}
    loop = ChatLoop(system.port)
    time.sleep(1.0)
    t_kill = time.monotonic()
    for pid in old.values():
        os.kill(pid, signal.SIGKILL)
    back = {}
    for role in old:
        i = system.wait_for(f"| {role} is back", 120, start)
        back[role] = float(re.search(r"ready ([\d.]+)s after it exited", system.lines[i]).group(1))
    t_back = time.monotonic()
    time.sleep(1.0)
    results = loop.stop()
    during = [code for t, code in results if t_kill <= t <= t_back]
    assert during and all(code == 200 for code in during), f"chat failed during the restart: {results}"
    assert all(code == 200 for _, code in results), results
    for role, pid in old.items():
        assert system.pid(role) != pid and system.is_ours(system.pid(role)) and not system.is_ours(pid)
        system.wait_for(f"| {role} exited with status -9; restarting it in 1.0s", 0, start)
    print("SUPERVISOR REPORT " + json.dumps({"restart_s": back, "chat_during_restart": len(during),
                                             "chat_ok": sum(c == 200 for c in during)}))


def test_killed_policy_is_restarted_and_chat_answers_again_within_30s(system):
    start = len(system.lines)
    old = system.pid("policy")
    assert chat(system.port) == 200
    t_kill = time.monotonic()
    os.kill(old, signal.SIGKILL)
    codes = []
    while True:
        code = chat(system.port, timeout=10)
        codes.append(code)
        if code == 200:
            break
        assert time.monotonic() - t_kill < 30, f"chat did not answer within 30 s of the kill: {codes}\n{system.tail()}"
        time.sleep(0.25)
    recovered = time.monotonic() - t_kill
    i = system.wait_for("| policy is back", 10, start)
    assert system.pid("policy") != old and system.is_ours(system.pid("policy"))
    print("SUPERVISOR REPORT " + json.dumps({"policy_chat_recovered_s": round(recovered, 1),
                                             "policy_restart": system.lines[i].split("| ", 1)[1],
                                             "chat_statuses": codes}))


def test_sigint_with_stdout_gone_stops_every_child(system):
    children = system.alive_children()
    assert {r for r, _ in children} == set(ROLES), children
    system.close_output()  # the reader of `up | tee` went away
    time.sleep(0.5)
    system.proc.send_signal(signal.SIGINT)
    code = system.proc.wait(60)
    assert system.wait_children_gone(10) == [], "children outlived `up`"
    assert code == 0


def test_sighup_stops_every_child(tmp_path):
    data = make_data_dir(tmp_path / "data")
    up = Up(data, "--free-ports", "--no-gateway", "--port", str(free_port()), "--grace", "5", "--ready-timeout", "240")
    try:
        up.wait_for("| ready: ", 300)
        assert len(up.alive_children()) == 4
        up.proc.send_signal(signal.SIGHUP)  # the terminal closed
        code = up.proc.wait(60)
        assert up.wait_children_gone(10) == [], "children outlived `up`"
        assert code == 0, up.tail()
        up.wait_for("received SIGHUP: stopping every service", 5)
        up.wait_for("all services stopped", 5)
    finally:
        up.cleanup()


def test_children_stop_by_themselves_when_up_is_killed_with_sigkill(tmp_path):
    data = make_data_dir(tmp_path / "data")
    up = Up(data, "--free-ports", "--no-gateway", "--port", str(free_port()), "--grace", "5", "--ready-timeout", "240")
    try:
        up.wait_for("| ready: ", 300)
        assert len(up.alive_children()) == 4
        up.proc.kill()  # no handler runs: the children must notice on their own
        up.proc.wait(30)
        assert up.wait_children_gone(30) == [], "children outlived a SIGKILLed `up`"
    finally:
        up.cleanup()


# --------------------------------------------------------------------------------------------
# secrets: the admin token and the database URL reach the children by environment, never argv


def test_planned_children_get_secrets_by_environment_not_argv(tmp_path, monkeypatch):
    from services.common.settings import UpSettings

    for k in list(os.environ):
        if k.startswith("PALM_RLHF_"):
            monkeypatch.delenv(k)
    secret, url = "tok-" + "x" * 20, "postgresql://app:pa55word@db:5432/fb"
    a = UpSettings.load({"data_dir": tmp_path, "admin_token": secret, "database_url": url, "free_ports": True})
    sup = Supervisor(a, out=io.StringIO())
    sup.plan()
    assert {c.name for c in sup.children} >= {"policy", "reference", "reward", "trainer"}
    for c in sup.children:
        argv = " ".join(c.cmd)
        assert secret not in argv and "pa55word" not in argv and "--admin-token" not in argv, c.cmd
        assert c.env["PALM_RLHF_ADMIN_TOKEN"] == secret and c.env["PALM_RLHF_DATABASE_URL"] == url


def test_up_generates_a_private_admin_token_once(tmp_path):
    from services.supervisor import ensure_admin_token

    token, path, created = ensure_admin_token(tmp_path)
    assert created and path == tmp_path / "admin-token" and len(token) >= 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().strip() == token
    path.chmod(0o644)
    again, _, created_again = ensure_admin_token(tmp_path)
    assert (again, created_again) == (token, False)  # kept across restarts, so clients keep working
    assert path.stat().st_mode & 0o777 == 0o600
    other, _, _ = ensure_admin_token(tmp_path / "..")
    assert other != token
