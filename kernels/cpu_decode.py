"""A small C kernel for the non-matmul part of a CPU decode step (``csrc/cpu_decode.c``).

At batch 1 a decode step streams every weight once through two matmuls per layer; what lies
between them (rotary, the KV-cache write, attention over the cache, SwiGLU, the gather of
both outputs) is a dozen tiny tensor operations whose dispatch costs more than their
arithmetic. :func:`attn_swiglu` does all of it in one call per layer.

The kernel is plain C with no PyTorch headers. It is compiled on first use with the system
C compiler (``$CC``, else ``cc`` or ``gcc``; under a second on two cores) into a cache
folder (``$PALM_RLHF_CACHE_DIR``, else ``$XDG_CACHE_HOME/palm-rlhf``, else
``~/.cache/palm-rlhf``; the variables are read by :mod:`kernels.settings`), keyed by the source, the flags, the compiler and the CPU, and
loaded with ``ctypes``. Where nothing can be compiled, a portable build shipped beside the
source (``python -m kernels.cpu_decode --prebuild``; the container image makes one) is used.
Before first use its results are checked against the PyTorch computation; with no library,
or a failed check, it stays off (one warning) and the model takes the PyTorch path.
``PALM_RLHF_CPU_KERNEL=0`` turns it off. The decode step that calls it is
:mod:`palm_rlhf.cpu_decode_runner`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import settings

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_decode.c"
#: a portable build shipped beside the source (``python -m kernels.cpu_decode --prebuild``,
#: as container images do), used where nothing can be compiled
PREBUILT = SOURCE.with_name("cpu_decode-portable.so")
ABI = 3
MAX_HEAD_DIM = 256
#: above this many (rows x attended slots) the PyTorch path, which uses every thread, is used
MAX_WORK = 1 << 15
FLAGS = (
    "-O3", "-fPIC", "-shared", "-std=c99",
    # vectorize the reductions without -ffast-math, which would set flush-to-zero for the process
    "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
)
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's element type codes
_ARGS = ctypes.c_int64 * 19

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None once decided


def _wanted() -> bool:
    return settings.current().cpu_kernel


def cache_dir() -> Path:
    return settings.current().cache_dir


def _compiler() -> str | None:
    for name in (settings.current().compiler, "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def _march_flags(cc: str) -> tuple[str, ...]:
    """-march=native where the compiler takes it (x86, recent Arm), else nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.c"
        probe.write_text("int main(void) { return 0; }\n")
        ok = subprocess.run([cc, "-march=native", "-o", str(Path(tmp) / "probe"), str(probe)], check=False, capture_output=True)
    return ("-march=native",) if ok.returncode == 0 else ()


