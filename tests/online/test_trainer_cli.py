"""``palm-rlhf trainer status|trigger|rollback`` against a real trainer process, which runs
the online loop by default."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import StoreCore, tiny_palm

REPO = Path(__file__).resolve().parents[2]
TOKEN = "cli-admin-token"
LISTEN = re.compile(r".*listening on \S+:(\d+)")


def cli(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALM_RLHF_")}
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "palm_rlhf.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env, check=False)


@pytest.fixture
def trainer(tmp_path):
    st = StoreCore(tmp_path).policy_store
    m = tiny_palm(0)
    st.save(m, m.config)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    st.save(m, m.config, parent="v0001")  # v0002, current
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALM_RLHF_")}
    env.update(PYTHONUNBUFFERED="1", PALM_RLHF_DEMO_AUTOBUILD="0")
    proc = subprocess.Popen([sys.executable, "-m", "palm_rlhf.cli", "serve", "trainer", "--port", "0",
                             "--metrics-port", "-1", "--data-dir", str(tmp_path), "--admin-token", TOKEN,
                             "--store-poll", "0.2"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    addr, lines, deadline = None, [], time.monotonic() + 90
    while addr is None:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "trainer exited:\n" + "".join(lines)
        lines.append(line)
        m = LISTEN.match(line)
        if m:
            addr = f"127.0.0.1:{m.group(1)}"
        assert time.monotonic() < deadline, "trainer did not start:\n" + "".join(lines)
    from services.common.client import wait_until_serving_sync

    wait_until_serving_sync(addr, timeout=60)
    yield addr, tmp_path
    proc.terminate()
    proc.wait(timeout=30)


def test_status_trigger_and_rollback_commands(trainer):
    addr, data = trainer
    r = cli("trainer", "status", "--trainer-addr", addr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "policy_version: v0002" in r.stdout

    r = cli("trainer", "trigger", "--trainer-addr", addr)
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stdout
    r = cli("trainer", "trigger", "--trainer-addr", addr, "--admin-token", TOKEN)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "message: no new feedback" in r.stdout  # the online loop answered: the log is empty

    r = cli("trainer", "rollback", "--trainer-addr", addr, "--admin-token", TOKEN)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "version: v0001" in r.stdout and "previous_version: v0002" in r.stdout
    assert StoreCore(data).policy_store.current() == "v0001"

    r = cli("trainer", "rollback", "--trainer-addr", addr, "--admin-token", TOKEN, "--to", "v0002", "--json")
    assert r.returncode == 0 and '"version": "v0002"' in r.stdout
    r = cli("trainer", "rollback", "--trainer-addr", addr, "--admin-token", TOKEN, "--to", "v0099")
    assert r.returncode == 1 and "NOT_FOUND" in r.stdout


def test_the_token_comes_from_the_environment_a_file_or_ups_data_dir(trainer, tmp_path_factory):
    addr, _ = trainer
    r = cli("trainer", "trigger", "--trainer-addr", addr, extra_env={"PALM_RLHF_ADMIN_TOKEN": TOKEN})
    assert r.returncode == 0, r.stdout + r.stderr

    elsewhere = tmp_path_factory.mktemp("token-file")
    (elsewhere / "t").write_text(TOKEN + "\n")
    r = cli("trainer", "trigger", "--trainer-addr", addr, "--admin-token-file", str(elsewhere / "t"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("trainer", "trigger", "--trainer-addr", addr, extra_env={"PALM_RLHF_ADMIN_TOKEN_FILE": str(elsewhere / "t")})
    assert r.returncode == 0, r.stdout + r.stderr

    # where `palm-rlhf up` keeps it: DATA_DIR/admin-token
    r = cli("trainer", "trigger", "--trainer-addr", addr, "--data-dir", str(elsewhere))
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stdout
    (elsewhere / "admin-token").write_text(TOKEN + "\n")
    r = cli("trainer", "trigger", "--trainer-addr", addr, "--data-dir", str(elsewhere))
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("trainer", "trigger", "--trainer-addr", addr, extra_env={"PALM_RLHF_DATA_DIR": str(elsewhere)})
    assert r.returncode == 0, r.stdout + r.stderr
