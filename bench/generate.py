"""Generation benchmark: this library's KV-cache engine against its peers, in one run.

Peers, at the same shape (dim 512, depth 8, 8 heads of 64, one K/V head, vocab 256,
feed-forward 2048, 64-token prompt, 128 new tokens, plain sampling at temperature 1):

* Hugging Face ``LlamaForCausalLM.generate`` (same widths, ``num_key_value_heads=1``);
* the ``palm-rlhf-pytorch`` package's ``PaLM.generate`` (no KV cache).

For each dtype (float32, bfloat16) and batch shape (one sample; eight samples of one prompt)
it prints tokens/s and the ratios against the peers. It also measures, in the same run:

* the weight-streaming floor: one batch-1 matrix-vector product over every weight matrix of
  the model (each weight read once from memory), in the faster of the two memory layouts. A
  batch-1 decode step built on these GEMVs cannot beat it. A plain read of the same bytes
  (a sum) is printed beside it: it is faster still, because the GEMV kernels do not reach the
  raw read bandwidth.
* the matmul peak: a large square matmul in the same dtype, for model FLOPs utilisation
  (PaLM appendix B: 2N + 4 L d_attn T FLOPs per generated token at context T).

Usage: ``python bench/generate.py [--dtypes float32,bfloat16] [--peers hf,palm-rlhf-pytorch]
[--repeats 3] [--json out.json]``. Needs the ``bench`` extra for the peers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palm_rlhf import PaLM, PaLMConfig, SamplingParams, generate_tokens

DIM, DEPTH, HEADS, DIM_HEAD, VOCAB, FF_MULT = 512, 8, 8, 64, 256, 4
PROMPT, NEW = 64, 128
GOALS = {
    # (dtype, what) -> required value
    ("float32", "floor"): 1.3,
    ("bfloat16", "floor"): 1.5,
    ("float32", "hf@1"): 1.2,
    ("bfloat16", "hf@1"): 1.6,
    ("float32", "hf@8"): 1.25,
    ("bfloat16", "hf@8"): 1.25,
    ("float32", "palm@1"): 5.0,
    ("bfloat16", "palm@1"): 5.0,
    ("float32", "palm@8"): 15.0,
    ("bfloat16", "palm@8"): 15.0,
}


def best_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def weight_floor(model: torch.nn.Module, dtype: torch.dtype, repeats: int = 20) -> tuple[float, int, float]:
    """Seconds to stream every 2-D weight once through a batch-1 GEMV, in whichever memory
    layout (output-major or input-major) is faster on this machine and dtype, and the bytes read.
    Also the seconds of a plain read (a sum) over the same bytes, for reference: PyTorch's GEMV
    kernels do not reach the raw read bandwidth, so no decoder built on them can."""
    weights = [p.detach() for p in model.parameters() if p.ndim == 2]
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype) for w in weights}
    out_major = [w.contiguous() for w in weights]
    in_major = [w.t().contiguous().t() for w in weights]

    def gemv(ws):
        def once():
            for w in ws:
                F.linear(xs[w.shape[1]], w)

        return once

    def read():
        for w in out_major:
            w.sum()

    nbytes = sum(w.numel() * w.element_size() for w in weights)
    floor = min(best_time(gemv(out_major), repeats, warmup=3), best_time(gemv(in_major), repeats, warmup=3))
    return floor, nbytes, best_time(read, repeats, warmup=3)


def matmul_peak(dtype: torch.dtype, n: int = 1024) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = best_time(lambda: a @ b, 5, warmup=2)
    return 2 * n**3 / t


def flops_per_token(cfg: PaLMConfig, ctx: float) -> float:
    return 2 * cfg.num_params() + 4 * cfg.depth * cfg.attn_inner * ctx


def bench_ours(cfg: PaLMConfig, dtype, batch: int, repeats: int):
    torch.manual_seed(0)
    model = PaLM(cfg).eval().to(dtype)
    prompt = torch.randint(0, VOCAB, (PROMPT,)).tolist()
    params = SamplingParams(max_new_tokens=NEW, temperature=1.0, n=batch)

    def run():
        # no stop tokens: every row produces exactly NEW tokens
        generate_tokens(model, [prompt], params)

    total = best_time(run, repeats)
    prefill = best_time(lambda: generate_tokens(model, [prompt], SamplingParams(max_new_tokens=1, n=batch)), repeats)
    step = (total - prefill) / (NEW - 1)
    return model, batch * NEW / total, step


def bench_hf(dtype, batch: int, repeats: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=DIM * FF_MULT,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        head_dim=DIM_HEAD,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(dtype)
    prompt = torch.randint(0, VOCAB, (1, PROMPT))
    kwargs = {
        "max_new_tokens": NEW,
        "min_new_tokens": NEW,
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "num_return_sequences": batch,
        "pad_token_id": 0,
        "eos_token_id": None,
    }

    def run():
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)

    return batch * NEW / best_time(run, repeats)


def bench_palm_rlhf_pytorch(dtype, batch: int, repeats: int) -> float:
    from palm_rlhf_pytorch import PaLM as PeerPaLM

    torch.manual_seed(0)
    model = PeerPaLM(num_tokens=VOCAB, dim=DIM, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD, ff_mult=FF_MULT)
    model = model.eval().to(dtype)
    prompt = torch.randint(0, VOCAB, (batch, PROMPT))

    def run():
        with torch.inference_mode():
            model.generate(PROMPT + NEW, prompt=prompt, temperature=1.0)

    return batch * NEW / best_time(run, repeats, warmup=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--peers", default="hf,palm-rlhf-pytorch", help="comma list; empty for none")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer-repeats", type=int, default=1, help="repeats for palm-rlhf-pytorch (slow: no cache)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    peers = [p for p in args.peers.split(",") if p]
    cfg = PaLMConfig(
        num_tokens=VOCAB, dim=DIM, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD, ff_mult=FF_MULT, max_seq_len=1024
    )
    print(f"# generation benchmark  {_dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    print(f"# dim {DIM} depth {DEPTH} heads {HEADS}x{DIM_HEAD} kv_heads 1 vocab {VOCAB} ff {DIM * FF_MULT}")
    print(f"# prompt {PROMPT} tokens, {NEW} new tokens, sampling at temperature 1; params {cfg.num_params() / 1e6:.1f}M")
    results = []
    failures = []
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        peak = matmul_peak(dtype)
        for batch in [int(b) for b in args.batches.split(",")]:
            model, ours, step = bench_ours(cfg, dtype, batch, args.repeats)
            floor, nbytes, raw_read = weight_floor(model, dtype)
            ctx = PROMPT + NEW / 2
            mfu = ours * flops_per_token(cfg, ctx) / peak
            row = {
                "dtype": dname,
                "batch": batch,
                "ours_tok_s": ours,
                "step_ms": step * 1e3,
                "floor_ms": floor * 1e3,
                "floor_GBps": nbytes / floor / 1e9,
                "step_over_floor": step / floor,
                "raw_read_ms": raw_read * 1e3,
                "mfu": mfu,
                "matmul_peak_GFLOPs": peak / 1e9,
            }
            line = (
                f"{dname:9s} batch {batch}: ours {ours:8.1f} tok/s  step {step * 1e3:6.2f} ms"
                f"  floor {floor * 1e3:6.2f} ms ({nbytes / floor / 1e9:5.1f} GB/s)  step/floor {step / floor:4.2f}"
                f"  MFU {mfu * 100:5.2f}% of {peak / 1e9:6.1f} GFLOP/s  (plain read {raw_read * 1e3:.2f} ms)"
            )
            if batch == 1:
                goal = GOALS[(dname, "floor")]
                ok = step / floor <= goal
                line += f"  [floor goal <= {goal}: {'ok' if ok else 'MISSED'}]"
                if not ok:
                    failures.append(f"{dname} step/floor {step / floor:.2f} > {goal}")
            print(line, flush=True)
            for peer, fn, key in (
                ("hf", bench_hf, "hf"),
                ("palm-rlhf-pytorch", bench_palm_rlhf_pytorch, "palm"),
            ):
                if peer not in peers:
                    continue
                reps = args.repeats if peer == "hf" else args.peer_repeats
                try:
                    theirs = fn(dtype, batch, reps)
                except ImportError as e:
                    print(f"    {peer}: not installed ({e}); install the bench extra")
                    continue
                ratio = ours / theirs
                goal = GOALS.get((dname, f"{key}@{batch}"))
                verdict = ""
                if goal is not None:
                    verdict = f"  [goal >= {goal}x: {'ok' if ratio >= goal else 'MISSED'}]"
                    if ratio < goal:
                        failures.append(f"{dname} batch {batch} vs {peer}: {ratio:.2f}x < {goal}x")
                print(f"    vs {peer:18s} {theirs:8.1f} tok/s  ratio {ratio:6.2f}x{verdict}", flush=True)
                row[f"{key}_tok_s"] = theirs
                row[f"{key}_ratio"] = ratio
            results.append(row)
    print("# summary: " + ("all goals met" if not failures else "; ".join(failures)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"date": _dt.datetime.now().isoformat(), "threads": args.threads, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
