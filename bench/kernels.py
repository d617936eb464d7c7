"""Triton kernels against PyTorch on one NVIDIA GPU (written for an H100).

Measures, for sequence lengths 512 to 8192 (default dtype bf16, 16 heads of 128):

* fused attention, forward and backward, causal and not, in TFLOP/s, against
  ``torch.nn.functional.scaled_dot_product_attention`` restricted to its flash
  backend (same heads for K/V), plus the multi-query case (one K/V head);
* SwiGLU forward and backward in GB/s against the unfused PyTorch expression, with a
  device-to-device copy as the achievable-bandwidth reference;
* split-K decode attention (one new token against a KV cache) in GB/s of cache read,
  against the PyTorch fallback of ``kernels.dispatch.decode_attention``, for equal
  lengths and for a left-padded batch (per-row first slots);
* a whole PaLM prefill and one decode step with the kernels (``set_backend("triton")``)
  and without (``set_backend("torch")``).

FLOP and byte counts are documented in docs/kernels.md. Results are printed and written
as JSON with the device name and date. Timing uses ``triton.testing.do_bench``.

Usage: ``python bench/kernels.py [--dtype bf16] [--seq-lens 512,1024,2048,4096,8192]
[--skip palm] [--json PATH]``. Without CUDA it prints a message and exits 0;
``--smoke`` then runs tiny shapes through the Triton interpreter instead (a check that
the script and kernels work, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import platform
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_SEQ_LENS = (512, 1024, 2048, 4096, 8192)
TOKENS_PER_BATCH = 16384  # attention batch = TOKENS_PER_BATCH // seq, so every length does similar work
HEADS, HEAD_DIM = 16, 128
SWIGLU_DIM = 2048  # model width; SwiGLU input is (tokens, 2 * 4 * dim)
DECODE_BATCH = 8
PALM_SHAPE = {"dim": 2048, "depth": 4, "heads": 16, "dim_head": 128, "num_tokens": 32768}

# Dense tensor-core peak (FLOP/s, 16-bit inputs) and memory bandwidth (B/s) from the data sheets.
PEAKS = {
    "H100 SXM": (989e12, 3.35e12),
    "H100 PCIe": (756e12, 2.0e12),
    "H100 NVL": (835e12, 3.9e12),
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.0e12),
}
GOAL_ATTN_VS_FLASH = 0.9  # forward and backward, bf16, head dim 128, seq 4096
GOAL_SWIGLU_BANDWIDTH = 0.85  # fraction of peak memory bandwidth
GOAL_DECODE_BANDWIDTH = 0.70  # decode attention at batch 1, longest cache: fraction of peak bandwidth


# ---------------------------------------------------------------------------
# counts
# ---------------------------------------------------------------------------


def attention_fwd_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> float:
    """Two matmuls of 2*n*n*d each per head; half of the score matrix is skipped when causal."""
    flops = 4.0 * batch * heads * seq * seq * head_dim
    return flops / 2 if causal else flops


def attention_bwd_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> float:
    """Five matmuls (S recomputed, dV, dP, dQ, dK) against two forward: 2.5x forward."""
    return 2.5 * attention_fwd_flops(batch, heads, seq, head_dim, causal)


def swiglu_bytes(tokens: int, hidden: int, elt: int, backward: bool) -> float:
    """Forward reads x (2h) and writes out (h); backward reads x (2h) and dout (h), writes dx (2h)."""
    per_token = 5 * hidden if backward else 3 * hidden
    return float(tokens * per_token * elt)


def decode_bytes(batch: int, kv_heads: int, cache_len: int, head_dim: int, elt: int) -> float:
    """The K and V cache entries read once; queries and outputs are negligible."""
    return float(2 * batch * kv_heads * cache_len * head_dim * elt)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def device_peaks(name: str) -> tuple[float, float] | None:
    upper = name.upper()
    if "H200" in upper:
        return PEAKS["H200"]
    if "H100" in upper:
        if "PCIE" in upper:
            return PEAKS["H100 PCIe"]
        if "NVL" in upper:
            return PEAKS["H100 NVL"]
        return PEAKS["H100 SXM"]
    if "A100" in upper:
        return PEAKS["A100"]
    return None


def bench_ms(fn: Callable[[], Any], grad_to_none: list | None = None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def time_fwd_bwd(torch: Any, fn: Callable[[], Any], inputs: list) -> tuple[float, float]:
    """Median forward time, and backward time (one autograd pass from a fixed output)."""
    fwd_ms = bench_ms(fn)
    out = fn()
    grad = torch.randn_like(out)

    def backward() -> Any:
        return torch.autograd.grad(out, inputs, grad, retain_graph=True)

    return fwd_ms, bench_ms(backward)


def safe(label: str, fn: Callable[[], dict]) -> dict:
    """Run one measurement; a failure is recorded rather than ending the run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - report and carry on
        print(f"  {label}: FAILED: {exc!r}")
        traceback.print_exc(limit=3)
        return {"error": repr(exc)}


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------


