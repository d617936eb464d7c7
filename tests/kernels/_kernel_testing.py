"""Float64 references and tolerances shared by the kernel tests.

Tolerances are per dtype and relative to the largest reference magnitude
(``max|actual - expected| <= tol * max(1, max|expected|)``). For fp16 and bf16 they sit
at roughly three times the error that plain PyTorch itself makes when it computes the
same attention in that dtype (measured against float64 on these shapes: fp16 ~1e-3,
bf16 ~7e-3); for fp32, whose rounding noise is below 1e-6, at 1e-5.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item()
    return err / max(1.0, expected.abs().max().item())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = max_rel_err(actual, expected)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]:.1e} ({dtype})"


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None = None
) -> torch.Tensor:
    """Plain softmax attention with K/V heads repeated for the query heads that share them."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (b, kv_heads, n, d) -> (b, heads, n, d)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (b, heads, n, n)
    if causal:
        n = q.shape[2]
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1) @ v


def decode_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """New token t of batch b sits at position lens[b] - n_new + t and sees keys up to it."""
    n_new = q.shape[2]
    group = q.shape[1] // k_cache.shape[1]
    k = k_cache.repeat_interleave(group, dim=1)  # (b, heads, max_len, d)
    v = v_cache.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (b, heads, n_new, max_len)
    last = lens.to(q.device)[:, None] - n_new + torch.arange(n_new, device=q.device)  # (b, n_new)
    visible = torch.arange(k.shape[2], device=q.device)[None, None, :] <= last[:, :, None]  # (b, n_new, max_len)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return scores.softmax(-1) @ v


def swiglu_ref(x: torch.Tensor) -> torch.Tensor:
    value, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * value
