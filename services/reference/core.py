"""The reference core: per-token log-probs of responses under a frozen PaLM, free of gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from services.common.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from services.common.metrics import ServiceMetrics
from services.common.models import LoadedPalm, load_palm_version

# Sequences per forward pass: bounds activation memory whatever the request size.
CHUNK = 16


class ReferenceCore:
    def __init__(self, device: str, max_batch: int, metrics: ServiceMetrics):
        self.device = device
        self.max_batch = max_batch
        self.metrics = metrics
        self.current: LoadedPalm | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="reference")

    async def start(self, path: Path, version: str) -> None:
        loop = asyncio.get_running_loop()
        self.current = await loop.run_in_executor(self._worker, load_palm_version, path, version, self.device)
        self.metrics.set_version(version)

    def model(self) -> LoadedPalm:
        if self.current is None:
            raise Unavailable("the reference model is still loading; retry shortly")
        return self.current

    def validate(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[list[int], list[int]]]:
        m = self.model()
        if not sequences:
            raise InvalidArgument("no sequences given: send at least one")
        if len(sequences) > self.max_batch:
            raise ResourceExhausted(f"{len(sequences)} sequences in one request; the limit is {self.max_batch}")
        vocab, limit = m.model.num_tokens, m.config.max_seq_len
        out = []
        for i, (prompt, response) in enumerate(sequences):
            prompt, response = [int(t) for t in prompt], [int(t) for t in response]
            if not prompt or not response:
                raise InvalidArgument(f"sequence {i}: prompt and response must both be non-empty")
            bad = [t for t in prompt + response if not 0 <= t < vocab]
            if bad:
                raise InvalidArgument(f"sequence {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            if len(prompt) + len(response) > limit:
                raise ResourceExhausted(
                    f"sequence {i} has {len(prompt) + len(response)} tokens; the model's max_seq_len is {limit}"
                )
            out.append((prompt, response))
        return out

    async def logprobs(self, sequences, timeout: float | None = None) -> tuple[list[list[float]], str]:
        """(per-sequence response log-probs, version)."""
        seqs = self.validate(sequences)
        m = self.model()
        deadline = None if timeout is None else time.monotonic() + timeout
        out = await asyncio.get_running_loop().run_in_executor(self._worker, self._compute, m, seqs, deadline)
        self.metrics.items_scored.labels(self.metrics.service, "logprobs").inc(len(seqs))
        self.metrics.batch_rows.labels(self.metrics.service).observe(len(seqs))
        return out, m.version

    @staticmethod
    @torch.inference_mode()
    def _compute(m: LoadedPalm, seqs: list[tuple[list[int], list[int]]], deadline: float | None) -> list[list[float]]:
        results: list[list[float]] = []
        for start in range(0, len(seqs), CHUNK):
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("deadline exceeded while computing log-probs")
            chunk = seqs[start:start + CHUNK]
            length = max(len(p) + len(r) for p, r in chunk)
            # Right padding: with causal attention the real positions never see the pad.
            batch = torch.zeros(len(chunk), length, dtype=torch.long, device=m.model.device)  # (seqs, len)
            for i, (p, r) in enumerate(chunk):
                batch[i, : len(p) + len(r)] = torch.tensor(p + r)
            lp = m.model.logprobs_of(batch).float().cpu()  # (seqs, len - 1): lp[:, t] = log p(x[t+1] | x[:t+1])
            for i, (p, r) in enumerate(chunk):
                results.append(lp[i, len(p) - 1 : len(p) - 1 + len(r)].tolist())
        return results

    async def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
