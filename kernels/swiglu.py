"""Fused SwiGLU in Triton: ``value, gate = x.chunk(2, -1); out = silu(gate) * value``.

One read of ``x`` and one write of ``out`` in the forward pass; one read of ``x`` and
of the output gradient and one write of a fresh input gradient in the backward pass.
All arithmetic is done in fp32 and cast back to the input dtype.

Layers: ``@triton.jit`` helpers, entry kernels, host launchers, the autograd
Function, and the functional wrapper :func:`triton_swiglu`. Runs on CPU tensors
under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels._runtime import (
    check_runnable,
    config_pruner,
    interpreter_enabled,
    next_power_of_2,
    select_configs,
)

_INTERPRETED = interpreter_enabled()

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Columns of the output handled by one program (data; first row is the default).
_TABLE = [
    {"BLOCK": 2048, "num_warps": 8, "num_stages": 1},
    {"BLOCK": 1024, "num_warps": 4, "num_stages": 1},
    {"BLOCK": 4096, "num_warps": 8, "num_stages": 1},
    {"BLOCK": 4096, "num_warps": 16, "num_stages": 1},
    {"BLOCK": 512, "num_warps": 4, "num_stages": 1},
]
_INTERPRETER = {"BLOCK": 64}


def _keep(config: Any, args: dict[str, Any]) -> bool:
    # A block much wider than the row only adds masked lanes.
    return config.kwargs["BLOCK"] <= max(512, next_power_of_2(args["n_cols"]))


_CONFIGS = select_configs(_TABLE, _INTERPRETER, _INTERPRETED)


# ---------------------------------------------------------------------------
# @triton.jit helpers
# ---------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    """Logistic function of fp32 x; exp of a non-positive argument only, so it never overflows."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# ---------------------------------------------------------------------------
# Entry kernels
# ---------------------------------------------------------------------------


@triton.autotune(configs=_CONFIGS, key=["n_cols"], prune_configs_by={"early_config_prune": config_pruner(_keep)})
@triton.jit
def _swiglu_fwd_kernel(X, OUT, n_cols, stride_x_row, stride_out_row, BLOCK: tl.constexpr):
    """OUT[r, c] = silu(X[r, n_cols + c]) * X[r, c] for one row r and BLOCK columns c."""
    tl.static_assert(BLOCK % 16 == 0, "BLOCK must be a multiple of 16")
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    x_row = X + row * stride_x_row
    value = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(x_row + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    out = gate * _sigmoid(gate) * value
    tl.store(OUT + row * stride_out_row + cols, out.to(OUT.dtype.element_ty), mask=ok)


@triton.autotune(configs=_CONFIGS, key=["n_cols"], prune_configs_by={"early_config_prune": config_pruner(_keep)})
@triton.jit
def _swiglu_bwd_kernel(
    X, GRAD_OUT, GRAD_X, n_cols, stride_x_row, stride_go_row, stride_gx_row, BLOCK: tl.constexpr
):
    """d value = g * silu(gate); d gate = g * value * sig(gate) * (1 + gate * (1 - sig(gate)))."""
    tl.static_assert(BLOCK % 16 == 0, "BLOCK must be a multiple of 16")
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    x_row = X + row * stride_x_row
    value = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(x_row + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(GRAD_OUT + row * stride_go_row + cols, mask=ok, other=0.0).to(tl.float32)
    sig = _sigmoid(gate)
    d_value = g * gate * sig
    d_gate = g * value * sig * (1.0 + gate * (1.0 - sig))
    gx_row = GRAD_X + row * stride_gx_row
    tl.store(gx_row + cols, d_value.to(GRAD_X.dtype.element_ty), mask=ok)
    tl.store(gx_row + n_cols + cols, d_gate.to(GRAD_X.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as (rows, last_dim) with a unit stride along the last dim.

    A view for the usual dense tensors; a copy only when the layout forbids a view.
    """
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])  # (..., c) -> (rows, c)


def _swiglu_forward(x: torch.Tensor) -> torch.Tensor:
    x2 = _rows(x)  # (rows, 2 * hidden)
    n_rows, n_cols = x2.shape[0], x2.shape[1] // 2
    out = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)  # (rows, hidden)
    if n_rows and n_cols:

        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (n_rows, triton.cdiv(n_cols, meta["BLOCK"]))

        _swiglu_fwd_kernel[grid](x2, out, n_cols, x2.stride(0), out.stride(0))
    return out.view(*x.shape[:-1], n_cols)  # (rows, hidden) -> (..., hidden)


def _swiglu_backward(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    x2 = _rows(x)  # (rows, 2 * hidden)
    g2 = _rows(grad_out)  # (rows, hidden)
    n_rows, n_cols = x2.shape[0], x2.shape[1] // 2
    grad_x = torch.empty((n_rows, 2 * n_cols), device=x.device, dtype=x.dtype)  # fresh, never x itself
    if n_rows and n_cols:

        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (n_rows, triton.cdiv(n_cols, meta["BLOCK"]))

        _swiglu_bwd_kernel[grid](x2, g2, grad_x, n_cols, x2.stride(0), g2.stride(0), grad_x.stride(0))
    return grad_x.view(x.shape)  # (rows, 2 * hidden) -> (..., 2 * hidden)


# ---------------------------------------------------------------------------
# Autograd Function
# ---------------------------------------------------------------------------


class TritonSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _swiglu_forward(x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _swiglu_backward(x, grad_out)


# ---------------------------------------------------------------------------
# Functional wrapper
# ---------------------------------------------------------------------------


def triton_swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(second half of the last dim) * first half, fused and differentiable.

    x: (..., 2 * hidden) in fp16, bf16 or fp32. Returns (..., hidden) in x's dtype.
    """
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"last dim of x must be even, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    check_runnable(_INTERPRETED, x)
    return TritonSwiGLUFunction.apply(x)
