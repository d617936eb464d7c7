"""``POST /v1/chat/completions``: best-of-n chat completions, plain or streamed."""

from __future__ import annotations

import time
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from .. import logprobs as lp
from ..admission import ClientGone, until_disconnect
from ..backends import BackendError, SamplingOptions, StreamEvent
from ..conversation import FittedPrompt
from ..errors import backend_http_error, doc, documented, in_band_error
from ..ranking import finite
from ..schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    GatewayExtras,
    SamplingRequest,
    TokenLogprob,
    Usage,
)
from ..state import Authorized, Client, GatewayState, State
from ..streaming import SSE_HEADERS, LiveStream, ranked_events, sse
from .models import model_not_found

router = APIRouter(tags=["chat"])

DROPPED_TURNS_HEADER = "X-Palm-Rlhf-Dropped-Turns"

# One server-sent event of a streamed completion: ``data`` holds a chat.completion.chunk as
# JSON, or the final ``[DONE]``.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    "required": ["data"],
}


def sampling_options(req: SamplingRequest, max_tokens: int | None, stop: list[str], top_n: int) -> SamplingOptions:
    """The request's sampling controls as the policy takes them."""
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        stop=stop,
        seed=req.seed,
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logit_bias=req.logit_bias_ids(),
        min_tokens=req.min_tokens,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        top_logprobs=top_n,
    )


def sampling_of(req: ChatCompletionRequest, max_tokens: int | None) -> SamplingOptions:
    # "\n" ends the answer (a new turn would begin): stopping there saves decoding
    stop = ["\n", *[s for s in req.stop_list() if s != "\n"]]
    return sampling_options(req, max_tokens, stop, req.top_n())


def controls_record(req: SamplingRequest) -> dict[str, Any]:
    """The sampling controls beyond temperature/top-p/top-k, as stored (only those set)."""
    out = {
        "min_p": req.min_p,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "logit_bias": req.logit_bias or None,
        "min_tokens": req.min_tokens,
        "stop_token_ids": req.stop_token_ids or None,
        "ignore_eos": req.ignore_eos or None,
    }
    return {k: v for k, v in out.items() if v is not None}


def sampling_record(req: ChatCompletionRequest, fitted: FittedPrompt) -> dict[str, Any]:
    """The sampling parameters as stored with the completion."""
    return {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "max_tokens": req.max_tokens or req.max_completion_tokens,
        "stop": req.stop_list(),
        "seed": req.seed,
        "stream": req.stream,
        "dropped_turns": fitted.dropped_turns,
        **controls_record(req),
        **({"logprobs": True, "top_logprobs": req.top_n()} if req.logprobs else {}),
    }


async def _record(state: GatewayState, req, client: Client, fitted: FittedPrompt, gen, texts, scored, n, started,
                  completion_id: str | None = None):  # fmt: skip
    return await state.storage.record(
        model=req.model,
        messages=fitted.messages,
        prompt_text=fitted.text,
        sampling=sampling_record(req, fitted),
        client_id=client.id,
        gen=gen,
        texts=texts,
        scores=scored.scores,
        reward_version=scored.reward_version,
        n=n,
        started=started,
        completion_id=completion_id,
    )


def choice_logprobs(gen, sample_index: int, top_n: int) -> ChoiceLogprobs:
    c = next(c for c in gen.candidates if c.sample_index == sample_index)
    content = lp.chat_content(c.logprobs, c.token_bytes, c.top_logprobs, top_n)
    return ChoiceLogprobs(content=[TokenLogprob(**t) for t in content])


