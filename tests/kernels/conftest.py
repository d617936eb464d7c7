"""Test setup for the Triton kernels.

Without a CUDA device the kernels run on CPU tensors through the Triton interpreter.
Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` function is *decorated*,
i.e. when ``kernels.attention`` / ``kernels.swiglu`` are first imported, not when
``triton`` itself is imported. So setting it here, at conftest import time, is
enough even if other test packages imported torch or triton earlier in the same
session; a kernel module that was already imported without it is re-imported.

``PALM_RLHF_KERNEL_TEST_DEVICE=cpu`` forces the interpreter on a GPU machine too.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parents[1]
for _path in (str(_ROOT), str(_HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def _use_gpu() -> bool:
    if os.environ.get("PALM_RLHF_KERNEL_TEST_DEVICE", "").strip().lower() == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


if not _use_gpu():
    os.environ["TRITON_INTERPRET"] = "1"
# One pinned tile configuration per kernel instead of autotuning (unless the environment
# asks for autotuning explicitly).
if "PALM_RLHF_KERNELS_AUTOTUNE" not in os.environ:
    from kernels import settings as _settings

    _settings.update(autotune=False)

for _name in ("kernels.attention", "kernels.swiglu"):
    _module = sys.modules.get(_name)
    if _module is not None and os.environ.get("TRITON_INTERPRET") == "1" and not _module._INTERPRETED:
        importlib.reload(_module)


@pytest.fixture(autouse=True)
def _restore_backend() -> Iterator[None]:
    """Tests may switch the dispatch backend; put it back afterwards."""
    from kernels import dispatch

    previous = dispatch._backend.get()  # None: the context had not chosen one
    yield
    dispatch._backend.set(previous)
