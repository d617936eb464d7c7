"""Log-probabilities in OpenAI's shapes, from the policy's per-token log-probs and alternatives.

Every log-prob is under the model's own distribution (temperature 1, before the logit bias,
penalties, top-k, top-p and min-p), as OpenAI reports them; ``token`` is the token's bytes as
text (a byte sequence that is not valid UTF-8 on its own is written with ``\\x`` escapes) and
``bytes`` the bytes themselves.
"""

from __future__ import annotations

from typing import Any

from .backends import Alternative


def token_text(data: bytes) -> str:
    return data.decode("utf-8", errors="backslashreplace")


def _bytes_of(tokens: list[bytes], i: int) -> bytes:
    return tokens[i] if i < len(tokens) else b""


def chat_content(
    logprobs: list[float], token_bytes: list[bytes], tops: list[list[Alternative]], top_n: int
) -> list[dict[str, Any]]:
    """``choices[i].logprobs.content`` of a chat completion (or of one chunk of it)."""
    out = []
    for i, lp in enumerate(logprobs):
        data = _bytes_of(token_bytes, i)
        alts = tops[i][:top_n] if i < len(tops) else []
        out.append({
            "token": token_text(data),
            "logprob": lp,
            "bytes": list(data),
            "top_logprobs": [{"token": token_text(b), "logprob": alp, "bytes": list(b)} for _, alp, b in alts],
        })
    return out


def legacy(
    logprobs: list[float], token_bytes: list[bytes], tops: list[list[Alternative]], top_n: int, offset: int
) -> dict[str, Any]:
    """``choices[i].logprobs`` of a legacy completion: tokens, token_logprobs, top_logprobs (a
    token -> log-prob object per position) and text_offset (character offsets of each token in
    prompt + completion, so the first is the prompt's length)."""
    tokens = [token_text(_bytes_of(token_bytes, i)) for i in range(len(logprobs))]
    offsets, seen = [], b""
    for i in range(len(logprobs)):
        offsets.append(offset + len(seen.decode("utf-8", errors="ignore")))
        seen += _bytes_of(token_bytes, i)
    top = [
        {token_text(b): alp for _, alp, b in (tops[i][:top_n] if i < len(tops) else [])} for i in range(len(logprobs))
    ]
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets}
