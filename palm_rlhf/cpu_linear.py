"""Projection matmuls for inference on the CPU.

MKL picks its GEMM path from the shapes. On a small CPU, at a batch of one row the
input-major weight layout of :meth:`PaLM.use_fast_layout` streams fastest, but for a few
rows (2 to 32, or 2 to 16 with one thread: the n samples of best-of-n, a decode batch of
several prompts) a plain float32 GEMM re-packs the weight into MKL's panel format on every
call, which reads and writes it once more than needed. Packing each weight once with MKL's
own ``gemm_pack`` and reusing it (``torch.ops.mkl._mkl_reorder_linear_weight`` /
``_mkl_linear``, the path PyTorch's compiler uses for frozen CPU models) cuts a batch-8
decode step by about a third. One bfloat16 row goes through ``torch.mv``, which is faster
than ``F.linear`` there.

The packed copy costs as much memory as the float32 weight. It is made lazily, the first
time a weight meets 2 to 32 rows without autograd, and is keyed on the weight's storage and
version counter: any in-place update (an optimizer step, ``load_state_dict``, a LoRA merge)
makes a new pack on the next call. An update through ``weight.data`` is invisible to the
version counter; call :func:`clear` after one. ``PALM_RLHF_CPU_PACKED=0`` (or
:func:`set_enabled`) turns the path off; the first pack is checked against ``F.linear`` and
the path turns itself off, with a warning, if MKL disagrees.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: row counts that go through the packed weight; outside it F.linear is as fast or faster
#: (with one thread, above 16 rows F.linear is already faster)
MIN_ROWS, MAX_ROWS, MAX_ROWS_ONE_THREAD = 2, 32, 16

_enabled: bool | None = None  # None: not decided yet (needs MKL and a passing self-check)
# id(weight) -> (weakref to the weight, (storage, version, shape), packed copy); an entry goes
# when its weight is collected (tensors compare elementwise, so no WeakKeyDictionary)
_packs: dict[int, tuple] = {}
_lock = threading.Lock()


def _ops_available() -> bool:
    return (
        torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )


def _self_check() -> bool:
    """MKL's packed format must not depend on the row count used to pack it: check that one
    pack gives F.linear's answer for several row counts before trusting it."""
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(96, 80, generator=gen)
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, MAX_ROWS)
        for rows in (MIN_ROWS, 5, MAX_ROWS):
            x = torch.randn(rows, 80, generator=gen)
            got = torch.ops.mkl._mkl_linear(x, packed, w, None, rows)
            if not torch.allclose(got, F.linear(x, w), rtol=1e-4, atol=1e-4):
                return False
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: do not use the path
        log.warning("packed CPU linear unavailable: %s", e)
        return False


def enabled() -> bool:
    global _enabled
    if _enabled is None:
        wanted = os.environ.get("PALM_RLHF_CPU_PACKED", "1").strip().lower() not in ("0", "false", "no", "off")
        ok = wanted and _ops_available() and _self_check()
        if wanted and not ok:
            log.warning("MKL weight packing unavailable or failed its check; using F.linear")
        _enabled = ok
    return _enabled


def set_enabled(on: bool) -> None:
    """Force the packed path on (still subject to the self-check) or off."""
    global _enabled
    _enabled = None if on else False
    if on:
        os.environ.pop("PALM_RLHF_CPU_PACKED", None)
    clear()


def clear() -> None:
    """Drop every packed copy (after changing weights through ``.data``)."""
    with _lock:
        _packs.clear()


def _packed(weight: torch.Tensor) -> torch.Tensor:
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    hit = _packs.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2]
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), MAX_ROWS)
    with _lock:
        if hit is None or hit[0]() is not weight:
            weakref.finalize(weight, _packs.pop, id(weight), None)
        _packs[id(weight)] = (weakref.ref(weight), key, packed)
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` without bias, through the packed weight where that is faster,
    and through ``torch.mv`` for one bfloat16 row (a third faster than ``F.linear``'s GEMM
    path for an output-major weight on the CPU)."""
    rows = x.numel() // weight.shape[1] if x.numel() else 0
    if rows == 1 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.is_contiguous():
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    if (
        MIN_ROWS <= rows <= MAX_ROWS
        and (rows <= MAX_ROWS_ONE_THREAD or torch.get_num_threads() > 1)
        and weight.dtype == torch.float32
        and x.dtype == torch.float32
        and weight.device.type == "cpu"
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        and enabled()
    ):
        x2 = x.reshape(rows, weight.shape[1])
        out = torch.ops.mkl._mkl_linear(x2, _packed(weight), weight, None, rows)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


# --- weight-only int8 -----------------------------------------------------------------------

#: above this many rows the int8 kernel (one pass per row) is slower than the float GEMM
INT8_MAX_ROWS = 4


#: the int8 kernel needs the inner dimension in whole blocks of this many (checked: other
#: sizes crash it or give wrong sums)
INT8_BLOCK = 16
_int8_ok: bool | None = None


def int8_available() -> bool:
    """Whether this build has the int8 kernel and it passes a check against float math."""
    global _int8_ok
    if _int8_ok is None:
        _int8_ok = False
        if hasattr(torch, "_weight_int8pack_mm"):
            try:
                gen = torch.Generator().manual_seed(0)
                w, x = torch.randn(40, 48, generator=gen), torch.randn(3, 48, generator=gen)
                wq, scale = quantize_int8(w)
                want = F.linear(x.bfloat16().float(), wq.float() * scale.float()[:, None])
                got = int8_linear(x, wq, scale)
                _int8_ok = bool(torch.allclose(got, want, rtol=2e-2, atol=5e-2))
            except Exception as e:  # noqa: BLE001 - any failure means: do not use the path
                log.warning("int8 CPU linear unavailable: %s", e)
        if not _int8_ok:
            log.warning("torch._weight_int8pack_mm is missing or failed its check; int8 decoding is off")
    return _int8_ok


@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ~= wq * scale[:, None]``. Returns the int8
    matrix (out, in) and the scales (out,) in bfloat16, the layout ``int8_linear`` takes."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    wq = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return wq, scale.to(torch.bfloat16)


def int8_linear(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, wq * scale[:, None])`` reading one byte per weight: bfloat16 activations
    times int8 weights (``torch._weight_int8pack_mm``), returned in ``x``'s dtype."""
    if wq.shape[1] % INT8_BLOCK:
        raise ValueError(f"int8 weights need an inner dimension divisible by {INT8_BLOCK}, got {wq.shape[1]}")
    rows = x.numel() // wq.shape[1]
    xb = x.reshape(rows, wq.shape[1])
    if xb.dtype != torch.bfloat16:
        xb = xb.to(torch.bfloat16)
    out = torch._weight_int8pack_mm(xb, wq, scale)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out.view(*x.shape[:-1], wq.shape[0])
