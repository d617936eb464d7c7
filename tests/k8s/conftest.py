"""Fixtures of the Kubernetes and container-image tests.

Each overlay is built once per session with ``kubectl kustomize`` (no cluster needed); the
tests get the parsed objects wrapped in :class:`_k8s_testing.Build`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from _k8s_testing import K8S, OVERLAYS, Build, python_sources


def _run_kustomize(kubectl: str, path: Path) -> str:
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed: the overlays cannot be built (install kubectl >= 1.27)")
    return path


@pytest.fixture(scope="session")
def build_overlay(kubectl: str):
    """``build_overlay(name) -> Build``, each overlay built once per session."""
    cache: dict[str, Build] = {}

    def build(name: str) -> Build:
        if name not in cache:
            text = _run_kustomize(kubectl, K8S / "overlays" / name)
            cache[name] = Build(name, [d for d in yaml.safe_load_all(text) if d])
        return cache[name]

    return build


@pytest.fixture(params=OVERLAYS)
def overlay(request, build_overlay) -> Build:
    """Each overlay in turn."""
    return build_overlay(request.param)


@pytest.fixture(scope="session")
def code_text() -> str:
    """All of the project's Python source, concatenated (for 'is this name read?' checks)."""
    return "\n".join(p.read_text(errors="replace") for p in python_sources())
