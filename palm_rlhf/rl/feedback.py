"""Human feedback turned into training data, free of any storage or transport.

The feedback log (the gateway's store, an export file, a test fixture) is read through two
duck-typed shapes: a *feedback record* (``id``, ``completion_id``, ``kind`` in
``thumbs | rating | preference``, ``choice_index``, ``value``, ``preferred_index``,
``rejected_index``) and a *completion record* (``id``, ``prompt_text``,
``prompt_token_ids``, ``candidates`` each with ``index``, ``text``, ``token_ids``). Anything
with those attributes works, so the online loop and the tests share this code.

What becomes what:

- an explicit preference (candidate A beat candidate B) is one pair;
- thumbs up versus thumbs down *on the same prompt* is a pair: across the candidates of one
  completion, and across completions whose prompt text is the same (people asking the same
  question get different samples, and their verdicts compare them);
- a 1..5 rating is a label 0..4 for the reward model's binned head.

Every example carries a deterministic ``heldout`` flag derived from its prompt text, so the
same prompt always lands on the same side of the split, round after round: the held-out side
checks the reward model and gates the policy, the other side trains.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_HELDOUT_FRACTION = 0.2
# A popular prompt with many thumbs would otherwise yield up * down pairs and drown the rest.
DEFAULT_MAX_THUMB_PAIRS_PER_PROMPT = 16


def is_heldout(prompt_text: str, fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    """Whether a prompt belongs to the held-out split: a stable hash of the text, so the
    decision never changes between rounds or processes (unlike Python's salted ``hash``)."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    h = int.from_bytes(hashlib.sha256(prompt_text.encode("utf-8")).digest()[:8], "big")
    return (h / 2**64) < fraction


@dataclass
class PreferencePair:
    """``chosen`` beat ``rejected`` as answers to ``prompt_text``."""

    prompt_text: str
    prompt_token_ids: list[int]
    chosen: str
    rejected: str
    chosen_token_ids: list[int]
    rejected_token_ids: list[int]
    source: str  # "preference" | "thumbs"
    feedback_id: int  # the (newest) feedback row that produced it
    heldout: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"type": "pair", **asdict(self)}


@dataclass
class RatingExample:
    """A rated answer; ``label`` is the rating minus one (0..4), the bin of the reward head."""

    prompt_text: str
    prompt_token_ids: list[int]
    response: str
    response_token_ids: list[int]
    label: int
    feedback_id: int
    heldout: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"type": "rating", **asdict(self)}


@dataclass
class ThumbExample:
    """One thumbs verdict, kept so that later verdicts on the same prompt can pair with it."""

    prompt_text: str
    prompt_token_ids: list[int]
    response: str
    response_token_ids: list[int]
    up: bool
    feedback_id: int
    completion_id: str
    candidate_index: int
    heldout: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"type": "thumb", **asdict(self)}


@dataclass
class PromptExample:
    """A prompt people asked: the policy trains (or is evaluated) on these."""

    prompt_text: str
    prompt_token_ids: list[int]
    feedback_id: int
    heldout: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"type": "prompt", **asdict(self)}


@dataclass
class FeedbackBatch:
    """What one read of the log produced. ``last_feedback_id`` is the cursor to store."""

    pairs: list[PreferencePair] = field(default_factory=list)
    ratings: list[RatingExample] = field(default_factory=list)
    thumbs: list[ThumbExample] = field(default_factory=list)
    prompts: list[PromptExample] = field(default_factory=list)
    last_feedback_id: int = 0
    feedback_count: int = 0
    skipped: int = 0  # rows that could not be used (unknown completion, bad index)

    def records(self) -> list[dict[str, Any]]:
        """Every example as a JSON-ready dict with a ``type`` key (for an append-only file)."""
        return [x.to_dict() for x in (*self.prompts, *self.pairs, *self.ratings, *self.thumbs)]


_BUILDERS = {"pair": PreferencePair, "rating": RatingExample, "thumb": ThumbExample, "prompt": PromptExample}


def example_from_dict(d: dict[str, Any]) -> PreferencePair | RatingExample | ThumbExample | PromptExample:
    """Inverse of ``to_dict`` (used when reading the trainer's data file back)."""
    d = dict(d)
    kind = d.pop("type", None)
    if kind not in _BUILDERS:
        raise ValueError(f"unknown training record type {kind!r}")
    return _BUILDERS[kind](**d)


def _candidate(completion: Any, index: int | None):
    if index is None:
        return None
    for c in completion.candidates:
        if c.index == index:
            return c
    return None


def _response_ids(candidate: Any) -> list[int]:
    return [int(t) for t in (getattr(candidate, "token_ids", None) or [])]


