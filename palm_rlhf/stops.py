"""Where an answer ends: the one rule for stop strings, shared by the policy service, the
gateway and the chat helpers.

An answer ends at the earliest occurrence of any of its stop strings (the stop string itself
is not part of the answer). While text is still arriving, a tail that could be the start of a
stop string must be held back: it is only known to be answer text once the next characters
rule the stop out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class StopScan:
    """Where ``text`` ends under a set of stop strings.

    ``end``: the answer is ``text[:end]`` (``len(text)`` when no stop string occurs).
    ``stopped``: a stop string occurs in ``text``.
    ``matched``: the stop string found at ``end`` ("" when none; the longest one when several
    start there).
    ``safe``: how much of ``text`` may be sent while more text may still follow: ``end`` when
    stopped, else ``text`` without its longest tail that is a proper prefix of a stop string.
    """

    end: int
    stopped: bool
    matched: str
    safe: int


def scan_stops(text: str, stops: Iterable[str]) -> StopScan:
    """Find where ``text`` ends under ``stops`` (empty stop strings are ignored)."""
    stops = [s for s in stops if s]
    end, matched = len(text), ""
    for s in stops:
        i = text.find(s, 0, end + len(s))  # an occurrence starting after ``end`` cannot win
        if i < 0:
            continue
        if i < end or (i == end and len(s) > len(matched)):
            end, matched = i, s
    if matched:
        return StopScan(end=end, stopped=True, matched=matched, safe=end)
    hold = 0
    for s in stops:
        # the longest tail of text that a later character could complete into ``s``
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return StopScan(end=end, stopped=False, matched="", safe=len(text) - hold)


def cut_at_stops(text: str, stops: Iterable[str]) -> str:
    """``text`` up to its first stop string (all of it when none occurs)."""
    return text[: scan_stops(text, stops).end]
