"""The demo corpus: short chat exchanges written from templates over a varied vocabulary.

Every exchange is a user question and a one-line assistant answer in the chat format of
:mod:`palm_rlhf.chat` (``User: ...`` / ``Assistant: ...``). Answers are cheerful, gloomy or
neutral in equal shares, so that a model pretrained here says all three kinds of things and
RLHF toward one sentiment has room to move; VADER's lexicon (``vaderSentiment``) rates the
cheerful answers positive and the gloomy ones negative, which the tests check.

All text comes from templates written for this package, so the corpus carries no licence of
its own. They are data files in ``assets/corpus/`` (UTF-8 JSON), read once at import:

``slots.json``
    Slot values shared by every topic: ``{"city": ["Paris", ...], "day": [...], ...}``.
``topics.json``
    A list of topics, each ``{"name", "slots", "questions", "cheerful", "gloomy", "neutral",
    "things"}``: the topic's own slot values, its question templates, its answer templates
    for each sentiment, and the noun phrases (``{thing}``) the generic answers talk about.
``answers.json``
    ``generic`` (answers that fit any topic, per sentiment), ``openers`` and ``closers``
    (optional first and last sentences of an answer, per sentiment) and
    ``question_prefixes`` (greetings put before a question; repeats weigh the draw).

The order of every list is part of the corpus: the generator draws from them with a seeded
:class:`random.Random`, so reordering or editing a file changes the corpus for every seed.

Slots such as ``{city}`` are filled at random (``{City}``: capitalised); a value chosen for
the question is reused by the answer, so answers stay on the question's subject (and the
model has to learn to copy it).

Some filled questions are held out: they never appear in the training corpus, and
:func:`held_out_prompts` lists them for the RLHF loop and for simulated users.

Run as a script::

    python -m palm_rlhf.demo.corpus --out corpus.txt --seed 0 --size 20000

writes ``corpus.txt`` (exchanges separated by a blank line) and ``prompts.txt`` (held-out
user questions, one a line) next to it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SENTIMENTS = ("cheerful", "gloomy", "neutral")

# The template data (see the module docstring for the layout of each file).
DATA_DIR = Path(__file__).resolve().parent / "assets" / "corpus"


@dataclass(frozen=True)
class Topic:
    """Question and answer templates about one subject, with the subject's own slot values.

    ``things`` are noun phrases (templates themselves) that the cross-topic answers in
    :data:`GENERIC_ANSWERS` talk about."""

    name: str
    questions: tuple[str, ...]
    cheerful: tuple[str, ...]
    gloomy: tuple[str, ...]
    neutral: tuple[str, ...]
    things: tuple[str, ...]
    slots: tuple[tuple[str, tuple[str, ...]], ...] = ()


def _load(name: str):
    return json.loads((DATA_DIR / name).read_text(encoding="utf-8"))


def _strings(value, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a non-empty list of strings")
    return tuple(value)


def _string_table(table, where: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(table, dict):
        raise TypeError(f"{where}: expected an object of string lists")
    return {key: _strings(values, f"{where}.{key}") for key, values in table.items()}


def _by_sentiment(table, where: str) -> dict[str, tuple[str, ...]]:
    out = _string_table(table, where)
    if set(out) != set(SENTIMENTS):
        raise ValueError(f"{where}: expected the keys {', '.join(SENTIMENTS)}, got {', '.join(out)}")
    return out


def _topic(entry: dict, where: str) -> Topic:
    fields = ("name", "slots", "questions", "cheerful", "gloomy", "neutral", "things")
    if set(entry) != set(fields):
        raise ValueError(f"{where}: expected the keys {', '.join(fields)}, got {', '.join(entry)}")
    if not isinstance(entry["name"], str):
        raise TypeError(f"{where}.name: expected a string")
    where = f"{where} ({entry['name']})"
    return Topic(
        name=entry["name"],
        slots=tuple(_string_table(entry["slots"], f"{where}.slots").items()),
        **{f: _strings(entry[f], f"{where}.{f}") for f in fields[2:]},
    )


_answers = _load("answers.json")
# Values shared by every topic.
COMMON_SLOTS: dict[str, tuple[str, ...]] = _string_table(_load("slots.json"), "slots.json")
TOPICS: tuple[Topic, ...] = tuple(
    _topic(entry, f"topics.json[{i}]") for i, entry in enumerate(_load("topics.json"))
)
# Answers that fit any topic, about one of the topic's ``things``.
GENERIC_ANSWERS: dict[str, tuple[str, ...]] = _by_sentiment(_answers["generic"], "answers.json:generic")
# Optional first sentences of an answer, in the answer's own sentiment.
OPENERS: dict[str, tuple[str, ...]] = _by_sentiment(_answers["openers"], "answers.json:openers")
# Optional last sentences of an answer.
CLOSERS: dict[str, tuple[str, ...]] = _by_sentiment(_answers["closers"], "answers.json:closers")
# Ways to open a question (repeated values weigh the draw; "" is no prefix).
QUESTION_PREFIXES: tuple[str, ...] = _strings(_answers["question_prefixes"], "answers.json:question_prefixes")
del _answers

MULTI_TURN_FRACTION = 0.08  # exchanges with an earlier turn, so the model has seen history
GENERIC_FRACTION = 0.35  # answers taken from GENERIC_ANSWERS instead of the topic's own
OPENER_FRACTION = 0.3
CLOSER_FRACTION = 0.25
HELD_OUT_MODULUS = 6  # one slot-filled question in six is held out of training

_SLOT = re.compile(r"\{(\w+)\}")
_A_VOWEL = re.compile(r"\b([Aa]) ([aeiouAEIOU])")


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    sentiment: str
    topic: str


@dataclass(frozen=True)
class Exchange:
    """One training unit: one or more turns, rendered by :meth:`text`."""

    turns: tuple[Turn, ...]

    def text(self) -> str:
        return "\n".join(f"User: {t.question}\nAssistant: {t.answer}" for t in self.turns)

    @property
    def last(self) -> Turn:
        return self.turns[-1]


def _fill(template: str, rng: random.Random, slots: dict[str, tuple[str, ...]], bound: dict[str, str]) -> str:
    """Replace ``{slot}`` (``{Slot}``: capitalised) with a value; values chosen earlier in the
    same exchange are reused, and values may contain slots themselves."""

    def sub(m: re.Match) -> str:
        key = m.group(1)
        low = key.lower()
        if low not in bound:
            if low not in slots:
                raise KeyError(f"template {template!r} uses unknown slot {{{key}}}")
            bound[low] = _fill(rng.choice(slots[low]), rng, slots, bound)
        value = bound[low]
        return value[:1].upper() + value[1:] if key[:1].isupper() else value

    return _SLOT.sub(sub, template)


def _topic_slots(topic: Topic) -> dict[str, tuple[str, ...]]:
    slots = dict(COMMON_SLOTS)
    slots.update(dict(topic.slots))
    slots["thing"] = topic.things
    return slots


def is_held_out(question: str) -> bool:
    """True for slot-filled questions reserved for evaluation and RLHF prompts.

    Decided by a stable hash of the question text (without its greeting prefix), so the split
    is the same for every seed and corpus size."""
    return zlib.crc32(question.encode("utf-8")) % HELD_OUT_MODULUS == 0


def _articles(text: str) -> str:
    """Turn the article a into an before a vowel (slot values would make "a engineer")."""
    return _A_VOWEL.sub(lambda m: m.group(1) + "n " + m.group(2), text)


def _add_prefix(question: str, rng: random.Random) -> str:
    prefix = rng.choice(QUESTION_PREFIXES)
    if prefix.endswith((", ", ": ")) and len(question) > 1 and question[1].islower():
        question = question[0].lower() + question[1:]
    return prefix + question


def _question(topic: Topic, rng: random.Random, slots, bound: dict[str, str], held_out: bool) -> str:
    """A filled question on the held-out side (``held_out``) or the training side of the split."""
    for _ in range(1000):
        template = rng.choice(topic.questions)
        trial: dict[str, str] = {}
        q = _articles(_fill(template, rng, slots, trial))
        has_slots = bool(_SLOT.search(template))
        if held_out == (has_slots and is_held_out(q)):
            bound.update(trial)
            return q
    raise RuntimeError(f"topic {topic.name!r}: no {'held-out' if held_out else 'training'} question found")


def _answer(topic: Topic, sentiment: str, rng: random.Random, slots, bound: dict[str, str]) -> str:
    if rng.random() < GENERIC_FRACTION:
        template = rng.choice(GENERIC_ANSWERS[sentiment])
    else:
        # of a few candidates, the one reusing most of the question's topic slots, so that
        # "is the cello hard?" is answered about the cello more often than about jazz
        own = {name for name, _ in topic.slots}
        candidates = [rng.choice(getattr(topic, sentiment)) for _ in range(3)]
        template = max(
            candidates,
            key=lambda t: sum(1 for k in _SLOT.findall(t) if k.lower() in own and k.lower() in bound),
        )
    answer = _fill(template, rng, slots, bound)
    if rng.random() < OPENER_FRACTION:
        answer = rng.choice(OPENERS[sentiment]) + answer
    if rng.random() < CLOSER_FRACTION:
        answer = answer + _fill(rng.choice(CLOSERS[sentiment]), rng, slots, bound)
    return answer


def make_turn(rng: random.Random, sentiment: str | None = None, held_out: bool = False) -> Turn:
    """One question and answer; ``held_out`` draws the question from the evaluation side."""
    topics = _HELD_OUT_TOPICS if held_out else TOPICS
    topic = rng.choice(topics)
    sentiment = sentiment or rng.choice(SENTIMENTS)
    slots = _topic_slots(topic)
    bound: dict[str, str] = {}
    question = _question(topic, rng, slots, bound, held_out=held_out)
    answer = _answer(topic, sentiment, rng, slots, bound)
    return Turn(_articles(_add_prefix(question, rng)), _articles(answer), sentiment, topic.name)


def generate_exchanges(seed: int, size: int, held_out: bool = False) -> list[Exchange]:
    """``size`` exchanges, the same for the same seed. Sentiments of final answers are dealt
    in a shuffled order so that the three kinds are balanced exactly (up to ``size % 3``).

    With ``held_out``, every question comes from the held-out side of the split: text for
    measuring how the model does on questions it was not trained on."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    rng = random.Random(f"{'held-out' if held_out else 'train'}-{seed}")
    labels = [SENTIMENTS[i % 3] for i in range(size)]
    rng.shuffle(labels)
    out = []
    for label in labels:
        turns = []
        if rng.random() < MULTI_TURN_FRACTION:
            turns.append(make_turn(rng, held_out=held_out))
        turns.append(make_turn(rng, sentiment=label, held_out=held_out))
        out.append(Exchange(tuple(turns)))
    return out


