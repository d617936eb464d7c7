"""The update step under torchrun (2 CPU processes, gloo) equals one process on the global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(args, out, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*args, str(WORKER), "--out", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ddp_two_processes_match_single_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    _run([sys.executable], single)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], multi)
    ref = load_file(str(single / "rank0.safetensors"))
    r0 = load_file(str(multi / "rank0.safetensors"))
    r1 = load_file(str(multi / "rank1.safetensors"))
    assert ref.keys() == r0.keys() == r1.keys()
    for k in ref:
        assert torch.equal(r0[k], r1[k]), f"ranks diverged on {k}"
        torch.testing.assert_close(
            r0[k], ref[k], atol=2e-5, rtol=1e-4, msg=f"DDP differs from one process on {k}"
        )
    # the steps did train: the actor adapter and the value head moved
    init = load_file(str(single / "init.safetensors"))
    moved = [k for k in init if not torch.equal(init[k], ref[k])]
    assert any("finetune_modules.actor" in k for k in moved)
    assert any("value_head" in k for k in moved)
    assert not any(k.startswith("actor.layers") for k in moved)  # frozen base
