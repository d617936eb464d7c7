"""Fused attention forward and backward against a float64 PyTorch reference."""

from __future__ import annotations

import zlib

import pytest
import torch
from _kernel_testing import DEVICE, DTYPES, assert_close, attention_ref

from kernels.attention import triton_attention

# (batch, heads, kv_heads, seq, head_dim, causal, dtype): odd lengths throughout, lengths
# shorter than one tile, MQA (kv_heads=1), GQA and plain multi-head, head dims 32-128
# including one that is not a power of two.
CASES = [
    (2, 4, 1, 37, 32, True, "fp32"),
    (1, 4, 2, 50, 64, False, "fp32"),
    (1, 2, 2, 33, 128, True, "fp32"),
    (1, 3, 1, 13, 64, False, "fp32"),
    (1, 2, 1, 40, 80, True, "fp32"),
    (1, 4, 1, 45, 64, True, "fp16"),
    (2, 2, 2, 29, 32, False, "fp16"),
    (1, 2, 1, 35, 128, False, "fp16"),
    (1, 4, 2, 41, 128, True, "bf16"),
    (1, 2, 1, 23, 64, False, "bf16"),
    (2, 2, 1, 37, 32, True, "bf16"),
    (2, 6, 2, 64, 96, True, "bf16"),
    (1, 2, 1, 100, 64, True, "fp16"),
]


def _ids(case: tuple) -> str:
    b, h, kvh, n, d, causal, dt = case
    return f"b{b}-h{h}-kv{kvh}-n{n}-d{d}-{'causal' if causal else 'full'}-{dt}"


def _inputs(b: int, h: int, kvh: int, n: int, d: int, dtype: torch.dtype, seed: int, q_scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen) * q_scale
    k = torch.randn(b, kvh, n, d, generator=gen)
    v = torch.randn(b, kvh, n, d, generator=gen)
    return [t.to(device=DEVICE, dtype=dtype).requires_grad_() for t in (q, k, v)]


def _check(q, k, v, causal: bool, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
    out = triton_attention(q, k, v, causal=causal, scale=scale)
    assert out.dtype == dtype and out.shape == q.shape
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    out.backward(grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_ref(q64, k64, v64, causal, scale)
    ref.backward(grad_out.double())

    assert_close(out, ref, dtype, "out")
    assert_close(q.grad, q64.grad, dtype, "dq")
    assert_close(k.grad, k64.grad, dtype, "dk")
    assert_close(v.grad, v64.grad, dtype, "dv")
    return out


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_attention_matches_float64_reference(case: tuple) -> None:
    b, h, kvh, n, d, causal, dt = case
    dtype = DTYPES[dt]
    q, k, v = _inputs(b, h, kvh, n, d, dtype, seed=zlib.crc32(_ids(case).encode()))
    _check(q, k, v, causal, dtype)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_peaked_scores(causal: bool) -> None:
    """Large logits (peaked softmax) exercise the running-max rescaling."""
    q, k, v = _inputs(1, 2, 1, 53, 32, torch.float32, seed=11, q_scale=6.0)
    _check(q, k, v, causal, torch.float32)


def test_attention_strided_inputs_and_custom_scale() -> None:
    """q/k/v as (batch, seq, heads, head_dim) buffers seen through a transpose: no copies needed."""
    gen = torch.Generator().manual_seed(7)
    b, n, h, kvh, d = 2, 27, 4, 1, 32
    q = torch.randn(b, n, h, d, generator=gen).to(DEVICE).transpose(1, 2).requires_grad_()
    kv = torch.randn(b, n, 2, kvh, d, generator=gen).to(DEVICE)
    k = kv[:, :, 0].transpose(1, 2).requires_grad_()  # (b, kvh, n, d), non-contiguous
    v = kv[:, :, 1].transpose(1, 2).requires_grad_()
    assert not q.is_contiguous() and not k.is_contiguous()
    out = _check(q, k, v, causal=True, dtype=torch.float32, scale=0.3)
    # stored sequence-major like q: back to (b, n, h * d) without a copy
    assert out.transpose(1, 2).is_contiguous()


def test_attention_single_token() -> None:
    q, k, v = _inputs(1, 2, 1, 1, 64, torch.float32, seed=3)
    _check(q, k, v, causal=True, dtype=torch.float32)


def test_attention_rejects_bad_shapes() -> None:
    q = torch.randn(1, 3, 8, 32, device=DEVICE)
    k = torch.randn(1, 2, 8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="divide"):
        triton_attention(q, k, k)
    with pytest.raises(ValueError, match="head_dim"):
        big = torch.randn(1, 1, 8, 256, device=DEVICE)
        triton_attention(big, big, big)
    with pytest.raises(TypeError):
        x = torch.randn(1, 1, 8, 32, device=DEVICE, dtype=torch.float64)
        triton_attention(x, x, x)
