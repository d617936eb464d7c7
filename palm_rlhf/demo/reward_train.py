"""The shipped reward model of the demo world, trained on preference pairs the corpus makes.

Every pair is a held-in training question with its corpus answer (chosen) and a worse answer
(rejected), one of:

* ``off_topic`` - a corpus answer to a question of another topic;
* ``misspelled`` - the answer with one to three words misspelled (letters swapped, dropped
  or doubled);
* ``truncated`` - the answer cut after a few words, mid-sentence;
* ``repeated`` - the answer with a run of its words said again (or twice over).

The reward model is a :class:`palm_rlhf.reward.RewardModel` (five rating bins, the reward
service's default head) on the demo policy's trunk, trained with the Bradley-Terry loss on
its expected rating, trunk included. It is saved in the format the reward service loads, so
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

REJECTION_KINDS = ("off_topic", "misspelled", "truncated", "repeated")
KIND_WEIGHTS = (0.55, 0.15, 0.15, 0.15)


@dataclass
class RewardTrainConfig:
    """The recipe of the shipped reward model; every default is what built it."""

    seed: int = 0
    corpus_seed: int = 2  # training questions of another sample than the policy's
    pairs: int = 6000
    steps: int = 500
    batch_size: int = 16  # pairs per step
    lr: float = 1e-3
    warmup_steps: int = 20
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


def preference_pairs(seed: int, count: int, held_out: bool = False, rng_seed: int = 0) -> list[Pair]:
    """``count`` pairs from single-turn exchanges of corpus ``seed``; rejected kinds are drawn
    with :data:`KIND_WEIGHTS`."""
    from palm_rlhf.chat import format_chat
    from palm_rlhf.demo.corpus import generate_exchanges

    turns = [e.last for e in generate_exchanges(seed, count, held_out=held_out)]
    by_topic: dict[str, list[str]] = {}
    for t in turns:
        by_topic.setdefault(t.topic, []).append(t.answer)
    rng = random.Random(f"pairs-{seed}-{held_out}-{rng_seed}")
    pairs = []
    for t in turns:
        kind = rng.choices(REJECTION_KINDS, KIND_WEIGHTS)[0]
        if kind == "off_topic":
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
        pairs.append(Pair(format_chat([{"role": "user", "content": t.question}]), t.answer, rejected, kind))
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
    model.train(was)
    out = {kind: round(sum(v) / len(v), 4) for kind, v in sorted(right.items())}
    out["all"] = round(sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values()), 4)
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
        model = RewardModel(palm, num_binned_output=cfg.num_bins, copy_palm=False).train()
        pairs = preference_pairs(cfg.corpus_seed, cfg.pairs)
        eval_pairs = preference_pairs(cfg.corpus_seed, cfg.eval_pairs, held_out=True)
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
                progress_ = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
                lr = cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress_)))
            for group in opt.param_groups:
                group["lr"] = lr
            batch = rng.sample(pairs, cfg.batch_size)
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
    "KIND_WEIGHTS",
    "REJECTION_KINDS",
    "Pair",
    "RewardTrainConfig",
    "build_reward_checkpoint",
    "load_reward_checkpoint",
    "pair_accuracy",
    "preference_pairs",
    "train_reward_model",
]
