"""``POST /v1/completions``: OpenAI's legacy completions (raw text prompts), best-of-n ranked.

Each prompt is completed as raw text (no chat format, no newline stop): ``best_of``
candidates are sampled, scored by the reward service, and the ``n`` best returned, best first.
Every prompt's interaction is stored in the feedback log like a chat completion, under the
response id (one prompt) or ``<id>-<i>`` (prompt ``i`` of a list), listed in
``palm_rlhf.completion_ids``. With ``stream=true`` the choices are sent once ranked, each whole.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from .. import logprobs as lp
from ..admission import ClientGone, until_disconnect
from ..backends import BackendError
from ..errors import backend_http_error, doc, documented
from ..schemas import (
    CompletionChoice,
    CompletionExtras,
    CompletionRequest,
    CompletionResponse,
    LegacyLogprobs,
    Usage,
)
from ..state import Authorized, Client, GatewayState, State
from ..streaming import DONE, SSE_HEADERS, sse
from .chat import SSE_EVENT, controls_record, sampling_options
from .models import model_not_found

router = APIRouter(tags=["completions"])


def _record_sampling(req: CompletionRequest) -> dict[str, Any]:
    return {
        "endpoint": "completions",
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "max_tokens": req.max_tokens,
        "stop": req.stop_list(),
        "seed": req.seed,
        "stream": req.stream,
        **controls_record(req),
        **({"logprobs": req.logprobs} if req.logprobs is not None else {}),
    }


async def _one(state: GatewayState, req: CompletionRequest, client: Client, prompt: str, completion_id: str,
               started: float):  # fmt: skip
    best_of = req.best_of or req.n
    params = sampling_options(req, req.max_tokens, req.stop_list(), req.logprobs or 0)
    gen = await state.ranking.generate(prompt, best_of, params)
    texts = [c.text for c in sorted(gen.candidates, key=lambda c: c.sample_index)]
    scored = await state.ranking.score(prompt, texts)
    rec, _ = await state.storage.record(
        model=req.model,
        messages=[],
        prompt_text=prompt,
        sampling=_record_sampling(req),
        client_id=client.id,
        gen=gen,
        texts=texts,
        scores=scored.scores,
        reward_version=scored.reward_version,
        n=req.n,
        started=started,
        completion_id=completion_id,
    )
    return gen, rec


def _choices(req: CompletionRequest, i: int, prompt: str, gen, rec) -> list[CompletionChoice]:
    by_sample = {c.sample_index: c for c in gen.candidates}
    out = []
    for c in rec.candidates[: req.n]:
        logprobs = None
        if req.logprobs is not None:
            g = by_sample[c.sample_index]
            logprobs = LegacyLogprobs(**lp.legacy(g.logprobs, g.token_bytes, g.top_logprobs, req.logprobs, len(prompt)))
        out.append(CompletionChoice(
            text=c.text,
            index=i * req.n + c.index,
            logprobs=logprobs,
            finish_reason="length" if c.finish_reason == "length" else "stop",
            reward=c.reward,
        ))
    return out


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={
        200: {
            "description": "The completion; with stream=true, server-sent events of text_completion "
            "objects (each choice whole, once ranked) ending with 'data: [DONE]'",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        },
        **documented(503),
        404: doc(404, "Unknown model (code model_not_found)"),
    },
)
async def completions(req: CompletionRequest, client: Authorized, state: State, request: Request):
    """Legacy best-of-n text completion of one prompt or a list of prompts: choice ``index`` is
    ``prompt index x n + rank``. ``echo`` and ``suffix`` are refused with a 400."""
    started = time.perf_counter()
    if req.model not in state.known_models:
        raise model_not_found(state, req.model, "model")
    prompts = req.prompts()
    cid = "cmpl-" + uuid.uuid4().hex
    ids = [cid] if len(prompts) == 1 else [f"{cid}-{i}" for i in range(len(prompts))]
    slot = state.admission.slot()
    try:
        work = asyncio.gather(*(_one(state, req, client, p, ids[i], started) for i, p in enumerate(prompts)))
        try:
            results = await until_disconnect(request.receive, work)
        except BackendError as e:
            raise backend_http_error(e) from None
        except ClientGone:
            state.metrics.client_gone.inc()
            return Response(status_code=499)
    finally:
        slot.release()
    choices = [ch for i, (p, (gen, rec)) in enumerate(zip(prompts, results)) for ch in _choices(req, i, p, gen, rec)]
    prompt_tokens = sum(gen.prompt_tokens for gen, _ in results)
    completion_tokens = sum(gen.completion_tokens for gen, _ in results)
    first = results[0][1]
    resp = CompletionResponse(
        id=cid,
        created=int(first.created_at),
        model=req.model,
        choices=choices,
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens),
        policy_version=first.policy_version,
        reward_version=first.reward_version,
        best_of=req.best_of or req.n,
        system_fingerprint=first.policy_version or None,
        palm_rlhf=CompletionExtras(completion_ids=ids),
    )
    if not req.stream:
        return resp
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(_events(resp, include_usage), media_type="text/event-stream", headers=SSE_HEADERS)


async def _events(resp: CompletionResponse, include_usage: bool) -> AsyncIterator[str]:
    head = {"id": resp.id, "object": "text_completion", "created": resp.created, "model": resp.model}
    versions = {"policy_version": resp.policy_version, "reward_version": resp.reward_version}
    for ch in resp.choices:
        body = ch.model_dump()
        body["finish_reason"] = None
        yield sse({**head, "choices": [body], **versions, "palm_rlhf": resp.palm_rlhf.model_dump()})
        yield sse({**head, "choices": [{"text": "", "index": ch.index, "logprobs": None,
                                        "finish_reason": ch.finish_reason, "reward": ch.reward}], **versions})
    if include_usage:
        yield sse({**head, "choices": [], "usage": resp.usage.model_dump(), **versions})
    yield DONE
