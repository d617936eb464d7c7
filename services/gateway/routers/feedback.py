"""Stored completions, feedback on them, and the export of the whole log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from services.common.feedback_store import (
    CompletionNotFound,
    FeedbackRecord,
    IdempotencyConflict,
    InvalidFeedback,
)

from ..errors import APIError, documented
from ..schemas import CandidateView, CompletionView, FeedbackList, FeedbackRequest, FeedbackResponse
from ..state import Admin, Authorized, State

router = APIRouter(tags=["feedback"])


def _not_found(e: CompletionNotFound) -> APIError:
    return APIError(404, str(e), param="completion_id")


def _check_owner(state, client, owner: str, completion_id: str) -> None:
    """With API keys, a completion is visible (and can be rated) only by the key that created
    it, and by the admin token; another key gets the same 404 as for an id that does not exist."""
    if len(state.keyring) and client.id != "admin" and owner != client.id:
        raise _not_found(CompletionNotFound(f"no completion with id {completion_id!r}"))


async def _owned(state, client, completion_id: str) -> None:
    if not len(state.keyring) or client.id == "admin":  # nothing to check: skip the read
        return
    try:
        owner = await state.storage.owner(completion_id)
    except CompletionNotFound as e:
        raise _not_found(e) from None
    _check_owner(state, client, owner, completion_id)


@router.get("/v1/completions/{completion_id}", response_model=CompletionView, responses=documented(404))
async def get_completion(completion_id: str, client: Authorized, state: State) -> CompletionView:
    """A stored completion with every candidate (shown or not) and its reward, in rank order."""
    try:
        rec = await state.storage.completion(completion_id)
    except CompletionNotFound as e:
        raise _not_found(e) from None
    _check_owner(state, client, rec.client_id, completion_id)
    return CompletionView(
        id=rec.id,
        created=rec.created_at,
        model=rec.model,
        messages=rec.messages,
        n=rec.n,
        best_of=rec.best_of,
        policy_version=rec.policy_version,
        reward_version=rec.reward_version,
        candidates=[
            CandidateView(index=c.index, text=c.text, reward=c.reward, finish_reason=c.finish_reason, shown=c.shown)
            for c in rec.candidates
        ],
    )


def feedback_view(fb: FeedbackRecord) -> FeedbackResponse:
    return FeedbackResponse(
        id=fb.id,
        completion_id=fb.completion_id,
        kind=fb.kind,
        choice_index=fb.choice_index,
        thumbs=None if fb.kind != "thumbs" else ("up" if fb.value == 1 else "down"),
        rating=fb.value if fb.kind == "rating" else None,
        preferred_index=fb.preferred_index,
        rejected_index=fb.rejected_index,
        comment=fb.comment,
        created=fb.created_at,
    )


@router.post("/v1/feedback", response_model=FeedbackResponse, responses=documented(404, 409, 422))
async def post_feedback(
    body: FeedbackRequest,
    client: Authorized,
    state: State,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Retries with the same key are stored once and get the same answer",
        ),
    ] = None,
) -> FeedbackResponse:
    """Thumbs, a 1-5 rating, or a preference between two candidates of a stored completion.
    With an ``Idempotency-Key`` header a retried post is stored once and answered the same."""
    kind = body.kind
    value = None
    if kind == "thumbs":
        value = 1 if body.thumbs == "up" else -1
    elif kind == "rating":
        value = body.rating
    await _owned(state, client, body.completion_id)
    try:
        fb, _ = await state.storage.add_feedback(
            body.completion_id,
            kind=kind,
            choice_index=body.choice_index,
            value=value,
            preferred_index=body.preferred_index,
            rejected_index=body.rejected_index,
            comment=body.comment,
            client_id=client.id,
            idempotency_key=idempotency_key,
        )
    except CompletionNotFound as e:
        raise _not_found(e) from None
    except InvalidFeedback as e:
        raise APIError(422, str(e), code="index_out_of_range") from None
    except IdempotencyConflict as e:
        raise APIError(409, str(e), param="Idempotency-Key", code="idempotency_key_reused") from None
    return feedback_view(fb)


@router.get("/v1/feedback", response_model=FeedbackList, responses=documented(404))
async def get_feedback(
    client: Authorized, state: State, completion_id: Annotated[str, Query(min_length=1, max_length=128)]
) -> FeedbackList:
    """All feedback on one completion, oldest first."""
    await _owned(state, client, completion_id)
    try:
        rows = await state.storage.list_feedback(completion_id)
    except CompletionNotFound as e:
        raise _not_found(e) from None
    return FeedbackList(data=[feedback_view(f) for f in rows])


@router.get(
    "/v1/feedback/export",
    responses={
        200: {
            "description": "JSON lines: one stored completion per line, with every candidate and its feedback",
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
        },
        **documented(403),
    },
    response_class=StreamingResponse,
)
async def export_feedback(
    admin: Admin,
    state: State,
    after_seq: Annotated[int, Query(ge=0, le=2**62, description="Only completions after this seq")] = 0,
    with_feedback_only: Annotated[bool, Query(description="Skip completions without feedback")] = False,
) -> StreamingResponse:
    """The log as JSON lines, for the admin token only (a gateway without one refuses it,
    unless it was started with --insecure-no-auth on a loopback address)."""
    return StreamingResponse(state.storage.export_lines(after_seq, with_feedback_only), media_type="application/x-ndjson")