def held_out_prompts(seed: int = 0, count: int = 300) -> list[str]:
    """Distinct user questions that never occur in a training corpus, with greeting prefixes."""
    rng = random.Random(f"prompts-{seed}")
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > count * 200:
            raise RuntimeError(f"could only find {len(out)} distinct held-out prompts")
        topic = rng.choice(_HELD_OUT_TOPICS)
        q = _articles(_add_prefix(_question(topic, rng, _topic_slots(topic), {}, held_out=True), rng))
        if q in seen:
            continue
        seen.add(q)
        out.append(q)
    return out


def _has_held_out_question(topic: Topic) -> bool:
    """Whether any filling of the topic's slotted questions falls on the held-out side."""
    slots = _topic_slots(topic)
    rng = random.Random(0)
    for template in topic.questions:
        if _SLOT.search(template):
            for _ in range(200):
                if is_held_out(_fill(template, rng, slots, {})):
                    return True
    return False


# topics that can ask a held-out question (one with few fillings may have none)
_HELD_OUT_TOPICS: tuple[Topic, ...] = tuple(t for t in TOPICS if _has_held_out_question(t))


def encode_exchange(tokenizer, text: str) -> list[int]:
    """The training-stream encoding of one exchange: ``[bos] + bytes + [eos]``."""
    return [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]


