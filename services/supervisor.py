"""``palm-rlhf up``: run every service as a child process, keep them up, stop them together.

Children are started as ``python -m palm_rlhf.cli serve ROLE ...`` in their own sessions, so
Ctrl-C (and a closing terminal's SIGHUP) reaches only the supervisor, which then stops them in
order: SIGTERM (each drains), then SIGKILL after the grace period.

A child counts as ready only from its own process: it is alive and has printed its own ready
line (``<role> ready`` once its model is loaded; the gateway's ``gateway listening on HOST:PORT
(http)`` followed by an answer from that port), never from an address probe alone, which an
older copy still holding the port would pass. Ports are checked before anything starts.

After start-up, a child that exits is restarted with exponential backoff (``--restart-backoff``
doubling up to ``--restart-backoff-max``) while the others keep serving; a child that crashes
more than ``--restart-limit`` times within ``--restart-window`` seconds is a crash loop, and
the whole set is stopped with a non-zero exit status. ``say()`` never raises: when stdout goes
away (a closed pipe or terminal) the supervisor carries on silently and still stops everyone.

Once its ports are chosen, ``up`` writes them to ``DATA_DIR/addresses.json`` (atomically: a
reader never sees half a file): every service's gRPC address, the gateway's URL and the
metrics ports, with ``up``'s pid, and ``"ready": true`` from the ``ready:`` line on. The CLI
clients read it when no address was given (services/common/settings.py ``ClientSettings``),
which is how they find services on ``--free-ports``. ``up`` removes the file when it stops; a
file left behind by an ``up`` killed with SIGKILL names a pid that no longer runs, and the
clients ignore it.
"""

from __future__ import annotations

import argparse
import collections
import errno
import importlib.util
import json
import os
import re
import secrets
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
    ADDRESSES_FILE_NAME,
    ADMIN_TOKEN_FILE_NAME,
    DEFAULT_METRICS_PORTS,
    DEFAULT_PORTS,
    DEFAULT_RATE_LIMIT,
    add_common_arguments,
    flag,
    rate_limit_spec,
)

MODEL_ROLES = ("trainer", "policy", "reference", "reward")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "--port", type=int, default=8000, help="gateway HTTP port (PALM_RLHF_PORT)")
    add_common_arguments(p)
    flag(p, "--free-ports", action="store_true",
         help="give the internal gRPC services and metrics free ephemeral ports instead of the defaults "
              "(PALM_RLHF_FREE_PORTS)")
    flag(p, "--no-gateway", action="store_true", help="start only the four model services (PALM_RLHF_NO_GATEWAY)")
    flag(p, "--grace", type=float, default=10.0,
         help="seconds each child gets to drain on shutdown before SIGKILL (PALM_RLHF_GRACE)")
    flag(p, "--ready-timeout", type=float, default=600.0,
         help="seconds to wait for every service to report ready (the first start may build the demo model), "
              "and for a restarted one (PALM_RLHF_READY_TIMEOUT)")
    flag(p, "--api-keys-file", default=None, help="passed to the gateway (PALM_RLHF_API_KEYS_FILE)")
    flag(p, "--rate-limit", type=rate_limit_spec, default=DEFAULT_RATE_LIMIT,
         help="passed to the gateway: request units per minute per API key, a chat completion 1, a "
              "feedback row 0.1 (or N/s, N/h, N/s:BURST, off; PALM_RLHF_RATE_LIMIT, default 1200/min:300)")
    flag(p, "--scorer", default="learned", choices=("learned", "sentiment"),
         help="passed to the reward service (PALM_RLHF_SCORER)")
    flag(p, "--restart-limit", type=int, default=5,
         help="a child that crashes more than this many times within --restart-window seconds stops "
              "everything (exit status 1); 0 = never restart, the first crash stops everything "
              "(PALM_RLHF_RESTART_LIMIT, default 5)")
    flag(p, "--restart-window", type=float, default=300.0,
         help="seconds over which crashes are counted (PALM_RLHF_RESTART_WINDOW, default 300)")
    flag(p, "--restart-backoff", type=float, default=1.0,
         help="seconds before the first restart of a crashed child, doubled for each further crash "
              "within the window (PALM_RLHF_RESTART_BACKOFF, default 1)")
    flag(p, "--restart-backoff-max", type=float, default=30.0,
         help="cap on the restart delay (PALM_RLHF_RESTART_BACKOFF_MAX, default 30)")