def bench_attention(torch: Any, dtype: Any, seq: int, causal: bool, kv_heads: int) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import triton_attention

    batch = max(1, TOKENS_PER_BATCH // seq)
    dev = "cuda"
    q = torch.randn(batch, HEADS, seq, HEAD_DIM, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, HEAD_DIM, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, HEAD_DIM, device=dev, dtype=dtype, requires_grad=True)
    # Flash SDPA needs as many K/V heads as query heads: give it the K/V repeated per head
    # (the copy is made once, outside the timing).
    group = HEADS // kv_heads
    k_rep = k.detach().repeat_interleave(group, 1).requires_grad_()  # (b, kvh, n, d) -> (b, h, n, d)
    v_rep = v.detach().repeat_interleave(group, 1).requires_grad_()
    fwd_flops = attention_fwd_flops(batch, HEADS, seq, HEAD_DIM, causal)
    bwd_flops = attention_bwd_flops(batch, HEADS, seq, HEAD_DIM, causal)

    def ours() -> Any:
        return triton_attention(q, k, v, causal=causal)

    def flash() -> Any:
        return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=causal)

    row: dict[str, Any] = {"batch": batch, "seq": seq, "causal": causal, "kv_heads": kv_heads}
    # Only the flash backend may run; the context is entered outside the timed calls.
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with torch.no_grad():
            row["max_abs_diff_vs_flash"] = (ours().float() - flash().float()).abs().max().item()
        timings = {
            "triton": time_fwd_bwd(torch, ours, [q, k, v]),
            "flash_sdpa": time_fwd_bwd(torch, flash, [q, k_rep, v_rep]),
        }
    for name, (fwd_ms, bwd_ms) in timings.items():
        row[name] = {
            "fwd_ms": fwd_ms,
            "bwd_ms": bwd_ms,
            "fwd_tflops": fwd_flops / fwd_ms * 1e-9,
            "bwd_tflops": bwd_flops / bwd_ms * 1e-9,
        }
    row["fwd_speedup_vs_flash"] = row["flash_sdpa"]["fwd_ms"] / row["triton"]["fwd_ms"]
    row["bwd_speedup_vs_flash"] = row["flash_sdpa"]["bwd_ms"] / row["triton"]["bwd_ms"]
    return row


# ---------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------


