"""pretrain / sft / train-reward / ppo run end to end on tiny data and resume."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from palm_rlhf.checkpoint import CheckpointStore, load_checkpoint, load_palm
from palm_rlhf.reward import RewardModel
from palm_rlhf.rl import cli as rl_cli

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["happy", "sad", "good", "bad", "sunny", "rain", "great", "awful", "nice", "day"]


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    rl_cli.register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl-data")
    gen = torch.Generator().manual_seed(0)

    def words(k):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=gen).tolist())

    (d / "corpus.txt").write_text("\n".join(f"User: hi\nAssistant: {words(6)}" for _ in range(100)))
    with open(d / "sft.jsonl", "w") as f:
        f.writelines(
            json.dumps({"prompt": "User: hi\nAssistant:", "response": " " + words(3)}) + "\n"
            for _ in range(12)
        )
    with open(d / "pref.jsonl", "w") as f:
        f.writelines(
            json.dumps(
                {"prompt": "User: hi\nAssistant:", "chosen": " happy good day", "rejected": " sad awful"}
            )
            + "\n"
            for _ in range(12)
        )
        f.writelines(
            json.dumps({"prompt": "User: hi\nAssistant:", "response": " nice", "rating": 1 + 4 * (i % 2)})
            + "\n"
            for i in range(6)
        )
    (d / "prompts.txt").write_text("hello\nhow are you\n")
    return d


def _pretrain(data, out, steps, *extra):
    return _run(
        "pretrain",
        "--data",
        str(data / "corpus.txt"),
        "--preset",
        "tiny",
        "--seq-len",
        "24",
        "--batch-size",
        "3",
        "--steps",
        str(steps),
        "--checkpoint-every",
        "2",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    )


def test_pretrain_resume_continues_exactly(data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _pretrain(data, straight, 4) == 0
    assert _pretrain(data, resumed, 2) == 0
    assert _pretrain(data, resumed, 4, "--resume") == 0
    a = load_checkpoint(CheckpointStore(straight / "checkpoints", "policy").path("v0002"))
    b_store = CheckpointStore(resumed / "checkpoints", "policy")
    assert b_store.versions() == ["v0001", "v0002"]
    b = load_checkpoint(b_store.path("v0002"))
    assert b[1]["metadata"]["step"] == 4 and b[1]["parent"] == "v0001"
    for k in a[0]:
        torch.testing.assert_close(a[0][k], b[0][k], atol=1e-6, rtol=1e-5, msg=k)
    init = load_checkpoint(b_store.path("v0001"))[0]
    assert any(not torch.equal(init[k], b[0][k]) for k in init)  # it did train
    assert (resumed / "optimizer" / "policy" / "v0002.safetensors").is_file()


def test_sft_reward_ppo_pipeline_end_to_end_and_resume(data, tmp_path):
    base = tmp_path / "base"
    assert _pretrain(data, base, 2) == 0
    base_ckpt = CheckpointStore(base / "checkpoints", "policy").path("v0001")

    sft = tmp_path / "sft"
    assert (
        _run(
            "sft",
            "--data",
            str(data / "sft.jsonl"),
            "--init",
            str(base_ckpt),
            "--steps",
            "2",
            "--batch-size",
            "3",
            "--lr",
            "1e-3",
            "--out",
            str(sft),
            "--no-progress",
        )
        == 0
    )
    sft_ckpt = CheckpointStore(sft / "checkpoints", "policy").path("v0001")
    palm, manifest = load_palm(sft_ckpt)
    assert manifest["metadata"]["command"] == "sft" and palm.config.dim == 32

    rm_out = tmp_path / "rm"
    args = [
        "train-reward",
        "--data",
        str(data / "pref.jsonl"),
        "--init",
        str(sft_ckpt),
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--checkpoint-every",
        "2",
        "--out",
        str(rm_out),
        "--no-progress",
    ]
    assert _run(*args, "--steps", "2") == 0
    assert _run(*args, "--steps", "4", "--resume") == 0
    rm_store = CheckpointStore(rm_out / "checkpoints", "reward")
    assert rm_store.versions() == ["v0001", "v0002"]
    _, rm_manifest = RewardModel.from_checkpoint(rm_store.path("v0002"))
    assert rm_manifest["metadata"]["step"] == 4

    ppo = tmp_path / "ppo"
    args = [
        "ppo",
        "--policy",
        str(sft_ckpt),
        "--reward",
        str(rm_store.path("v0002")),
        "--prompts",
        str(data / "prompts.txt"),
        "--chat",
        "--update-timesteps",
        "2",
        "--batch-size",
        "2",
        "--max-seq-len",
        "40",
        "--out",
        str(ppo),
        "--no-progress",
    ]
    assert _run(*args, "--steps", "1") == 0
    assert _run(*args, "--steps", "2", "--resume") == 0
    assert sorted(p.name for p in (ppo / "ppo-state").iterdir() if p.is_dir()) == [
        "step-00000001",
        "step-00000002",
    ]
    pol_store = CheckpointStore(ppo / "checkpoints", "policy")
    assert pol_store.versions() == ["v0001", "v0002"]
    served, m = load_palm(pol_store.path("v0002"))
    assert m["metadata"]["step"] == 2 and not served.finetune_modules  # adapter merged for serving


def test_cli_entry_point_runs_pretrain(data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "palm_rlhf.cli",
            "pretrain",
            "--data",
            str(data / "corpus.txt"),
            "--preset",
            "tiny",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--out",
            str(tmp_path),
            "--no-progress",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 1
