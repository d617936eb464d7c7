"""Server-sent events of a streamed chat completion, free of HTTP.

:class:`LiveStream` is the state machine of a stream whose candidates are all shown
(``best_of == n``): it is fed the policy's stream events and answers with the SSE frames to
send. Each choice's text is cut where the answer ends (:mod:`palm_rlhf.stops`: a newline or a
stop string, even when one arrives split over several events), a tail that may still turn
out to be a stop string is held back, and control characters and surrounding spaces never
reach the client, so the streamed text of a choice is exactly its stored answer.
:func:`ranked_events` frames a completion that was generated, scored and stored first
(``best_of > n``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from palm_rlhf.chat import answer_stops, strip_control
from palm_rlhf.stops import scan_stops

from . import logprobs as lp
from .backends import GeneratedCandidate, Generation, StreamEvent
from .schemas import ChatCompletionResponse

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(body: dict[str, Any]) -> str:
    """One server-sent event carrying ``body`` as compact JSON."""
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def chunk(rec_id: str, created: int, model: str, choices: list[dict], **extra: Any) -> str:
    """A ``chat.completion.chunk`` event."""
    body = {"id": rec_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    body.update(extra)
    return sse(body)


def delta(
    index: int,
    *,
    finish_reason: str | None = None,
    reward: float | None = None,
    rank: int | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    **content: Any,
) -> dict[str, Any]:
    """One choice of a chunk; a choice's last chunk carries its finish reason and reward (and
    ``rank``: the choice's place by reward, the index feedback takes). ``logprobs`` is the
    ``content`` list of the tokens this chunk adds."""
    d: dict[str, Any] = {
        "index": index,
        "delta": content,
        "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
        "finish_reason": finish_reason,
    }
    if finish_reason is not None:
        d["reward"] = reward
        if rank is not None:
            d["rank"] = rank
    return d


def finish_reason_of(reason: str | None) -> str:
    """The API's finish reason: "length" when the token limit ended it, else "stop"."""
    return "length" if reason == "length" else "stop"


class LiveStream:
    """A stream whose ``n`` candidates are all shown, forwarded as they are generated.

    ``start()`` gives the opening frames, ``feed(event)`` the frames an event of the policy
    leads to, ``finish(...)`` the closing ones; the accumulated candidates are in
    :meth:`generation` and their answers in :attr:`texts`."""

    def __init__(
        self,
        completion_id: str,
        created: int,
        model: str,
        n: int,
        stops: list[str],
        extra: dict[str, Any] | None = None,
        logprobs: int | None = None,
    ):
        """``logprobs``: None for none, else the alternatives per token to report."""
        self.id, self.created, self.model, self.n = completion_id, created, model, n
        self.top_n = logprobs
        self.token_bytes: list[list[bytes]] = [[] for _ in range(n)]
        self.tops: list[list] = [[] for _ in range(n)]
        self.reported = [0] * n  # tokens whose log-probs were sent, per choice
        self.stops = answer_stops(stops)
        self.extra = dict(extra or {})
        self.raw = [""] * n
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[float]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.sent = [""] * n  # answer text sent so far, per choice
        self.ended = [False] * n  # the answer is complete (a stop string or the last event)
        self.prompt_ids: list[int] = []
        self.version = ""

    def _chunk(self, choices: list[dict], **extra: Any) -> str:
        return chunk(self.id, self.created, self.model, choices, **extra)

    def start(self) -> list[str]:
        return [self._chunk([delta(i, role="assistant", content="")], **self.extra) for i in range(self.n)]

    def feed(self, ev: StreamEvent) -> list[str]:
        i = ev.sample_index
        if not 0 <= i < self.n:
            return []
        self.version = self.version or ev.policy_version
        self.prompt_ids = self.prompt_ids or list(ev.prompt_token_ids)
        self.raw[i] += ev.text
        self.tokens[i] += ev.token_ids
        self.logprobs[i] += ev.logprobs
        self.token_bytes[i] += ev.token_bytes
        self.tops[i] += ev.top_logprobs
        if ev.finish_reason:
            self.finish[i] = ev.finish_reason
        if self.ended[i]:
            return []
        scan = scan_stops(self.raw[i], self.stops)
        done = scan.stopped or self.finish[i] is not None
        visible = self.raw[i][: scan.end if done else scan.safe]
        target = strip_control(visible).lstrip()
        # trailing spaces wait until the answer is complete: it may end right after them
        target = target.rstrip()
        self.ended[i] = done
        if target.startswith(self.sent[i]) and len(target) > len(self.sent[i]):
            piece = target[len(self.sent[i]) :]
            self.sent[i] = target
            return [self._chunk([delta(i, content=piece, logprobs=self._unreported(i))])]
        return []

    def _unreported(self, i: int) -> list[dict[str, Any]] | None:
        """The log-probs of choice i's tokens not sent yet (None when not asked for)."""
        if self.top_n is None:
            return None
        start, self.reported[i] = self.reported[i], len(self.logprobs[i])
        return lp.chat_content(
            self.logprobs[i][start:], self.token_bytes[i][start:], self.tops[i][start:], self.top_n
        )

    @property
    def texts(self) -> list[str]:
        """Each candidate's answer (what was, or will be, sent for it)."""
        return [strip_control(self.raw[i][: scan_stops(self.raw[i], self.stops).end]).strip() for i in range(self.n)]

    def generation(self) -> Generation:
        return Generation(
            prompt_token_ids=self.prompt_ids,
            candidates=[
                GeneratedCandidate(i, self.raw[i], self.tokens[i], self.logprobs[i], self.finish[i] or "length",
                                   self.token_bytes[i], self.tops[i])
                for i in range(self.n)
            ],
            policy_version=self.version,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=sum(len(t) for t in self.tokens),
        )

    def finish_events(
        self,
        rewards: list[float | None],
        ranks: list[int],
        versions: dict[str, str],
        usage: dict[str, int] | None = None,
    ) -> list[str]:
        """Each choice's last chunk (finish reason, reward, rank, and the log-probs of tokens
        not reported yet), the usage chunk when asked for, and ``[DONE]``."""
        out = [
            self._chunk(
                [delta(i, finish_reason=finish_reason_of(self.finish[i]), reward=rewards[i], rank=ranks[i],
                       logprobs=self._unreported(i))],
                **versions,
            )
            for i in range(self.n)
        ]
        if usage is not None:
            out.append(self._chunk([], usage=usage))
        out.append(DONE)
        return out


def ranked_events(
    resp: ChatCompletionResponse, include_usage: bool, extra: dict[str, Any] | None = None
) -> Iterator[str]:
    """The frames of a completion already generated, ranked and stored: its choices, best
    first, each as a role chunk, one content chunk and a closing chunk."""
    versions = {"policy_version": resp.policy_version, "reward_version": resp.reward_version}

    def frame(choices: list[dict], **more: Any) -> str:
        return chunk(resp.id, resp.created, resp.model, choices, **more)

    for ch in resp.choices:
        content = None if ch.logprobs is None else [t.model_dump() for t in ch.logprobs.content or []]
        yield frame([delta(ch.index, role="assistant", content="")], **versions, **(extra or {}))
        if ch.message.content:
            yield frame([delta(ch.index, content=ch.message.content, logprobs=content)])
            content = None if content is None else []
        yield frame([delta(ch.index, finish_reason=ch.finish_reason, reward=ch.reward, rank=ch.index,
                           logprobs=content)], **versions)
    if include_usage:
        yield frame([], usage=resp.usage.model_dump(), **versions)
    yield DONE
