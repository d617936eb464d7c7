"""Projection matmuls for inference on the CPU.

PyTorch sends a float32 ``F.linear`` on the CPU to MKL, whose GEMV and small GEMMs stream
the weights at well under the memory bandwidth on some CPUs (on an AMD EPYC host: about 30
GB/s for a batch-1 GEMV, against 60 GB/s for a plain read of the same bytes). oneDNN, which
PyTorch also ships, reaches close to the read bandwidth once a weight is reordered into its
own blocked layout. So inference matmuls (no autograd) go through a oneDNN copy of the
weight, made once with ``torch.ops.mkldnn._reorder_linear_weight`` and applied with
``torch.ops.mkldnn._linear_pointwise`` (the path PyTorch's compiler uses for frozen CPU
models), in float32 and bfloat16 and for any row count: one row (a decode step), a few (the
n samples of best-of-n), or hundreds (a prefill, a scoring pass). On that host this cuts a
batch-1 float32 GEMV by 2.5-3x, a bfloat16 one by about 2x and a 256-row prefill by 2.5x.

The reordered copy costs as much memory as the weight. It is made lazily, the first time a
weight meets a matmul without autograd, and is keyed on the weight's storage and version
counter: any in-place update (an optimizer step, ``load_state_dict``, a LoRA merge) makes a
new copy on the next call. An update through ``weight.data`` is invisible to the version
counter; call :func:`clear` after one.

Each oneDNN op the path uses is probed (present in this build) and checked against
``F.linear`` at first use, separately for each dtype: the reordering, the plain product
(``_linear_pointwise``) and the product with a residual added in the same call
(``_linear_pointwise.binary``). A dtype whose check fails (bfloat16 on a CPU without native
bfloat16 support, say) takes ``F.linear``, with one warning, while the other keeps oneDNN.
``PALM_RLHF_CPU_PACKED=0`` (read by :mod:`kernels.settings`) or :func:`set_enabled` turns the
path off for every dtype.
"""

from __future__ import annotations

import logging
import threading
import weakref

import torch
import torch.nn.functional as F

from kernels import settings

log = logging.getLogger(__name__)

#: the row count the reordered layout is chosen for; it serves other row counts too (measured
#: on a 2-core host: as fast as a 1-row hint at one row, faster at 2-8 rows, no slower at 256)
PACK_ROWS_HINT = 8
#: dtypes with a reordered path
PACKED_DTYPES = (torch.float32, torch.bfloat16)
#: the tolerance of each dtype's check against F.linear (relative; ten times that absolute)
_CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}

# dtype -> whether its reordered path is on; a dtype missing here is decided at first use
_enabled: dict[torch.dtype, bool] = {}
_forced_off = False  # set_enabled(False)
# id(weight) -> (weakref to the weight, (storage, version, shape), packed copy); an entry goes
# when its weight is collected (tensors compare elementwise, so no WeakKeyDictionary)
_packs: dict[int, tuple] = {}
_lock = threading.Lock()


