"""Fixtures of the client tests: real policy, reward and gateway processes on ephemeral ports,
serving tiny random checkpoints (the harness is shared with tests/reliability)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _load_harness():
    name = "palm_rlhf_test_harness"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "reliability" / "harness.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


harness = _load_harness()
ADMIN_TOKEN = harness.CLIENT_ADMIN_TOKEN


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    data = harness.make_tiny_data_dir(root / "data", versions=2)
    logs = root / "logs"
    logs.mkdir()
    st = harness.Stack(data, logs, admin_token=ADMIN_TOKEN).start()
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="session")
def gateway(stack):
    return stack.add_gateway("--rate-limit", "0")


@pytest.fixture(scope="session")
def reward_addr(stack) -> str:
    return stack.reward.addr


@pytest.fixture(scope="session")
def policy_addr(stack) -> str:
    return stack.policy.addr
