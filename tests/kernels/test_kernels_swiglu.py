"""Fused SwiGLU forward and backward against a float64 reference."""

from __future__ import annotations

import pytest
import torch
from _kernel_testing import DEVICE, DTYPES, assert_close, swiglu_ref

from kernels.swiglu import triton_swiglu

CASES = [((3, 5, 200), "fp32"), ((7, 130), "bf16"), ((2, 3, 66), "fp16"), ((4, 258), "fp32"), ((1, 2, 32), "bf16")]


@pytest.mark.parametrize("shape,dt", CASES, ids=[f"{'x'.join(map(str, s))}-{d}" for s, d in CASES])
def test_swiglu_matches_float64_reference(shape: tuple[int, ...], dt: str) -> None:
    dtype = DTYPES[dt]
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype).requires_grad_()
    x_before = x.detach().clone()
    out = triton_swiglu(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    x64 = x.detach().double().requires_grad_()
    ref = swiglu_ref(x64)
    ref.backward(grad_out.double())
    assert_close(out, ref, dtype, "out")
    assert_close(x.grad, x64.grad, dtype, "dx")
    # the saved activation is left untouched and the gradient is a separate buffer
    assert torch.equal(x.detach(), x_before)
    assert x.grad.data_ptr() != x.data_ptr()


def test_swiglu_strided_input() -> None:
    """A row-strided view (every other row) needs no copy; a non-unit last stride is handled too."""
    base = torch.randn(10, 96, device=DEVICE)
    for x in (base[::2], base.t().contiguous().t()):
        x = x.detach().requires_grad_()
        out = triton_swiglu(x)
        out.sum().backward()
        x64 = x.detach().double().requires_grad_()
        swiglu_ref(x64).sum().backward()
        assert_close(out, swiglu_ref(x.detach().double()), torch.float32, "out")
        assert_close(x.grad, x64.grad, torch.float32, "dx")


def test_swiglu_extreme_gates() -> None:
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5, 120.0, -120.0, 0.0, 30.0]], device=DEVICE, requires_grad=True)
    out = triton_swiglu(x)
    out.sum().backward()
    x64 = x.detach().double().requires_grad_()
    swiglu_ref(x64).sum().backward()
    assert_close(out, swiglu_ref(x.detach().double()), torch.float32, "out")
    assert_close(x.grad, x64.grad, torch.float32, "dx")


def test_swiglu_rejects_odd_last_dim() -> None:
    with pytest.raises(ValueError, match="even"):
        triton_swiglu(torch.randn(3, 5, device=DEVICE))
