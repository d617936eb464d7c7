"""The shipped reward model of the demo world, trained on preference pairs the corpus makes.

Every pair is a held-in training question with its corpus answer (chosen) and a worse answer
(rejected), one of:

* ``off_topic`` - a corpus answer to a question of another topic (when the conversation has
  earlier turns, often the topic of one of them: the answer that drifted back to an old subject);
* ``misspelled`` - the answer with one to three words misspelled (letters swapped, dropped
  or doubled);
* ``truncated`` - the answer cut after a few words, mid-sentence;
* ``repeated`` - the answer with a run of its words said again (or twice over);
* ``sampled_off_topic`` - here both answers are the demo policy's own, sampled as the chat page
  samples them before training: its answer to the question asked alone (chosen) over its
  answer to a question of another topic (rejected), often one asked earlier in the
  conversation. These carry the policy's own style and slips, which the corpus answers do not.

The reward model is a :class:`palm_rlhf.reward.RewardModel` (five rating bins, the reward
service's default head) on the demo policy's trunk, trained with the Bradley-Terry loss on
its expected rating, trunk included. Two pairs in five come after earlier turns of a
conversation (one to :data:`MAX_HISTORY` of them, drawn from other exchanges), as the gateway
scores answers in a chat: the whole conversation is the prompt. It is saved in the format the reward service loads, so
``up`` seeds it into the reward store and best-of-n ranks from the first request.

``palm-rlhf demo-reward-build --out DIR`` runs it.
"""

from __future__ import annotations

import logging
import math
import platform
import random
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

REJECTION_KINDS = ("off_topic", "misspelled", "truncated", "repeated")
KIND_WEIGHTS = (0.6, 0.1, 0.15, 0.15)
MAX_HISTORY = 11  # earlier turns before the rated one, at most: the twelfth turn of a chat
HISTORY_SHARE = 0.4  # pairs with earlier turns
SAMPLED_SHARE = 0.35  # pairs of the policy's own answers (sampled_off_topic), when they are given


@dataclass
class RewardTrainConfig:
    """The recipe of the shipped reward model; every default is what built it."""

    seed: int = 0
    corpus_seed: int = 2  # training questions of another sample than the policy's
    pairs: int = 8000
    steps: int = 1000  # topic match is learnt late: the loss on off-topic pairs stays flat for ~150 steps
    batch_size: int = 16  # pairs per step
    lr: float = 3e-4
    warmup_steps: int = 50
    sampled_pairs: bool = True  # add sampled_off_topic pairs of the policy's own answers
    topic_first_steps: int = 450  # steps on off-topic pairs only, before every kind is mixed in
    decay_from: int = 800  # the learning rate stays flat until here, then falls to a tenth (cosine)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    num_bins: int = 5
    num_threads: int = 2
    eval_pairs: int = 400  # pairs on held-out questions for the final accuracy
    save_dtype: str = "bfloat16"


@dataclass(frozen=True)
class Pair:
    prompt: str  # the chat prompt, as the gateway sends it to the reward service
    chosen: str
    rejected: str
    kind: str


def _misspell(text: str, rng: random.Random) -> str:
    spans = [m.span() for m in re.finditer(r"[A-Za-z]{4,}", text)]
    if not spans:
        return text + text[-1:]
    out = text
    for start, end in sorted(rng.sample(spans, min(len(spans), rng.randint(1, 3))), reverse=True):
        w = out[start:end]
        i = rng.randrange(1, len(w) - 1)
        how = rng.randrange(3)
        if how == 0:
            w = w[:i] + w[i + 1] + w[i] + w[i + 2 :]
        elif how == 1:
            w = w[:i] + w[i + 1 :]
        else:
            w = w[:i] + w[i] + w[i:]
        out = out[:start] + w + out[end:]
    return out


