"""Measuring the demo model on questions it never saw: does the answer follow the question?

* **Topic match**: the share of held-out questions whose answer is about the question's
  topic. An answer's topic is decided by :class:`TopicClassifier`, a multinomial naive Bayes
  over the words of the training corpus's answers, per topic (its own accuracy is measured on
  held-out answers of the corpus: :func:`classifier_accuracy`).
* **Corpus words**: the share of the answers' words that occur in the training corpus.
* **Ended**: the share of answers that stop with EOS (not cut at the token limit).
* **Broken**: the share of answers that are cut, contain a word the corpus does not know, or
  repeat a run of four words.

Answers are sampled as the chat page samples them (temperature 0.8, no nucleus cut), one per
question (``n=1``) or four ranked by a reward model (best of 4), twice: for the question alone,
and for the question asked in a conversation, after :data:`CONVERSATION_TURNS` earlier
exchanges on other held-out questions (the whole conversation is the prompt, as the page sends
it). The model was trained on one- and two-turn exchanges, so a long conversation is where it
drifts to an earlier turn's topic, and where ranking by the reward model has the most to win.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PAGE_TEMPERATURE = 0.8  # the chat page's default
PAGE_TOP_P = 1.0
MAX_NEW_TOKENS = 96
CONVERSATION_TURNS = 11  # earlier exchanges: the measured question is the twelfth of a conversation
_WORD = re.compile(r"[A-Za-z']+")


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


class TopicClassifier:
    """Multinomial naive Bayes over lower-cased words, with add-one smoothing."""

    def __init__(self, texts: Sequence[str], labels: Sequence[str]):
        if len(texts) != len(labels) or not texts:
            raise ValueError("need as many labels as texts, and at least one")
        self.labels = sorted(set(labels))
        counts: dict[str, Counter] = {label: Counter() for label in self.labels}
        docs = Counter(labels)
        for text, label in zip(texts, labels):
            counts[label].update(words(text))
        self.vocabulary = set().union(*counts.values())
        v = len(self.vocabulary)
        self._prior = {label: math.log(docs[label] / len(texts)) for label in self.labels}
        self._log = {}
        self._unseen = {}
        for label in self.labels:
            total = sum(counts[label].values()) + v
            self._log[label] = {w: math.log((c + 1) / total) for w, c in counts[label].items()}
            self._unseen[label] = math.log(1 / total)

    def scores(self, text: str) -> dict[str, float]:
        ws = [w for w in words(text) if w in self.vocabulary]
        return {
            label: self._prior[label] + sum(self._log[label].get(w, self._unseen[label]) for w in ws)
            for label in self.labels
        }

    def predict(self, text: str) -> str:
        s = self.scores(text)
        return max(self.labels, key=lambda label: s[label])


def training_answers(seed: int = 0, size: int = 20000) -> tuple[list[str], list[str]]:
    """(answers, topics) of every turn of a training corpus."""
    from palm_rlhf.demo.corpus import generate_exchanges

    turns = [t for e in generate_exchanges(seed, size) for t in e.turns]
    return [t.answer for t in turns], [t.topic for t in turns]


def topic_classifier(seed: int = 0, size: int = 20000) -> TopicClassifier:
    return TopicClassifier(*training_answers(seed, size))


def heldout_turns(seed: int, count: int) -> list[Any]:
    """``count`` single-turn exchanges whose questions never occur in training."""
    from palm_rlhf.demo.corpus import generate_exchanges

    return [e.last for e in generate_exchanges(seed, count, held_out=True)]


def conversation_prompts(turns: Sequence[Any], earlier: int, seed: int = 0) -> list[str]:
    """One chat prompt per turn: ``earlier`` other held-out exchanges (question and corpus
    answer), then the turn's question, rendered as the gateway renders a conversation."""
    import random

    from palm_rlhf.chat import format_chat

    rng = random.Random(f"conversation-{seed}-{earlier}")
    prompts = []
    for i, t in enumerate(turns):
        others = [h for j, h in enumerate(turns) if j != i]
        messages: list[dict[str, str]] = []
        for h in rng.sample(others, min(earlier, len(others))):
            messages += [{"role": "user", "content": h.question}, {"role": "assistant", "content": h.answer}]
        messages.append({"role": "user", "content": t.question})
        prompts.append(format_chat(messages))
    return prompts


def classifier_accuracy(classifier: TopicClassifier, seed: int = 5, count: int = 1000) -> float:
    """The classifier's accuracy on the corpus's own answers to held-out questions."""
    turns = heldout_turns(seed, count)
    return sum(classifier.predict(t.answer) == t.topic for t in turns) / len(turns)


def has_repeat(text: str, run: int = 4) -> bool:
    """True when a run of ``run`` words occurs twice."""
    ws = words(text)
    seen = set()
    for i in range(len(ws) - run + 1):
        key = tuple(ws[i : i + run])
        if key in seen:
            return True
        seen.add(key)
    return False


@dataclass
class Answer:
    text: str
    ended: bool