def build(force: bool = False, portable: bool = False, output: Path | None = None) -> Path:
    """Compile the kernel (or find the cached build) and return the shared library's path.
    ``portable``: for any CPU of this architecture (no -march=native), as shipped in container
    images; ``output``: write there instead of the cache. Raises RuntimeError when there is
    no compiler or the build fails."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    # portable: no -march=native, but one copy of the kernel per x86-64 level, picked at load
    flags = FLAGS + (("-DPALM_PORTABLE",) if portable else _march_flags(cc))
    version = subprocess.run([cc, "--version"], check=False, capture_output=True, text=True).stdout.splitlines()[:1]
    cpu = platform.machine() if portable else _cpu_signature()
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(flags), cc, *version, cpu, str(ABI)]).encode()
    ).hexdigest()[:16]
    target = Path(output) if output is not None else cache_dir() / f"cpu_decode-{key}.so"
    if target.exists() and not force and output is None:
        return target
    out_dir = target.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    # build next to the target and rename: concurrent builders (services starting together)
    # each produce a whole file, and the last rename wins
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".cpu_decode-", suffix=".so")
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], check=False, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{res.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    if lib.palm_cpu_decode_abi() != ABI:
        raise RuntimeError(f"{path} has another ABI version")
    lib.palm_attn_swiglu.argtypes = [ctypes.c_void_p, ctypes.c_float]
    lib.palm_attn_swiglu.restype = ctypes.c_int
    return lib


def reference(fused, cos, sin, k_cache, v_cache, pos, heads, ff, scale, start=0):
    """The same computation in PyTorch (what the model's plain path does), for the checks.
    ``cos``/``sin``: (dim_head,) for all rows or (rows, dim_head); ``start``: an int or one
    first slot per row. Writes the caches like the kernel and returns ``[attention out |
    SwiGLU out]``."""
    b = fused.shape[0]
    d = k_cache.shape[-1]
    q, k, v, value, gate = fused.split((heads * d, d, d, ff, ff), dim=-1)
    if cos.dim() == 2:
        cos, sin = cos[:, None], sin[:, None]

    def rotate(x):
        return x * cos + x.roll(d // 2, dims=-1) * sin

    q = rotate(q.view(b, heads, d))
    k_cache[:, 0, pos] = rotate(k[:, None])[:, 0]
    v_cache[:, 0, pos] = v
    starts = torch.as_tensor(start).expand(b)
    slots = torch.arange(pos + 1)
    mask = (slots[None] >= starts[:, None])[:, None, None, :]  # (rows, 1, 1, pos + 1)
    keys, values = k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1]
    att = F.scaled_dot_product_attention(q.view(b, 1, heads, d), keys, values, attn_mask=mask, scale=scale)
    return torch.cat((att.reshape(b, heads * d), F.silu(gate) * value), dim=-1)


# head dims the self-check runs: the generic loop (16) and each vectorised case of the C source
SELF_CHECK_HEAD_DIMS = (16, 32, 64, 128)


def _self_check(lib) -> bool:
    gen = torch.Generator().manual_seed(0)
    heads, ff, slots = 3, 24, 12
    for d in SELF_CHECK_HEAD_DIMS:
        if not _self_check_dim(lib, gen, heads, d, ff, slots):
            log.warning("the CPU decode kernel disagrees with PyTorch at head dim %d", d)
            return False
    return True


def _self_check_dim(lib, gen, heads: int, d: int, ff: int, slots: int) -> bool:
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        for rows, pos, start, per_row in ((1, 0, 0, False), (2, 7, 0, False), (2, 9, 3, False), (3, 9, None, True)):
            fused = torch.randn(rows, heads * d + 2 * d + 2 * ff, generator=gen).to(dtype)
            angle = torch.rand(rows if per_row else 1, d // 2, generator=gen) * 6
            cos = torch.cat((angle.cos(), angle.cos()), dim=-1).to(dtype)
            sin = torch.cat((-angle.sin(), angle.sin()), dim=-1).to(dtype)
            if not per_row:
                cos, sin = cos[0], sin[0]
            if start is None:
                start = torch.tensor([0, 4, 9])[:rows]
            k0 = torch.randn(rows, 1, slots, d, generator=gen).to(dtype)
            v0 = torch.randn(rows, 1, slots, d, generator=gen).to(dtype)
            k_ref, v_ref = k0.float(), v0.float()
            want = reference(fused.float(), cos.float(), sin.float(), k_ref, v_ref, pos, heads, ff, 0.3, start)
            got = _call(lib, fused, cos, sin, k0, v0, pos, heads, ff, 0.3, start)
            for a, b in ((got, want), (k0, k_ref), (v0, v_ref)):
                if not torch.allclose(a.float(), b, rtol=tol, atol=tol):
                    return False
    return True


def library():
    """The loaded kernel library, or None when it is off, cannot be built or failed its check."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib = None
        if _wanted():
            try:
                try:
                    path = build()
                except (RuntimeError, OSError):  # no compiler, or a cache directory we cannot write
                    if not PREBUILT.exists():
                        raise
                    path = PREBUILT
                lib = _load(path)
                if not _self_check(lib):
                    log.warning("the CPU decode kernel disagrees with PyTorch; using the PyTorch path")
                    lib = None
            except Exception as e:  # noqa: BLE001 - any failure means: take the PyTorch path
                log.warning("CPU decode kernel unavailable (%s); using the PyTorch path", e)
                lib = None
        _state["fn"] = None if lib is None else lib.palm_attn_swiglu
        _state["lib"] = lib
        return lib


def available() -> bool:
    return library() is not None


def reset() -> None:
    """Forget the decision, so that the next use decides afresh under the current
    :mod:`kernels.settings` (tests; after :func:`kernels.settings.update`)."""
    with _lock:
        _state.clear()


def supports(rows: torch.Tensor, caches, pos: int) -> bool:
    """Whether :func:`attn_swiglu` takes a decode step of ``rows`` (any (rows, features)
    activation of the step) against these per-layer ``(k, v)`` caches (else use the PyTorch
    path)."""
    k0 = caches[0][0]
    d, strides = k0.shape[-1], k0.stride()
    return (
        rows.device.type == "cpu"
        and rows.dtype in DTYPES
        and rows.dim() == 2
        and strides[-1] == 1
        and d <= MAX_HEAD_DIM
        and d % 2 == 0
        and rows.shape[0] * (pos + 1) <= MAX_WORK
        and pos < k0.shape[-2]
        and k0.dim() == 4
        and k0.shape[1] == 1  # one K/V head (multi-query attention): the kernel's cache layout
        and k0.shape[0] == rows.shape[0]
        and all(k.dtype == v.dtype == rows.dtype and k.stride() == v.stride() == strides for k, v in caches)
        and available()
    )


_tls = threading.local()  # one argument array per thread: calls may run concurrently


def _args():
    a = _tls.__dict__.get("args")
    if a is None:
        a = _tls.args = _ARGS()
    return a


def _invoke(fn, fused, cos, sin, k_cache, v_cache, pos, heads, ff, scale, start, starts):
    """One kernel call on already checked tensors; returns the new [attention | SwiGLU] rows."""
    rows, d = fused.shape[0], k_cache.shape[-1]
    width = heads * d + ff
    out = torch.empty(rows, width, dtype=fused.dtype)
    strides = k_cache.stride()
    a = _args()
    a[:] = (
        DTYPES[fused.dtype], fused.data_ptr(), fused.stride(0), cos.data_ptr(), sin.data_ptr(),
        d if cos.dim() == 2 else 0, k_cache.data_ptr(), v_cache.data_ptr(), strides[0], strides[-2], start,
        0 if starts is None else starts.data_ptr(), pos, rows, heads, d, ff, out.data_ptr(), width,
    )
    rc = fn(ctypes.addressof(a), scale)
    if rc != 0:
        raise RuntimeError(f"CPU decode kernel failed ({rc})")
    return out


def _call(lib, fused, cos, sin, k_cache, v_cache, pos, heads, ff, scale, start=0):
    """Check the tensors (a wrong shape would make the kernel write out of bounds), then run."""
    rows = fused.shape[0]
    d = k_cache.shape[-1]
    if fused.stride(-1) != 1:
        fused = fused.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    if cos.shape != sin.shape or cos.shape[-1] != d or (cos.dim() == 2 and cos.shape[0] != rows) or cos.dim() > 2:
        raise ValueError(f"cos/sin must be ({d},) or ({rows}, {d}), got {tuple(cos.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.shape != v_cache.shape or k_cache.stride(-1) != 1:
        raise ValueError("k/v caches must have one shape and strides, with contiguous head rows")
    if k_cache.dim() != 4 or k_cache.shape[0] != rows or not 0 <= pos < k_cache.shape[-2]:
        raise ValueError(f"caches must be ({rows}, 1, slots, {d}) with slot {pos} inside them")
    if fused.shape[-1] != heads * d + 2 * d + 2 * ff or fused.dim() != 2:
        raise ValueError(f"fused rows must hold {heads * d + 2 * d + 2 * ff} values, got {tuple(fused.shape)}")
    if not (fused.dtype == k_cache.dtype == v_cache.dtype == cos.dtype == sin.dtype) or fused.dtype not in DTYPES:
        raise ValueError("fused, caches, cos and sin must share one dtype, float32 or bfloat16")
    starts = None
    if isinstance(start, torch.Tensor):
        starts = start.to(torch.int64).contiguous()
        if starts.shape != (rows,):
            raise ValueError(f"start must be an int or one slot per row ({rows},), got {tuple(starts.shape)}")
        start = 0
    return _invoke(lib.palm_attn_swiglu, fused, cos, sin, k_cache, v_cache, pos, heads, ff, scale, start, starts)


def attn_swiglu(fused, cos, sin, k_cache, v_cache, pos: int, heads: int, ff: int, scale: float, start=0):
    """One decode step's work between the two projections of a layer, for every row:
    rotate the queries and the key (``cos``/``sin``: one sign-folded row (dim_head,) for all
    rows or one per row (rows, dim_head), see :class:`palm_rlhf.model.Rotary`), write the key
    and value at slot ``pos`` of the caches (``(rows, 1, slots, dim_head)``), attend over slots
    ``[start, pos]`` (``start``: an int, or an int64 tensor with one first slot per row, as in
    a left-padded batch) and apply SwiGLU. ``fused``: (rows, heads * dim_head + 2 * dim_head +
    2 * ff) rows of the fused input projection. Returns (rows, heads * dim_head + ff):
    [attention out | SwiGLU out]."""
    return _call(library(), fused, cos, sin, k_cache, v_cache, pos, heads, ff, scale, start)


def attn_swiglu_unchecked(fused, cos, sin, cache, pos: int, heads: int, ff: int, scale: float, starts=None):
    """:func:`attn_swiglu` for a caller that checked :func:`supports` (contiguous ``fused``;
    contiguous ``cos``/``sin``, one row or one per row; ``starts``: None or a contiguous int64
    tensor, one first slot per row; the caches of one layer of a KV cache), with less per-call
    work."""
    return _invoke(_state["fn"], fused, cos, sin, *cache, pos, heads, ff, scale, 0, starts)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build the CPU decode kernel and check it against PyTorch.")
    ap.add_argument("--prebuild", action="store_true", help=f"write a portable build to {PREBUILT}")
    args = ap.parse_args(argv)
    path = build(portable=True, output=PREBUILT) if args.prebuild else build(force=True)
    ok = _self_check(_load(path))
    print(f"{path}: {'passes' if ok else 'FAILS'} its check against PyTorch")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
