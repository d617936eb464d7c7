"""bench/gpu_check.sh may get one run on a GPU: its plumbing (set-up, every step, the time
boxes, the JSON it assembles, `up` with one best-of-4 chat) is checked here on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_the_gpu_check_script_runs_end_to_end_in_its_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALM_RLHF_")}
    env.update(OUT=str(tmp_path), GPU_CHECK_BUDGET="480")
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], check=False, cwd=ROOT, env=env,
                          capture_output=True,
                          text=True, timeout=560)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert result["dry_run"] is True
    steps = {name: s["status"] for name, s in result["steps"].items()}
    assert steps == {name: "ok" for name in ("setup_bootstrap", "probe", "tests", "kernels", "generate", "serve")}, (
        json.dumps(result["steps"], indent=1)[-3000:]
    )
    assert result["total_seconds"] <= 480
    assert result["tests"]["tests"] > 0 and result["tests"]["failures"] == 0
    assert result["device"]["cuda_available"] is False
    report = result["device"]["kernel_report"]  # what the kernels would cover on a GPU
    assert {"prefill_padded", "decode_padded", "scoring_masked", "training"} <= set(report)
    assert all(r["backend"] == "triton" for r in report.values()), report
    gen = result["generate"]["torch"]
    assert {"batch1", "batch8_equal", "batch8_mixed"} <= set(gen) and all(r["tokens"] > 0 for r in gen.values())
    chat = result["serve"]["chat"]
    assert chat["best_of"] == 4 and chat["choices"][0]["message"]["content"] is not None