def write_corpus(path: str | Path, exchanges: Iterable[Exchange]) -> Path:
    """Exchanges separated by one blank line (turn lines never contain a newline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(e.text() for e in exchanges) + "\n", encoding="utf-8")
    return path


def read_corpus(path: str | Path) -> list[str]:
    """The exchange texts of a file written by :func:`write_corpus`."""
    text = Path(path).read_text(encoding="utf-8")
    return [block.strip("\n") for block in text.split("\n\n") if block.strip()]


def write_prompts(path: str | Path, prompts: Sequence[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m palm_rlhf.demo.corpus",
        description="Write the demo chat corpus and a held-out prompt list.",
    )
    parser.add_argument(
        "--out", required=True, help="corpus file to write (exchanges separated by blank lines)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=20000, help="number of exchanges (default 20000)")
    parser.add_argument("--prompts", help="held-out prompt file (default: prompts.txt next to --out)")
    parser.add_argument(
        "--num-prompts", type=int, default=300, help="held-out prompts to write (default 300)"
    )
    args = parser.parse_args(argv)
    out = write_corpus(args.out, generate_exchanges(args.seed, args.size))
    prompts_path = Path(args.prompts) if args.prompts else out.parent / "prompts.txt"
    write_prompts(prompts_path, held_out_prompts(args.seed, args.num_prompts))
    print(f"wrote {args.size} exchanges to {out} and {args.num_prompts} held-out prompts to {prompts_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