def response_of(rec, gen, fitted: FittedPrompt, top_n: int | None = None) -> ChatCompletionResponse:
    """``top_n``: None without logprobs, else the alternatives per token."""
    return ChatCompletionResponse(
        id=rec.id,
        created=int(rec.created_at),
        model=rec.model,
        choices=[
            Choice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                finish_reason="length" if c.finish_reason == "length" else "stop",
                reward=c.reward,
                logprobs=None if top_n is None else choice_logprobs(gen, c.sample_index, top_n),
            )
            for c in rec.candidates[: rec.n]
        ],
        usage=Usage(
            prompt_tokens=gen.prompt_tokens,
            completion_tokens=gen.completion_tokens,
            total_tokens=gen.prompt_tokens + gen.completion_tokens,
        ),
        policy_version=rec.policy_version,
        reward_version=rec.reward_version,
        best_of=rec.best_of,
        system_fingerprint=rec.policy_version or None,
        palm_rlhf=GatewayExtras(dropped_turns=fitted.dropped_turns),
    )


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={
        200: {
            "description": "The completion; with stream=true, server-sent events of "
            "chat.completion.chunk objects ending with 'data: [DONE]'",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
            "headers": {
                DROPPED_TURNS_HEADER: {
                    "description": "Messages left out, oldest first, so that the conversation fits the model",
                    "schema": {"type": "integer"},
                }
            },
        },
        **documented(503),
        404: doc(404, "Unknown model (code model_not_found)"),
    },
)
async def chat_completions(
    req: ChatCompletionRequest, client: Authorized, state: State, response: Response, request: Request
):
    """Best-of-n chat completion: ``best_of`` candidates are sampled, scored by the reward
    service, and the ``n`` best returned, best first, each with its reward. A conversation too
    long for the model loses its oldest exchanges first (reported in ``palm_rlhf.dropped_turns``
    and the ``X-Palm-Rlhf-Dropped-Turns`` header); ``max_tokens`` defaults to the room left.
    Over the gateway's in-flight cap the answer is 503 with Retry-After; a client that
    disconnects before its answer stops the generation and nothing is stored."""
    started = time.perf_counter()
    if req.model not in state.known_models:
        raise model_not_found(state, req.model, "model")
    fitted = await state.fitter.fit(
        [m.model_dump(exclude_none=True) for m in req.messages], req.max_tokens or req.max_completion_tokens
    )
    n = req.n
    best_of = req.best_of or n
    params = sampling_of(req, fitted.max_tokens)
    stops = req.stop_list()
    headers = {DROPPED_TURNS_HEADER: str(fitted.dropped_turns)}
    if req.stream and best_of == n:
        return await _stream_live(state, req, client, fitted, n, params, stops, started, headers)
    slot = state.admission.slot()
    try:
        try:
            gen, texts, scored = await until_disconnect(
                request.receive, state.ranking.best_of(fitted.text, best_of, params, stops)
            )
        except BackendError as e:
            raise backend_http_error(e) from None
        except ClientGone:
            state.metrics.client_gone.inc()
            return Response(status_code=499)  # nobody reads it; counted under this status
        rec, _ = await _record(state, req, client, fitted, gen, texts, scored, n, started)
    finally:
        slot.release()
    if req.stream:
        return _stream_ranked(req, rec, gen, fitted, headers)
    response.headers.update(headers)
    return response_of(rec, gen, fitted, _top_n(req))


def _top_n(req: ChatCompletionRequest) -> int | None:
    return req.top_n() if req.logprobs else None


def _extras(fitted: FittedPrompt) -> dict[str, Any]:
    return {"palm_rlhf": {"dropped_turns": fitted.dropped_turns}}


def _stream_ranked(req, rec, gen, fitted, headers) -> StreamingResponse:
    """best_of > n: the answer is known only once every candidate is scored, so it was
    generated, ranked and stored first (errors became HTTP statuses); send the chosen ones."""
    resp = response_of(rec, gen, fitted, _top_n(req))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        for frame in ranked_events(resp, include_usage, _extras(fitted)):
            yield frame

    return StreamingResponse(events(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})


async def _stream_live(state, req, client, fitted, n, params, stops, started, headers):
    """best_of == n: every candidate is shown, so tokens are forwarded as the policy makes
    them; rewards come in each choice's last chunk, and the interaction is stored before
    ``[DONE]``."""
    slot = state.admission.slot()
    agen = state.ranking.generate_stream(fitted.text, n, params).__aiter__()
    try:
        first: StreamEvent | None = await agen.__anext__()
    except StopAsyncIteration:
        first = None
    except BackendError as e:
        slot.release()
        raise backend_http_error(e) from None
    except BaseException:
        slot.release()
        raise
    live = LiveStream(
        "chatcmpl-" + uuid.uuid4().hex, int(time.time()), req.model, n, stops, _extras(fitted), _top_n(req)
    )

    async def events() -> AsyncIterator[str]:
        try:
            async for frame in live_events():
                yield frame
        finally:
            slot.release()
            await agen.aclose()  # a client gone mid-stream: the policy stops decoding its rows

    async def live_events() -> AsyncIterator[str]:
        for frame in live.start():
            yield frame
        try:
            ev = first
            while ev is not None:
                for frame in live.feed(ev):
                    yield frame
                try:
                    ev = await agen.__anext__()
                except StopAsyncIteration:
                    ev = None
            texts = live.texts
            scored = await state.ranking.score(fitted.text, texts)
            gen = live.generation()
            rec, order = await _record(state, req, client, fitted, gen, texts, scored, n, started, live.id)
        except Exception as e:  # noqa: BLE001 -- headers are sent: report in-band
            yield sse(in_band_error(e))
            return
        # choices were streamed in sample order; the stored ranks map them for feedback
        rank_of = {s: r for r, s in enumerate(order)}
        usage = None
        if req.stream_options and req.stream_options.include_usage:
            usage = Usage(
                prompt_tokens=gen.prompt_tokens,
                completion_tokens=gen.completion_tokens,
                total_tokens=gen.prompt_tokens + gen.completion_tokens,
            ).model_dump()
        versions = {"policy_version": rec.policy_version, "reward_version": rec.reward_version}
        for frame in live.finish_events(
            [finite(s) for s in scored.scores], [rank_of[i] for i in range(n)], versions, usage
        ):
            yield frame

    out = StreamingResponse(events(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    # a stream cancelled before its first frame never enters events(): release the slot with it
    weakref.finalize(out, slot.release)
    return out
