"""Fixtures of the demo tests: a tiny random checkpoint (fast) and the shipped demo model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def seed() -> int:
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised PaLM ("tiny" preset) saved as a policy checkpoint."""
    from palm_rlhf.checkpoint import save_checkpoint
    from palm_rlhf.config import PaLMConfig
    from palm_rlhf.model import PaLM

    torch.manual_seed(0)
    cfg = PaLMConfig.from_name("tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, PaLM(cfg), cfg)
    return path


@pytest.fixture(scope="session")
def demo_model():
    """(model, tokenizer, manifest) of the shipped demo checkpoint, loaded once."""
    from palm_rlhf.demo import load_demo_model

    return load_demo_model()


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for ``python -m palm_rlhf.cli`` subprocesses run from the repository."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("PALM_RLHF_CHECKPOINT", None)
    env["PALM_RLHF_DEMO_AUTOBUILD"] = "0"  # a missing shipped model fails fast instead of training
    return env


@pytest.fixture
def python() -> str:
    return sys.executable
