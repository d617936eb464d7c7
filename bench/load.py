"""Load generator for a running gateway: many concurrent chat clients for a bounded time.

    python bench/load.py --url http://127.0.0.1:8000 --concurrency 64 --duration 20 --best-of 2

Each of ``--concurrency`` asyncio clients loops: POST /v1/chat/completions; on a shed answer
(429/503) it waits ``min(Retry-After, --max-backoff)`` with jitter and goes on (a polite client
population; ``--ignore-retry-after`` makes it hammer). It prints requests/s, the latency of
successful requests (p50/p90/p99, with the same figures for shed answers to show that shedding is
cheap), status code counts, and transport errors (timeouts, resets): a gateway that holds its
load answers every request with a status, never with a timeout.

The same :func:`run_load` drives the load test in tests/reliability.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    requests: int = 0
    status: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # transport errors by exception type
    ok_latency_s: list[float] = field(default_factory=list)
    shed_latency_s: list[float] = field(default_factory=list)
    shed_without_retry_after: int = 0
    completion_ids: list[str] = field(default_factory=list)

    @property
    def served(self) -> int:
        return sum(v for k, v in self.status.items() if 200 <= k < 300)

    @property
    def shed(self) -> int:
        return self.status.get(429, 0) + self.status.get(503, 0)

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("ok_latency_s", "shed_latency_s", "completion_ids")}
        d["status"] = {str(k): v for k, v in sorted(self.status.items())}
        d["errors"] = dict(self.errors)
        d["requests_per_s"] = round(self.requests / self.duration_s, 1)
        d["served_per_s"] = round(self.served / self.duration_s, 2)
        d["ok_latency_ms"] = quantiles_ms(self.ok_latency_s)
        d["shed_latency_ms"] = quantiles_ms(self.shed_latency_s)
        return d


def quantiles_ms(xs: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds (empty when there are no samples)."""
    if not xs:
        return {}
    s = sorted(xs)

    def q(p: float) -> float:
        return round(1000 * s[min(len(s) - 1, int(p * len(s)))], 1)

    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": round(1000 * s[-1], 1),
            "mean": round(1000 * statistics.fmean(s), 1)}


async def run_load(url: str, *, concurrency: int = 64, duration: float = 20.0, best_of: int = 2,
                   max_tokens: int = 8, api_key: str | None = None, timeout: float = 60.0,
                   max_backoff: float = 0.25, ignore_retry_after: bool = False, seed: int = 0) -> LoadResult:
    """Drive ``url`` with ``concurrency`` clients for ``duration`` seconds."""
    rng = random.Random(seed)
    result = LoadResult(concurrency, duration)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    stop_at = time.monotonic() + duration
    words = ["hello", "how are you", "tell me about the sea", "what a day", "good morning", "any news"]

    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout,
                                 limits=limits) as http:

        async def client(i: int) -> None:
            while time.monotonic() < stop_at:
                body = {"messages": [{"role": "user", "content": rng.choice(words)}], "best_of": best_of,
                        "max_tokens": max_tokens, "seed": rng.randrange(1 << 30)}
                t0 = time.perf_counter()
                try:
                    resp = await http.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as e:
                    result.requests += 1
                    result.errors[type(e).__name__] += 1
                    await asyncio.sleep(max_backoff * rng.random())
                    continue
                dt = time.perf_counter() - t0
                result.requests += 1
                result.status[resp.status_code] += 1
                if resp.is_success:
                    result.ok_latency_s.append(dt)
                    result.completion_ids.append(resp.json()["id"])
                elif resp.status_code in (429, 503):
                    result.shed_latency_s.append(dt)
                    ra = resp.headers.get("retry-after")
                    if ra is None:
                        result.shed_without_retry_after += 1
                    wait = max_backoff if ignore_retry_after or ra is None else min(float(ra), max_backoff)
                    await asyncio.sleep(wait * (0.5 + 0.5 * rng.random()))

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="gateway URL")
    p.add_argument("--api-key", default=None, help="API key, when the gateway requires one")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds to run (default 20)")
    p.add_argument("--best-of", type=int, default=2, help="candidates per request (default 2)")
    p.add_argument("--max-tokens", type=int, default=8, help="max_tokens per request (default 8)")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request in seconds")
    p.add_argument("--max-backoff", type=float, default=0.25,
                   help="longest wait after a shed answer, whatever Retry-After says (default 0.25 s)")
    p.add_argument("--ignore-retry-after", action="store_true", help="wait --max-backoff after a shed answer")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    res = asyncio.run(run_load(args.url, concurrency=args.concurrency, duration=args.duration,
                               best_of=args.best_of, max_tokens=args.max_tokens, api_key=args.api_key,
                               timeout=args.timeout, max_backoff=args.max_backoff,
                               ignore_retry_after=args.ignore_retry_after))
    s = res.summary()
    if args.json:
        print(json.dumps(s))
        return 0
    print(f"{res.concurrency} clients for {res.duration_s:.0f} s against {args.url} (best_of {args.best_of})")
    print(f"  requests        {res.requests} ({s['requests_per_s']}/s)")
    print(f"  served (2xx)    {res.served} ({s['served_per_s']}/s)")
    print(f"  shed (429/503)  {res.shed}   without Retry-After: {res.shed_without_retry_after}")
    print(f"  status codes    {s['status']}")
    print(f"  transport errs  {s['errors'] or 'none'}")
    ok, shed = s["ok_latency_ms"], s["shed_latency_ms"]
    if ok:
        print(f"  served latency  p50 {ok['p50']} ms  p90 {ok['p90']} ms  p99 {ok['p99']} ms  max {ok['max']} ms")
    if shed:
        print(f"  shed latency    p50 {shed['p50']} ms  p99 {shed['p99']} ms   "
              f"(shed/served p50 ratio {shed['p50'] / ok['p50']:.3f})" if ok else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