def bench_swiglu(torch: Any, dtype: Any, seq: int) -> dict:
    import torch.nn.functional as F

    from kernels.swiglu import triton_swiglu

    hidden = 4 * SWIGLU_DIM
    x = torch.randn(seq, 2 * hidden, device="cuda", dtype=dtype, requires_grad=True)
    elt = x.element_size()

    def unfused() -> Any:
        value, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * value

    row: dict[str, Any] = {"tokens": seq, "hidden": hidden}
    for name, fn in (("triton", functools.partial(triton_swiglu, x)), ("torch", unfused)):
        fwd_ms, bwd_ms = time_fwd_bwd(torch, fn, [x])
        row[name] = {
            "fwd_ms": fwd_ms,
            "bwd_ms": bwd_ms,
            "fwd_gbps": swiglu_bytes(seq, hidden, elt, False) / fwd_ms * 1e-6,
            "bwd_gbps": swiglu_bytes(seq, hidden, elt, True) / bwd_ms * 1e-6,
        }
    # achievable bandwidth: a plain copy moving as many bytes as the forward pass (reads
    # half of them, writes the other half), whatever the element size
    row["copy_bytes"] = copy_bytes = int(swiglu_bytes(seq, hidden, elt, False))
    src = torch.empty(copy_bytes // 2, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    row["copy_gbps"] = 2 * src.numel() / copy_ms * 1e-6
    return row


# ---------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------


def bench_decode(torch: Any, dtype: Any, cache_len: int, kv_heads: int) -> dict:
    from kernels.attention import triton_decode_attention
    from kernels.dispatch import _decode_attention_torch

    q = torch.randn(DECODE_BATCH, HEADS, 1, HEAD_DIM, device="cuda", dtype=dtype)
    k_cache = torch.randn(DECODE_BATCH, kv_heads, cache_len, HEAD_DIM, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    lens = torch.full((DECODE_BATCH,), cache_len, device="cuda", dtype=torch.int32)
    nbytes = decode_bytes(DECODE_BATCH, kv_heads, cache_len, HEAD_DIM, q.element_size())
    row: dict[str, Any] = {"batch": DECODE_BATCH, "cache_len": cache_len, "kv_heads": kv_heads}
    with torch.inference_mode():
        ours = triton_decode_attention(q, k_cache, v_cache, lens)
        ref = _decode_attention_torch(q, k_cache, v_cache, lens, None)
        row["max_abs_diff_vs_torch"] = (ours.float() - ref.float()).abs().max().item()
        for name, fn in (
            ("triton", functools.partial(triton_decode_attention, q, k_cache, v_cache, lens)),
            ("torch", functools.partial(_decode_attention_torch, q, k_cache, v_cache, lens, None)),
        ):
            ms = bench_ms(fn)
            row[name] = {"ms": ms, "gbps": nbytes / ms * 1e-6}
    row["speedup_vs_torch"] = row["torch"]["ms"] / row["triton"]["ms"]
    # batch 1: one sequence's cache, the latency-bound case of a single chat
    one_bytes = decode_bytes(1, kv_heads, cache_len, HEAD_DIM, q.element_size())
    with torch.inference_mode():
        ms = bench_ms(functools.partial(triton_decode_attention, q[:1], k_cache[:1], v_cache[:1], lens[:1]))
    row["batch1"] = {"ms": ms, "gbps": one_bytes / ms * 1e-6}

    # a left-padded batch (a continuous batch of mixed lengths): row i starts at slot
    # first[i], spread over the first half of the cache; the bytes are the slots read
    first = (torch.arange(DECODE_BATCH, device="cuda") * cache_len) // (2 * DECODE_BATCH)
    padded_bytes = decode_bytes(1, kv_heads, int((lens - first).sum()), HEAD_DIM, q.element_size())
    padded: dict[str, Any] = {"first_slots": first.tolist()}
    with torch.inference_mode():
        ours = triton_decode_attention(q, k_cache, v_cache, lens, first_slot=first)
        ref = _decode_attention_torch(q, k_cache, v_cache, lens, None, first)
        padded["max_abs_diff_vs_torch"] = (ours.float() - ref.float()).abs().max().item()
        for name, fn in (
            ("triton", functools.partial(triton_decode_attention, q, k_cache, v_cache, lens, first_slot=first)),
            ("torch", functools.partial(_decode_attention_torch, q, k_cache, v_cache, lens, None, first)),
        ):
            ms = bench_ms(fn)
            padded[name] = {"ms": ms, "gbps": padded_bytes / ms * 1e-6}
    padded["speedup_vs_torch"] = padded["torch"]["ms"] / padded["triton"]["ms"]
    row["padded"] = padded
    return row


# ---------------------------------------------------------------------------
# PaLM
# ---------------------------------------------------------------------------


def bench_palm(torch: Any, dtype: Any, seq_lens: list[int]) -> dict:
    from kernels import dispatch
    from palm_rlhf import PaLM

    model = PaLM(**PALM_SHAPE).to(device="cuda", dtype=dtype).eval()
    out: dict[str, Any] = {"shape": PALM_SHAPE, "prefill": [], "decode": []}
    for seq in seq_lens:
        tokens = torch.randint(0, PALM_SHAPE["num_tokens"], (1, seq), device="cuda")
        row: dict[str, Any] = {"batch": 1, "seq": seq}
        with torch.inference_mode():
            for backend in ("torch", "triton"):
                with dispatch.use_backend(backend):
                    ms = bench_ms(functools.partial(model, tokens))
                row[backend] = {"ms": ms, "tokens_per_s": seq / ms * 1e3}
        row["speedup"] = row["torch"]["ms"] / row["triton"]["ms"]
        out["prefill"].append(row)
        print(f"  prefill seq {seq:5d}: torch {row['torch']['ms']:.2f} ms, triton {row['triton']['ms']:.2f} ms "
              f"({row['speedup']:.2f}x)")

    from palm_rlhf.generation import KVCache

    cfg = model.config
    for ctx in seq_lens:
        # One decode step at context length ctx, the cache filled with random entries
        # (the timing does not depend on their values).
        cache = KVCache(cfg.depth, DECODE_BATCH, ctx, cfg.dim_head, "cuda", dtype)
        cache.k.normal_()
        cache.v.normal_()
        caches = cache.layers()
        tok = torch.randint(0, PALM_SHAPE["num_tokens"], (DECODE_BATCH, 1), device="cuda")
        positions = torch.full((1, 1), ctx - 1, device="cuda", dtype=torch.long)
        row = {"batch": DECODE_BATCH, "context": ctx}
        # the same step for a left-padded batch (rows starting at different slots), as the
        # generation engine runs it: a decode mask plus each row's first slot
        first = (torch.arange(DECODE_BATCH, device="cuda") * ctx) // (2 * DECODE_BATCH)
        slots = torch.arange(ctx, device="cuda")
        decode_mask = (slots[None] >= first[:, None])[:, None, None, :]
        padded_positions = (ctx - 1 - first)[:, None]
        with torch.inference_mode():
            for backend in ("torch", "triton"):
                with dispatch.use_backend(backend):
                    ms = bench_ms(functools.partial(model.forward_cached, tok, positions, caches, ctx - 1))
                    row[backend] = {"ms": ms, "tokens_per_s": DECODE_BATCH / ms * 1e3}
                    ms = bench_ms(functools.partial(
                        model.forward_cached, tok, padded_positions, caches, ctx - 1,
                        decode_mask=decode_mask, row_start=first,
                    ))
                    row[f"{backend}_padded"] = {"ms": ms, "tokens_per_s": DECODE_BATCH / ms * 1e3}
        row["speedup"] = row["torch"]["ms"] / row["triton"]["ms"]
        row["speedup_padded"] = row["torch_padded"]["ms"] / row["triton_padded"]["ms"]
        out["decode"].append(row)
        print(f"  decode ctx {ctx:5d}: torch {row['torch']['ms']:.3f} ms, triton {row['triton']['ms']:.3f} ms "
              f"({row['speedup']:.2f}x); left-padded: torch {row['torch_padded']['ms']:.3f} ms, "
              f"triton {row['triton_padded']['ms']:.3f} ms ({row['speedup_padded']:.2f}x)")
        del cache, caches
    return out


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------


def save_partial(args: argparse.Namespace, result: dict) -> None:
    """With ``--json``, write what has been measured so far after each part, so that a run
    stopped part-way (a time limit) still leaves its figures."""
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result, "partial": True}, indent=2))


