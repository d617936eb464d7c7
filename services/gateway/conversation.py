"""Conversation fitting: the prompt a chat request becomes, shortened to fit the model.

The policy refuses a prompt whose tokens plus ``max_new_tokens`` exceed the model's
``max_seq_len`` (or whose tokens exceed its ``max_prompt_tokens``). Before generating, the
gateway counts the rendered conversation's tokens as the policy will (its tokenizer, from the
policy's ``ModelInfo``, BOS included) and drops the oldest exchanges until the prompt leaves
room for an answer (:func:`palm_rlhf.chat.fit_messages`); only when the latest user message
(with the system messages) cannot fit is the request refused. When the request leaves
``max_tokens`` unset, the answer may use all the room left in the context, up to the policy's
``max_new_tokens`` limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from palm_rlhf.chat import fit_messages, format_chat

from .errors import APIError

log = logging.getLogger("palm_rlhf.gateway")


@dataclass(frozen=True)
class ContextLimits:
    """What bounds a prompt and its answer on the served model."""

    max_seq_len: int  # prompt tokens + new tokens
    count_tokens: Callable[[str], int]  # tokens of a rendered prompt, as the policy counts them
    max_prompt_tokens: int | None = None  # the policy's prompt limit, when it has one
    max_new_tokens: int | None = None  # the policy's limit on max_tokens, when it has one


class ContextSource(Protocol):
    async def limits(self) -> ContextLimits | None:
        """The served model's limits, or None when they are not known (then nothing is fitted
        and the policy's own checks decide)."""
        ...


@dataclass
class FittedPrompt:
    messages: list[dict[str, Any]]  # the conversation as the model sees it
    text: str  # its rendered prompt
    dropped_turns: int  # messages left out, oldest first
    prompt_tokens: int | None  # None when the limits are unknown
    max_tokens: int | None  # what to ask the policy for (None: the policy's default)


def _render(messages: list[Mapping[str, Any]]) -> str:
    try:
        return format_chat(messages)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None


class ConversationFitter:
    def __init__(self, source: ContextSource | None, min_answer_tokens: int = 32):
        self.source = source
        self.min_answer_tokens = min_answer_tokens

    async def fit(self, messages: list[dict[str, Any]], max_tokens: int | None) -> FittedPrompt:
        """The prompt for ``messages`` (shortened when needed) and the max_tokens to use."""
        text = _render(messages)
        limits = await self.source.limits() if self.source is not None else None
        if limits is None:
            return FittedPrompt(list(messages), text, 0, None, max_tokens)
        if max_tokens is not None and limits.max_new_tokens and max_tokens > limits.max_new_tokens:
            # over the policy's own limit whatever the prompt: the policy refuses it, naming the limit
            return FittedPrompt(list(messages), text, 0, None, max_tokens)
        room = max_tokens
        if room is None:
            room = self.min_answer_tokens
            if limits.max_new_tokens:
                room = min(room, limits.max_new_tokens)
        budget = limits.max_seq_len - room
        if limits.max_prompt_tokens:
            budget = min(budget, limits.max_prompt_tokens)

        def fits(kept: list[Mapping[str, Any]]) -> bool:
            return limits.count_tokens(_render(kept)) <= budget

        found = fit_messages(messages, fits)
        if found is None:
            tokens = limits.count_tokens(_render(_shortest(messages)))
            raise APIError(
                400,
                _too_long(tokens, room, limits, explicit=max_tokens is not None),
                param="messages",
                code="context_length_exceeded",
            )
        kept, dropped = found
        text = _render(kept)
        tokens = limits.count_tokens(text)
        if max_tokens is None:
            max_tokens = limits.max_seq_len - tokens
            if limits.max_new_tokens:
                max_tokens = min(max_tokens, limits.max_new_tokens)
        return FittedPrompt([dict(m) for m in kept], text, dropped, tokens, max_tokens)


def _shortest(messages: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The least a fitted conversation keeps: the system messages and the latest user turn on."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages))
    return [m for i, m in enumerate(messages) if i >= last_user or m.get("role") == "system"]


def _too_long(tokens: int, room: int, limits: ContextLimits, *, explicit: bool) -> str:
    answer = f"max_tokens = {room}" if explicit else f"the least room for an answer ({room} tokens)"
    msg = (
        f"the latest user message is too long for this model: with the system message it is {tokens} "
        f"prompt tokens, and with {answer} it does not fit the model's context of {limits.max_seq_len} tokens"
    )
    if limits.max_prompt_tokens and tokens > limits.max_prompt_tokens:
        msg += f" (the policy accepts prompts of at most {limits.max_prompt_tokens} tokens)"
    longest_prompt = min(limits.max_seq_len - 1, limits.max_prompt_tokens or limits.max_seq_len)
    if explicit and tokens <= longest_prompt:  # the message would fit with a shorter answer
        msg += "; ask for fewer max_tokens"
    else:
        msg += "; shorten the message"
    return msg


class PolicyContext:
    """:class:`ContextSource` from the policy service's ``ModelInfo`` (its ``max_seq_len``, its
    limits and its tokenizer), asked again every ``ttl_s`` seconds so that a new policy version
    with another context is noticed. When the policy cannot be asked, the last answer is used
    (or None before the first)."""

    def __init__(self, policy_addr: str, *, timeout_s: float = 5.0, ttl_s: float = 30.0):
        self.addr = policy_addr
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._channel = None
        self._stub = None
        self._cached: ContextLimits | None = None
        self._at = -float("inf")
        self._key: tuple | None = None
        self._lock = asyncio.Lock()

    def _connect(self):
        if self._stub is None:
            from palm_rlhf.proto.v1 import policy_pb2_grpc
            from services.common.client import create_channel

            self._channel = create_channel(self.addr, retries=0)
            self._stub = policy_pb2_grpc.PolicyStub(self._channel)
        return self._stub

    async def limits(self) -> ContextLimits | None:
        if time.monotonic() - self._at < self.ttl_s:
            return self._cached
        async with self._lock:
            if time.monotonic() - self._at < self.ttl_s:
                return self._cached
            from palm_rlhf.proto.v1 import common_pb2

            try:
                info = await self._connect().ModelInfo(common_pb2.ModelInfoRequest(), timeout=self.timeout_s)
            except Exception as e:  # noqa: BLE001 -- unknown limits: the policy's own checks decide
                log.info("policy ModelInfo failed (%s); using the last known context", type(e).__name__)
                return self._cached
            self._cached = self._limits_of(info)
            self._at = time.monotonic()
            return self._cached

    def _limits_of(self, info) -> ContextLimits | None:
        if not info.max_seq_len:
            return None
        tok_spec = info.tokenizer.spec_json or ""
        key = (tok_spec, info.max_seq_len, info.max_prompt_tokens, info.max_new_tokens)
        if key == self._key and self._cached is not None:
            return self._cached
        from palm_rlhf.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(json.loads(tok_spec) if tok_spec else None)
        except Exception as e:  # noqa: BLE001 -- a tokenizer the gateway cannot rebuild: no fitting
            log.warning("cannot rebuild the policy's tokenizer (%s): conversations are not fitted", e)
            return None
        bos = int(info.tokenizer.bos_id)
        self._key = key
        return ContextLimits(
            max_seq_len=int(info.max_seq_len),
            count_tokens=lambda text: len([bos, *tok.encode(text)]),
            max_prompt_tokens=int(info.max_prompt_tokens) or None,
            max_new_tokens=int(info.max_new_tokens) or None,
        )

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
