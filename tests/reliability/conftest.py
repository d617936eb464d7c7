"""Fixtures of the reliability tests: one shared stack of real service processes (policy,
reward, trainer) over tiny random checkpoints, with gateways configured per concern."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _load(name: str, path: Path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


HERE = Path(__file__).resolve().parent
harness = _load("palm_rlhf_test_harness", HERE / "harness.py")
_load("palm_rlhf_bench_load", HERE.parents[1] / "bench" / "load.py")

ADMIN_TOKEN, API_KEY = harness.ADMIN_TOKEN, harness.API_KEY
RATE_LIMIT, MAX_MESSAGE_BYTES = harness.RATE_LIMIT, harness.MAX_MESSAGE_BYTES


@pytest.fixture(scope="session")
def rel_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="session")
def stack(rel_root):
    data = harness.make_tiny_data_dir(rel_root / "data", versions=2)
    logs = rel_root / "logs"
    logs.mkdir()
    st = harness.Stack(data, logs, admin_token=ADMIN_TOKEN, trainer=True,
                       service_flags=("--max-message-bytes", str(MAX_MESSAGE_BYTES))).start()
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="session")
def keyed_gateway(stack):
    """API keys required, no rate limit: the bad-input and security tests use it."""
    return stack.add_gateway("--rate-limit", "0", "--admin-token", ADMIN_TOKEN, env={"PALM_RLHF_API_KEYS": API_KEY})


@pytest.fixture(scope="session")
def limited_gateway(stack):
    """A low rate limit (5 requests/s, burst 10, shared by every loopback client)."""
    return stack.add_gateway("--rate-limit", RATE_LIMIT)
