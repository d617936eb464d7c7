"""Generation benchmark: this library's KV-cache engine against its peers, in one run.

Peers, at the same shape (dim 512, depth 8, 8 heads of 64, one K/V head, vocab 256,
feed-forward 2048, 64-token prompt, 128 new tokens, plain sampling at temperature 1):

* Hugging Face ``LlamaForCausalLM.generate`` (same widths, ``num_key_value_heads=1``);
* the ``palm-rlhf-pytorch`` package's ``PaLM.generate`` (no KV cache).

For each dtype (float32, bfloat16) and batch shape (one sample; eight samples of one prompt)
it prints tokens/s and the ratios against the peers. It also measures, in the same run:

* the weight-streaming floor: one batch-1 matrix-vector product over every weight matrix of
  the model in the order a decode step reads them (each weight read once from memory), each
  shape through whichever GEMV entry point (``F.linear`` in either layout, ``torch.mv``, or
  oneDNN on a reordered weight, the path :mod:`palm_rlhf.cpu_linear` takes) is fastest for
  it, run back to back like the decode steps. A batch-1 decode step built on GEMVs cannot
  beat it. A plain read of the same bytes (a sum) is printed beside it for reference.
* the matmul peak: a large square matmul in the same dtype, for model FLOPs utilisation
  (PaLM appendix B: 2N + 4 L d_attn T FLOPs per generated token at context T).
* at batch 1, the same generation with weight-only int8 decode steps (``PaLM.quantize_int8``):
  its step against the float step and against the float floor (``--no-int8`` skips it).

Usage: ``python bench/generate.py [--dtypes float32,bfloat16] [--peers hf,palm-rlhf-pytorch]
[--repeats 3] [--json out.json]``. Needs the ``bench`` extra for the peers.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palm_rlhf import PaLM, PaLMConfig, SamplingParams, cpu_linear, generate_tokens

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


def interleaved_min(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """Run every callable once per round, round after round, and keep each one's fastest time.
    Interleaving puts every contender through the same stretches of machine noise (shared
    hosts drift by 20% within minutes), so the ratios hold better than with one phase each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


#: passes over the weights per floor measurement: like the decode steps it is compared with,
#: the floor then runs back to back, so both see the same cache warmth
FLOOR_PASSES = 16


def _decode_weights(model) -> list[torch.Tensor]:
    """Every weight matrix in the order a decode step reads it: per layer the fused input
    projection and the output projections side by side (one matrix, as the decode reads
    them), then the tied output embedding."""
    order = []
    for layer in model.layers:
        order.append(layer.fused_attn_ff_proj.weight.detach())
        order.append(torch.cat((layer.attn_out.weight, layer.ff_out.weight), dim=1).detach())
    order.append(model.token_emb.weight.detach())
    return order


def _gemv_kinds(dtype: torch.dtype = torch.float32) -> dict:
    """GEMV entry points for ``dtype``, each as (prepare weight, apply to a (1, in) row)."""
    kinds = {
        "F.linear, output-major": (lambda w: w.contiguous(), lambda x, w: F.linear(x, w)),
        "F.linear, input-major": (lambda w: w.t().contiguous().t(), lambda x, w: F.linear(x, w)),
        "torch.mv": (lambda w: w.contiguous(), lambda x, w: torch.mv(w, x[0])),
    }
    if cpu_linear.enabled(dtype):
        kinds["oneDNN, reordered"] = (lambda w: cpu_linear.pack(w.contiguous()), cpu_linear.apply_packed)
    return kinds


def floor_runners(model: torch.nn.Module, dtype: torch.dtype, passes: int = FLOOR_PASSES) -> tuple[dict, int, dict]:
    """The weight-streaming floor as callables. ``floor``: one batch-1 GEMV over every weight
    matrix in the decode's order (see :func:`_decode_weights`), each shape through whichever
    GEMV entry point (``F.linear`` in either layout, ``torch.mv``, oneDNN on a reordered
    weight) a quick pre-pass found fastest for it, ``passes`` times back to back. ``raw-read``:
    a plain read (a sum) of the same weights the same number of times, for reference: the
    bandwidth no GEMV can beat. Returns the runners, the bytes per pass and the chosen kind
    per shape."""
    order = _decode_weights(model)
    kinds = _gemv_kinds(dtype)
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype) for w in order}
    chosen = {}
    for shape in sorted({tuple(w.shape) for w in order}):
        same = [w for w in order if tuple(w.shape) == shape]
        times = {}
        for name, (prep, apply) in kinds.items():
            ready = [prep(w) for w in same]
            x = xs[shape[1]]
            times[name] = best_time(lambda ready=ready, apply=apply, x=x: [apply(x, w) for w in ready], 5)
        chosen[shape] = min(times, key=times.get)
    plan = [(kinds[chosen[tuple(w.shape)]][1], kinds[chosen[tuple(w.shape)]][0](w), xs[w.shape[1]]) for w in order]
    flat = [w.contiguous() for w in order]

    def floor():
        for _ in range(passes):
            for apply, w, x in plan:
                apply(x, w)

    def raw_read():
        for _ in range(passes):
            for w in flat:
                w.sum()

    runners = {"floor": floor, "raw-read": raw_read}
    return runners, sum(w.numel() * w.element_size() for w in order), chosen