def _truncate(text: str, rng: random.Random) -> str:
    ws = text.split()
    if len(ws) < 3:
        return ws[0] if ws else text
    return " ".join(ws[: rng.randint(1, max(1, len(ws) // 2))]).rstrip(".,!?")


def _repeat(text: str, rng: random.Random) -> str:
    ws = text.split()
    if rng.random() < 0.4 or len(ws) < 4:
        return text + " " + text
    i = rng.randrange(0, len(ws) - 2)
    k = rng.randint(2, min(5, len(ws) - i))
    run = ws[i : i + k]
    return " ".join(ws[: i + k] + run * rng.randint(1, 3) + ws[i + k :])


def policy_answers(palm, tok, questions: Sequence[str], seed: int = 0) -> dict[str, str]:
    """The policy's own answer to each distinct question asked alone, sampled as the chat page
    samples; answers cut at the token limit or empty are left out."""
    from palm_rlhf.chat import format_chat
    from palm_rlhf.demo.evaluate import sample_answers

    distinct = sorted(set(questions))
    prompts = [format_chat([{"role": "user", "content": q}]) for q in distinct]
    was = palm.training
    palm.eval()
    got = sample_answers(palm, tok, prompts, n=1, seed=seed)
    palm.train(was)
    return {q: a[0].text for q, a in zip(distinct, got) if a[0].ended and a[0].text.strip()}


def corpus_questions(seed: int, count: int, held_out: bool = False) -> list[str]:
    """The questions :func:`preference_pairs` rates, for :func:`policy_answers`."""
    from palm_rlhf.demo.corpus import generate_exchanges

    return [e.last.question for e in generate_exchanges(seed, count, held_out=held_out)]


def preference_pairs(seed: int, count: int, held_out: bool = False, rng_seed: int = 0,
                     answers: Mapping[str, str] | None = None) -> list[Pair]:
    """``count`` pairs from exchanges of corpus ``seed``; rejected kinds are drawn with
    :data:`KIND_WEIGHTS`, and a share :data:`HISTORY_SHARE` of the prompts carry earlier turns.
    With ``answers`` (question -> the policy's answer, :func:`policy_answers`), a share
    :data:`SAMPLED_SHARE` of the pairs are ``sampled_off_topic`` instead."""
    from palm_rlhf.chat import format_chat
    from palm_rlhf.demo.corpus import generate_exchanges

    turns = [e.last for e in generate_exchanges(seed, count, held_out=held_out)]
    by_topic: dict[str, list[str]] = {}
    for t in turns:
        by_topic.setdefault(t.topic, []).append(t.answer)
    rng = random.Random(f"pairs-{seed}-{held_out}-{rng_seed}")
    pairs = []
    for t in turns:
        history = []
        if rng.random() < HISTORY_SHARE:
            history = rng.sample(turns, rng.randint(1, MAX_HISTORY))
        messages = []
        for h in history:
            messages += [{"role": "user", "content": h.question}, {"role": "assistant", "content": h.answer}]
        messages.append({"role": "user", "content": t.question})
        if answers is not None and t.question in answers and rng.random() < SAMPLED_SHARE:
            others = [h for h in history if h.topic != t.topic and h.question in answers]
            if not (others and rng.random() < 0.5):
                others = [o for o in rng.sample(turns, 8) if o.topic != t.topic and o.question in answers]
            if others:
                rejected = answers[rng.choice(others).question]
                pairs.append(Pair(format_chat(messages), answers[t.question], rejected, "sampled_off_topic"))
                continue
        kind = rng.choices(REJECTION_KINDS, KIND_WEIGHTS)[0]
        if kind == "off_topic":
            earlier = [h.topic for h in history if h.topic != t.topic]
            if earlier and rng.random() < 0.5:
                other = rng.choice(earlier)
            else:
                other = rng.choice([name for name in by_topic if name != t.topic])
            rejected = rng.choice(by_topic[other])
        elif kind == "misspelled":
            rejected = _misspell(t.answer, rng)
        elif kind == "truncated":
            rejected = _truncate(t.answer, rng)
        else:
            rejected = _repeat(t.answer, rng)
        if rejected == t.answer:
            continue
        pairs.append(Pair(format_chat(messages), t.answer, rejected, kind))
    return pairs


def _scores(model, tok, prompts, responses) -> torch.Tensor:
    from palm_rlhf.rl.online import reward_batch

    x, mask, plen = reward_batch(tok, prompts, responses, model.palm.config.max_seq_len, model.palm.device)
    return model(x, mask=mask, prompt_lengths=plen)


@torch.no_grad()
def pair_accuracy(model, tok, pairs: list[Pair], batch_size: int = 32) -> dict[str, float]:
    """Share of pairs ranked right, overall and per rejected kind."""
    was = model.training
    model.eval()
    right: dict[str, list[bool]] = {}
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        rc = _scores(model, tok, [p.prompt for p in chunk], [p.chosen for p in chunk])
        rr = _scores(model, tok, [p.prompt for p in chunk], [p.rejected for p in chunk])
        for p, ok in zip(chunk, (rc > rr).tolist()):
            right.setdefault(p.kind, []).append(ok)
            if p.prompt.count("User:") > 1:
                right.setdefault("with_history", []).append(ok)
    model.train(was)
    out = {kind: round(sum(v) / len(v), 4) for kind, v in sorted(right.items()) if kind != "with_history"}
    if "with_history" in right:
        out["with_history"] = round(sum(right["with_history"]) / len(right["with_history"]), 4)
    kinds = [v for kind, v in right.items() if kind != "with_history"]
    out["all"] = round(sum(sum(v) for v in kinds) / sum(len(v) for v in kinds), 4)
    return out


def train_reward_model(policy: str | Path, cfg: RewardTrainConfig, progress: bool = True):
    """(reward model in eval mode, tokenizer, policy manifest, figures)."""
    from tqdm.auto import tqdm

    from palm_rlhf.checkpoint import load_palm
    from palm_rlhf.reward import RewardModel, bradley_terry_loss
    from palm_rlhf.tokenizer import load_tokenizer

    previous_threads = torch.get_num_threads()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    try:
        torch.manual_seed(cfg.seed)
        palm, manifest = load_palm(policy, dtype=torch.float32)
        tok = load_tokenizer(manifest.get("tokenizer"))
        answers = None
        if cfg.sampled_pairs:  # the policy's answers, before its trunk becomes the reward model's
            t_sample = time.perf_counter()
            questions = corpus_questions(cfg.corpus_seed, cfg.pairs)
            questions += corpus_questions(cfg.corpus_seed, cfg.eval_pairs, held_out=True)
            answers = policy_answers(palm, tok, questions, seed=cfg.seed)
            log.info("sampled the policy's answers to %d questions in %.0f s", len(answers),
                     time.perf_counter() - t_sample)
        model = RewardModel(palm, num_binned_output=cfg.num_bins, copy_palm=False).train()
        pairs = preference_pairs(cfg.corpus_seed, cfg.pairs, answers=answers)
        eval_pairs = preference_pairs(cfg.corpus_seed, cfg.eval_pairs, held_out=True, answers=answers)
        topical = [p for p in pairs if p.kind in ("off_topic", "sampled_off_topic")]
        pools: dict[tuple[bool, int], list[Pair]] = {}
        for first in (True, False):
            for p in topical if first else pairs:
                pools.setdefault((first, p.prompt.count("User:") - 1), []).append(p)
        pools = {key: pool for key, pool in pools.items() if len(pool) >= cfg.batch_size}
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        rng = random.Random(cfg.seed)
        losses: list[float] = []
        t0, cpu0 = time.perf_counter(), time.process_time()
        bar = tqdm(range(cfg.steps), desc="demo reward", unit="step", disable=not progress, file=sys.stderr)
        for step in bar:
            if step < cfg.warmup_steps:
                lr = cfg.lr * (step + 1) / cfg.warmup_steps
            else:
                progress_ = max(0.0, (step - cfg.decay_from) / max(1, cfg.steps - cfg.decay_from))
                lr = cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress_)))
            for group in opt.param_groups:
                group["lr"] = lr
            # off-topic pairs alone first: mixed in from the start, the broken kinds (learnt in a
            # few steps) left off-topic pairs near chance, likely by pushing the intact answers into
            # the top rating bin, where the expected rating hardly moves.
            # A batch's pairs have as many earlier turns each: padding stays short
            first = step < cfg.topic_first_steps
            keys = [key for key in pools if key[0] == first]
            key = rng.choices(keys, [len(pools[k]) for k in keys])[0]
            batch = rng.sample(pools[key], cfg.batch_size)
            prompts = [p.prompt for p in batch] * 2
            scores = _scores(model, tok, prompts, [p.chosen for p in batch] + [p.rejected for p in batch])
            loss = bradley_terry_loss(scores[: cfg.batch_size], scores[cfg.batch_size :])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        model.eval()
        tail = losses[-20:]
        figures = {
            "train_seconds": round(time.perf_counter() - t0, 1),
            "train_cpu_seconds": round(time.process_time() - cpu0, 1),
            "final_train_loss": round(sum(tail) / len(tail), 4),
            "loss_curve": [
                round(sum(losses[i : i + 25]) / len(losses[i : i + 25]), 3) for i in range(0, len(losses), 25)
            ],
            "heldout_pair_accuracy": pair_accuracy(model, tok, eval_pairs),
        }
        return model, tok, manifest, figures
    finally:
        torch.set_num_threads(previous_threads)


def build_reward_checkpoint(
    out: str | Path, policy: str | Path, cfg: RewardTrainConfig | None = None, *, force: bool = False,
    progress: bool = True, command: str | None = None,
) -> Path:
    """Train the reward model on ``policy``'s trunk and save it as a ``reward`` checkpoint."""

    from palm_rlhf.demo.train import check_replaceable, staging_folder, swap_in

    cfg = cfg or RewardTrainConfig()
    out = Path(out)
    check_replaceable(out, force)
    model, _tok, manifest, figures = train_reward_model(policy, cfg, progress=progress)
    model = model.to(getattr(torch, cfg.save_dtype))
    metadata = {
        "description": "demo reward model: preference pairs of the demo corpus on the demo policy's trunk",
        "recipe": asdict(cfg),
        "figures": figures,
        "build_command": command or f"palm-rlhf demo-reward-build --out {out} --policy {policy}",
        "policy": str(manifest.get("version") or Path(policy).name),
        "stored_dtype": cfg.save_dtype,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    target = staging_folder(out)
    model.save(target, version=out.name, parent=manifest.get("version"), tokenizer=manifest.get("tokenizer"),
               metadata=metadata)
    swap_in(target, out)
    log.info("demo reward model saved to %s: held-out pair accuracy %s", out, figures["heldout_pair_accuracy"])
    return out


def load_reward_checkpoint(path: str | Path, dtype: Any = None):
    """(RewardModel in eval mode, tokenizer, manifest), upcast to float32 by default."""
    from palm_rlhf.reward import RewardModel
    from palm_rlhf.tokenizer import load_tokenizer

    model, manifest = RewardModel.from_checkpoint(path)
    return model.to(dtype or torch.float32).eval(), load_tokenizer(manifest.get("tokenizer")), manifest


__all__ = [
    "HISTORY_SHARE",
    "KIND_WEIGHTS",
    "MAX_HISTORY",
    "REJECTION_KINDS",
    "SAMPLED_SHARE",
    "Pair",
    "RewardTrainConfig",
    "build_reward_checkpoint",
    "corpus_questions",
    "load_reward_checkpoint",
    "pair_accuracy",
    "policy_answers",
    "preference_pairs",
    "train_reward_model",
]
