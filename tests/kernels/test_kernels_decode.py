"""Split-K decode attention against a float64 reference, and its dispatch fallback."""

from __future__ import annotations

import zlib

import pytest
import torch
from _kernel_testing import DEVICE, DTYPES, assert_close, decode_ref

from kernels import dispatch
from kernels.attention import triton_attention, triton_decode_attention

# (batch, heads, kv_heads, n_new, max_len, head_dim, dtype, cache lengths, num_splits)
# cache lengths: an int, or one per batch element (a tensor); num_splits None = heuristic.
CASES = [
    (2, 4, 1, 1, 70, 32, "fp32", [70, 45], None),
    (2, 4, 1, 3, 70, 64, "fp32", [70, 17], 3),
    (1, 2, 2, 1, 129, 128, "fp32", 101, 4),
    (3, 8, 2, 2, 100, 128, "bf16", [99, 2, 64], 5),
    (1, 2, 2, 4, 40, 64, "fp16", 33, 4),
    (2, 16, 1, 5, 90, 64, "fp16", [90, 61], 2),  # 80 query rows per kv head: two row blocks
    (1, 4, 4, 1, 57, 32, "bf16", 57, 1),
]


def _ids(case: tuple) -> str:
    b, h, kvh, t, max_len, d, dt, lens, splits = case
    return f"b{b}-h{h}-kv{kvh}-new{t}-max{max_len}-d{d}-{dt}-len{lens}-s{splits}"


def _inputs(case: tuple):
    b, h, kvh, t, max_len, d, dt, lens, _ = case
    gen = torch.Generator().manual_seed(zlib.crc32(_ids(case).encode()))
    dtype = DTYPES[dt]
    q = torch.randn(b, h, t, d, generator=gen).to(DEVICE, dtype)
    k_cache = torch.randn(b, kvh, max_len, d, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(b, kvh, max_len, d, generator=gen).to(DEVICE, dtype)
    if isinstance(lens, list):
        cache_len = torch.tensor(lens, device=DEVICE)
        lens_t = cache_len
    else:
        cache_len = lens
        lens_t = torch.full((b,), lens, device=DEVICE)
    return q, k_cache, v_cache, cache_len, lens_t, dtype


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_decode_matches_float64_reference(case: tuple) -> None:
    q, k_cache, v_cache, cache_len, lens_t, dtype = _inputs(case)
    out = triton_decode_attention(q, k_cache, v_cache, cache_len, num_splits=case[-1])
    ref = decode_ref(q.double(), k_cache.double(), v_cache.double(), lens_t)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "decode out")


@pytest.mark.parametrize("case", CASES[:3], ids=_ids)
def test_decode_torch_fallback_matches_reference(case: tuple) -> None:
    q, k_cache, v_cache, cache_len, lens_t, dtype = _inputs(case)
    dispatch.set_backend("torch")
    out = dispatch.decode_attention(q, k_cache, v_cache, cache_len)
    ref = decode_ref(q.double(), k_cache.double(), v_cache.double(), lens_t)
    assert_close(out, ref, dtype, "torch decode out")


def test_decode_agrees_with_prefill_attention() -> None:
    """The last rows of full causal attention equal a decode of those rows against the cache."""
    gen = torch.Generator().manual_seed(5)
    b, h, kvh, n, d, t = 2, 4, 1, 41, 64, 3
    q = torch.randn(b, h, n, d, generator=gen).to(DEVICE)
    k = torch.randn(b, kvh, n, d, generator=gen).to(DEVICE)
    v = torch.randn(b, kvh, n, d, generator=gen).to(DEVICE)
    with torch.no_grad():
        full = triton_attention(q, k, v, causal=True)
        k_cache = torch.zeros(b, kvh, 64, d, device=DEVICE)  # (b, kvh, max_len, d), tail unused
        v_cache = torch.zeros(b, kvh, 64, d, device=DEVICE)
        k_cache[:, :, :n] = k
        v_cache[:, :, :n] = v
        dec = triton_decode_attention(q[:, :, n - t:], k_cache, v_cache, n, num_splits=3)
    assert_close(dec, full[:, :, n - t:].double(), torch.float32, "decode vs prefill")


def test_decode_refuses_gradients_and_dispatch_falls_back() -> None:
    q = torch.randn(1, 2, 1, 32, device=DEVICE, requires_grad=True)
    cache = torch.randn(1, 1, 16, 32, device=DEVICE)
    with pytest.raises(RuntimeError, match="no backward"):
        triton_decode_attention(q, cache, cache, 10)
    dispatch.set_backend("triton")
    out = dispatch.decode_attention(q, cache, cache, 10)  # needs grad: PyTorch path
    out.sum().backward()
    assert q.grad is not None


def test_decode_rejects_bad_cache_len() -> None:
    q = torch.randn(1, 2, 2, 32, device=DEVICE)
    cache = torch.randn(1, 1, 16, 32, device=DEVICE)
    for bad in (1, 17):
        with pytest.raises(ValueError, match="cache_len"):
            triton_decode_attention(q, cache, cache, bad)
