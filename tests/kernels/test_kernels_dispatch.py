"""Backend selection in kernels.dispatch."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _kernel_testing import DEVICE, assert_close, attention_ref

from kernels import attention as attention_module
from kernels import dispatch, settings
from kernels import swiglu as swiglu_module

ROOT = Path(__file__).resolve().parents[2]


def _spy(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls = [0]
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _qkv(n: int = 9, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(1, 2, n, 32, generator=gen).to(DEVICE, dtype)
    k = torch.randn(1, 1, n, 32, generator=gen).to(DEVICE, dtype)
    v = torch.randn(1, 1, n, 32, generator=gen).to(DEVICE, dtype)
    return q, k, v


def test_set_backend_validates_and_use_backend_restores() -> None:
    with pytest.raises(ValueError):
        dispatch.set_backend("cuda")
    dispatch.set_backend("torch")
    with dispatch.use_backend("triton"):
        assert dispatch.get_backend() == "triton"
    assert dispatch.get_backend() == "torch"


def test_a_thread_choosing_a_backend_leaves_other_threads_alone() -> None:
    dispatch.set_backend("torch")
    chosen, seen = threading.Event(), []

    def other() -> None:
        with dispatch.use_backend("triton"):
            chosen.set()
            seen.append(dispatch.get_backend())
            release.wait(10)
        seen.append(dispatch.get_backend())

    release = threading.Event()
    worker = threading.Thread(target=other)
    worker.start()
    try:
        assert chosen.wait(10)
        assert dispatch.get_backend() == "torch"  # the worker's choice stays in the worker
    finally:
        release.set()
        worker.join(10)
    assert seen == ["triton", settings.current().backend]  # a new thread starts from the default
    assert dispatch.get_backend() == "torch"


def test_concurrent_tasks_each_keep_their_own_backend() -> None:
    async def task(name: str, out: dict) -> None:
        with dispatch.use_backend(name):
            await asyncio.sleep(0.01)  # the other task switches in between
            out[name] = dispatch.get_backend()

    async def main() -> dict:
        out: dict = {}
        await asyncio.gather(task("torch", out), task("triton", out))
        return out

    assert asyncio.run(main()) == {"torch": "torch", "triton": "triton"}


def test_the_environment_is_read_once_and_never_written(monkeypatch: pytest.MonkeyPatch) -> None:
    before = dict(os.environ)
    with settings.override(backend="torch"):
        assert dispatch.get_backend() == "torch"
        monkeypatch.setenv("PALM_RLHF_KERNELS", "triton")
        assert dispatch.get_backend() == "torch"  # not re-read behind the caller's back
    with dispatch.use_backend("triton"):
        pass
    monkeypatch.delenv("PALM_RLHF_KERNELS")
    assert dict(os.environ) == before


def test_backend_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PALM_RLHF_KERNELS", " Triton ")
    assert dispatch._backend_from_env() == "triton"
    monkeypatch.setenv("PALM_RLHF_KERNELS", "fast")
    with pytest.raises(ValueError):
        dispatch._backend_from_env()


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_routing(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    attn = _spy(monkeypatch, attention_module, "triton_attention")
    dec = _spy(monkeypatch, attention_module, "triton_decode_attention")
    glu = _spy(monkeypatch, swiglu_module, "triton_swiglu")
    dispatch.set_backend(backend)
    q, k, v = _qkv()
    x = torch.randn(3, 8, device=DEVICE)
    out = dispatch.attention(q, k, v, causal=True)
    dispatch.decode_attention(q[:, :, -1:], k, v, q.shape[2])
    dispatch.swiglu(x)
    expect = backend == "triton" or (backend == "auto" and DEVICE == "cuda")
    assert (attn[0], dec[0], glu[0]) == ((1, 1, 1) if expect else (0, 0, 0))
    assert_close(out, attention_ref(q.double(), k.double(), v.double(), True), torch.float32, "out")


def test_uncovered_calls_take_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    attn = _spy(monkeypatch, attention_module, "triton_attention")
    dispatch.set_backend("triton")
    q, k, v = _qkv()
    mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=DEVICE).tril()
    out = dispatch.attention(q, k, v, attn_mask=mask)
    assert_close(out, attention_ref(q.double(), k.double(), v.double(), True), torch.float32, "masked")
    dispatch.attention(q.double(), k.double(), v.double())  # float64
    dispatch.attention(q[:, :, -2:], k, v, causal=False)  # unequal lengths
    assert attn[0] == 0
    x = torch.randn(2, 6, dtype=torch.float64, device=DEVICE)
    value, gate = x.chunk(2, -1)
    assert torch.equal(dispatch.swiglu(x), F.silu(gate) * value)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU error path")
def test_forced_triton_without_interpreter_is_a_clear_error() -> None:
    code = (
        "import torch\n"
        "from kernels import dispatch\n"
        "dispatch.set_backend('triton')\n"
        "try:\n"
        "    dispatch.swiglu(torch.randn(2, 4))\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET' in str(e)\n"
        "    print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