def run_gpu(args: argparse.Namespace) -> dict:
    import torch
    import triton

    dtype = getattr(torch, DTYPES[args.dtype])
    name = torch.cuda.get_device_name()
    peaks = device_peaks(name)
    print(f"device: {name}  (torch {torch.__version__}, triton {triton.__version__}, dtype {args.dtype})")
    if peaks:
        print(f"data-sheet peaks: {peaks[0] / 1e12:.0f} TFLOP/s dense 16-bit, {peaks[1] / 1e12:.2f} TB/s")
    result: dict[str, Any] = {
        "device": name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "peak_flops": peaks[0] if peaks else None,
        "peak_bytes_per_s": peaks[1] if peaks else None,
    }
    seq_lens = args.seq_lens

    if "attention" not in args.skip:
        print("\nattention (TFLOP/s; batch = 16384 // seq)")
        print(f"  {'seq':>5} {'causal':>6} {'kvh':>3} | {'fwd ours':>8} {'fwd flash':>9} {'x':>5} | "
              f"{'bwd ours':>8} {'bwd flash':>9} {'x':>5}")
        rows = []
        for kv_heads in (HEADS, 1):
            for causal in (True, False):
                for seq in seq_lens:
                    row = safe(f"attention seq {seq}",
                               functools.partial(bench_attention, torch, dtype, seq, causal, kv_heads))
                    row.update({"seq": seq, "causal": causal, "kv_heads": kv_heads})
                    rows.append(row)
                    if "error" not in row:
                        t, f = row["triton"], row["flash_sdpa"]
                        print(f"  {seq:5d} {causal!s:>6} {kv_heads:3d} | {t['fwd_tflops']:8.1f} "
                              f"{f['fwd_tflops']:9.1f} {row['fwd_speedup_vs_flash']:5.2f} | "
                              f"{t['bwd_tflops']:8.1f} {f['bwd_tflops']:9.1f} {row['bwd_speedup_vs_flash']:5.2f}")
        result["attention"] = rows
        save_partial(args, result)

    if "swiglu" not in args.skip:
        print(f"\nswiglu (GB/s; tokens = seq, hidden = {4 * SWIGLU_DIM})")
        print(f"  {'tokens':>6} | {'fwd ours':>8} {'fwd torch':>9} | {'bwd ours':>8} {'bwd torch':>9} | {'copy':>6}")
        rows = []
        for seq in seq_lens:
            row = safe(f"swiglu {seq}", functools.partial(bench_swiglu, torch, dtype, seq))
            row["tokens"] = seq
            rows.append(row)
            if "error" not in row:
                t, u = row["triton"], row["torch"]
                print(f"  {seq:6d} | {t['fwd_gbps']:8.0f} {u['fwd_gbps']:9.0f} | {t['bwd_gbps']:8.0f} "
                      f"{u['bwd_gbps']:9.0f} | {row['copy_gbps']:6.0f}")
        result["swiglu"] = rows
        save_partial(args, result)

    if "decode" not in args.skip:
        print(f"\ndecode attention, one new token (GB/s of KV cache read; batch {DECODE_BATCH})")
        rows = []
        for kv_heads in (1, HEADS):
            for ctx in seq_lens:
                row = safe(f"decode {ctx}", functools.partial(bench_decode, torch, dtype, ctx, kv_heads))
                row.update({"cache_len": ctx, "kv_heads": kv_heads})
                rows.append(row)
                if "error" not in row:
                    p = row["padded"]
                    print(f"  ctx {ctx:5d} kvh {kv_heads:2d}: ours {row['triton']['gbps']:7.0f}  "
                          f"torch {row['torch']['gbps']:7.0f}  ({row['speedup_vs_torch']:.2f}x); left-padded: "
                          f"ours {p['triton']['gbps']:7.0f}  torch {p['torch']['gbps']:7.0f}  "
                          f"({p['speedup_vs_torch']:.2f}x)")
        result["decode"] = rows
        save_partial(args, result)

    if "palm" not in args.skip:
        print(f"\nPaLM {PALM_SHAPE}: prefill (batch 1) and one decode step (batch {DECODE_BATCH})")
        result["palm"] = safe("palm", functools.partial(bench_palm, torch, dtype, seq_lens))

    result["goals"] = evaluate_goals(result)
    for goal, verdict in result["goals"].items():
        print(f"goal {goal}: {verdict}")
    return result