def convert_feedback(
    feedback: Iterable[Any],
    get_completion: Callable[[str], Any],
    prior_thumbs: Sequence[ThumbExample] = (),
    *,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    max_thumb_pairs_per_prompt: int = DEFAULT_MAX_THUMB_PAIRS_PER_PROMPT,
    since_id: int = 0,
) -> FeedbackBatch:
    """Convert feedback rows (in id order) into pairs, rating labels, thumbs and prompts.

    ``get_completion(completion_id)`` returns the completion record (it may raise ``KeyError``
    or any ``LookupError``-like error for an unknown id: such rows are counted in ``skipped``).
    ``prior_thumbs`` are thumbs read in earlier rounds (those after ``since_id`` are ignored:
    they are in ``feedback`` again); a new thumb pairs with an opposite
    prior thumb on the same prompt text, so pairs form even when the two verdicts arrive in
    different rounds. Pairs whose two answers have the same text carry no signal and are
    dropped, as are duplicate pairs."""
    out = FeedbackBatch(last_feedback_id=int(since_id))
    cache: dict[str, Any] = {}
    seen_prompts: set[str] = set()
    seen_pairs: set[tuple[str, str, str]] = set()
    by_prompt: dict[str, list[ThumbExample]] = {}
    for t in prior_thumbs:
        if t.feedback_id <= since_id:  # later ones are being read again now (after a crash)
            by_prompt.setdefault(t.prompt_text, []).append(t)
    pairs_from_thumbs: dict[str, int] = {}

    def add_pair(pair: PreferencePair) -> None:
        key = (pair.prompt_text, pair.chosen, pair.rejected)
        if pair.chosen == pair.rejected or key in seen_pairs:
            return
        seen_pairs.add(key)
        out.pairs.append(pair)

    for fb in feedback:
        out.feedback_count += 1
        out.last_feedback_id = max(out.last_feedback_id, int(fb.id))
        comp = cache.get(fb.completion_id)
        if comp is None:
            try:
                comp = get_completion(fb.completion_id)
            except Exception:  # noqa: BLE001 -- a row we cannot resolve is skipped, not fatal
                out.skipped += 1
                continue
            cache[fb.completion_id] = comp
        prompt = comp.prompt_text
        prompt_ids = [int(t) for t in comp.prompt_token_ids]
        held = is_heldout(prompt, heldout_fraction)
        if prompt not in seen_prompts:
            seen_prompts.add(prompt)
            out.prompts.append(PromptExample(prompt, prompt_ids, int(fb.id), held))
        if fb.kind == "preference":
            good, bad = _candidate(comp, fb.preferred_index), _candidate(comp, fb.rejected_index)
            if good is None or bad is None:
                out.skipped += 1
                continue
            add_pair(
                PreferencePair(
                    prompt,
                    prompt_ids,
                    good.text,
                    bad.text,
                    _response_ids(good),
                    _response_ids(bad),
                    "preference",
                    int(fb.id),
                    held,
                )
            )
        elif fb.kind == "rating":
            cand = _candidate(comp, fb.choice_index)
            if cand is None or fb.value is None or not 1 <= int(fb.value) <= 5:
                out.skipped += 1
                continue
            out.ratings.append(
                RatingExample(
                    prompt, prompt_ids, cand.text, _response_ids(cand), int(fb.value) - 1, int(fb.id), held
                )
            )
        elif fb.kind == "thumbs":
            cand = _candidate(comp, fb.choice_index)
            if cand is None or fb.value not in (1, -1):
                out.skipped += 1
                continue
            thumb = ThumbExample(
                prompt,
                prompt_ids,
                cand.text,
                _response_ids(cand),
                fb.value == 1,
                int(fb.id),
                str(comp.id),
                int(cand.index),
                held,
            )
            for other in by_prompt.get(prompt, []):
                if other.up == thumb.up:
                    continue
                if pairs_from_thumbs.get(prompt, 0) >= max_thumb_pairs_per_prompt:
                    break
                up, down = (thumb, other) if thumb.up else (other, thumb)
                before = len(out.pairs)
                add_pair(
                    PreferencePair(
                        prompt,
                        prompt_ids,
                        up.response,
                        down.response,
                        up.response_token_ids,
                        down.response_token_ids,
                        "thumbs",
                        int(fb.id),
                        held,
                    )
                )
                if len(out.pairs) > before:
                    pairs_from_thumbs[prompt] = pairs_from_thumbs.get(prompt, 0) + 1
            by_prompt.setdefault(prompt, []).append(thumb)
            out.thumbs.append(thumb)
        else:
            out.skipped += 1
    return out


def split_heldout(examples: Iterable[Any]) -> tuple[list[Any], list[Any]]:
    """(train, held-out) by each example's ``heldout`` flag."""
    train, held = [], []
    for x in examples:
        (held if x.heldout else train).append(x)
    return train, held
