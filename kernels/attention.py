"""Fused multi-query attention in Triton, FlashAttention-2 style.

Training / prefill: :func:`triton_attention` takes ``q`` of shape
``(batch, heads, seq, head_dim)`` and ``k``, ``v`` of shape
``(batch, kv_heads, seq, head_dim)`` where ``kv_heads`` divides ``heads`` (1 for
multi-query attention). It streams K/V tiles past a resident Q tile with an online
softmax, so nothing of size ``seq x seq`` is ever stored. The backward pass
recomputes the probabilities from the saved log-sum-exp: one kernel produces
dK/dV per key tile (looping over every query head that shares the kv head, so the
gradients of a shared K/V head are summed in registers), another produces dQ.

Decoding: :func:`triton_decode_attention` attends a few new query tokens to a KV
cache. The cache is cut into splits processed by separate programs (split-K,
"flash decoding"), each program handling all query heads of one kv head, and a
second kernel merges the partial results with their log-sum-exps.

The file is layered: ``@triton.jit`` helpers, entry kernels, host launchers, the
autograd Function, and the functional wrappers. Everything runs on CPU tensors
under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import torch
import triton
import triton.language as tl

from kernels._runtime import (
    check_runnable,
    config_pruner,
    dot_precision,
    interpreter_enabled,
    multiprocessor_count,
    next_power_of_2,
    select_configs,
    shared_memory_budget,
)

# Decided once, at import: the @triton.jit decorators below make the same choice.
_INTERPRETED = interpreter_enabled()

MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------
# Tile configurations (data). On a GPU the autotuner tries every row that suits the
# call (see the _keep_* filters); with autotuning off the first suitable row is used;
# the interpreter uses the small pinned configuration. Every row builds for sm_90 with
# bf16 inputs without register spills (or with a few dozen bytes, checked with ptxas)
# at the head dims it is tried for; rows marked max_block_d spill above that size and
# are only tried up to it.
# ---------------------------------------------------------------------------

_FWD_TABLE = [
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "max_block_d": 64},
    {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "max_block_d": 64},
]
_FWD_INTERPRETER = {"BLOCK_M": 32, "BLOCK_N": 16}

# dK/dV: BLOCK_N key rows stay resident, BLOCK_M query rows stream past.
_DKDV_TABLE = [
    {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "max_block_d": 64},
    {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "max_block_d": 64},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "max_block_d": 64},
    {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "max_block_d": 64},
]
_DKDV_INTERPRETER = {"BLOCK_M": 16, "BLOCK_N": 32}

# dQ: BLOCK_M query rows stay resident, BLOCK_N key rows stream past.
_DQ_TABLE = [
    {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "max_block_d": 64},
]
_DQ_INTERPRETER = {"BLOCK_M": 32, "BLOCK_N": 16}

# Decode: the split length is computed on the host from BLOCK_N, so it is picked
# here rather than autotuned.
_DECODE_TABLE = [{"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}]
_DECODE_INTERPRETER = {"BLOCK_N": 16}
_DECODE_MAX_ROWS = 64  # query rows (heads sharing a kv head x new tokens) per program

_DELTA_BLOCK_M = 32 if _INTERPRETED else 64


@cache
def _smem_budget(device_index: int | None) -> int:
    return shared_memory_budget(torch.device("cuda", device_index) if device_index is not None else None)


def _budget_for(t: torch.Tensor) -> int:
    return _smem_budget(t.device.index if t.is_cuda else None)


def _keep_fwd(config: Any, args: dict[str, Any]) -> bool:
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    bd, elt = args["BLOCK_D"], args["Q"].element_size()
    smem = elt * (bm * bd + config.num_stages * 2 * bn * bd)
    return bm % bn == 0 and bm <= max(64, args["seq_bucket"]) and smem <= _budget_for(args["Q"])


def _keep_dkdv(config: Any, args: dict[str, Any]) -> bool:
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    bd, elt = args["BLOCK_D"], args["Q"].element_size()
    smem = elt * (2 * bn * bd + config.num_stages * 2 * bm * bd)
    return bn % bm == 0 and bn <= max(64, args["seq_bucket"]) and smem <= _budget_for(args["Q"])


def _keep_dq(config: Any, args: dict[str, Any]) -> bool:
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    bd, elt = args["BLOCK_D"], args["Q"].element_size()
    smem = elt * (2 * bm * bd + config.num_stages * 2 * bn * bd)
    return bm % bn == 0 and bm <= max(64, args["seq_bucket"]) and smem <= _budget_for(args["Q"])


_FWD_CONFIGS = select_configs(_FWD_TABLE, _FWD_INTERPRETER, _INTERPRETED)
_DKDV_CONFIGS = select_configs(_DKDV_TABLE, _DKDV_INTERPRETER, _INTERPRETED)
_DQ_CONFIGS = select_configs(_DQ_TABLE, _DQ_INTERPRETER, _INTERPRETED)
_DECODE_CONFIG = select_configs(_DECODE_TABLE, _DECODE_INTERPRETER, _INTERPRETED)[0]


# ---------------------------------------------------------------------------
# @triton.jit helpers
# ---------------------------------------------------------------------------
#
# Only Triton builtins are called from the kernels (tl.full rather than tl.zeros,
# tl.reduce rather than tl.max / tl.sum): the standard-library wrappers are themselves
# @triton.jit functions, built for the GPU or for the interpreter when triton.language
# is first imported, so avoiding them lets these kernels run in the interpreter even
# when Triton was imported before TRITON_INTERPRET was set.


@triton.jit
def _max_combine_fallback(a, b):
    return tl.maximum(a, b)


@triton.jit
def _sum_combine_fallback(a, b):
    return a + b


# The standard library's own combine functions (what tl.max / tl.sum reduce with); the
# interpreter maps them onto vectorised numpy reductions.
_MAX_COMBINE = getattr(tl.standard, "_elementwise_max", _max_combine_fallback)
_SUM_COMBINE = getattr(tl.standard, "_sum_combine", _sum_combine_fallback)


@triton.jit
def _reduce_max(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _MAX_COMBINE)


@triton.jit
def _reduce_sum(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _SUM_COMBINE)



@triton.jit
def _dot(a, b, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST_DOT feeds the operands as fp32 (used by the
    interpreter, whose matmul cannot take bf16); the operands hold the same values."""
    if UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _dot_acc(a, b, acc, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in fp32."""
    if UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _fwd_span(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    kv_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    offs_m,
    offs_d,
    lo,
    hi,
    seq_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    MASK_TAIL: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax pass of one query tile over key columns [lo, hi).

    Scores are kept in the log2 domain (qk_scale includes log2(e)), so exp2 is used.
    With MASK_KEYS, ``kv_base`` points at this batch row's key-valid flags: invalid keys
    are masked, except (with MASK_CAUSAL) a query's own key.
    """
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        # K^T tile: (BLOCK_D, BLOCK_N)
        kt = tl.load(
            k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
            mask=d_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        s = _dot(q, kt, UPCAST_DOT, DOT_PRECISION) * qk_scale
        if MASK_KEYS:
            key_ok = tl.load(kv_base + offs_n, mask=n_ok, other=0) != 0
            if MASK_CAUSAL:
                ok = ((offs_m[:, None] >= offs_n[None, :]) & key_ok[None, :]) | (offs_m[:, None] == offs_n[None, :])
            else:
                ok = key_ok[None, :] & (offs_m[:, None] >= 0)
            s = tl.where(ok, s, float("-inf"))
        elif MASK_CAUSAL:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        if MASK_TAIL:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, _reduce_max(s, 1))
        if MASK_KEYS:
            # a row may have seen no key yet: use a finite reference (no -inf - -inf)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + _reduce_sum(p, 1)
        # V tile: (BLOCK_N, BLOCK_D)
        v = tl.load(
            v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None]
        acc = _dot_acc(p.to(v.dtype), v, acc, UPCAST_DOT, DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _dkdv_span(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qm,
    stride_qd,
    stride_dom,
    stride_dod,
    offs_n,
    offs_d,
    key_ok,
    lo,
    hi,
    seq_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query rows [lo, hi) of one head.

    Works in the transposed orientation (key rows x query rows) so that P^T and dS^T
    come out of the matmuls directly.
    """
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seq_len
        io_mask = m_ok[:, None] & d_ok[None, :]
        # (BLOCK_M, BLOCK_D) tiles of Q and dO
        q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                    mask=io_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :] * stride_dod,
                     mask=io_mask, other=0.0)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        # S^T, P^T: (BLOCK_N, BLOCK_M)
        st = _dot(k, tl.trans(q), UPCAST_DOT, DOT_PRECISION)
        pt = tl.exp2(st * qk_scale - lse[None, :])
        keep = m_ok[None, :]
        if MASK_KEYS:
            # key_ok: (BLOCK_N,) flags of this program's keys
            if MASK_CAUSAL:
                keep = keep & (((offs_m[None, :] >= offs_n[:, None]) & key_ok[:, None])
                               | (offs_m[None, :] == offs_n[:, None]))
            else:
                keep = keep & key_ok[:, None]
        elif MASK_CAUSAL:
            keep = keep & (offs_m[None, :] >= offs_n[:, None])
        pt = tl.where(keep, pt, 0.0)
        dv = _dot_acc(pt.to(do.dtype), do, dv, UPCAST_DOT, DOT_PRECISION)
        dpt = _dot(v, tl.trans(do), UPCAST_DOT, DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = _dot_acc(dst.to(q.dtype), q, dk, UPCAST_DOT, DOT_PRECISION)
    return dk, dv


@triton.jit
def _dq_span(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    kv_base,
    offs_m,
    offs_d,
    lo,
    hi,
    seq_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ of one query tile over key columns [lo, hi)."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        t_mask = d_ok[:, None] & n_ok[None, :]
        # K^T, V^T tiles: (BLOCK_D, BLOCK_N)
        kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
                     mask=t_mask, other=0.0)
        vt = tl.load(v_base + offs_n[None, :].to(tl.int64) * stride_vn + offs_d[:, None] * stride_vd,
                     mask=t_mask, other=0.0)
        s = _dot(q, kt, UPCAST_DOT, DOT_PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])
        keep = n_ok[None, :]
        if MASK_KEYS:
            key_ok = tl.load(kv_base + offs_n, mask=n_ok, other=0) != 0
            if MASK_CAUSAL:
                keep = keep & (((offs_m[:, None] >= offs_n[None, :]) & key_ok[None, :])
                               | (offs_m[:, None] == offs_n[None, :]))
            else:
                keep = keep & key_ok[None, :]
        elif MASK_CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        p = tl.where(keep, p, 0.0)
        dp = _dot(do, vt, UPCAST_DOT, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot_acc(ds.to(kt.dtype), tl.trans(kt), dq, UPCAST_DOT, DOT_PRECISION)
    return dq


# ---------------------------------------------------------------------------
# Entry kernels
# ---------------------------------------------------------------------------


@triton.autotune(
    configs=_FWD_CONFIGS,
    key=["seq_bucket", "HEAD_DIM", "CAUSAL", "MASK_KEYS"],
    prune_configs_by={"early_config_prune": config_pruner(_keep_fwd)},
)
@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    KEY_VALID,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_kvb,
    num_heads,
    group,
    seq_len,
    seq_bucket,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "BLOCK_M must be a multiple of BLOCK_N")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dim")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs at least 16 along the reduction")
    if CAUSAL:
        # The last query tiles do the most work: start them first.
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_kvh = off_h // group

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_len
    d_ok = offs_d < HEAD_DIM
    io_mask = m_ok[:, None] & d_ok[None, :]

    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=io_mask,
        other=0.0,
    )
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    kv_base = KEY_VALID + off_b * stride_kvb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    if CAUSAL:
        # Key tiles wholly left of this query tile need no mask; the tile(s) on the
        # diagonal do.
        acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, k_base, v_base, kv_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  offs_m, offs_d, 0, start_m, seq_len, qk_scale,
                                  HEAD_DIM, BLOCK_N, False, False, MASK_KEYS, UPCAST_DOT, DOT_PRECISION)
        acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, k_base, v_base, kv_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  offs_m, offs_d, start_m, tl.minimum(start_m + BLOCK_M, seq_len), seq_len,
                                  qk_scale, HEAD_DIM, BLOCK_N, True, True, MASK_KEYS, UPCAST_DOT, DOT_PRECISION)
    else:
        full_hi = (seq_len // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, k_base, v_base, kv_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  offs_m, offs_d, 0, full_hi, seq_len, qk_scale,
                                  HEAD_DIM, BLOCK_N, False, False, MASK_KEYS, UPCAST_DOT, DOT_PRECISION)
        acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, k_base, v_base, kv_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  offs_m, offs_d, full_hi, seq_len, seq_len, qk_scale,
                                  HEAD_DIM, BLOCK_N, False, True, MASK_KEYS, UPCAST_DOT, DOT_PRECISION)

    # Every stored row saw at least its own key (causal), so l_i > 0 there; padded rows,
    # and rows a key mask leaves empty (their output is 0), cannot produce NaN either.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om
        + offs_d[None, :] * stride_od,
        out.to(O.dtype.element_ty),
        mask=io_mask,
    )
    # log2-domain log-sum-exp of the scaled scores, one per query row: (batch * heads, seq)
    tl.store(LSE + pid_bh * seq_len + offs_m, m_i + tl.log2(l_safe), mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    num_heads,
    seq_len,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta[row] = sum_d O[row, d] * dO[row, d] (the softmax-backward row term), in fp32."""
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dim")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_len
    mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + rows * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * seq_len + offs_m, _reduce_sum(o * do, 1), mask=m_ok)


@triton.autotune(
    configs=_DKDV_CONFIGS,
    key=["seq_bucket", "HEAD_DIM", "CAUSAL", "MASK_KEYS"],
    prune_configs_by={"early_config_prune": config_pruner(_keep_dkdv)},
)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    KEY_VALID,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    stride_kvb,
    num_kv_heads,
    group,
    seq_len,
    seq_bucket,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV for one tile of BLOCK_N keys of one kv head, summed over the `group`
    query heads that share it (no atomics, no per-head copies of K/V)."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0, "BLOCK_N must be a multiple of BLOCK_M")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dim")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs at least 16 along the reduction")
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1).to(tl.int64)
    off_b = pid_bkv // num_kv_heads
    off_kvh = pid_bkv % num_kv_heads
    num_heads = num_kv_heads * group

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seq_len
    kv_mask = n_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = offs_n[:, None].to(tl.int64)
    # (BLOCK_N, BLOCK_D) tiles of K and V, resident for the whole program
    k = tl.load(K + off_b * stride_kb + off_kvh * stride_kh + rows * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_kvh * stride_vh + rows * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    if MASK_KEYS:
        key_ok = tl.load(KEY_VALID + off_b * stride_kvb + offs_n, mask=n_ok, other=0) != 0
    else:
        key_ok = n_ok

    for g in range(group):
        off_h = off_kvh * group + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        row_base = (off_b * num_heads + off_h) * seq_len
        lse_base = LSE + row_base
        delta_base = DELTA + row_base
        if CAUSAL:
            # Query rows before start_n never see these keys; the rows of the diagonal
            # tile need the mask, rows below it do not.
            diag_hi = tl.minimum(start_n + BLOCK_N, seq_len)
            dk, dv = _dkdv_span(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                stride_qm, stride_qd, stride_dom, stride_dod, offs_n, offs_d, key_ok,
                                start_n, diag_hi, seq_len, qk_scale,
                                HEAD_DIM, BLOCK_M, True, MASK_KEYS, UPCAST_DOT, DOT_PRECISION)
            dk, dv = _dkdv_span(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                stride_qm, stride_qd, stride_dom, stride_dod, offs_n, offs_d, key_ok,
                                start_n + BLOCK_N, seq_len, seq_len, qk_scale,
                                HEAD_DIM, BLOCK_M, False, MASK_KEYS, UPCAST_DOT, DOT_PRECISION)
        else:
            dk, dv = _dkdv_span(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                stride_qm, stride_qd, stride_dom, stride_dod, offs_n, offs_d, key_ok,
                                0, seq_len, seq_len, qk_scale,
                                HEAD_DIM, BLOCK_M, False, MASK_KEYS, UPCAST_DOT, DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_kvh * stride_dkh + rows * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b * stride_dvb + off_kvh * stride_dvh + rows * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(
    configs=_DQ_CONFIGS,
    key=["seq_bucket", "HEAD_DIM", "CAUSAL", "MASK_KEYS"],
    prune_configs_by={"early_config_prune": config_pruner(_keep_dq)},
)
@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    KEY_VALID,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    stride_kvb,
    num_heads,
    group,
    seq_len,
    seq_bucket,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "BLOCK_M must be a multiple of BLOCK_N")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dim")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs at least 16 along the reduction")
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_kvh = off_h // group

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_len
    io_mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows * stride_qm + offs_d[None, :] * stride_qd,
                mask=io_mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows * stride_dom + offs_d[None, :] * stride_dod,
                 mask=io_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * seq_len + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * seq_len + offs_m, mask=m_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    kv_base = KEY_VALID + off_b * stride_kvb

    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    if CAUSAL:
        dq = _dq_span(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                      kv_base, offs_m, offs_d, 0, start_m, seq_len, qk_scale,
                      HEAD_DIM, BLOCK_N, False, MASK_KEYS, UPCAST_DOT, DOT_PRECISION)
        dq = _dq_span(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                      kv_base, offs_m, offs_d, start_m, tl.minimum(start_m + BLOCK_M, seq_len), seq_len, qk_scale,
                      HEAD_DIM, BLOCK_N, True, MASK_KEYS, UPCAST_DOT, DOT_PRECISION)
    else:
        dq = _dq_span(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                      kv_base, offs_m, offs_d, 0, seq_len, seq_len, qk_scale,
                      HEAD_DIM, BLOCK_N, False, MASK_KEYS, UPCAST_DOT, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + rows * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    LENS,
    FIRST,
    O,
    PART_O,
    PART_LSE,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    num_kv_heads,
    group,
    n_new,
    num_splits,
    split_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    HAS_FIRST: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One split of the cache for one kv head: every query row (head sharing this kv
    head x new token) attends to keys [split * split_len, (split + 1) * split_len).
    With HAS_FIRST, keys before the batch row's first slot (FIRST, left padding) are
    skipped; a split that lies wholly before it contributes nothing.

    With SINGLE_SPLIT the normalised result goes straight to O; otherwise the
    normalised partial output and its log2-domain log-sum-exp go to PART_O
    (batch, heads, n_new, splits, head_dim) and PART_LSE (batch, heads, n_new, splits).
    """
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dim")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs at least 16 along the reduction")
    tl.static_assert(BLOCK_R >= 16, "tl.dot needs at least 16 rows")
    pid_s = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_bkv = tl.program_id(2).to(tl.int64)
    off_b = pid_bkv // num_kv_heads
    off_kvh = pid_bkv % num_kv_heads
    cache_len = tl.load(LENS + off_b).to(tl.int32)

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < group * n_new
    head = off_kvh * group + (rows // n_new).to(tl.int64)
    tok = rows % n_new
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    io_mask = r_ok[:, None] & d_ok[None, :]
    # (BLOCK_R, BLOCK_D): rows gather several heads of the same batch element
    q = tl.load(
        Q + off_b * stride_qb + head[:, None] * stride_qh + tok[:, None].to(tl.int64) * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=io_mask,
        other=0.0,
    )
    # The new tokens are the last n_new of the valid cache: token t sits at position
    # cache_len - n_new + t and sees keys up to and including that position.
    last_visible = cache_len - n_new + tok

    lo = pid_s * split_len
    hi = tl.minimum(lo + split_len, cache_len)
    if HAS_FIRST:
        lo = tl.maximum(lo, tl.load(FIRST + off_b).to(tl.int32))
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_R], 0.0, tl.float32)
    acc = tl.full([BLOCK_R, BLOCK_D], 0.0, tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        # K^T tile: (BLOCK_D, BLOCK_N)
        kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s = _dot(q, kt, UPCAST_DOT, DOT_PRECISION) * qk_scale
        visible = n_ok[None, :] & (offs_n[None, :] <= last_visible[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, _reduce_max(s, 1))
        # A row can see nothing of this split yet (a new token before the split's
        # keys): use a finite reference so that no -inf - -inf appears.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + _reduce_sum(p, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = _dot_acc(p.to(v.dtype), v, acc, UPCAST_DOT, DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    if SINGLE_SPLIT:
        tl.store(
            O + off_b * stride_ob + head[:, None] * stride_oh + tok[:, None].to(tl.int64) * stride_om
            + offs_d[None, :] * stride_od,
            out.to(O.dtype.element_ty),
            mask=io_mask,
        )
    else:
        part_row = ((off_b * (num_kv_heads * group) + head) * n_new + tok) * num_splits + pid_s
        tl.store(PART_LSE + part_row, tl.where(seen, m_i + tl.log2(l_safe), float("-inf")), mask=r_ok)
        tl.store(PART_O + part_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=io_mask)


@triton.jit
def _decode_merge_kernel(
    PART_O,
    PART_LSE,
    O,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    num_heads,
    n_new,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Merge the per-split partial outputs of one query row by their log-sum-exps."""
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dim")
    row = tl.program_id(0).to(tl.int64)  # flat index over (batch, heads, n_new)
    tok = row % n_new
    off_h = (row // n_new) % num_heads
    off_b = row // (n_new * num_heads)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(PART_LSE + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = _reduce_max(lse, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_ref)  # empty splits carry lse = -inf and weigh 0
    parts = tl.load(PART_O + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    denom = _reduce_sum(w, 0)
    out = _reduce_sum(w[:, None] * parts, 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(O + off_b * stride_ob + off_h * stride_oh + tok * stride_om + offs_d * stride_od,
             out.to(O.dtype.element_ty), mask=d_ok)


# ---------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------


def _check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-d: (batch, heads, seq, head_dim)")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    batch, heads, _, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if k.shape[1] < 1 or heads % k.shape[1] != 0:
        raise ValueError(f"kv heads ({k.shape[1]}) must divide query heads ({heads})")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} not supported (1..{MAX_HEAD_DIM})")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype out of {SUPPORTED_DTYPES}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    check_runnable(_INTERPRETED, q, k, v)


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _seq_bucket(seq_len: int) -> int:
    """Autotuning key for the sequence length: powers of two, capped, so that a server
    seeing many lengths tunes a handful of times rather than once per length."""
    return min(next_power_of_2(max(seq_len, 16)), 16384)


def _empty_like_rows(t: torch.Tensor) -> torch.Tensor:
    """A fresh (batch, heads, seq, head_dim) tensor whose memory order follows ``t``'s:
    sequence-major (batch, seq, heads, head_dim) when ``t`` is, so that the caller's
    transpose back to (batch, seq, heads * head_dim) is a view rather than a copy."""
    batch, heads, seq, head_dim = t.shape
    if heads > 1 and t.stride(1) < t.stride(2):
        # (batch, seq, heads, head_dim) storage seen as (batch, heads, seq, head_dim)
        return torch.empty((batch, seq, heads, head_dim), device=t.device, dtype=t.dtype).transpose(1, 2)
    return torch.empty((batch, heads, seq, head_dim), device=t.device, dtype=t.dtype)


def _common_meta(q: torch.Tensor, causal: bool, key_valid: torch.Tensor | None = None) -> dict[str, Any]:
    head_dim = q.shape[-1]
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": _block_d(head_dim),
        "CAUSAL": bool(causal),
        "MASK_KEYS": key_valid is not None,
        "UPCAST_DOT": _INTERPRETED and q.dtype == torch.bfloat16,
        "DOT_PRECISION": dot_precision(q.dtype),
    }


def _key_flags(key_valid: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The key-valid flags as a (batch, seq) uint8 tensor and its batch stride; without a
    mask a placeholder pointer the kernels never read."""
    if key_valid is None:
        return like, 0
    flags = key_valid if key_valid.dtype == torch.uint8 else key_valid.to(torch.bool).view(torch.uint8)
    if flags.stride(-1) != 1:
        flags = flags.contiguous()
    return flags, flags.stride(0)


def _attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    sm_scale: float,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, seq_len, _ = q.shape
    kv_heads = k.shape[1]
    out = _empty_like_rows(q)
    lse = torch.empty((batch, heads, seq_len), device=q.device, dtype=torch.float32)
    flags, stride_kvb = _key_flags(key_valid, q)

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * heads)

    _attn_fwd_kernel[grid](
        q, k, v, out, lse, flags,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), stride_kvb,
        heads, heads // kv_heads, seq_len, _seq_bucket(seq_len), sm_scale * _LOG2E,
        **_common_meta(q, causal, key_valid),
    )
    return out, lse


def _attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    sm_scale: float,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    meta = _common_meta(q, causal, key_valid)
    bucket = _seq_bucket(seq_len)
    flags, stride_kvb = _key_flags(key_valid, q)

    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(triton.cdiv(seq_len, _DELTA_BLOCK_M), batch * heads)](
        out, grad_out, delta,
        *out.stride(), *grad_out.stride(),
        heads, seq_len,
        HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=_DELTA_BLOCK_M,
    )

    # Fresh gradient buffers, laid out like their inputs.
    dq = _empty_like_rows(q)
    dk = _empty_like_rows(k)
    dv = _empty_like_rows(v)

    def dkdv_grid(m: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(seq_len, m["BLOCK_N"]), batch * kv_heads)

    _attn_bwd_dkdv_kernel[dkdv_grid](
        q, k, v, grad_out, dk, dv, lse, delta, flags,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), stride_kvb,
        kv_heads, group, seq_len, bucket, sm_scale * _LOG2E, sm_scale,
        **meta,
    )

    def dq_grid(m: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(seq_len, m["BLOCK_M"]), batch * heads)

    _attn_bwd_dq_kernel[dq_grid](
        q, k, v, grad_out, dq, lse, delta, flags,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), stride_kvb,
        heads, group, seq_len, bucket, sm_scale * _LOG2E, sm_scale,
        **meta,
    )
    return dq, dk, dv


def _decode_num_splits(programs: int, span_len: int, block_n: int, device: torch.device) -> int:
    """Enough splits to give every multiprocessor about two programs, but never a
    split shorter than a few key tiles."""
    tiles = triton.cdiv(max(span_len, 1), block_n)
    target = 2 * multiprocessor_count(device)
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), tiles // 4, 128))


def _decode_forward(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lens: torch.Tensor,
    span_len: int,
    sm_scale: float,
    num_splits: int | None,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    batch, heads, n_new, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    rows = group * n_new
    block_r = max(16, min(next_power_of_2(rows), _DECODE_MAX_ROWS))
    row_blocks = triton.cdiv(rows, block_r)
    block_n = _DECODE_CONFIG.kwargs["BLOCK_N"]
    if num_splits is None:
        num_splits = _decode_num_splits(batch * kv_heads * row_blocks, span_len, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(max(span_len, 1), max(num_splits, 1)), block_n) * block_n
    num_splits = max(1, triton.cdiv(max(span_len, 1), split_len))

    out = _empty_like_rows(q)
    meta = _common_meta(q, causal=True)
    meta.pop("CAUSAL")
    meta.pop("MASK_KEYS")
    launch = {"num_warps": _DECODE_CONFIG.num_warps, "num_stages": _DECODE_CONFIG.num_stages}
    if num_splits == 1:
        part_o = part_lse = out  # unused by the kernel
    else:
        part_o = torch.empty((batch, heads, n_new, num_splits, head_dim), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((batch, heads, n_new, num_splits), device=q.device, dtype=torch.float32)
    _decode_split_kernel[(num_splits, row_blocks, batch * kv_heads)](
        q, k_cache, v_cache, lens, lens if first is None else first, out, part_o, part_lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        kv_heads, group, n_new, num_splits, split_len, sm_scale * _LOG2E,
        BLOCK_R=block_r, BLOCK_N=block_n, SINGLE_SPLIT=num_splits == 1, HAS_FIRST=first is not None,
        **meta, **launch,
    )
    if num_splits > 1:
        _decode_merge_kernel[(batch * heads * n_new,)](
            part_o, part_lse, out,
            *out.stride(),
            heads, n_new, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_S=max(2, next_power_of_2(num_splits)),
        )
    return out


# ---------------------------------------------------------------------------
# Autograd Function
# ---------------------------------------------------------------------------


class TritonAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        sm_scale: float,
        key_valid: torch.Tensor | None = None,
    ):
        out, lse = _attention_forward(q, k, v, causal, sm_scale, key_valid)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.key_valid = key_valid
        ctx.causal = causal
        ctx.sm_scale = sm_scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _attention_backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.sm_scale, ctx.key_valid)
        return dq, dk, dv, None, None, None


# ---------------------------------------------------------------------------
# Functional wrappers
# ---------------------------------------------------------------------------


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask] [+ key mask]) v, fused, differentiable.

    q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim) with
    kv_heads dividing heads. Returns (batch, heads, seq, head_dim) in q's dtype, stored
    sequence-major when q is (as a view of a (batch, seq, heads, head_dim) buffer).
    ``scale`` defaults to head_dim ** -0.5.

    ``key_valid`` (batch, seq) bool (or uint8) marks the keys each batch row may attend
    to: left padding of a mixed-length batch, right padding of scored sequences, any
    key-padding mask. With ``causal`` a query also sees only keys up to its own position
    and always sees its own key (a padding query attends to itself alone, as the model's
    dense masks have it); without, a query whose row has no valid key gets zeros.
    """
    _check_attention_inputs(q, k, v)
    if k.shape[2] != q.shape[2]:
        raise ValueError("triton_attention needs equal query and key lengths; use triton_decode_attention")
    if key_valid is not None:
        if key_valid.shape != (q.shape[0], k.shape[2]):
            raise ValueError(f"key_valid must have shape (batch, seq) = {(q.shape[0], k.shape[2])}")
        if key_valid.device != q.device:
            raise ValueError("key_valid must be on the device of q")
    sm_scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return TritonAttentionFunction.apply(q, k, v, bool(causal), sm_scale, key_valid)


def triton_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: int | torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
    first_slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of a few new tokens against a KV cache (inference only, no gradient).

    q: (batch, heads, n_new, head_dim); k_cache, v_cache: (batch, kv_heads, max_len,
    head_dim). ``cache_len`` (an int, or an int tensor of shape (batch,)) is the number
    of valid cache entries, the new tokens' own keys included: they are the last
    ``n_new`` valid entries and are causal among themselves. ``num_splits`` overrides
    how many pieces the cache is cut into (chosen from the device size by default).
    ``first_slot`` (an int tensor of shape (batch,) or ()) is each row's first valid
    entry: keys before it are not attended (the left padding of a mixed-length batch).
    """
    _check_attention_inputs(q, k_cache, v_cache)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise RuntimeError("triton_decode_attention has no backward; call it under torch.no_grad()")
    batch, _, n_new, head_dim = q.shape
    max_len = k_cache.shape[2]
    if isinstance(cache_len, torch.Tensor):
        if cache_len.shape not in ((batch,), ()):
            raise ValueError(f"cache_len must be an int or a (batch,) tensor, got shape {tuple(cache_len.shape)}")
        lens = cache_len.to(device=q.device, dtype=torch.int32).expand(batch).contiguous()  # (batch,)
        span_len = max_len
    else:
        if not n_new <= int(cache_len) <= max_len:
            raise ValueError(f"cache_len {cache_len} must lie in [n_new={n_new}, max_len={max_len}]")
        lens = torch.full((batch,), int(cache_len), device=q.device, dtype=torch.int32)
        span_len = int(cache_len)
    first = None
    if first_slot is not None:
        if first_slot.shape not in ((batch,), ()):
            raise ValueError(f"first_slot must be a (batch,) tensor, got shape {tuple(first_slot.shape)}")
        first = first_slot.to(device=q.device, dtype=torch.int32).expand(batch).contiguous()
    sm_scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
    return _decode_forward(q, k_cache, v_cache, lens, span_len, sm_scale, num_splits, first)
