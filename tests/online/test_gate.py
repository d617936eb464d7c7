"""The publish gate and the figures it reads."""

from __future__ import annotations

import math
import random

import torch

from palm_rlhf.rl.online import (
    GateConfig,
    PolicyEval,
    gate,
    pair_agreement,
    paired_gain,
    repetition_rate,
    signed_rank_p,
)


def ev(**kw) -> PolicyEval:
    base = {"mean_reward": 0.5, "kl": 1.0, "mean_length": 20.0, "repetition": 0.02, "pair_agreement": 0.6,
            "num_prompts": 32, "num_pairs": 10}
    base.update(kw)
    return PolicyEval(**base)


CFG = GateConfig(reward_confidence=1.645, kl_budget=5.0, max_repetition=0.25, pair_tolerance=0.0, min_pairs=4)
# per-prompt rewards of a current policy, and a candidate that is better on most prompts
CUR = [0.5, 0.4, 0.6, 0.5, 0.3, 0.7, 0.5, 0.45, 0.55, 0.5]
BETTER = [r + d for r, d in zip(CUR, [0.2, 0.1, 0.15, 0.3, 0.2, 0.0, 0.25, 0.1, 0.2, 0.15])]


def test_better_candidate_within_every_bound_passes():
    d = gate(ev(mean_reward=0.7, kl=3.0, pair_agreement=0.7), ev(), CFG)
    assert d.passed and d.reasons == [] and all(d.checks.values())


def test_candidate_over_the_kl_budget_is_rejected_even_with_a_higher_reward():
    d = gate(ev(mean_reward=0.9, kl=5.5), ev(), CFG)
    assert not d.passed and d.checks["kl"] is False and "KL" in d.message
    assert d.checks["reward"] and d.checks["human_pairs"]


def test_candidate_whose_human_pair_agreement_drops_is_rejected_despite_more_reward():
    d = gate(ev(mean_reward=0.9, pair_agreement=0.5), ev(pair_agreement=0.6), CFG)
    assert not d.passed and d.checks["human_pairs"] is False and "human pairs" in d.message


def test_human_pair_check_is_skipped_without_enough_held_out_pairs():
    d = gate(ev(mean_reward=0.7, pair_agreement=0.0, num_pairs=2), ev(pair_agreement=1.0), CFG)
    assert d.passed and "human_pairs" not in d.checks


def test_the_reward_must_improve_with_confidence_on_the_same_prompts():
    cur = ev(mean_reward=sum(CUR) / len(CUR), rewards=CUR)
    better = ev(mean_reward=sum(BETTER) / len(BETTER), rewards=BETTER)
    assert gate(better, cur, CFG).passed
    # the same candidate is not good enough against itself, nor a slightly lower one
    assert not gate(cur, cur, CFG).checks["reward"]
    lower = [r - 0.01 for r in CUR]
    d = gate(ev(mean_reward=sum(lower) / len(lower), rewards=lower), cur, CFG)
    assert not d.passed and "not above" in d.message
    # a higher mean carried by one lucky prompt is noise: rejected for want of confidence
    lucky = [*CUR[:-1], CUR[-1] + 2.0]
    mean, t = paired_gain(lucky, CUR)
    assert mean > 0 and t < 1.645
    d = gate(ev(mean_reward=sum(lucky) / len(lucky), rewards=lucky), cur, CFG)
    assert not d.checks["reward"] and "confidence" in d.message
    assert not gate(ev(mean_reward=math.nan), ev(), CFG).checks["reward"]


