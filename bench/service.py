"""Policy service throughput under concurrency, and gRPC overhead against in-process generation.

Starts ``palm-rlhf serve policy`` as a child process on an ephemeral port, serving either a
given checkpoint or a random model with the shape of the shipped demo model (same cost per
token), and measures completion tokens/s with 1, 4 and 16 concurrent clients. Each request is
one prompt, ``--n`` samples, ``--new-tokens`` new tokens. The same requests also run
in-process with ``generate_tokens`` (same thread count) to price the transport. Every
throughput measurement runs once per round (``--rounds``, default 3) and keeps its best round;
the overhead is also measured in back-to-back pairs of the same request over the wire and
in-process (``--pairs``), whose median ratio is immune to the host's drift.

    python bench/service.py                 # prints a table and the ratios
    python bench/service.py --checkpoint palm_rlhf/demo/assets/demo-v2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "User: how was your day today?\nAssistant:"


def make_store(root: Path, checkpoint: str | None) -> Path:
    import torch

    from palm_rlhf.checkpoint import CheckpointStore, load_palm
    from palm_rlhf.config import PaLMConfig
    from palm_rlhf.model import PaLM

    st = CheckpointStore(root / "checkpoints", "policy")
    if checkpoint:
        model, manifest = load_palm(checkpoint, dtype=torch.float32)
        st.save(model, manifest["config"], tokenizer=manifest.get("tokenizer"))
    else:
        torch.manual_seed(0)
        model = PaLM(PaLMConfig.from_name("demo"))
        st.save(model, model.config)
    return st.path(st.current())


def start_server(data: Path, threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "palm_rlhf.cli", "--log-level", "WARNING", "serve", "policy", "--port", "0",
           "--metrics-port", "-1", "--data-dir", str(data), "--torch-threads", str(threads),
           "--max-batch-rows", "128"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    port = None
    for line in proc.stdout:
        m = re.search(r"listening on \S+:(\d+) \(grpc\)", line)
        if m:
            port = m.group(1)
            break
    if port is None:
        raise RuntimeError("the policy service did not start")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    from services.common.client import wait_until_serving_sync

    addr = f"127.0.0.1:{port}"
    wait_until_serving_sync(addr, timeout=120)
    return proc, addr


async def run_clients(addr: str, clients: int, per_client: int, n: int, new_tokens: int) -> tuple[float, float]:
    """(completion tokens/s, mean seconds per request)."""
    from palm_rlhf.proto.v1 import policy_pb2 as P
    from palm_rlhf.proto.v1 import policy_pb2_grpc
    from services.common.client import create_channel

    async with create_channel(addr) as ch:
        stub = policy_pb2_grpc.PolicyStub(ch)

        def req(i: int):
            return P.GenerateRequest(prompts=[P.Prompt(text=PROMPT)],
                                     params=P.SamplingParams(n=n, max_new_tokens=new_tokens, seed=i, temperature=1.0))

        await stub.Generate(req(0), timeout=300)  # warm-up
        tokens = 0
        latencies: list[float] = []

        async def client(c: int) -> None:
            nonlocal tokens
            for k in range(per_client):
                t0 = time.perf_counter()
                r = await stub.Generate(req(c * 1000 + k), timeout=600)
                latencies.append(time.perf_counter() - t0)
                tokens += r.usage.completion_tokens

        t0 = time.perf_counter()
        await asyncio.gather(*[client(c) for c in range(clients)])
        wall = time.perf_counter() - t0
    return tokens / wall, sum(latencies) / len(latencies)


def in_process(path: Path, n: int, new_tokens: int, threads: int):
    """A callable running ``requests`` requests in this process: (tokens/s, s/request)."""
    import torch

    from palm_rlhf.chat import encode_prompt
    from palm_rlhf.checkpoint import load_palm
    from palm_rlhf.generation import SamplingParams, generate_tokens
    from palm_rlhf.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    model, manifest = load_palm(path, dtype=torch.float32)
    tok = load_tokenizer(manifest.get("tokenizer"))
    ids = encode_prompt(tok, PROMPT)

    def one(i: int) -> int:
        sp = SamplingParams(max_new_tokens=new_tokens, n=n, seed=i, temperature=1.0, stop_token_ids=(tok.eos_id,))
        return sum(len(c.token_ids) for c in generate_tokens(model, [ids], sp)[0])

    def run(requests: int) -> tuple[float, float]:
        one(0)  # warm-up
        tokens = 0
        t0 = time.perf_counter()
        for k in range(requests):
            tokens += one(k)
        wall = time.perf_counter() - t0
        return tokens / wall, wall / requests

    run.one = one
    return run


def paired_overhead(addr: str, local_one, pairs: int, n: int, new_tokens: int) -> tuple[float, list[float]]:
    """gRPC overhead measured in pairs: the same request (same seed, so the same tokens) once
    over the wire and once in-process, back to back, alternating which goes first. Returns the
    median of (wire time / in-process time) - 1 and all the per-pair ratios. Pairs see the
    same machine state, so the host's drift cancels out of each ratio."""
    import statistics

    from palm_rlhf.proto.v1 import policy_pb2 as P
    from palm_rlhf.proto.v1 import policy_pb2_grpc
    from services.common.client import create_sync_channel

    with create_sync_channel(addr) as ch:
        stub = policy_pb2_grpc.PolicyStub(ch)

        def wire(i: int) -> None:
            stub.Generate(P.GenerateRequest(prompts=[P.Prompt(text=PROMPT)], params=P.SamplingParams(
                n=n, max_new_tokens=new_tokens, seed=i, temperature=1.0)), timeout=300)

        def timed(fn, i: int) -> float:
            t0 = time.perf_counter()
            fn(i)
            return time.perf_counter() - t0

        wire(0), local_one(0)  # warm-up
        ratios = []
        for k in range(pairs):
            if k % 2:
                t_local, t_wire = timed(local_one, k), timed(wire, k)
            else:
                t_wire, t_local = timed(wire, k), timed(local_one, k)
            ratios.append(t_wire / t_local)
    return statistics.median(ratios) - 1, ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="policy checkpoint folder (default: random weights, demo shape)")
    ap.add_argument("--n", type=int, default=4, help="samples per request")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=8, help="requests per measurement for 1 client")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, service and in-process alike")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is the best round")
    ap.add_argument("--pairs", type=int, default=16, help="back-to-back wire/in-process pairs for the overhead")
    args = ap.parse_args()

    configs = ((1, args.requests), (4, max(2, args.requests // 2)), (16, max(1, args.requests // 4)))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        path = make_store(data, args.checkpoint)
        proc, addr = start_server(data, args.threads)
        local = in_process(path, args.n, args.new_tokens, args.threads)
        # rounds: every measurement once per round, each keeping its best, so that the ratios
        # compare runs that went through the same stretches of machine noise
        results: dict = {}
        try:
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
                runs = {c: asyncio.run(run_clients(addr, c, per, args.n, args.new_tokens)) for c, per in configs}
                runs["in-proc"] = local(args.requests)
                for key, (tps, lat) in runs.items():
                    best = results.get(key)
                    results[key] = (max(tps, best[0]), min(lat, best[1])) if best else (tps, lat)
            overhead, ratios = paired_overhead(addr, local.one, args.pairs, args.n, args.new_tokens)
        finally:
            proc.terminate()
            proc.wait(60)
        inproc_tps, inproc_lat = results.pop("in-proc")

    print(f"policy service, {args.n} samples x {args.new_tokens} new tokens per request, "
          f"{args.threads} torch thread(s), {os.cpu_count()} CPUs")
    print(f"{'clients':>8} {'tokens/s':>10} {'s/request':>10} {'vs 1 client':>12}")
    base = results[1][0]
    for clients, (tps, lat) in results.items():
        print(f"{clients:>8} {tps:>10.0f} {lat:>10.3f} {tps / base:>11.2f}x")
    print(f"{'in-proc':>8} {inproc_tps:>10.0f} {inproc_lat:>10.3f}")
    print(f"16 clients / 1 client throughput: {results[16][0] / base:.2f}x (goal >= 4x)")
    print(f"gRPC overhead, 1 client vs in-process (best rounds): {results[1][1] / inproc_lat - 1:+.1%} per request")
    print(f"gRPC overhead, paired (median of {len(ratios)} back-to-back pairs): {overhead:+.1%} per request, "
          f"pairs from {min(ratios) - 1:+.1%} to {max(ratios) - 1:+.1%} (goal <= 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
