"""The chat format shared by the demo corpus, the gateway and the trainer.

A conversation is rendered as lines ``User: ...`` and ``Assistant: ...``; the prompt ends
with ``Assistant:`` and the model answers with one line closed by the tokenizer's EOS id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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


def clean_response(text: str) -> str:
    """The answer proper: up to the first newline (a new turn), without control characters
    (a sampled form feed or escape byte must not reach a terminal or a web page) or
    surrounding spaces."""
    return strip_control(text.split("\n", 1)[0]).strip()
