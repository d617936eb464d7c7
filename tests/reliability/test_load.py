"""The gateway under more load than it is configured to serve: it sheds with 429/503 and
Retry-After, never times out or crashes, and its memory (and the policy's) stays bounded."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

import httpx

harness = sys.modules["palm_rlhf_test_harness"]
load = sys.modules["palm_rlhf_bench_load"]

CLIENTS = 64
DURATION_S = 20.0
RSS_GROWTH_LIMIT_MIB = {"gateway": 150, "policy": 300, "reward": 300}


class RssSampler:
    """Samples the RSS of some processes every ``interval`` seconds (from /proc)."""

    def __init__(self, procs: dict, interval: float = 0.25):
        self.procs = procs
        self.interval = interval
        self.samples: dict[str, list[int]] = {name: [] for name in procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, p in self.procs.items():
                self.samples[name].append(harness.rss_kib(p.pid)[0])
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:  # noqa: PYI034 - Self needs Python 3.11
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_gateway_sheds_excess_load_with_retry_after_and_bounded_memory(stack, limited_gateway):
    gw = limited_gateway
    procs = {"gateway": gw, "policy": stack.policy, "reward": stack.reward}
    # warm up (first requests allocate the model's caches), then take the baseline
    for _ in range(3):
        assert httpx.post(f"{gw.url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "hi"}], "best_of": 2,
                                "max_tokens": 8}).status_code in (200, 429)
    time.sleep(1.0)  # let the token bucket refill a little so the run starts from the same place
    baseline = {name: harness.rss_kib(p.pid)[0] for name, p in procs.items()}

    with RssSampler(procs) as rss:
        res = asyncio.run(load.run_load(gw.url, concurrency=CLIENTS, duration=DURATION_S, best_of=2, max_tokens=8,
                                        timeout=30.0, max_backoff=0.25))
    summary = res.summary()
    peaks = {name: max(s) for name, s in rss.samples.items()}
    report = {
        "clients": CLIENTS, "duration_s": DURATION_S, **summary,
        "rss_baseline_mib": {k: round(v / 1024, 1) for k, v in baseline.items()},
        "rss_peak_mib": {k: round(v / 1024, 1) for k, v in peaks.items()},
        "rss_peak_hwm_mib": {k: round(harness.rss_kib(p.pid)[1] / 1024, 1) for k, p in procs.items()},
    }
    print("\nLOAD REPORT " + json.dumps(report, indent=1))

    # every request got an answer: no client-side timeouts, resets or refused connections
    assert not res.errors, f"transport errors under load: {dict(res.errors)}"
    # only "served" or "shed" -- never a 5xx other than 503, never a 4xx other than 429
    assert set(res.status) <= {200, 429, 503}, dict(res.status)
    assert res.served > 0 and res.shed > 0, dict(res.status)
    assert res.shed_without_retry_after == 0
    # the limiter (5/s, burst 10) is what bounds the served rate (plus what the warm-up refilled)
    assert res.served <= 5 * DURATION_S + 10 + 5 * 3, res.served
    # memory: bounded growth over the run (a leak or an unbounded queue would show here)
    for name, limit in RSS_GROWTH_LIMIT_MIB.items():
        grew = (peaks[name] - baseline[name]) / 1024
        assert grew < limit, f"{name} RSS grew by {grew:.0f} MiB under load (limit {limit})"
    # and everything still answers afterwards
    for p in procs.values():
        assert p.alive() and p.is_ready(), f"{p.role} is down after the load"
    ok = httpx.get(f"{gw.url}/readyz", timeout=10)
    assert ok.status_code == 200, ok.text


def test_overloaded_backends_are_shed_with_503_and_retry_after_not_timeouts(stack):
    """No rate limit, and more work than the policy can do within the gateway's backend
    deadline (0.25 s): what cannot be served in time is answered 503 with Retry-After; no client
    waits until its own timeout."""
    gw = stack.add_gateway("--rate-limit", "off", env={"PALM_RLHF_GENERATE_TIMEOUT": "0.25",
                                                       "PALM_RLHF_SCORE_TIMEOUT": "0.25"})
    try:
        res = asyncio.run(load.run_load(gw.url, concurrency=CLIENTS, duration=10.0, best_of=4, max_tokens=32,
                                        timeout=30.0, max_backoff=0.25))
        print("\nOVERLOAD REPORT " + json.dumps(res.summary()))
        assert not res.errors, f"transport errors under overload: {dict(res.errors)}"
        assert set(res.status) <= {200, 429, 503}, dict(res.status)
        assert res.served > 0 and res.shed > 0, dict(res.status)
        assert res.shed_without_retry_after == 0, (
            f"{res.shed_without_retry_after} of {res.shed} shed answers had no Retry-After header")
        # two cores run the clients, the gateway and both model services, so queueing in the
        # gateway itself adds seconds; the bound is half the clients' own timeout
        assert max(res.shed_latency_s) < 15.0, "a shed answer took as long as a client timeout"
        assert gw.alive() and httpx.get(f"{gw.url}/healthz", timeout=10).status_code == 200
    finally:
        gw.stop()
