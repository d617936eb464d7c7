"""``palm-rlhf up`` writes the addresses it chose to DATA_DIR/addresses.json, and the CLI clients
find the services there: ``palm-rlhf trainer status --data-dir D`` reaches the trainer of
``palm-rlhf up --data-dir D --free-ports``. A flag, then a variable, win over the file; a file
left by an ``up`` that is gone is ignored; ``up`` removes the file when it stops."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from services.common.config import DEFAULT_ADDRS, DEFAULT_METRICS_PORTS, DEFAULT_PORTS

from .conftest import REPO, make_data_dir
from .test_supervisor import Up

MODEL_ROLES = ("policy", "reference", "reward", "trainer")
STARTED_ON = re.compile(r"^up\s*\| started (\w+) \(pid \d+\) on (\S+)$")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PALM_RLHF_")}
    clean.update(env or {})
    return subprocess.run([sys.executable, "-m", "palm_rlhf.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=clean, check=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_cli_clients_find_the_services_of_up_on_free_ports(tmp_path):
    data = make_data_dir(tmp_path / "data")
    path = data / "addresses.json"
    up = Up(data, "--free-ports", "--port", "0", "--grace", "5", "--ready-timeout", "240")
    try:
        i = up.wait_for("| ready: ", 300)
        gateway_url = up.lines[i].split("| ready: ", 1)[1].strip()
        doc = json.loads(path.read_text())
        started = {m.group(1): m.group(2) for line in up.lines if (m := STARTED_ON.match(line))}
        assert doc["grpc"] == {r: started[r] for r in MODEL_ROLES}, (doc, started)
        assert all(doc["grpc"][r] != DEFAULT_ADDRS[r] for r in MODEL_ROLES), doc
        assert doc["gateway_url"] == gateway_url and not gateway_url.endswith(":0"), (doc, gateway_url)
        assert int(gateway_url.rsplit(":", 1)[1]) != DEFAULT_PORTS["gateway"]
        assert doc["ready"] is True and doc["pid"] == up.proc.pid
        assert set(doc["metrics_ports"]) == set(MODEL_ROLES)
        for role, port in doc["metrics_ports"].items():
            assert port != DEFAULT_METRICS_PORTS[role]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                assert r.status == 200, role

        # no address given: the trainer of this `up`, found through --data-dir or PALM_RLHF_DATA_DIR
        r = cli("trainer", "status", "--data-dir", str(data), "--timeout", "30")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "policy_version: v0001" in r.stdout, r.stdout
        r = cli("trainer", "status", "--timeout", "30", env={"PALM_RLHF_DATA_DIR": str(data)})
        assert r.returncode == 0 and "policy_version: v0001" in r.stdout, r.stdout + r.stderr

        # a flag, then the variable, win over the file
        nowhere = f"127.0.0.1:{closed_port()}"
        r = cli("trainer", "status", "--data-dir", str(data), "--trainer-addr", nowhere, "--timeout", "10")
        assert r.returncode == 1 and "UNAVAILABLE" in r.stdout and nowhere in r.stdout, r.stdout + r.stderr
        r = cli("trainer", "status", "--data-dir", str(data), "--timeout", "10",
                env={"PALM_RLHF_TRAINER_ADDR": nowhere})
        assert r.returncode == 1 and nowhere in r.stdout, r.stdout + r.stderr

        # the other clients of up's services: score (reward) and chat-client (gateway)
        r = cli("score", "--data-dir", str(data), "--scorer", "sentiment", "--prompt", "hi", "What a lovely day!")
        assert r.returncode == 0, r.stdout + r.stderr
        assert re.match(r"^[+-]\d+\.\d{4}\tWhat a lovely day!$", r.stdout.strip()), r.stdout
        r = cli("chat-client", "--data-dir", str(data), "--best-of", "1", "--max-tokens", "4", "--json",
                "--once", "hello")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["id"].startswith("chatcmpl-")
        # and the simulated raters (gateway): one short session, measured on one question
        r = cli("demo-users", "--data-dir", str(data), "--minutes", "0.02", "--raters", "1", "--measure-prompts", "1",
                "--measure-samples", "1")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"raters chat with {gateway_url} (from {path})" in r.stdout, r.stdout
        assert "raters like" in r.stdout, r.stdout

        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0
        assert not path.exists(), "addresses.json outlived `up`"
    finally:
        up.cleanup()


def _write(data_dir: Path, pid: int) -> None:
    doc = {"pid": pid, "hostname": socket.gethostname(), "ready": True,
           "grpc": {"trainer": "127.0.0.1:1111", "reward": "127.0.0.1:2222"},
           "gateway_url": "http://127.0.0.1:3333", "metrics_ports": {}}
    (data_dir / "addresses.json").write_text(json.dumps(doc))


def test_address_precedence_flag_then_variable_then_file_then_default(tmp_path, monkeypatch):
    from services.common.settings import ClientSettings

    for k in list(os.environ):
        if k.startswith("PALM_RLHF_"):
            monkeypatch.delenv(k)
    assert ClientSettings.load({"data_dir": tmp_path}).trainer_addr == DEFAULT_ADDRS["trainer"]
    _write(tmp_path, os.getpid())  # a live `up`
    s = ClientSettings.load({"data_dir": tmp_path})
    assert (s.trainer_addr, s.reward_addr, s.gateway_url) == ("127.0.0.1:1111", "127.0.0.1:2222",
                                                              "http://127.0.0.1:3333")
    assert s.where("trainer_addr") == f" (from {tmp_path / 'addresses.json'})"
    monkeypatch.setenv("PALM_RLHF_TRAINER_ADDR", "10.0.0.1:7")
    s = ClientSettings.load({"data_dir": tmp_path})
    assert (s.trainer_addr, s.reward_addr, s.where("trainer_addr")) == ("10.0.0.1:7", "127.0.0.1:2222", "")
    s = ClientSettings.load({"data_dir": tmp_path, "trainer_addr": "10.0.0.2:8"})
    assert s.trainer_addr == "10.0.0.2:8"

    # a file left behind by an `up` killed with SIGKILL: its pid runs no more, the file is ignored
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write(tmp_path, gone.pid)
    monkeypatch.delenv("PALM_RLHF_TRAINER_ADDR")
    s = ClientSettings.load({"data_dir": tmp_path})
    assert (s.trainer_addr, s.gateway_url) == (DEFAULT_ADDRS["trainer"], "http://127.0.0.1:8000")
