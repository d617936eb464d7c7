"""The preference pairs the demo reward model is trained on, and its recipe (a short build on
a tiny random trunk)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from palm_rlhf.demo import reward_train as R
from palm_rlhf.demo.evaluate import topic_classifier


@pytest.fixture(scope="module")
def pairs():
    return R.preference_pairs(2, 3000)


def _question(prompt: str) -> str:
    return prompt.rsplit("User: ", 1)[1].removesuffix("\nAssistant:")


def test_pairs_have_every_kind_in_the_recipe_shares(pairs):
    kinds = Counter(p.kind for p in pairs)
    assert set(kinds) == set(R.REJECTION_KINDS)
    for kind, weight in zip(R.REJECTION_KINDS, R.KIND_WEIGHTS):
        assert abs(kinds[kind] / len(pairs) - weight) < 0.04, kinds
    assert all(p.chosen != p.rejected for p in pairs)


def test_pairs_ask_in_conversations_of_every_length(pairs):
    earlier = Counter(p.prompt.count("User:") - 1 for p in pairs)
    assert abs(earlier[0] / len(pairs) - (1 - R.HISTORY_SHARE)) < 0.04, earlier
    assert set(earlier) == set(range(R.MAX_HISTORY + 1)), earlier
    for p in pairs:
        assert p.prompt.startswith("User: ") and p.prompt.endswith("\nAssistant:")
        # every earlier turn has its answer; the rated question has none yet
        assert p.prompt.count("\nAssistant: ") == p.prompt.count("User:") - 1


def test_off_topic_answers_are_about_another_topic_often_an_earlier_one(pairs):
    classifier = topic_classifier()
    off = [p for p in pairs if p.kind == "off_topic"]
    # the corpus answer is about the question's topic; the rejected one, about another
    assert sum(classifier.predict(p.chosen) != classifier.predict(p.rejected) for p in off) / len(off) > 0.9
    in_chat = [p for p in off if p.prompt.count("User:") > 1]
    earlier = 0
    for p in in_chat:
        before = p.prompt.rsplit("User: ", 1)[0]
        answers = [line.removeprefix("Assistant: ") for line in before.splitlines() if line.startswith("Assistant: ")]
        topics = {classifier.predict(a) for a in answers}
        earlier += classifier.predict(p.rejected) in topics
    # half of them drift back to a topic of the conversation (and some others do by chance)
    assert 0.45 < earlier / len(in_chat) < 0.8, earlier / len(in_chat)


def test_sampled_pairs_put_the_policys_answer_over_its_answer_to_another_topic():
    from palm_rlhf.demo.corpus import generate_exchanges

    turns = [e.last for e in generate_exchanges(2, 1500)]
    topic_of = {t.question: t.topic for t in turns}
    # stand-in policy answers that name their question, so each pair can be traced back
    answers = {q: f"answer to <{q}>" for q in R.corpus_questions(2, 1500)[::2]}
    pairs = R.preference_pairs(2, 1500, answers=answers)
    sampled = [p for p in pairs if p.kind == "sampled_off_topic"]
    answerable = [p for p in pairs if _question(p.prompt) in answers]
    assert abs(len(sampled) / len(answerable) - R.SAMPLED_SHARE) < 0.05, (len(sampled), len(answerable))
    earlier = 0
    for p in sampled:
        asked = _question(p.prompt)
        assert p.chosen == answers[asked]
        other = p.rejected.removeprefix("answer to <").removesuffix(">")
        assert p.rejected == answers[other] and topic_of[other] != topic_of[asked]
        earlier += f"User: {other}\n" in p.prompt
    in_chat = [p for p in sampled if p.prompt.count("User:") > 1]
    assert 0.3 < earlier / len(in_chat) < 0.8
    # without the policy's answers, no such pairs
    assert not [p for p in R.preference_pairs(2, 300) if p.kind == "sampled_off_topic"]


def test_corruptions_break_the_answer(pairs):
    for p in pairs:
        if p.kind == "truncated":
            assert len(p.rejected.split()) < len(p.chosen.split())
            assert p.chosen.startswith(p.rejected)
        elif p.kind == "repeated":
            assert len(p.rejected.split()) > len(p.chosen.split())
        elif p.kind == "misspelled":
            assert len(p.rejected.split()) == len(p.chosen.split()) and p.rejected != p.chosen


def test_held_out_pairs_ask_other_questions(pairs):
    held = R.preference_pairs(2, 300, held_out=True)
    assert not {_question(p.prompt) for p in held} & {_question(p.prompt) for p in pairs}


def test_a_short_build_follows_the_recipe_and_loads_in_the_reward_service_format(tiny_checkpoint, tmp_path,
                                                                                   monkeypatch):
    seen: list[tuple[int, set[str], int]] = []  # (step, kinds, earlier turns) of every batch
    scores = R._scores

    def spy(model, tok, prompts, responses):
        if torch.is_grad_enabled():  # a training step (the held-out accuracy runs without grad)
            half = len(prompts) // 2
            batch = [by_text[(prompts[i], responses[i], responses[half + i])] for i in range(half)]
            seen.append((len(seen), {p.kind for p in batch}, {p.prompt.count("User:") for p in batch}))
        return scores(model, tok, prompts, responses)

    cfg = R.RewardTrainConfig(pairs=400, steps=8, topic_first_steps=4, decay_from=6, warmup_steps=2, eval_pairs=40,
                              batch_size=4, num_threads=1, sampled_pairs=False)
    by_text = {(p.prompt, p.chosen, p.rejected): p for p in R.preference_pairs(cfg.corpus_seed, cfg.pairs)}
    monkeypatch.setattr(R, "_scores", spy)
    out = R.build_reward_checkpoint(tmp_path / "rm", tiny_checkpoint, cfg, progress=False)
    assert len(seen) == cfg.steps
    training = seen
    assert all(kinds == {"off_topic"} for _, kinds, _ in training[: cfg.topic_first_steps])
    assert all(len(turns) == 1 for _, _, turns in training)  # one conversation length per batch
    model, _tok, manifest = R.load_reward_checkpoint(out)
    assert manifest["kind"] == "reward" and manifest["metadata"]["recipe"]["topic_first_steps"] == 4
    acc = manifest["metadata"]["figures"]["heldout_pair_accuracy"]
    assert set(acc) >= {"all", "off_topic", "with_history"}
    assert torch.isfinite(R._scores(model, _tok, ["User: hi\nAssistant:"], [" hello"])).all()
