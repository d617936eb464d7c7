"""The shipped demo model answers the question asked, and the shipped reward model ranks
broken answers below intact ones (the figures of docs/demo.md, measured on held-out questions
at the chat page's temperature)."""

from __future__ import annotations

import pytest
import torch

from palm_rlhf.demo import evaluate as E

QUESTIONS = 160  # held-out questions; one answer each, or four ranked by the reward model


@pytest.fixture(scope="module")
def classifier():
    return E.topic_classifier()


@pytest.fixture(scope="module")
def demo_reward():
    from palm_rlhf.demo import demo_reward_dir
    from palm_rlhf.demo.reward_train import load_reward_checkpoint

    path = demo_reward_dir()
    assert path is not None, "the shipped demo reward checkpoint is missing"
    return load_reward_checkpoint(path)


@pytest.fixture(scope="module")
def evaluation(demo_model, demo_reward):
    model, tok, _ = demo_model
    torch.manual_seed(0)
    return E.demo_eval(model, tok, demo_reward[0], count=QUESTIONS, seed=1, best_of=4)


def test_topic_classifier_recognises_the_corpus_answers(classifier):
    # validated on answers to held-out questions, which it was not built from
    assert E.classifier_accuracy(classifier, seed=5, count=1000) >= 0.9
    assert classifier.predict("My trip to Lisbon was wonderful, the people were so kind.") == "travel"
    # an answer that is about nothing in particular gets no confident topic from chance words
    turns = E.heldout_turns(6, 200)
    shuffled = [t.answer for t in turns[1:]] + [turns[0].answer]
    off = sum(classifier.predict(a) == t.topic for a, t in zip(shuffled, turns)) / len(turns)
    assert off < 0.2  # answers paired with other questions match about as often as chance (1/18)


def test_repeat_detection():
    assert E.has_repeat("I love it, I love it, I love it so much.")
    assert not E.has_repeat("I love my garden, the roses are blooming.")


def test_answers_follow_the_question(evaluation):
    n1 = evaluation["n1"]
    assert n1["topic_match"] >= 0.70, n1
    assert n1["corpus_words"] >= 0.99, n1
    assert n1["ended"] >= 0.97, n1


def test_best_of_four_is_ranked_by_the_shipped_reward(evaluation):
    n1, best = evaluation["n1"], evaluation["best_of_4"]
    # the ranked answers are still the model's own: on topic, in corpus words, ended
    assert best["topic_match"] >= 0.70 and best["corpus_words"] >= 0.99 and best["ended"] >= 0.97, (n1, best)
    # one sample is already near the classifier's own accuracy; ranking must not lose any of it
    assert best["topic_match"] >= n1["topic_match"], (n1, best)


def test_best_of_four_keeps_the_twelfth_turn_of_a_chat_on_topic(evaluation):
    conversation = evaluation["conversation"]
    assert conversation["earlier_turns"] == E.CONVERSATION_TURNS == 11
    n1, best = conversation["n1"], conversation["best_of_4"]
    # after eleven exchanges one sample drifts to an earlier topic about one time in five; the
    # reward model's pick wins back at least 5 points of it (8.1 measured here, 7.0 at seed 0)
    assert best["topic_match"] >= n1["topic_match"] + 0.05, (n1, best)
    assert best["broken"] <= n1["broken"] + 0.01 and best["ended"] >= n1["ended"], (n1, best)


def test_shipped_reward_prefers_the_corpus_answer_on_held_out_pairs(demo_model, demo_reward):
    from palm_rlhf.demo.reward_train import pair_accuracy, preference_pairs

    reward, tok, manifest = demo_reward
    assert manifest["kind"] == "reward" and manifest["metadata"]["reward_head"]["num_binned_output"] == 5
    assert manifest["tokenizer"] == demo_model[2]["tokenizer"]
    assert manifest["config"] == demo_model[2]["config"]
    acc = pair_accuracy(reward, tok, preference_pairs(9, 300, held_out=True))
    # an answer to another topic ranks below the answer, alone and after earlier turns
    assert acc["off_topic"] >= 0.85 and acc["with_history"] >= 0.85, acc
    # misspelled and cut answers rank below the intact one; a repeated one only more often than not
    assert min(acc["misspelled"], acc["truncated"]) >= 0.9 and acc["repeated"] >= 0.55, acc
