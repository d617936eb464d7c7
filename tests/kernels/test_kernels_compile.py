"""Build every kernel for an H100 (sm_90) without a GPU: a check that the compiled
(non-interpreted) code paths lower through Triton and ptxas.

Every row of every tile table is built (bf16, at the largest head dim it is tried for,
causal, with and without key masks), and the first suitable row of each table in every
dtype and head dim, causal or not, and causal with key masks; the decode kernel with
and without per-row first slots; every SwiGLU row (bf16; the first row in the other
dtypes). About 150 builds: several minutes on two cores (Triton caches them, so a
second run is quick). Off by default; enable with
``PALM_RLHF_KERNELS_COMPILE_CHECK=1``. Runs in a subprocess because the kernels in
this test session are built for the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.environ.get("PALM_RLHF_KERNELS_COMPILE_CHECK", "0") != "1",
    reason="set PALM_RLHF_KERNELS_COMPILE_CHECK=1 to compile the kernels for sm_90",
)

SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.attention as A
    import kernels.swiglu as S

    TARGET = GPUTarget("cuda", 90, 32)


    def jit_fn(kernel):
        while not isinstance(kernel, triton.runtime.jit.JITFunction):
            kernel = kernel.fn
        return kernel


    def build(kernel, pointers, constexprs, floats=(), **options):
        # Specialised the way a launch on contiguous tensors is: unit head-dim strides
        # become constants, pointers and the other strides are multiples of 16.
        fn = jit_fn(kernel)
        constexprs = dict(constexprs)
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.startswith("stride_") and name.endswith("d"):
                signature[name] = "constexpr"
                constexprs[name] = 1
            elif name in pointers:
                signature[name] = pointers[name]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif name in floats:
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
                if name.startswith("stride_"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        triton.compile(src, target=TARGET, options=options)
        print("built", fn.__name__, constexprs, options, flush=True)


    def ptrs(names, ty):
        return {name: ty for name in names}


    def first_row(table, block_d):
        return next(row for row in table if row.get("max_block_d", block_d) >= block_d)


    def attention_jobs(dt, hd, table, kernel, pointers, floats, causal, mask_keys, rows):
        e = "*" + dt
        bd = max(16, 1 << (hd - 1).bit_length())
        prec = "ieee" if dt == "fp32" else "tf32"
        for c in rows:
            meta = dict(HEAD_DIM=hd, BLOCK_D=bd, UPCAST_DOT=False, DOT_PRECISION=prec, CAUSAL=causal,
                        MASK_KEYS=mask_keys, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"])
            ptr = {name: (e if ty == "E" else ty) for name, ty in pointers.items()}
            yield kernel, ptr, meta, floats, dict(num_warps=c["num_warps"], num_stages=c["num_stages"])


    FWD = (A._attn_fwd_kernel, {"Q": "E", "K": "E", "V": "E", "O": "E", "LSE": "*fp32", "KEY_VALID": "*u8"},
           ("qk_scale",))
    DKDV = (A._attn_bwd_dkdv_kernel, {**{n: "E" for n in ("Q", "K", "V", "DO", "DK", "DV")}, "LSE": "*fp32",
                                      "DELTA": "*fp32", "KEY_VALID": "*u8"}, ("qk_scale", "sm_scale"))
    DQ = (A._attn_bwd_dq_kernel, {**{n: "E" for n in ("Q", "K", "V", "DO", "DQ")}, "LSE": "*fp32",
                                  "DELTA": "*fp32", "KEY_VALID": "*u8"}, ("qk_scale", "sm_scale"))
    TABLES = ((A._FWD_TABLE, FWD), (A._DKDV_TABLE, DKDV), (A._DQ_TABLE, DQ))

    jobs = []
    # every dtype and head dim, causal or not, and causal with key masks (non-causal with key
    # masks in bf16 at 128): the first suitable row of each table (what
    # PALM_RLHF_KERNELS_AUTOTUNE=0 launches)
    for dt in ("bf16", "fp16", "fp32"):
        for hd in (128, 80):
            bd = max(16, 1 << (hd - 1).bit_length())
            variants = [(True, False), (False, False), (True, True)]
            if dt == "bf16" and hd == 128:
                variants.append((False, True))
            for table, (kernel, pointers, floats) in TABLES:
                row = first_row(table, bd)
                for causal, mask_keys in variants:
                    jobs += attention_jobs(dt, hd, table, kernel, pointers, floats, causal, mask_keys, [row])
    # every row of every table, at the largest head dim it is tried for, in bf16, causal with
    # key masks (the most code) and plain causal
    for table, (kernel, pointers, floats) in TABLES:
        for row in table[1:]:
            hd = row.get("max_block_d", 128)
            for mask_keys in (False, True):
                jobs += attention_jobs("bf16", hd, table, kernel, pointers, floats, True, mask_keys, [row])

    for kernel, ptr, meta, floats, options in jobs:
        build(kernel, ptr, meta, floats, **options)

    for dt in ("bf16", "fp16", "fp32"):
        e = "*" + dt
        prec = "ieee" if dt == "fp32" else "tf32"
        for hd in (128, 80):
            bd = max(16, 1 << (hd - 1).bit_length())
            meta = dict(HEAD_DIM=hd, BLOCK_D=bd, UPCAST_DOT=False, DOT_PRECISION=prec)
            build(A._attn_bwd_delta_kernel, {"O": e, "DO": e, "DELTA": "*fp32"},
                  dict(HEAD_DIM=hd, BLOCK_D=bd, BLOCK_M=64))
            c = A._DECODE_TABLE[0]
            for single in (True, False):
                for has_first in (False, True):
                    build(A._decode_split_kernel,
                          {**ptrs(["Q", "K", "V", "O"], e), "LENS": "*i32", "FIRST": "*i32", "PART_O": "*fp32",
                           "PART_LSE": "*fp32"},
                          {**meta, "BLOCK_R": 16, "BLOCK_N": c["BLOCK_N"], "SINGLE_SPLIT": single,
                           "HAS_FIRST": has_first},
                          ("qk_scale",), num_warps=c["num_warps"], num_stages=c["num_stages"])
            build(A._decode_merge_kernel, {"PART_O": "*fp32", "PART_LSE": "*fp32", "O": e},
                  dict(HEAD_DIM=hd, BLOCK_D=bd, BLOCK_S=8))
        for c in S._TABLE if dt == "bf16" else S._TABLE[:1]:
            build(S._swiglu_fwd_kernel, {"X": e, "OUT": e}, {"BLOCK": c["BLOCK"]}, num_warps=c["num_warps"])
            build(S._swiglu_bwd_kernel, {"X": e, "GRAD_OUT": e, "GRAD_X": e}, {"BLOCK": c["BLOCK"]},
                  num_warps=c["num_warps"])
    print("all built")
    """
)


# pytest's own limit (600 s in pyproject.toml) would stop the build before the subprocess's
@pytest.mark.timeout(2400)
def test_kernels_build_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=2100, check=False
    )
    assert res.returncode == 0 and "all built" in res.stdout, res.stdout[-4000:] + res.stderr[-4000:]