def evaluate_goals(result: dict) -> dict[str, str]:
    goals: dict[str, str] = {}
    if result.get("dtype") != "bf16":
        return goals
    for row in result.get("attention", []):
        if row.get("seq") == 4096 and row.get("kv_heads") == HEADS and "error" not in row:
            for part in ("fwd", "bwd"):
                ratio = row[f"{part}_speedup_vs_flash"]
                ok = "met" if ratio >= GOAL_ATTN_VS_FLASH else "NOT met"
                goals[f"attention {part} >= {GOAL_ATTN_VS_FLASH}x flash (seq 4096, causal={row['causal']})"] = (
                    f"{ratio:.2f}x: {ok}"
                )
    peak_bw = result.get("peak_bytes_per_s")
    decode = [r for r in result.get("decode", []) if "error" not in r and "batch1" in r]
    if decode and peak_bw:
        row = max(decode, key=lambda r: (r["cache_len"], -r["kv_heads"]))
        frac = row["batch1"]["gbps"] * 1e9 / peak_bw
        ok = "met" if frac >= GOAL_DECODE_BANDWIDTH else "NOT met"
        goals[f"decode attention at batch 1 >= {GOAL_DECODE_BANDWIDTH:.0%} of peak bandwidth "
              f"(cache {row['cache_len']}, {row['kv_heads']} kv heads)"] = f"{frac:.0%}: {ok}"
    for row in result.get("swiglu", []):
        if row.get("tokens") == 4096 and "error" not in row and peak_bw:
            frac = row["triton"]["fwd_gbps"] * 1e9 / peak_bw
            ok = "met" if frac >= GOAL_SWIGLU_BANDWIDTH else "NOT met"
            goals[f"swiglu fwd >= {GOAL_SWIGLU_BANDWIDTH:.0%} of peak bandwidth (4096 tokens)"] = (
                f"{frac:.0%} ({row['copy_gbps'] * 1e9 / peak_bw:.0%} for a plain copy): {ok}"
            )
    return goals


