"""Build every kernel for an H100 (sm_90) without a GPU: a check that the compiled
(non-interpreted) code paths lower through Triton and ptxas.

Off by default (a couple of minutes on two cores); enable with
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


    for dt in ("bf16", "fp16", "fp32"):
        e = "*" + dt
        prec = "ieee" if dt == "fp32" else "tf32"
        for hd in (128, 80):
            bd = max(16, 1 << (hd - 1).bit_length())
            meta = dict(HEAD_DIM=hd, BLOCK_D=bd, UPCAST_DOT=False, DOT_PRECISION=prec)
            for causal in (True, False):
                c = first_row(A._FWD_TABLE, bd)
                build(A._attn_fwd_kernel, {**ptrs("QKVO", e), "LSE": "*fp32"},
                      {**meta, "CAUSAL": causal, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
                      ("qk_scale",), num_warps=c["num_warps"], num_stages=c["num_stages"])
                c = first_row(A._DKDV_TABLE, bd)
                build(A._attn_bwd_dkdv_kernel,
                      {**ptrs(["Q", "K", "V", "DO", "DK", "DV"], e), "LSE": "*fp32", "DELTA": "*fp32"},
                      {**meta, "CAUSAL": causal, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
                      ("qk_scale", "sm_scale"), num_warps=c["num_warps"], num_stages=c["num_stages"])
                c = first_row(A._DQ_TABLE, bd)
                build(A._attn_bwd_dq_kernel,
                      {**ptrs(["Q", "K", "V", "DO", "DQ"], e), "LSE": "*fp32", "DELTA": "*fp32"},
                      {**meta, "CAUSAL": causal, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
                      ("qk_scale", "sm_scale"), num_warps=c["num_warps"], num_stages=c["num_stages"])
            build(A._attn_bwd_delta_kernel, {"O": e, "DO": e, "DELTA": "*fp32"},
                  dict(HEAD_DIM=hd, BLOCK_D=bd, BLOCK_M=64))
            c = A._DECODE_TABLE[0]
            for single in (True, False):
                build(A._decode_split_kernel,
                      {**ptrs(["Q", "K", "V", "O"], e), "LENS": "*i32", "PART_O": "*fp32", "PART_LSE": "*fp32"},
                      {**meta, "BLOCK_R": 16, "BLOCK_N": c["BLOCK_N"], "SINGLE_SPLIT": single}, ("qk_scale",),
                      num_warps=c["num_warps"], num_stages=c["num_stages"])
            build(A._decode_merge_kernel, {"PART_O": "*fp32", "PART_LSE": "*fp32", "O": e},
                  dict(HEAD_DIM=hd, BLOCK_D=bd, BLOCK_S=8))
        c = S._TABLE[0]
        build(S._swiglu_fwd_kernel, {"X": e, "OUT": e}, {"BLOCK": c["BLOCK"]}, num_warps=c["num_warps"])
        build(S._swiglu_bwd_kernel, {"X": e, "GRAD_OUT": e, "GRAD_X": e}, {"BLOCK": c["BLOCK"]},
              num_warps=c["num_warps"])
    print("all built")
    """
)


def test_kernels_build_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1800, check=False
    )
    assert res.returncode == 0 and "all built" in res.stdout, res.stdout[-4000:] + res.stderr[-4000:]
