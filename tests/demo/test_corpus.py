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


def _stage_recipes(metadata: dict) -> list[tuple[dict, dict]]:
    """(recipe, figures) of the shipped model and of every stage it was continued from."""
    out = []
    while metadata:
        out.append((metadata["recipe"], metadata["figures"]))
        metadata = (metadata.get("continued_from") or {}).get("metadata")
    return out


def test_the_shipped_demo_model_was_trained_on_this_corpus():
    """The token counts the manifest recorded at build time are those of the corpus generated
    today, for every training stage: editing a template file changes the corpus and fails here."""
    import json

    from palm_rlhf.demo import ASSETS_DIR, DEMO_VERSION
    from palm_rlhf.demo.recipe import DemoTrainConfig
    from palm_rlhf.demo.train import demo_tokenizer
    from palm_rlhf.tokenizer import load_tokenizer

    manifest = json.loads((ASSETS_DIR / DEMO_VERSION / "manifest.json").read_text())
    stages = _stage_recipes(manifest["metadata"])
    assert len(stages) >= 1
    tok = load_tokenizer(manifest["tokenizer"])
    for recipe, figures in stages:
        exchanges = C.generate_exchanges(recipe["seed"], recipe["corpus_size"])
        if recipe.get("tokenizer") == "bpe" and not recipe.get("init_from"):
            # the BPE trained on today's corpus is the one the model was shipped with
            trained = demo_tokenizer(DemoTrainConfig(**recipe), [e.text() for e in exchanges])
            assert trained.to_dict() == manifest["tokenizer"]
        tokens = sum(len(C.encode_exchange(tok, e.text())) for e in exchanges)
        assert tokens == figures["corpus_tokens"], recipe


def test_the_shipped_prompt_list_is_the_held_out_prompt_list():
    from palm_rlhf.demo import ASSETS_DIR

    shipped = (ASSETS_DIR / "prompts.txt").read_text(encoding="utf-8")
    assert shipped == "".join(p + "\n" for p in C.held_out_prompts(0, 300))


def test_template_data_is_read_from_the_asset_files():
    import json

    topics = json.loads((C.DATA_DIR / "topics.json").read_text(encoding="utf-8"))
    assert [t.name for t in C.TOPICS] == [t["name"] for t in topics]
    assert C.TOPICS[0].questions == tuple(topics[0]["questions"])
    assert C.TOPICS[0].slots == tuple((k, tuple(v)) for k, v in topics[0]["slots"].items())
    slots = json.loads((C.DATA_DIR / "slots.json").read_text(encoding="utf-8"))
    assert C.COMMON_SLOTS == {k: tuple(v) for k, v in slots.items()}
    answers = json.loads((C.DATA_DIR / "answers.json").read_text(encoding="utf-8"))
    assert C.GENERIC_ANSWERS == {k: tuple(v) for k, v in answers["generic"].items()}
    assert C.QUESTION_PREFIXES == tuple(answers["question_prefixes"])


def test_every_template_slot_has_values():
    """Each ``{slot}`` of every template resolves for its topic (an unknown one would only fail
    when the generator happens to draw that template)."""
    pattern = re.compile(r"\{(\w+)\}")
    for topic in C.TOPICS:
        known = set(C.COMMON_SLOTS) | {name for name, _ in topic.slots} | {"thing"}
        texts = [*topic.questions, *topic.cheerful, *topic.gloomy, *topic.neutral, *topic.things]
        texts += [v for _, values in topic.slots for v in values]
        texts += [
            t for table in (C.GENERIC_ANSWERS, C.OPENERS, C.CLOSERS) for ts in table.values() for t in ts
        ]
        for text in texts:
            for slot in pattern.findall(text):
                assert slot.lower() in known, (topic.name, text)


@pytest.mark.parametrize(
    ("entry", "error", "match"),
    [
        (
            {"name": "x", "slots": {}, "questions": ["Q?"], "cheerful": ["A."], "gloomy": ["A."]},
            ValueError,
            "keys",
        ),
        (
            {
                "name": "x",
                "slots": {},
                "questions": [],
                "cheerful": ["A."],
                "gloomy": ["A."],
                "neutral": ["A."],
                "things": ["t"],
            },
            ValueError,
            r"\(x\)\.questions: expected a non-empty list",
        ),
        (
            {
                "name": "x",
                "slots": [],
                "questions": ["Q?"],
                "cheerful": ["A."],
                "gloomy": ["A."],
                "neutral": ["A."],
                "things": ["t"],
            },
            TypeError,
            r"\(x\)\.slots",
        ),
    ],
)
def test_a_malformed_topic_is_reported_with_its_place(entry, error, match):
    with pytest.raises(error, match=match):
        C._topic(entry, "topics.json[3]")
