"""The gateway's use of the feedback store: each interaction recorded whole, feedback rows,
and the log export; blocking store calls run in worker threads."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi.encoders import jsonable_encoder

from services.common.feedback_store import CandidateRecord, CompletionRecord, FeedbackRecord, FeedbackStore

from .backends import Generation
from .metrics import GatewayMetrics
from .ranking import finite, ranked


async def in_thread(fn, *args, **kw):
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kw))


class StorageService:
    def __init__(self, store: FeedbackStore, metrics: GatewayMetrics):
        self.store = store
        self.metrics = metrics

    async def record(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        prompt_text: str,
        sampling: dict[str, Any],
        client_id: str,
        gen: Generation,
        texts: list[str],
        scores: list[float],
        reward_version: str,
        n: int,
        started: float,
        completion_id: str | None = None,
    ) -> tuple[CompletionRecord, list[int]]:
        """Store the interaction (every candidate, ranked) before the client sees it. Returns the
        record and the sample indices in rank order."""
        order = ranked(scores)
        by_sample = {c.sample_index: c for c in gen.candidates}
        rec = CompletionRecord(
            id=completion_id or "chatcmpl-" + uuid.uuid4().hex,
            seq=0,
            created_at=time.time(),
            model=model,
            messages=messages,
            prompt_text=prompt_text,
            prompt_token_ids=gen.prompt_token_ids,
            sampling={"n": n, "best_of": len(texts), **sampling},
            n=n,
            best_of=len(texts),
            policy_version=gen.policy_version,
            reward_version=reward_version,
            client_id=client_id,
            latency_ms=(time.perf_counter() - started) * 1000,
            candidates=[
                CandidateRecord(
                    index=rank,
                    sample_index=s,
                    text=texts[s],
                    raw_text=by_sample[s].text,
                    token_ids=by_sample[s].token_ids,
                    logprobs=by_sample[s].logprobs,
                    finish_reason=by_sample[s].finish_reason,
                    reward=finite(scores[s]),
                    shown=rank < n,
                    policy_version=gen.policy_version,
                )
                for rank, s in enumerate(order)
            ],
        )
        await in_thread(self.store.add_completion, rec)
        self.metrics.best_of.observe(len(texts))
        self.metrics.choices.observe(n)
        self.metrics.tokens.inc(gen.completion_tokens)
        return rec, order

    async def completion(self, completion_id: str) -> CompletionRecord:
        return await in_thread(self.store.get_completion, completion_id)

    async def owner(self, completion_id: str) -> str:
        """The client id that created a completion; raises CompletionNotFound."""
        rec = await in_thread(self.store.get_completion, completion_id, with_candidates=False)
        return rec.client_id

    async def add_feedback(self, completion_id: str, **fields: Any) -> tuple[FeedbackRecord, bool]:
        fb, created = await in_thread(self.store.add_feedback, completion_id, **fields)
        if created:
            self.metrics.feedback.labels(fields["kind"]).inc()
        return fb, created

    async def list_feedback(self, completion_id: str) -> list[FeedbackRecord]:
        return await in_thread(self.store.list_feedback, completion_id)

    async def ping(self) -> None:
        await in_thread(self.store.ping)

    def export_lines(self, after_seq: int, with_feedback_only: bool) -> AsyncIterator[bytes]:
        """The log as JSON lines, read in batches off the event loop."""
        it = self.store.iter_export(after_seq=after_seq, with_feedback_only=with_feedback_only)
        sentinel = object()

        async def lines() -> AsyncIterator[bytes]:
            while True:
                batch = await in_thread(lambda: [next(it, sentinel) for _ in range(50)])
                for d in batch:
                    if d is sentinel:
                        return
                    yield (json.dumps(jsonable_encoder(d), separators=(",", ":")) + "\n").encode()

        return lines()
