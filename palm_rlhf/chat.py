"""The chat format shared by the demo corpus, the gateway and the trainer.

A conversation is rendered as lines ``User: ...`` and ``Assistant: ...``; the prompt ends
with ``Assistant:`` and the model answers with one line closed by the tokenizer's EOS id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from palm_rlhf.stops import cut_at_stops

# where an answer ends besides the caller's stop strings: a newline starts a new turn
TURN_END = "\n"

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def format_chat(messages: Iterable[Mapping[str, str]]) -> str:
    """Render messages ({"role", "content"}) into the prompt text the model continues."""
    lines = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: role must be one of {sorted(ROLES)}, got {role!r}")
        content = " ".join(str(m.get("content", "")).split())  # one line per turn
        lines.append(f"{ROLES[role]}: {content}")
    if not lines:
        raise ValueError("at least one message is needed")
    return "\n".join(lines) + "\nAssistant:"


def encode_prompt(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_id] + tokenizer.encode(text)


_CONTROL = {c: None for c in range(32) if c not in (9, 10)} | {127: None}


def strip_control(text: str) -> str:
    """``text`` without control characters other than tab and newline."""
    return text.translate(_CONTROL)


def answer_stops(stops: Iterable[str] = ()) -> list[str]:
    """The stop strings that end an answer: a newline (a new turn) and the caller's own."""
    return [TURN_END, *(s for s in stops if s and s != TURN_END)]


def clean_response(text: str, stops: Iterable[str] = ()) -> str:
    """The answer proper: up to the first newline (a new turn) or stop string (see
    :mod:`palm_rlhf.stops`), without control characters (a sampled form feed or escape byte
    must not reach a terminal or a web page) or surrounding spaces."""
    return strip_control(cut_at_stops(text, answer_stops(stops))).strip()


def fit_messages(
    messages: Sequence[Mapping[str, str]], fits: Callable[[list[Mapping[str, str]]], bool]
) -> tuple[list[Mapping[str, str]], int] | None:
    """The conversation without its oldest exchanges, as few dropped as ``fits`` allows.

    Turns are dropped from the front in whole exchanges (a user message and the replies up to
    the next user message); system messages and everything from the latest user message on
    are always kept. Returns ``(kept, dropped)``, ``dropped`` counting the messages left out,
    or None when even the shortest conversation does not fit."""
    msgs = list(messages)
    last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=len(msgs))
    droppable = [i for i in range(last_user) if msgs[i].get("role") != "system"]
    first = droppable[0] if droppable else last_user
    # where the kept part may begin: the oldest exchange first, then each later one
    cuts = [0, *(i for i in droppable if i > first and msgs[i].get("role") == "user"), last_user]
    cuts = list(dict.fromkeys(cuts))

    def kept(cut: int) -> list[Mapping[str, str]]:
        return [m for i, m in enumerate(msgs) if i >= cut or m.get("role") == "system"]

    if fits(msgs):
        return msgs, 0
    # dropping more never makes a conversation longer: find the first cut that fits by bisection
    lo, hi = 1, len(cuts) - 1
    if not fits(kept(cuts[hi])):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(kept(cuts[mid])):
            hi = mid
        else:
            lo = mid + 1
    out = kept(cuts[lo])
    return out, len(msgs) - len(out)
