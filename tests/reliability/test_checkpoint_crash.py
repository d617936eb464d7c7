"""SIGKILL a process while it publishes checkpoints: the store must stay consistent (every listed
version verifies its sha256, CURRENT names a complete version) and a restarted writer resumes
from the last good version."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from palm_rlhf.checkpoint import CheckpointStore, verify_checkpoint

harness = sys.modules["palm_rlhf_test_harness"]

# The writer publishes like the trainer does (CheckpointStore.save with parent = CURRENT, making
# it CURRENT), with a model big enough (~16 MB) that a kill often lands inside a write.
WRITER = r"""
import sys, torch
from pathlib import Path
from palm_rlhf.checkpoint import CheckpointStore
from palm_rlhf.config import PaLMConfig
from palm_rlhf.model import PaLM

store = CheckpointStore(Path(sys.argv[1]), "policy")
count = int(sys.argv[2])
model = PaLM(PaLMConfig(dim=256, depth=4, dim_head=32, heads=4, max_seq_len=64))
start = store.current()
print("resume", start or "-", flush=True)
for i in range(count):
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # every version differs
    parent = store.current()
    print("saving", store.next_version(), flush=True)
    v = store.save(model, model.config, parent=parent)
    print("saved", v, parent or "-", flush=True)
"""


def check_consistent(root: Path) -> tuple[list[str], str | None]:
    st = CheckpointStore(root, "policy")
    versions = st.versions()
    for v in versions:
        verify_checkpoint(st.path(v))  # raises on a size or sha256 mismatch
    current = st.current()
    if versions:
        assert current in versions
        pointer = st.root / "CURRENT"
        if pointer.exists():
            named = pointer.read_text().strip()
            assert named in versions, f"CURRENT names {named!r}, which is not a complete version"
    # interrupted writes leave only hidden temporary names, never a vNNNN folder without a manifest
    for p in st.root.iterdir():
        if p.name.startswith("v"):
            assert (p / "manifest.json").is_file(), f"{p.name} looks like a version but is incomplete"
    return versions, current


def run_writer(root: Path, count: int, kill_after_saving: int | None, rng: random.Random) -> tuple[list[str], int]:
    """Start the writer; when ``kill_after_saving`` is set, SIGKILL it a random moment after it
    announces that many saves. Returns (its output lines, exit status)."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(count)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=harness.REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines: list[str] = []
    saving = 0
    for line in proc.stdout:
        lines.append(line.strip())
        if line.startswith("saving"):
            saving += 1
            if kill_after_saving is not None and saving == kill_after_saving:
                time.sleep(rng.uniform(0.0, 0.06))  # somewhere inside the write or just after
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(60)
    if kill_after_saving is None:
        assert proc.returncode == 0, proc.stderr.read()
    else:
        proc.stdout.close()
    proc.stderr.close()
    return lines, proc.returncode


def test_store_survives_sigkill_mid_publish_and_writer_resumes(tmp_path):
    rng = random.Random(1234)
    root = tmp_path / "checkpoints"
    history: list[dict] = []
    for round_, kill_at in enumerate([2, 3, 1, 2, 3]):
        before, _ = check_consistent(root)
        lines, status = run_writer(root, count=5, kill_after_saving=kill_at, rng=rng)
        assert status == -signal.SIGKILL
        versions, current = check_consistent(root)
        # nothing that was complete before the crash was lost
        assert set(before) <= set(versions)
        # every save the writer announced as done before the kill survived it (the writer may have
        # completed more between the announcement and the signal; none may be missing)
        saved = [line.split()[1] for line in lines if line.startswith("saved")]
        assert len(saved) == kill_at - 1 and set(saved) <= set(versions), (before, versions, lines)
        assert len(versions) - len(before) >= kill_at - 1
        leftovers = sum(1 for p in (root / "policy").iterdir() if p.name.startswith("."))
        history.append({"round": round_, "killed_while": lines[-1], "versions": len(versions), "current": current,
                        "temporary_leftovers": leftovers})

    # the restarted writer resumes from the last good version and extends the chain
    _, current_before = check_consistent(root)
    lines, status = run_writer(root, count=2, kill_after_saving=None, rng=rng)
    assert lines[0] == f"resume {current_before}"
    versions, current = check_consistent(root)
    st = CheckpointStore(root, "policy")
    new = [line.split() for line in lines if line.startswith("saved")]
    assert [n[2] for n in new] == [current_before, new[0][1]]  # parents: last good, then the first new one
    assert current == new[-1][1] == versions[-1]
    # every version's parent is an earlier complete version
    for v in versions:
        parent = st.manifest(v).get("parent")
        assert parent is None or parent in versions and parent < v
    print("\nCHECKPOINT CRASH REPORT " + json.dumps({"kills": history, "final_versions": len(versions)}))