def test_a_gain_carried_by_the_few_prompts_whose_answers_changed_is_not_confidence():
    # same seeds: a small step leaves 9 of 12 answers (and rewards) exactly as they were; three
    # that changed for the better give a paired t over 1.645, but 3 of 3 is no evidence (p = 1/8)
    cur = [2.0, 1.5, 3.0, 2.5, 0.5, 3.5, 2.0, 1.0, 3.0, 2.5, 1.5, 2.0]
    cand = [*cur[:9], cur[9] + 2.4, cur[10] + 2.3, cur[11] + 2.2]
    mean, t = paired_gain(cand, cur)
    assert mean > 0 and t > 1.645
    d = gate(ev(mean_reward=sum(cand) / 12, rewards=cand), ev(mean_reward=sum(cur) / 12, rewards=cur), CFG)
    assert not d.checks["reward"] and "over the 3 of 12 prompts whose rewards changed (3 better, 0 worse)" in d.message
    assert "p=0.125" in d.message
    # five changed prompts, all better, are enough (p = 1/32)
    five = [*cur[:7], *(r + 2.0 + 0.1 * k for k, r in enumerate(cur[7:]))]
    assert gate(ev(mean_reward=sum(five) / 12, rewards=five), ev(mean_reward=sum(cur) / 12, rewards=cur), CFG).passed
    # a large gain on most prompts passes with a few small losses (a sign test would not: 9 of 12
    # better gives p = 0.073)
    skewed = [r + (1.5 + 0.1 * k if k % 4 else -0.05 - 0.01 * k) for k, r in enumerate(cur)]
    wins = sum(a > b for a, b in zip(skewed, cur))
    assert wins == 9 and gate(ev(mean_reward=sum(skewed) / 12, rewards=skewed),
                              ev(mean_reward=sum(cur) / 12, rewards=cur), CFG).passed
    # and it can be turned off
    off = GateConfig(reward_confidence=1.645, kl_budget=5.0, min_pairs=4, rank_alpha=1.0)
    assert gate(ev(mean_reward=sum(cand) / 12, rewards=cand), ev(mean_reward=sum(cur) / 12, rewards=cur), off).passed


def _signed_rank_p_by_enumeration(diffs):
    """The same test written the slow, obvious way: every sign pattern of the non-zero
    differences, mean ranks for ties."""
    import itertools

    d = [x for x in diffs if x != 0]
    mags = sorted(abs(x) for x in d)
    rank = {m: (mags.index(m) + 1 + len(mags) - mags[::-1].index(m)) / 2 for m in mags}
    observed = sum(rank[abs(x)] for x in d if x > 0)
    hits = sum(sum(rank[abs(x)] for x, s in zip(d, signs) if s) >= observed - 1e-12
               for signs in itertools.product([True, False], repeat=len(d)))
    return hits / 2 ** len(d)


def test_signed_rank_p_is_exact_with_ties_and_zeros():
    assert signed_rank_p([0.0, 0.0]) == 1.0
    assert signed_rank_p([1.0, 2.0, 3.0]) == 1 / 8 and signed_rank_p([1, 2, 3, 4, 5]) == 1 / 32
    assert signed_rank_p([-1.0, -2.0, -3.0]) == 1.0
    assert signed_rank_p([1.0, 1.0, -1.0]) == 0.5  # three tied ranks of 2: W+ = 4 or more in 4 of 8
    rng = random.Random(0)
    for _ in range(40):
        diffs = [rng.choice([0.0, 0.5, -0.5, 1.0, -1.0, rng.uniform(-2, 2)]) for _ in range(rng.randint(1, 11))]
        assert math.isclose(signed_rank_p(diffs), _signed_rank_p_by_enumeration(diffs)), diffs


def test_paired_gain_is_the_mean_difference_and_its_t_statistic():
    assert paired_gain([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (0.0, 0.0)
    assert paired_gain([2.0, 3.0], [1.0, 2.0]) == (1.0, math.inf)
    mean, t = paired_gain([1.0, 2.0, 4.0], [0.0, 0.0, 0.0])
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert math.isclose(mean, 7 / 3) and math.isclose(t, (7 / 3) / (sd / math.sqrt(3)))


def test_length_and_repetition_are_bounded():
    assert not gate(ev(mean_length=45.0), ev(), CFG).checks["length"]
    assert not gate(ev(mean_length=1.0), ev(), CFG).checks["length"]
    assert not gate(ev(repetition=0.4), ev(), CFG).checks["repetition"]


def test_pair_agreement_is_one_half_for_the_reference_and_follows_the_margin():
    ref_c, ref_r = torch.tensor([-5.0, -6.0, -7.0, -8.0]), torch.tensor([-5.5, -4.0, -7.0, -9.0])
    assert pair_agreement(ref_c, ref_r, ref_c, ref_r) == 0.5
    # the policy moved mass toward the chosen answers of pairs 0 and 1, away in pair 2; pair 3 a tie
    pol_c = ref_c + torch.tensor([1.0, 2.0, -1.0, 0.0])
    assert pair_agreement(pol_c, ref_r, ref_c, ref_r) == (1 + 1 + 0 + 0.5) / 4
    assert math.isnan(pair_agreement(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0)))


def test_repetition_rate_counts_repeated_word_trigrams():
    assert repetition_rate("what a lovely day it is") == 0.0
    assert repetition_rate("so good so good so good so good") == 1 - 2 / 6  # two distinct of six
    assert repetition_rate("hi") == 0.0
