"""The init step of the model pods, run for real against a checkpoint folder.

The servers mount the checkpoint volume read-only, so seeding a fresh volume (what a server
would otherwise do on its first start) happens in the ``seed-checkpoints`` init container.
Its script calls into the services' code; running it here catches a renamed function or a
changed store layout before a cluster does.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from _k8s_testing import REPO


def seed_containers(build):
    out = {}
    for role in ("policy", "reference", "reward"):
        w = build.workload(role)
        inits = w.pod_spec.get("initContainers") or []
        seeds = [c for c in inits if c["name"] == "seed-checkpoints"]
        assert len(seeds) == 1, f"{role} has no seed-checkpoints init container"
        out[role] = (w, seeds[0])
    return out


def test_servers_read_only_and_the_seed_step_writes(overlay):
    for role, (w, seed) in seed_containers(overlay).items():
        seed_mount = [m for m in seed["volumeMounts"] if m["mountPath"] == "/data/checkpoints"]
        assert seed_mount and not seed_mount[0].get("readOnly"), f"{role}: the seed step cannot write"
        assert seed["command"][:2] == ["python", "-c"]
        assert overlay.pod_env(w, seed).get("PALM_RLHF_DATA_DIR") == "/data"
        assert seed["image"] == w.main["image"], f"{role}: the seed step pulls another image"


def run_seed(script: str, data_dir, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PALM_RLHF_DATA_DIR": str(data_dir),
        "PALM_RLHF_DEMO_AUTOBUILD": "0",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=data_dir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_seed_script_fills_an_empty_reward_store_once(build_overlay, tmp_path):
    torch = pytest.importorskip("torch")
    from palm_rlhf.checkpoint import CheckpointStore
    from palm_rlhf.config import PRESETS
    from palm_rlhf.model import PaLM

    scripts = {
        role: seed["args"][0] for role, (_w, seed) in seed_containers(build_overlay("cpu-demo")).items()
    }
    assert len(set(scripts.values())) == 1, "the model pods seed differently"
    script = scripts["policy"]

    # A policy version already present (as a trainer or an operator would have left it); the
    # reward store is empty.
    torch.manual_seed(0)
    config = PRESETS["tiny"]
    policy = CheckpointStore(tmp_path / "checkpoints", "policy")
    first = policy.save(PaLM(config), config)

    proc = run_seed(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rewards = CheckpointStore(tmp_path / "checkpoints", "reward")
    assert rewards.versions() == ["v0001"] and rewards.current() == "v0001"
    assert rewards.manifest("v0001")["kind"] == "reward"
    assert policy.versions() == [first], "the seed step touched a seeded policy store"

    # A second pod (or a restart) finds both stores seeded and changes nothing.
    again = run_seed(script, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert rewards.versions() == ["v0001"] and policy.versions() == [first]
