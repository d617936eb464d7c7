"""What the gateway costs: a best-of-4 chat request through HTTP -> gateway -> gRPC policy and
reward services, against the same work done in one process (generate 4 samples, clean them,
score them with the reward model), and the request rate at 32 concurrent clients.

    python bench/gateway.py [--preset demo|tiny] [--requests 40] [--max-tokens 24] [--seconds 20]

Both sides run the same checkpoints (random weights of the chosen preset) with one torch thread
per model, on this machine, in this run; the figures to compare are the printed ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# bench/ holds other benchmarks named like packages (kernels.py): keep it off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Tell me something about the weather today."}]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


class Child:
    def __init__(self, role: str, args: list[str], pattern: str, log: Path):
        cmd = [
            sys.executable,
            "-m",
            "palm_rlhf.cli",
            "serve",
            role,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PALM_RLHF_DEMO_AUTOBUILD="0")
        self._log = open(log, "w")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env
        )
        self.port = None
        self._re = re.compile(pattern)
        self._ev = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            m = self._re.match(line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._ev.set()

    def wait(self, timeout=120.0) -> str:
        if not self._ev.wait(timeout):
            raise RuntimeError(f"process did not start; see {self._log.name}")
        return f"127.0.0.1:{self.port}"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def in_process(data: Path, max_tokens: int, n_req: int) -> list[float]:
    """The same work without the network: sample 4, clean, score the 4 with the reward model."""
    from palm_rlhf.chat import clean_response, encode_prompt, format_chat
    from palm_rlhf.checkpoint import CheckpointStore, load_palm
    from palm_rlhf.generation import SamplingParams, generate_tokens
    from palm_rlhf.reward import RewardModel
    from palm_rlhf.tokenizer import ByteTokenizer
    from services.reward.core import encode_for_reward

    torch.set_num_threads(1)
    pol = CheckpointStore(data / "checkpoints", "policy")
    rew = CheckpointStore(data / "checkpoints", "reward")
    policy, _ = load_palm(pol.path(pol.current()))
    reward, _ = RewardModel.from_checkpoint(rew.path(rew.current()))
    policy.eval()
    reward.eval()
    tok = ByteTokenizer()
    lat = []
    for i in range(n_req):
        t0 = time.perf_counter()
        with torch.inference_mode():
            prompt = format_chat(MESSAGES)
            ids = encode_prompt(tok, prompt)
            params = SamplingParams(
                max_new_tokens=max_tokens, temperature=1.0, n=4, seed=i, stop_token_ids=(tok.eos_id,)
            )
            comps = generate_tokens(policy, [ids], params)[0]
            texts = [clean_response(tok.decode(c.token_ids)) for c in comps]
            enc = [encode_for_reward(tok, prompt, t, policy.config.max_seq_len) for t in texts]
            length = max(len(e) for e, _ in enc)
            x = torch.zeros(len(enc), length, dtype=torch.long)  # (candidates, len)
            mask = torch.zeros(len(enc), length, dtype=torch.bool)
            for j, (e, _) in enumerate(enc):
                x[j, : len(e)] = torch.tensor(e)
                mask[j, : len(e)] = True
            scores = reward(x, mask=mask, prompt_lengths=torch.tensor([p for _, p in enc])).tolist()
            _best = max(range(4), key=lambda j: scores[j])
        lat.append(time.perf_counter() - t0)
    return lat


def body(i: int, max_tokens: int) -> dict:
    return {
        "messages": MESSAGES,
        "n": 1,
        "best_of": 4,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": i,
    }


def through_gateway(url: str, max_tokens: int, n_req: int) -> list[float]:
    lat = []
    with httpx.Client(timeout=120) as c:
        for i in range(n_req):
            t0 = time.perf_counter()
            r = c.post(url + "/v1/chat/completions", json=body(i, max_tokens))
            r.raise_for_status()
            lat.append(time.perf_counter() - t0)
    return lat


async def concurrent(url: str, max_tokens: int, clients: int, seconds: float) -> tuple[float, list[float]]:
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(k: int, c: httpx.AsyncClient):
        i = k * 100000
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await c.post(url + "/v1/chat/completions", json=body(i, max_tokens))
            r.raise_for_status()
            lat.append(time.perf_counter() - t0)
            i += 1

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        await asyncio.gather(*(worker(k, c) for k in range(clients)))
    return len(lat) / (time.perf_counter() - t0), lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args()

    from palm_rlhf.checkpoint import CheckpointStore
    from palm_rlhf.config import PaLMConfig
    from palm_rlhf.model import PaLM

    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    torch.manual_seed(0)
    m = PaLM(PaLMConfig.from_name(a.preset))
    CheckpointStore(tmp / "checkpoints", "policy").save(m, m.config)
    del m
    grpc_re = r"^\w+ listening on \S+:(\d+) \(grpc\)"
    flags = ["--metrics-port", "0", "--data-dir", str(tmp), "--max-n", "16", "--max-batch-rows", "256"]
    policy = Child("policy", flags, grpc_re, tmp / "policy.log")
    reward = Child("reward", ["--metrics-port", "0", "--data-dir", str(tmp)], grpc_re, tmp / "reward.log")
    children = [policy, reward]
    try:
        p_addr, r_addr = policy.wait(), reward.wait()
        gw = Child(
            "gateway",
            ["--data-dir", str(tmp), "--policy-addr", p_addr, "--reward-addr", r_addr, "--rate-limit", "off"],
            r"^gateway listening on \S+:(\d+) \(http\)",
            tmp / "gateway.log",
        )
        children.append(gw)
        url = "http://" + gw.wait()
        deadline = time.monotonic() + 120
        while httpx.get(url + "/readyz").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("gateway never ready")
            time.sleep(0.2)

        through_gateway(url, a.max_tokens, 3)  # warm-up
        in_process(tmp, a.max_tokens, 2)
        local = in_process(tmp, a.max_tokens, a.requests)
        remote = through_gateway(url, a.max_tokens, a.requests)
        rps, conc_lat = asyncio.run(concurrent(url, a.max_tokens, a.clients, a.seconds))
    finally:
        for c in reversed(children):
            c.stop()

    lp50, lp99 = percentile(local, 50), percentile(local, 99)
    gp50, gp99 = percentile(remote, 50), percentile(remote, 99)
    local_rps = 1 / statistics.mean(local)
    print(f"# gateway benchmark, preset {a.preset}, best_of=4, max_tokens={a.max_tokens}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")  # fmt: skip
    print(f"{'':34s} {'p50 ms':>9s} {'p99 ms':>9s}")
    print(f"{'in-process (generate + score)':34s} {lp50 * 1e3:9.1f} {lp99 * 1e3:9.1f}")
    print(f"{'through the gateway (sequential)':34s} {gp50 * 1e3:9.1f} {gp99 * 1e3:9.1f}")
    print(f"latency ratio gateway / in-process: p50 {gp50 / lp50:.2f}x, p99 {gp99 / lp99:.2f}x "
          f"(overhead p50 {1e3 * (gp50 - lp50):.1f} ms)")  # fmt: skip
    print(f"throughput: in-process sequential {local_rps:.2f} req/s; gateway at {a.clients} clients "
          f"{rps:.2f} req/s (p50 {percentile(conc_lat, 50) * 1e3:.0f} ms, p99 {percentile(conc_lat, 99) * 1e3:.0f} ms)")  # fmt: skip
    print(f"throughput ratio gateway@{a.clients} / in-process sequential: {rps / local_rps:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