def run_smoke() -> dict:
    """Tiny shapes through the Triton interpreter: checks the kernels against PyTorch."""
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
    import torch
    import torch.nn.functional as F

    from kernels.attention import triton_attention, triton_decode_attention
    from kernels.dispatch import _decode_attention_torch, dense_key_mask
    from kernels.swiglu import triton_swiglu

    torch.manual_seed(0)
    q = torch.randn(1, 4, 33, 64, requires_grad=True)
    k = torch.randn(1, 1, 33, 64, requires_grad=True)
    v = torch.randn(1, 1, 33, 64, requires_grad=True)
    out = triton_attention(q, k, v)
    out.sum().backward()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    x = torch.randn(5, 96)
    value, gate = x.chunk(2, -1)
    key_valid = torch.arange(33)[None] >= 5  # five slots of left padding
    first = torch.tensor([5])
    with torch.no_grad():
        dec = triton_decode_attention(q[:, :, -1:], k, v, 33, num_splits=2)
        dec_padded = triton_decode_attention(q[:, :, -1:], k, v, 33, num_splits=2, first_slot=first)
        masked = triton_attention(q, k, v, key_valid=key_valid)
        masked_ref = F.scaled_dot_product_attention(
            q, k, v, attn_mask=dense_key_mask(key_valid, 33, True), enable_gqa=True
        )
    checks = {
        "attention_max_abs_diff": (out - ref).abs().max().item(),
        "attention_key_mask_max_abs_diff": (masked - masked_ref).abs().max().item(),
        "decode_max_abs_diff": (dec - _decode_attention_torch(q[:, :, -1:], k, v, 33, None)).abs().max().item(),
        "decode_first_slot_max_abs_diff": (
            dec_padded - _decode_attention_torch(q[:, :, -1:], k, v, 33, None, first)
        ).abs().max().item(),
        "swiglu_max_abs_diff": (triton_swiglu(x) - F.silu(gate) * value).abs().max().item(),
    }
    for name, diff in checks.items():
        print(f"  {name}: {diff:.2e}")
    return {
        "device": "cpu (Triton interpreter, smoke test only)",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "smoke": checks,
    }


def default_json_path(device: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower() or "device"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return ROOT / "bench" / "results" / f"kernels-{slug}-{stamp}.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--seq-lens", default=",".join(map(str, DEFAULT_SEQ_LENS)),
                        help="comma-separated sequence / context lengths")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: attention,swiglu,decode,palm")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    parser.add_argument("--smoke", action="store_true", help="without CUDA: tiny interpreted check instead")
    args = parser.parse_args(argv)
    args.seq_lens = [int(s) for s in args.seq_lens.split(",") if s]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        if not args.smoke:
            print("No CUDA device: this benchmark measures the Triton kernels on an NVIDIA GPU "
                  "(written for an H100). Nothing was measured. Run with --smoke for an interpreted check.")
            return 0
        print("No CUDA device: smoke test through the Triton interpreter (tiny shapes, no timings).")
        result = run_smoke()
    else:
        result = run_gpu(args)
    path = args.json or default_json_path(result["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