def ensure_admin_token(data_dir: str | Path) -> tuple[str, Path, bool]:
    """The admin token kept in ``DATA_DIR/admin-token`` (created with mode 0600 and a fresh
    random token when missing); returns (token, path, created)."""
    path = Path(data_dir) / ADMIN_TOKEN_FILE_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        from services.common.settings import read_secret_file

        return read_secret_file(path), path, False
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)  # whatever the umask
    return token, path, True


def write_json_atomically(path: Path, doc: dict) -> None:
    """Write ``doc`` to ``path`` through a temporary file renamed over it: a reader sees the old
    file or the new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on (or holds) ``host:port``. Binds with SO_REUSEADDR,
    as the services do, so sockets in TIME_WAIT from a copy that just stopped do not count."""
    if port <= 0:
        return False
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    for family, type_, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, type_, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
    return False


class RestartPolicy:
    """When to restart a crashed child, and when to give up.

    Crashes are counted per child over a sliding ``window`` (seconds). The k-th crash within
    the window is restarted after ``min(max_backoff, backoff * 2**(k-1))`` seconds; a crash that
    makes more than ``limit`` within the window is a crash loop: :meth:`crashed` returns None.
    Old crashes age out of the window, so a child that has been stable for a while starts again
    from the shortest delay. ``limit`` 0 never restarts.
    """

    def __init__(self, limit: int = 5, window: float = 300.0, backoff: float = 1.0, max_backoff: float = 30.0):
        self.limit, self.window = limit, window
        self.backoff, self.max_backoff = backoff, max_backoff
        self._crashes: dict[str, collections.deque[float]] = {}

    def crashed(self, name: str, now: float | None = None) -> float | None:
        """Record a crash of ``name``; the delay before restarting it, or None to give up."""
        now = time.monotonic() if now is None else now
        q = self._crashes.setdefault(name, collections.deque())
        q.append(now)
        while q and now - q[0] > self.window:
            q.popleft()
        if len(q) > self.limit:
            return None
        return min(self.max_backoff, self.backoff * 2 ** (len(q) - 1))

    def recent(self, name: str) -> int:
        """Crashes of ``name`` within the window that ended with its latest crash."""
        return len(self._crashes.get(name, ()))


@dataclass
class Child:
    name: str
    cmd: list[str]
    addr: str
    http: bool = False  # the gateway: ready = its listening line, then an answer from that port
    env: dict[str, str] = field(default_factory=dict)  # added to the environment: secrets never go on argv
    proc: subprocess.Popen | None = None
    reader: threading.Thread | None = None
    lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=500))
    announced: threading.Event = field(default_factory=threading.Event)  # this run printed its ready line
    state: str = "new"  # new | starting | ready | waiting (to be restarted) | stopped
    started_at: float = 0.0
    exited_at: float | None = None
    restart_at: float = 0.0
    restarts: int = 0


