"""The demo corpus: deterministic, in the chat format, balanced in sentiment, with a clean
held-out split."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from palm_rlhf.demo import corpus as C
from palm_rlhf.tokenizer import ByteTokenizer

TURN = re.compile(r"User: [^\n]+\nAssistant: [^\n]+")


def test_same_seed_gives_the_same_corpus_and_another_seed_a_different_one():
    a = [e.text() for e in C.generate_exchanges(7, 300)]
    b = [e.text() for e in C.generate_exchanges(7, 300)]
    c = [e.text() for e in C.generate_exchanges(8, 300)]
    assert a == b
    assert a != c
    assert len(set(a)) > 250  # varied, not a handful of sentences repeated


def test_exchanges_follow_the_chat_format():
    for e in C.generate_exchanges(1, 500):
        text = e.text()
        assert re.fullmatch(rf"{TURN.pattern}(\n{TURN.pattern})*", text), text
        assert "\n\n" not in text
        assert text.isascii()


def test_sentiments_are_balanced_and_vader_agrees_with_the_labels():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    exchanges = C.generate_exchanges(3, 1500)
    labels = Counter(e.last.sentiment for e in exchanges)
    assert labels == {"cheerful": 500, "gloomy": 500, "neutral": 500}

    agree: Counter[str] = Counter()
    compound: dict[str, list[float]] = {s: [] for s in C.SENTIMENTS}
    for e in exchanges:
        score = vader.polarity_scores(e.last.answer)["compound"]
        compound[e.last.sentiment].append(score)
        ok = {"cheerful": score >= 0.05, "gloomy": score <= -0.05, "neutral": abs(score) < 0.05}
        agree[e.last.sentiment] += ok[e.last.sentiment]
    for s in C.SENTIMENTS:
        assert agree[s] / labels[s] >= 0.95, (s, agree[s])
    mean = {s: sum(v) / len(v) for s, v in compound.items()}
    assert mean["cheerful"] > 0.5 and mean["gloomy"] < -0.5 and abs(mean["neutral"]) < 0.05, mean


def test_topics_are_varied():
    topics = Counter(e.last.topic for e in C.generate_exchanges(4, 2000))
    assert len(topics) == len(C.TOPICS)
    assert max(topics.values()) < 3 * min(topics.values())


def test_held_out_questions_never_appear_in_the_training_corpus():
    train_questions = {t.question for e in C.generate_exchanges(0, 5000) for t in e.turns}
    prompts = C.held_out_prompts(0, 300)
    assert len(prompts) == len(set(prompts)) == 300
    assert not train_questions & set(prompts)
    held = {t.question for e in C.generate_exchanges(0, 300, held_out=True) for t in e.turns}
    assert not train_questions & held
    # the split is by the question itself: every held-out question is marked held out
    for q in list(held)[:50]:
        core = re.sub(r"^(Hey, |Hi! |Hello\. |So, |Tell me, |Quick question: )", "", q)
        assert C.is_held_out(core[0].upper() + core[1:]) or C.is_held_out(core), q


def test_encode_exchange_wraps_bytes_in_bos_and_eos():
    tok = ByteTokenizer()
    ids = C.encode_exchange(tok, "User: Hi?\nAssistant: Hello.")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "User: Hi?\nAssistant: Hello."


def test_script_writes_corpus_and_prompts(tmp_path):
    out = tmp_path / "corpus.txt"
    assert C.main(["--out", str(out), "--seed", "5", "--size", "120", "--num-prompts", "40"]) == 0
    texts = C.read_corpus(out)
    assert texts == [e.text() for e in C.generate_exchanges(5, 120)]
    prompts = (tmp_path / "prompts.txt").read_text().splitlines()
    assert prompts == C.held_out_prompts(5, 40)


def test_negative_size_is_rejected():
    with pytest.raises(ValueError, match="size"):
        C.generate_exchanges(0, -1)