def sample_answers(
    model, tok, prompts: Sequence[str], n: int = 1, seed: int = 0, temperature: float = PAGE_TEMPERATURE,
    top_p: float = PAGE_TOP_P, max_new_tokens: int = MAX_NEW_TOKENS, batch: int = 32,
) -> list[list[Answer]]:
    """``n`` sampled answers per chat prompt (rendered by :func:`palm_rlhf.chat.format_chat`)."""
    import torch

    from palm_rlhf.chat import clean_response, encode_prompt
    from palm_rlhf.generation import SamplingParams, generate_tokens

    out: list[list[Answer]] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        ids = [encode_prompt(tok, p) for p in chunk]
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            stop_token_ids=(tok.eos_id,), seed=seed + start, n=n,
        )
        with torch.no_grad():
            groups = generate_tokens(model, ids, params)
        for group in groups:
            answers = []
            for c in group:
                text = tok.decode(c.token_ids)
                ended = c.finish_reason == "stop" or "\n" in text
                answers.append(Answer(clean_response(text), ended))
            out.append(answers)
    return out


def figures(answers: Sequence[Answer], topics: Sequence[str], classifier: TopicClassifier,
            vocabulary: set[str]) -> dict[str, float]:
    """topic_match, corpus_words, ended and broken shares of one answer per question."""
    all_words = [w for a in answers for w in words(a.text)]
    broken = [
        (not a.ended) or has_repeat(a.text) or any(w not in vocabulary for w in words(a.text)) or not words(a.text)
        for a in answers
    ]
    return {
        "topic_match": sum(classifier.predict(a.text) == t for a, t in zip(answers, topics)) / len(answers),
        "corpus_words": sum(w in vocabulary for w in all_words) / max(1, len(all_words)),
        "ended": sum(a.ended for a in answers) / len(answers),
        "broken": sum(broken) / len(answers),
    }


def corpus_vocabulary(seed: int = 0, size: int = 20000) -> set[str]:
    from palm_rlhf.demo.corpus import generate_exchanges

    return {w for e in generate_exchanges(seed, size) for w in words(e.text())}


def reward_pick(reward_model, tok, prompts: Sequence[str], candidates: Sequence[Sequence[Answer]]) -> list[Answer]:
    """The candidate the reward model scores highest, per prompt."""
    from palm_rlhf.rl.online import reward_scores

    flat_p = [p for p, cs in zip(prompts, candidates) for _ in cs]
    flat_r = [a.text for cs in candidates for a in cs]
    scores = reward_scores(reward_model, tok, flat_p, flat_r).tolist()
    out, i = [], 0
    for cs in candidates:
        s = scores[i : i + len(cs)]
        out.append(cs[max(range(len(cs)), key=lambda k: s[k])])
        i += len(cs)
    return out


def _rank_and_measure(model, tok, reward_model, prompts, topics, classifier, vocabulary, *, seed: int,
                      best_of: int, temperature: float) -> dict[str, Any]:
    samples = sample_answers(
        model, tok, prompts, n=best_of if reward_model is not None else 1, seed=seed, temperature=temperature
    )
    out = {"n1": figures([s[0] for s in samples], topics, classifier, vocabulary)}
    if reward_model is not None:
        picked = reward_pick(reward_model, tok, prompts, samples)
        out[f"best_of_{best_of}"] = figures(picked, topics, classifier, vocabulary)
    return out


def demo_eval(model, tok, reward_model=None, count: int = 200, seed: int = 0, best_of: int = 4,
              temperature: float = PAGE_TEMPERATURE, earlier_turns: int = CONVERSATION_TURNS) -> dict[str, Any]:
    """Figures of one sample and of best-of-``best_of`` (when a reward model is given) on
    ``count`` held-out questions, sampled at ``temperature`` (default: the chat page's); then
    the same questions asked after ``earlier_turns`` earlier exchanges (skipped when 0)."""
    from palm_rlhf.chat import format_chat

    classifier = topic_classifier()
    vocabulary = corpus_vocabulary()
    turns = heldout_turns(seed, count)
    topics = [t.topic for t in turns]
    kw = {"seed": seed, "best_of": best_of, "temperature": temperature}
    result: dict[str, Any] = {
        "questions": count,
        "temperature": temperature,
        "classifier_accuracy": classifier_accuracy(classifier),
    }
    prompts = [format_chat([{"role": "user", "content": t.question}]) for t in turns]
    result.update(_rank_and_measure(model, tok, reward_model, prompts, topics, classifier, vocabulary, **kw))
    if earlier_turns > 0:
        prompts = conversation_prompts(turns, earlier_turns, seed=seed)
        conversation = _rank_and_measure(model, tok, reward_model, prompts, topics, classifier, vocabulary, **kw)
        result["conversation"] = {"earlier_turns": earlier_turns, **conversation}
    return result


__all__ = [
    "CONVERSATION_TURNS",
    "MAX_NEW_TOKENS",
    "PAGE_TEMPERATURE",
    "PAGE_TOP_P",
    "Answer",
    "TopicClassifier",
    "classifier_accuracy",
    "conversation_prompts",
    "corpus_vocabulary",
    "demo_eval",
    "figures",
    "has_repeat",
    "heldout_turns",
    "reward_pick",
    "sample_answers",
    "topic_classifier",
    "training_answers",
]