class Supervisor:
    def __init__(self, args: argparse.Namespace, out=None):
        self.args = args
        self.out = out or sys.stdout
        self.children: list[Child] = []
        self.stopping = threading.Event()  # set by other threads (tests) to stop
        # Signals received. The handler only appends here: setting an Event (it takes a lock) from
        # a handler can deadlock when the signal lands while the main thread holds that lock.
        self.signals: list[int] = []
        self._signals_at_stop = 0
        self._print_lock = threading.Lock()
        self._addresses_written = False
        self.policy = RestartPolicy(
            limit=getattr(args, "restart_limit", 5), window=getattr(args, "restart_window", 300.0),
            backoff=getattr(args, "restart_backoff", 1.0), max_backoff=getattr(args, "restart_backoff_max", 30.0),
        )

    def say(self, name: str, line: str) -> None:
        """Print one prefixed line; never raises. When the output is gone (the reader of a pipe
        went away, the terminal closed), later lines go to /dev/null and the work goes on."""
        with self._print_lock:
            try:
                print(f"{name:<9}| {line}", file=self.out, flush=True)
            except (OSError, ValueError):  # BrokenPipeError, EIO from a hung-up tty, a closed file
                self._silence()

    def _silence(self) -> None:
        devnull = open(os.devnull, "w")  # noqa: SIM115 - replaces self.out for good
        try:
            # Point the dead descriptor at /dev/null too, so that flushing what is still buffered
            # (at exit, for instance) cannot fail again.
            os.dup2(devnull.fileno(), self.out.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        self.out = devnull

    def _on_signal(self, signum, _frame) -> None:
        self.signals.append(signum)

    def should_stop(self) -> bool:
        return bool(self.signals) or self.stopping.is_set()

    def kill_now(self) -> bool:
        """A signal arrived after stopping began (a second Ctrl-C): SIGKILL at once."""
        return len(self.signals) > self._signals_at_stop

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signals[0]).name if self.signals else None

    # -- planning -----------------------------------------------------------------------------

    def plan(self) -> None:
        a = self.args
        host = a.host
        ports = {r: (free_port(host) if a.free_ports else DEFAULT_PORTS[r]) for r in MODEL_ROLES}
        mports = {r: (free_port(host) if a.free_ports else DEFAULT_METRICS_PORTS[r]) for r in MODEL_ROLES}
        self.ports = {(r, "grpc"): ports[r] for r in MODEL_ROLES} | {(r, "metrics"): mports[r] for r in MODEL_ROLES}
        addrs = {r: f"{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{ports[r]}" for r in MODEL_ROLES}
        base = [sys.executable, "-m", "palm_rlhf.cli", "serve"]
        shared = [
            "--host", host, "--data-dir", str(a.data_dir), "--device", a.device,
            "--policy-addr", addrs["policy"], "--reference-addr", addrs["reference"],
            "--reward-addr", addrs["reward"], "--trainer-addr", addrs["trainer"],
            "--max-message-bytes", str(a.max_message_bytes), "--torch-threads", str(a.torch_threads),
            "--grace", str(a.grace),
        ]
        from services.common.settings import env_for_child

        # Secrets travel in the environment, never on the command line (which every local user
        # can read in the process list).
        secret_env = env_for_child(admin_token=getattr(a, "admin_token", None),
                                   database_url=getattr(a, "database_url", None))
        for role in MODEL_ROLES:
            cmd = base + [role, "--port", str(ports[role]), "--metrics-port", str(mports[role]), *shared]
            if role == "policy" and a.checkpoint:
                cmd += ["--checkpoint", a.checkpoint]
            if role == "reward":
                cmd += ["--scorer", a.scorer]
            self.children.append(Child(role, cmd, addrs[role], env=dict(secret_env)))
        if not a.no_gateway and importlib.util.find_spec("services.gateway.app") is not None:
            cmd = base + ["gateway", "--port", str(a.port), *shared, "--rate-limit", str(a.rate_limit)]
            if a.api_keys_file:
                cmd += ["--api-keys-file", a.api_keys_file]
            gw_host = host if host not in ("0.0.0.0", "::") else "127.0.0.1"
            self.ports[("gateway", "http")] = a.port
            self.children.append(Child("gateway", cmd, f"{gw_host}:{a.port}", http=True, env=dict(secret_env)))

    def busy_ports(self) -> list[str]:
        """One message per planned port that is already taken (empty: all free)."""
        problems = []
        for (role, kind), port in self.ports.items():
            if (kind == "http" or not self.args.free_ports) and port_in_use(self.args.host, port):
                hint = "choose another --port" if kind == "http" else "use --free-ports"
                problems.append(f"port {port} is in use (another palm-rlhf up?); stop it or {hint} "
                                f"[the {role} {kind} port]")
        return problems

    # -- the addresses file -------------------------------------------------------------------

    @property
    def addresses_path(self) -> Path:
        return Path(self.args.data_dir) / ADDRESSES_FILE_NAME

    def addresses(self, ready: bool) -> dict:
        """What DATA_DIR/addresses.json holds: where each planned service listens."""
        gateway = next((c for c in self.children if c.http), None)
        gateway_url = None
        if gateway is not None and not gateway.addr.endswith(":0"):  # --port 0: known once it listens
            gateway_url = f"http://{gateway.addr}"
        return {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "ready": ready,
            "grpc": {c.name: c.addr for c in self.children if not c.http},
            "gateway_url": gateway_url,
            "metrics_ports": {r: self.ports[(r, "metrics")] for r in MODEL_ROLES if (r, "metrics") in self.ports},
        }

    def write_addresses(self, ready: bool) -> None:
        try:
            write_json_atomically(self.addresses_path, self.addresses(ready))
        except OSError as e:
            self.say("up", f"warning: could not write {self.addresses_path}: {e.strerror or e}")
            return
        if not self._addresses_written:
            self.say("up", f"addresses written to {self.addresses_path.resolve()}")
        self._addresses_written = True

    def update_addresses(self) -> None:
        """Rewrite the file, ready, once start-up is over (the gateway's port is known by then)
        and when a restarted gateway is back."""
        if self._addresses_written:
            self.write_addresses(ready=True)

    def remove_addresses(self) -> None:
        """Remove DATA_DIR/addresses.json if this ``up`` wrote it (not one of another ``up``
        that has since written its own over it)."""
        if not self._addresses_written:
            return
        try:
            if json.loads(self.addresses_path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                self.addresses_path.unlink()
        except (OSError, ValueError, AttributeError):
            pass

    # -- processes ----------------------------------------------------------------------------

    def start(self, child: Child) -> None:
        env_vars = dict(os.environ, PYTHONUNBUFFERED="1", PALM_RLHF_PARENT_PID=str(os.getpid()), **child.env)
        proc = subprocess.Popen(
            child.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            errors="replace", env=env_vars, start_new_session=True,  # signals reach the supervisor only
        )
        announced = threading.Event()  # this run's own: a line from an older run cannot set it
        child.proc, child.announced = proc, announced
        child.state, child.started_at = "starting", time.monotonic()
        if child.http:
            pattern = re.compile(rf"^{re.escape(child.name)} listening on (\S+):(\d+) \(http\)")
        else:
            pattern = re.compile(rf"^{re.escape(child.name)} ready$")

        def pump() -> None:
            # Drains the child's output for as long as it lives, whatever happens to ours: a child
            # whose pipe fills up would block on its next log line.
            try:
                for line in proc.stdout:
                    line = line.rstrip("\n")
                    child.lines.append(line)
                    m = pattern.match(line)
                    if m:
                        if child.http:
                            child.addr = f"{child.addr.rsplit(':', 1)[0]}:{m.group(2)}"
                        announced.set()
                    self.say(child.name, line)
            except (OSError, ValueError):
                pass

        child.reader = threading.Thread(target=pump, name=f"log-{child.name}", daemon=True)
        child.reader.start()
        self.say("up", f"started {child.name} (pid {proc.pid}) on {child.addr}")

    def is_ready(self, child: Child) -> bool:
        """Ready by the child's own word: alive and its ready line printed (the gateway: its
        listening line, and then its port answers)."""
        if child.proc is None or child.proc.poll() is not None or not child.announced.is_set():
            return False
        return _http_ready(child.addr) if child.http else True

    def wait_ready(self, child: Child, deadline: float) -> bool:
        """Wait until ``child`` is ready; False if it died, the deadline passed or we are stopping."""
        while time.monotonic() < deadline and not self.should_stop():
            if child.proc.poll() is not None:
                return False
            if self.is_ready(child):
                child.state = "ready"
                return True
            time.sleep(0.1)
        return False

    def stop_all(self) -> None:
        """SIGTERM everyone (gateway first), then SIGKILL whoever outlives the grace period (or
        everyone at once on a second signal)."""
        self._signals_at_stop = len(self.signals)
        for c in reversed(self.children):
            if c.proc is not None and c.proc.poll() is None:
                self.say("up", f"stopping {c.name}")
                try:
                    c.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self.args.grace + 5
        while time.monotonic() < deadline and not self.kill_now():
            if all(c.proc is None or c.proc.poll() is not None for c in self.children):
                break
            time.sleep(0.05)
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                why = "a second signal" if self.kill_now() else "it did not stop within the grace period"
                self.say("up", f"killing {c.name} ({why})")
                c.proc.kill()
                c.proc.wait()
            c.state = "stopped"
        for c in self.children:
            if c.reader is not None:
                c.reader.join(timeout=2)

    def run(self) -> int:
        a = self.args
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        try:
            self.plan()
            busy = self.busy_ports()
            if busy:
                for msg in busy:
                    self.say("up", f"error: {msg}")
                self.say("up", "nothing was started")
                return 1
            Path(a.data_dir).mkdir(parents=True, exist_ok=True)
            self.say("up", f"data directory {Path(a.data_dir).resolve()}")
            self.write_addresses(ready=False)
            if not a.admin_token:
                from services.common.settings import env_for_child

                token, path, created = ensure_admin_token(a.data_dir)
                a.admin_token = token
                for c in self.children:
                    c.env.update(env_for_child(admin_token=token))
                self.say("up", f"admin token {'written to' if created else 'read from'} {path.resolve()} (mode "
                               "0600); 'palm-rlhf trainer ...' finds it there with --data-dir, or set "
                               f"PALM_RLHF_ADMIN_TOKEN_FILE={path.resolve()}")
            # Seed the policy store once, before the children race to do it.
            from services.common.models import ensure_policy_store

            checkpoint = a.checkpoint if a.checkpoint and Path(a.checkpoint).is_dir() else None
            version = ensure_policy_store(a.data_dir, checkpoint)
            self.say("up", f"policy store at {version}")
            if self.should_stop():
                self.say("up", f"received {self.signal_name}: nothing was started")
                return 0
            return self.supervise()
        finally:
            self.remove_addresses()
            try:
                sys.stdout.flush()
            except (OSError, ValueError):
                pass

    def supervise(self) -> int:
        """Start the planned children, wait until each is ready, keep them up until a signal
        (0) or a crash loop (1); every child is stopped on the way out."""
        a = self.args
        try:
            models = [c for c in self.children if not c.http]
            for c in models:
                self.start(c)
            deadline = time.monotonic() + a.ready_timeout
            for c in models:
                if not self.wait_ready(c, deadline):
                    return self._fail(c)
            for c in self.children:
                if c.http:
                    self.start(c)
                    if not self.wait_ready(c, deadline):
                        return self._fail(c)
            if any(c.name == "gateway" for c in self.children):
                url = f"http://{next(c for c in self.children if c.name == 'gateway').addr}"
            else:
                url = ", ".join(f"{c.name}={c.addr}" for c in self.children)
            self.update_addresses()
            self.say("up", f"ready: {url}")
            return self.keep_up()
        finally:
            if self.signal_name:
                self.say("up", f"received {self.signal_name}: stopping every service")
            self.stop_all()
            self.say("up", "all services stopped")

    def keep_up(self) -> int:
        """Restart children that exit, with backoff, until a signal (0) or a crash loop (1)."""
        a = self.args
        while not self.should_stop():
            now = time.monotonic()
            for c in self.children:
                if c.state in ("starting", "ready") and c.proc.poll() is not None:
                    code, c.exited_at = c.proc.returncode, now
                    if c.reader is not None:
                        c.reader.join(timeout=1)  # its last words come before ours
                    delay = self.policy.crashed(c.name, now)
                    if delay is None:
                        if self.policy.limit <= 0:
                            self.say("up", f"{c.name} exited with status {code}; stopping everything "
                                           "(restarts are off: --restart-limit 0)")
                        else:
                            self.say("up", f"crash loop: {c.name} exited with status {code}, its "
                                           f"{self.policy.recent(c.name)}th exit within {self.policy.window:.0f}s "
                                           f"(limit {self.policy.limit}); stopping everything")
                        return 1
                    c.state, c.restart_at = "waiting", now + delay
                    self.say("up", f"{c.name} exited with status {code}; restarting it in {delay:.1f}s "
                                   f"(crash {self.policy.recent(c.name)} of at most {self.policy.limit} "
                                   f"within {self.policy.window:.0f}s)")
                elif c.state == "waiting" and now >= c.restart_at:
                    c.restarts += 1
                    self.start(c)
                elif c.state == "starting":
                    if self.is_ready(c):
                        c.state = "ready"
                        took = time.monotonic() - (c.exited_at or c.started_at)
                        self.say("up", f"{c.name} is back (pid {c.proc.pid}): ready {took:.1f}s after it exited")
                        if c.http:  # a gateway on --port 0 listens on a new port
                            self.update_addresses()
                    elif now - c.started_at > a.ready_timeout and c.proc.poll() is None:
                        self.say("up", f"{c.name} did not become ready within {a.ready_timeout:.0f}s "
                                       "of its restart; killing it")
                        c.proc.kill()
            time.sleep(0.1)
        return 0

    def _fail(self, child: Child) -> int:
        if self.should_stop():
            return 0
        if child.proc.poll() is not None:
            if child.reader is not None:
                child.reader.join(timeout=1)
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


def run_supervisor(args) -> int:
    """``args``: the UpSettings (services/common/settings.py) of ``palm-rlhf up``."""
    return Supervisor(args).run()
