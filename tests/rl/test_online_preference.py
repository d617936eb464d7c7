"""Preference updates from logged pairs (DPO, IPO, KTO) move the policy towards what people chose.

A toy preference: every chosen answer has the token GOOD at its even positions, the rejected
one BAD there, and otherwise the same (random) tokens. ``preference_update`` must raise the
policy's implicit margin ``[log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]`` on the
training pairs *and* on held-out pairs that share only that feature; with chosen and rejected
swapped it must lower it instead.
"""

from __future__ import annotations

import time

import pytest
import torch

from palm_rlhf.rl.feedback import PreferencePair
from palm_rlhf.rl.models import Actor
from palm_rlhf.rl.online import (
    PreferenceUpdateConfig,
    mismatched_completions,
    preference_update,
    sequence_logps,
)

VOCAB = 16
GOOD, BAD = 5, 9


def _pairs(n: int, seed: int, flip: bool = False) -> list[PreferencePair]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(1, VOCAB, (3,), generator=gen).tolist()
        noise = torch.randint(1, VOCAB, (4,), generator=gen).tolist()
        good = [GOOD if j % 2 == 0 else t for j, t in enumerate(noise)]
        bad = [BAD if j % 2 == 0 else t for j, t in enumerate(noise)]
        chosen, rejected = (bad, good) if flip else (good, bad)
        out.append(PreferencePair(f"p{i}", prompt, "c", "r", chosen, rejected, "preference", i))
    return out


def _ref(reference, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [p.prompt_token_ids for p in pairs]
    return (
        sequence_logps(reference, prompts, [p.chosen_token_ids for p in pairs]),
        sequence_logps(reference, prompts, [p.rejected_token_ids for p in pairs]),
    )


def _margin(policy, reference, pairs) -> float:
    """Mean implicit margin of the policy on ``pairs`` (0 for the reference itself)."""
    ref_c, ref_r = _ref(reference, pairs)
    pol_c, pol_r = _ref(policy, pairs)
    return float(((pol_c - ref_c) - (pol_r - ref_r)).mean())


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("algorithm", ["dpo", "ipo", "kto"])
def test_preference_update_raises_the_implicit_margin(tiny_palm, algorithm, flip):
    palm = tiny_palm(num_tokens=VOCAB, max_seq_len=32)
    palm.set_dropout(0.0)
    actor = Actor(palm, finetune="full")  # a random tiny model's LoRA alone learns too slowly
    reference = actor.make_reference()
    train = _pairs(8, seed=0, flip=flip)
    held = _pairs(8, seed=1)  # other prompts and answers, the same feature, never flipped
    ref_c, ref_r = _ref(reference, train)
    extra = {}
    if algorithm == "kto":
        mp, mr = mismatched_completions(train, max_len=32)
        extra["ref_mismatched_logps"] = sequence_logps(reference, mp, mr)
        extra["max_len"] = 32
    optim = torch.optim.Adam(actor.trainable_parameters(), lr=1e-2)
    cfg = PreferenceUpdateConfig(algorithm=algorithm, beta=0.1, epochs=8, minibatch_size=4)

    assert _margin(palm, reference, train) == pytest.approx(0.0, abs=1e-5)
    start = time.perf_counter()
    stats = preference_update(actor, optim, train, ref_c, ref_r, cfg, **extra)
    elapsed = time.perf_counter() - start
    train_margin = _margin(palm, reference, train)
    held_margin = _margin(palm, reference, held)  # in the unflipped orientation

    assert stats["steps"] == 16 and stats["pairs"] == 8
    assert stats["loss_last"] < stats["loss_first"]
    # measured on the training pairs as given (flipped or not): the update fits them
    assert train_margin > 1.0, (algorithm, flip, train_margin, stats)
    sign = -1.0 if flip else 1.0
    assert sign * held_margin > 1.0, (algorithm, flip, held_margin, stats)
    if algorithm == "ipo":  # IPO regresses the margin to 1 / (2 beta) = 5 nats instead of growing it
        assert train_margin < 10.0, train_margin
    if algorithm == "kto":
        assert "kto_reference_point" in stats
    assert elapsed < 20, f"{algorithm} took {elapsed:.1f} s"


def test_preference_update_checks_its_inputs(tiny_palm):
    palm = tiny_palm(num_tokens=VOCAB)
    actor = Actor(palm, finetune="full")
    optim = torch.optim.Adam(actor.trainable_parameters(), lr=1e-3)
    pairs = _pairs(3, seed=0)
    with pytest.raises(ValueError, match="2 entries for 3 pairs"):
        preference_update(actor, optim, pairs, torch.zeros(2), torch.zeros(3), PreferenceUpdateConfig())
    with pytest.raises(ValueError, match="no preference pairs"):
        preference_update(actor, optim, [], [], [], PreferenceUpdateConfig())
    with pytest.raises(ValueError, match="'dpo', 'ipo' or 'kto'"):
        PreferenceUpdateConfig(algorithm="orpo")
    prompts, responses = mismatched_completions(pairs, max_len=5)
    assert prompts == [p.prompt_token_ids for p in pairs]
    assert responses[0] == pairs[1].chosen_token_ids[:2] and responses[2] == pairs[0].chosen_token_ids[:2]
