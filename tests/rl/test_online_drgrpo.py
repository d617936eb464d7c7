"""Dr. GRPO in the online update: unscaled group advantages and a constant-normalised loss."""

from __future__ import annotations

import pytest
import torch

from palm_rlhf.generation import SamplingParams
from palm_rlhf.rl.models import Actor
from palm_rlhf.rl.online import PolicyUpdateConfig, compute_advantages, policy_update
from palm_rlhf.rl.rollout import rollout

BUDGET = 6


def test_drgrpo_config_needs_the_generation_budget():
    with pytest.raises(ValueError, match="max_new_tokens"):
        PolicyUpdateConfig(algorithm="drgrpo")
    assert PolicyUpdateConfig(algorithm="drgrpo", max_new_tokens=BUDGET).aggregation == "seq-mean-token-sum-norm"
    assert PolicyUpdateConfig(algorithm="grpo").aggregation == "token-mean"
    with pytest.raises(ValueError, match="loss aggregation"):
        PolicyUpdateConfig(algorithm="grpo", loss_aggregation="token-median")


def test_drgrpo_update_uses_centred_advantages_and_the_constant_normaliser(tiny_palm):
    palm = tiny_palm(num_tokens=16, max_seq_len=32)
    palm.set_dropout(0.0)
    actor = Actor(palm, finetune="full")
    group = 4
    params = SamplingParams(max_new_tokens=BUDGET, n=group, seed=0, stop_token_ids=(2,))
    ro = rollout(palm, [[1, 3, 4], [5, 6]], params)
    ro.ref_logprobs = ro.policy_logprobs.clone()
    ro.scores = torch.tensor([0.0, 1.0, 3.0, 0.0, 2.0, 2.0, 0.0, 4.0])
    cfg = PolicyUpdateConfig(algorithm="drgrpo", max_new_tokens=BUDGET, epochs=1, minibatch_size=8)

    adv, returns, _ = compute_advantages(ro, cfg, kl_coef=0.1, group_size=group)
    scores = ro.scores.view(-1, group)
    centred = (scores - scores.mean(1, keepdim=True)).reshape(-1)  # no division by the group std
    mask = ro.action_mask
    assert returns is None
    torch.testing.assert_close(adv, centred[:, None] * mask)

    # one on-policy step (lr 0: ratio 1): the surrogate is -sum_t A_i per response / budget
    stats = policy_update(actor, torch.optim.SGD(actor.trainable_parameters(), lr=0.0), ro, cfg, 0.1, group)
    expected = -(centred * mask.sum(1)).sum() / BUDGET / len(ro)
    assert stats["policy_loss"] == pytest.approx(float(expected), abs=1e-5)
    assert stats["ref_kl"] == pytest.approx(0.0, abs=1e-7)  # Dr. GRPO keeps GRPO's in-loss KL term
