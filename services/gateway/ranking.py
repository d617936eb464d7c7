"""Best-of-n selection: candidates from the policy, scores from the reward service, ranked."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator

from palm_rlhf.chat import clean_response

from .backends import Backends, Generation, SamplingOptions, ScoreResult, StreamEvent
from .metrics import GatewayMetrics


def ranked(scores: list[float]) -> list[int]:
    """Sample indices, best reward first; NaN scores last; ties keep sample order."""
    return sorted(range(len(scores)), key=lambda i: (-(scores[i] if math.isfinite(scores[i]) else -math.inf), i))


def finite(x: float | None) -> float | None:
    """A reward as the API reports it: None for a NaN or infinite score."""
    return x if x is not None and math.isfinite(x) else None


class RankingService:
    """Generates candidates, cleans them to answers, and scores them (with latency metrics)."""

    def __init__(self, backends: Backends, metrics: GatewayMetrics):
        self.backends = backends
        self.metrics = metrics

    async def generate(self, prompt_text: str, best_of: int, params: SamplingOptions) -> Generation:
        t0 = time.perf_counter()
        try:
            return await self.backends.generate(prompt_text, best_of, params)
        finally:
            self.metrics.backend_latency.labels("policy", "generate").observe(time.perf_counter() - t0)

    def generate_stream(self, prompt_text: str, n: int, params: SamplingOptions) -> AsyncIterator[StreamEvent]:
        return self.backends.generate_stream(prompt_text, n, params)

    async def score(self, prompt_text: str, texts: list[str]) -> ScoreResult:
        t0 = time.perf_counter()
        try:
            return await self.backends.score(prompt_text, texts)
        finally:
            self.metrics.backend_latency.labels("reward", "score").observe(time.perf_counter() - t0)

    async def best_of(
        self, prompt_text: str, best_of: int, params: SamplingOptions, stops: list[str]
    ) -> tuple[Generation, list[str], ScoreResult]:
        """``best_of`` candidates, their answers (in sample order) and the answers' scores."""
        gen = await self.generate(prompt_text, best_of, params)
        texts = [clean_response(c.text, stops) for c in sorted(gen.candidates, key=lambda c: c.sample_index)]
        return gen, texts, await self.score(prompt_text, texts)
