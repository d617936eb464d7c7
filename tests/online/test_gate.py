"""The publish gate and the figures it reads."""

from __future__ import annotations

import math

import torch

from palm_rlhf.rl.online import GateConfig, PolicyEval, gate, pair_agreement, repetition_rate


def ev(**kw) -> PolicyEval:
    base = {"mean_reward": 0.5, "kl": 1.0, "mean_length": 20.0, "repetition": 0.02, "pair_agreement": 0.6,
            "num_prompts": 32, "num_pairs": 10}
    base.update(kw)
    return PolicyEval(**base)


CFG = GateConfig(reward_tolerance=0.02, kl_budget=5.0, max_repetition=0.25, pair_tolerance=0.0, min_pairs=4)


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
    d = gate(ev(pair_agreement=0.0, num_pairs=2), ev(pair_agreement=1.0), CFG)
    assert d.passed and "human_pairs" not in d.checks


def test_reward_drop_beyond_tolerance_length_and_repetition_are_rejected():
    assert gate(ev(mean_reward=0.49), ev(), CFG).passed  # within tolerance
    assert not gate(ev(mean_reward=0.47), ev(), CFG).checks["reward"]
    assert not gate(ev(mean_reward=math.nan), ev(), CFG).checks["reward"]
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