def matmul_peak(dtype: torch.dtype, n: int = 1024) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = best_time(lambda: a @ b, 5, warmup=2)
    return 2 * n**3 / t


def flops_per_token(cfg: PaLMConfig, ctx: float) -> float:
    return 2 * cfg.num_params() + 4 * cfg.depth * cfg.attn_inner * ctx


def generation_runners(model, batch: int, name: str) -> dict:
    """Two callables: the whole generation, and the prefill alone (one new token); their
    difference over ``NEW - 1`` is the decode step."""
    prompt = torch.randint(0, VOCAB, (PROMPT,)).tolist()
    params = SamplingParams(max_new_tokens=NEW, temperature=1.0, n=batch)
    first = SamplingParams(max_new_tokens=1, n=batch)
    # no stop tokens: every row produces exactly NEW tokens
    return {
        name: lambda: generate_tokens(model, [prompt], params),
        f"{name}-prefill": lambda: generate_tokens(model, [prompt], first),
    }


def ours_runners(cfg: PaLMConfig, dtype, batch: int):
    """The model and its generation runners (see :func:`generation_runners`)."""
    torch.manual_seed(0)
    model = PaLM(cfg).eval().to(dtype)
    return model, generation_runners(model, batch, "ours")


def int8_runners(model, batch: int):
    """The same generation with weight-only int8 decode steps (``PaLM.quantize_int8``)."""
    return generation_runners(copy.deepcopy(model).quantize_int8(), batch, "ours-int8")


def hf_runner(dtype, batch: int):
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

    return run


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
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; each time is the fastest")
    ap.add_argument("--peer-repeats", type=int, default=1, help="repeats for palm-rlhf-pytorch (slow: no cache)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    ap.add_argument("--no-int8", dest="int8", action="store_false",
                    help="skip the weight-only int8 rows (PaLM.quantize_int8, batches up to 4)")
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
            model, runners = ours_runners(cfg, dtype, batch)
            floors, nbytes, chosen = floor_runners(model, dtype)
            runners.update(floors)
            if args.int8 and batch <= cpu_linear.INT8_MAX_ROWS and cpu_linear.int8_available():
                runners.update(int8_runners(model, batch))
            if "hf" in peers:
                try:
                    runners["hf"] = hf_runner(dtype, batch)
                except ImportError as e:
                    print(f"    hf: not installed ({e}); install the bench extra")
            times = interleaved_min(runners, args.repeats)
            ours = batch * NEW / times["ours"]
            step = (times["ours"] - times["ours-prefill"]) / (NEW - 1)
            floor, raw_read = times["floor"] / FLOOR_PASSES, times["raw-read"] / FLOOR_PASSES
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
                "floor_gemv": {"x".join(map(str, shape)): kind for shape, kind in chosen.items()},
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
            print("    floor GEMVs: " + ", ".join(f"{o}x{i} {kind}" for (o, i), kind in chosen.items()), flush=True)
            if "ours-int8" in times:
                q_tok = batch * NEW / times["ours-int8"]
                q_step = (times["ours-int8"] - times["ours-int8-prefill"]) / (NEW - 1)
                print(f"    int8 weights       {q_tok:8.1f} tok/s  step {q_step * 1e3:6.2f} ms  "
                      f"{step / q_step:4.2f}x the {dname} step, {q_step / floor:4.2f} of its floor", flush=True)
                row.update(int8_tok_s=q_tok, int8_step_ms=q_step * 1e3, int8_speedup=step / q_step,
                           int8_step_over_floor=q_step / floor)
            theirs_by_peer = {}
            if "hf" in runners:
                theirs_by_peer["hf"] = ("hf", batch * NEW / times["hf"])
            if "palm-rlhf-pytorch" in peers:
                try:
                    theirs_by_peer["palm-rlhf-pytorch"] = (
                        "palm", bench_palm_rlhf_pytorch(dtype, batch, args.peer_repeats))
                except ImportError as e:
                    print(f"    palm-rlhf-pytorch: not installed ({e}); install the bench extra")
            for peer, (key, theirs) in theirs_by_peer.items():
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
