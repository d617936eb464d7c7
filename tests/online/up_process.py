"""``palm-rlhf up`` on its defaults as a user starts it: a real process on free ports, no
``PALM_RLHF_*`` variable passed on, its output kept for the test's messages."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_checkpoint_or_fail() -> None:
    from palm_rlhf.demo import demo_checkpoint_dir

    try:
        demo_checkpoint_dir(build_if_missing=False)
    except FileNotFoundError as e:  # it ships with the package: missing is a packaging bug
        pytest.fail(f"the shipped demo checkpoint is missing: {e}")


@contextlib.contextmanager
def up_on_defaults(data_dir: Path, ready_timeout: float = 600) -> Iterator[tuple[str, list[str]]]:
    """Start ``up`` and wait until it says it is ready; yields (gateway URL, output lines so far,
    a list that keeps growing). Stops it with Ctrl-C (SIGINT) on the way out."""
    demo_checkpoint_or_fail()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALM_RLHF_")}  # the defaults, nothing else
    env["PYTHONUNBUFFERED"] = "1"
    port = free_port()
    cmd = [sys.executable, "-m", "palm_rlhf.cli", "up", "--data-dir", str(data_dir), "--port", str(port),
           "--free-ports"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "| ready: " in line:
                ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + ready_timeout
        while not ready.wait(0.5):
            assert proc.poll() is None, "up exited:\n" + "\n".join(lines[-40:])
            assert time.monotonic() < deadline, "up did not become ready:\n" + "\n".join(lines[-40:])
        yield f"http://127.0.0.1:{port}", lines
    finally:
        proc.send_signal(2)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        reader.join(timeout=5)
