"""The rollback procedure of docs/kubernetes.md, run against a real trainer process.

The docs tell operators to roll a bad policy back by running a Python snippet inside the
trainer pod. This test extracts that snippet from the docs, starts ``palm-rlhf serve trainer``
on an ephemeral port over a checkpoint store holding two versions, runs the snippet with the
pod's environment (the admin token) and checks that CURRENT moved back.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from _k8s_testing import REPO

DOCS = REPO / "docs" / "kubernetes.md"
TOKEN = "test-admin-token"


def documented_snippet() -> str:
    m = re.search(r"-- python - <<'EOF'\n(.*?)\nEOF\n", DOCS.read_text(), flags=re.DOTALL)
    assert m, "docs/kubernetes.md lost its in-pod rollback snippet"
    return m.group(1)


@pytest.fixture
def trainer(tmp_path):
    """A trainer over a policy store with v0001 <- v0002 (current); yields (address, store)."""
    torch = pytest.importorskip("torch")
    from palm_rlhf.checkpoint import CheckpointStore
    from palm_rlhf.config import PRESETS
    from palm_rlhf.model import PaLM

    torch.manual_seed(0)
    config = PRESETS["tiny"]
    store = CheckpointStore(tmp_path / "checkpoints", "policy")
    first = store.save(PaLM(config), config)
    store.save(PaLM(config), config, parent=first)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PALM_RLHF_ADMIN_TOKEN": TOKEN,
        "PALM_RLHF_DEMO_AUTOBUILD": "0",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "palm_rlhf.cli",
            "serve",
            "trainer",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--data-dir",
            str(tmp_path),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        addr, lines = None, []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"listening on (\S+) \(grpc\)", line):
                addr = m.group(1)
            if addr and "ready" in line and "listening" not in line:
                break
        assert addr, "trainer did not start:\n" + "".join(lines)
        yield addr, store
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_documented_rollback_moves_current_back(trainer, tmp_path):
    addr, store = trainer
    assert store.current() == "v0002"
    snippet = documented_snippet().replace("127.0.0.1:50054", addr).replace('version="v0005"', 'version=""')
    assert addr in snippet
    env = {**os.environ, "PYTHONPATH": str(REPO), "PALM_RLHF_ADMIN_TOKEN": TOKEN}
    proc = subprocess.run(
        [sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from v0002 to v0001" in proc.stdout
    assert store.current() == "v0001"

    # Without the token the same call is refused and nothing moves.
    env["PALM_RLHF_ADMIN_TOKEN"] = "wrong"
    refused = subprocess.run(
        [sys.executable, "-c", snippet.replace('version=""', 'version="v0002"')],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
    assert "UNAUTHENTICATED" in refused.stderr or "PERMISSION_DENIED" in refused.stderr, refused.stderr[
        -2000:
    ]
    assert store.current() == "v0001"