def _ops_available() -> bool:
    """Whether this build has every oneDNN op the path calls."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops._linear_pointwise, "binary")
    )


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def _apply(x2: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2, packed, None, "none", [], "")


def _apply_add(x2: torch.Tensor, packed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.binary(x2, residual, packed, None, "add")


def _self_check(dtype: torch.dtype) -> bool:
    """The reordered weight must give F.linear's answer, with and without a residual added in
    the same call, for one row, a few and many, in both layouts the model stores, before it is
    trusted for ``dtype``."""
    tol = _CHECK_TOL[dtype]
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(96, 80, generator=gen).to(dtype)
        for weight in (w, w.t().contiguous().t()):
            packed = _pack(weight)
            for rows in (1, 3, PACK_ROWS_HINT, 33):
                x = torch.randn(rows, 80, generator=gen).to(dtype)
                residual = torch.randn(rows, 96, generator=gen).to(dtype)
                keep = residual.clone()
                want = F.linear(x.float(), weight.float())
                got = _apply(x, packed)
                got_add = _apply_add(x, packed, residual)
                for out, ref in ((got, want), (got_add, want + keep.float())):
                    if out.dtype != dtype or not torch.allclose(out.float(), ref, rtol=tol, atol=tol * 10):
                        return False
                if not torch.equal(residual, keep):  # the residual is read, never written
                    return False
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: do not use the path
        log.warning("oneDNN CPU linear unavailable for %s: %s", dtype, e)
        return False


def enabled(dtype: torch.dtype = torch.float32) -> bool:
    """Whether matmuls in ``dtype`` take the reordered oneDNN path (decided at first use)."""
    hit = _enabled.get(dtype)
    if hit is not None:
        return hit
    with _lock:
        if dtype not in _enabled:
            wanted = not _forced_off and settings.current().cpu_packed and dtype in PACKED_DTYPES
            ok = wanted and _ops_available() and _self_check(dtype)
            if wanted and not ok:
                log.warning("oneDNN weight reordering unavailable or failed its check for %s; using F.linear", dtype)
            _enabled[dtype] = ok
        return _enabled[dtype]


def set_enabled(on: bool) -> None:
    """Turn the reordered path off for every dtype, or back on (each dtype still subject to its
    check and to ``PALM_RLHF_CPU_PACKED``), deciding afresh."""
    global _forced_off
    with _lock:
        _forced_off = not on
        _enabled.clear()
    clear()


def clear() -> None:
    """Drop every reordered copy (after changing weights through ``.data``)."""
    with _lock:
        _packs.clear()


def forget(*weights: torch.Tensor) -> None:
    """Drop the reordered copies of ``weights`` (after replacing their ``.data``: a new tensor
    may reuse the old one's memory and version count, which the cache key cannot tell apart)."""
    with _lock:
        for w in weights:
            _packs.pop(id(w), None)


def _packed(weight: torch.Tensor) -> torch.Tensor:
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype)
    hit = _packs.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2]
    packed = _pack(weight)
    with _lock:
        if hit is None or hit[0]() is not weight:
            weakref.finalize(weight, _packs.pop, id(weight), None)
        _packs[id(weight)] = (weakref.ref(weight), key, packed)
    return packed


def _takes_reordered(weight: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether a matmul of ``weight`` with ``tensors`` (its input, a residual) goes through
    the reordered oneDNN weight: CPU, float32 or bfloat16 throughout, no autograd."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in PACKED_DTYPES
        and weight.dim() == 2
        and all(t.dtype == weight.dtype for t in tensors)
        and tensors[0].numel() > 0
        and not (torch.is_grad_enabled() and (weight.requires_grad or any(t.requires_grad for t in tensors)))
        and enabled(weight.dtype)
    )


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` without bias, through the reordered oneDNN weight when no
    gradient is needed (float32 or bfloat16 on the CPU), else through ``F.linear``."""
    if _takes_reordered(weight, x):
        rows = x.numel() // weight.shape[1]
        out = _apply(x.reshape(rows, weight.shape[1]), _packed(weight))
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + F.linear(x, weight)`` as one oneDNN call (the add rides in the matmul) where
    :func:`linear` would take the reordered path; a new tensor either way."""
    shape = (*x.shape[:-1], weight.shape[0])
    if residual.shape == shape and _takes_reordered(weight, x, residual):
        rows = x.numel() // weight.shape[1]
        out = linear_packed_add(x.reshape(rows, weight.shape[1]), weight, residual.reshape(rows, weight.shape[0]))
        return out.view(shape)
    return residual + linear(x, weight)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The reordered oneDNN copy of ``weight`` (made now, or the one made before for this
    weight and version), for :func:`apply_packed` and :func:`apply_packed_add`."""
    return _packed(weight)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A new reordered copy of ``weight`` that is not cached here: the caller owns it."""
    return _pack(weight)


def apply_packed(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``F.linear`` for a 2-D ``x`` and a reordered weight, without checks: for a caller that
    made them (no autograd, matching float32 or bfloat16 CPU tensors, :func:`enabled`)."""
    return _apply(x, packed)


def apply_packed_add(x: torch.Tensor, packed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + F.linear(x, weight)`` for 2-D tensors and a reordered weight in one oneDNN
    call, without checks (see :func:`apply_packed`); a new tensor."""
    return _apply_add(x, packed, residual)


def linear_packed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`linear` for a 2-D ``x`` without its checks (see :func:`apply_packed`)."""
    return _apply(x, _packed(weight))


def linear_packed_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """:func:`linear_add` for 2-D tensors without its checks (see :func:`apply_packed`)."""
    return _apply_add(x, _packed(weight), residual)


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
