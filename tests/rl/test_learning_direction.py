"""The online updates must move the policy *towards* reward.

Sign mistakes in an advantage (or in the KL penalty folded into it) make no test about shapes,
finiteness or "the loss changed" fail, yet they turn learning around. These tests pin the
direction:

- a toy task (reward = fraction of response tokens equal to a target token) on which a few
  ``policy_update`` iterations of each online algorithm must raise the mean reward of fresh,
  seeded samples by a clear margin (and, with a flipped advantage, it falls instead);
- ``compute_advantages`` on hand-made groups: the best-scored sample gets a positive
  advantage and the others negative ones, with the exact RLOO / GRPO values, and the RLOO KL
  penalty lowers the advantage of the sample that drifted furthest from the reference.
"""

from __future__ import annotations

import pytest
import torch

from palm_rlhf.generation import SamplingParams, generate_tokens
from palm_rlhf.rl.models import Actor, Critic
from palm_rlhf.rl.online import PolicyUpdateConfig, compute_advantages, policy_update
from palm_rlhf.rl.rollout import Rollout, pack_sequences, rollout

TARGET = 5
VOCAB = 16
NEW_TOKENS = 4


def _target_fraction(ro: Rollout) -> torch.Tensor:
    """Reward of each row: the fraction of its response tokens equal to TARGET."""
    resp = ro.action_mask  # position t is about token t + 1
    hits = (ro.sequences[:, 1:] == TARGET) & resp
    return hits.sum(1).float() / resp.sum(1).clamp(min=1)


def _mean_reward_of_fresh_samples(palm, prompts, seed: int = 10_000) -> float:
    """Mean reward of 16 seeded samples per prompt, a random stream the updates never saw."""
    res = generate_tokens(palm, prompts, SamplingParams(max_new_tokens=NEW_TOKENS, n=16, seed=seed))
    toks = [t for group in res for c in group for t in c.token_ids]
    return sum(t == TARGET for t in toks) / len(toks)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_policy_update_raises_the_reward_of_fresh_samples(tiny_palm, algorithm):
    palm = tiny_palm(num_tokens=VOCAB, max_seq_len=32)
    prompts = [torch.randint(1, VOCAB, (3,)).tolist() for _ in range(8)]
    group = 4
    # full fine-tuning: a random tiny model's LoRA alone learns too slowly for a quick test
    critic = Critic(palm, lora=False) if algorithm == "ppo" else None
    actor = Actor(palm, finetune="full")
    reference = actor.make_reference()
    optim = torch.optim.Adam(actor.trainable_parameters(), lr=3e-3)
    critic_optim = torch.optim.Adam(critic.trainable_parameters(), lr=3e-3) if critic else None
    cfg = PolicyUpdateConfig(algorithm=algorithm, epochs=2, minibatch_size=32)
    kl_coef = 0.01  # small: the leash is on, but the task reward dominates

    before = _mean_reward_of_fresh_samples(palm, prompts)
    scores = []
    for it in range(8):
        ro = rollout(
            palm,
            prompts,
            SamplingParams(max_new_tokens=NEW_TOKENS, n=group, seed=it),
            ref_logprobs_fn=lambda seq, mask: reference.logprobs_of(seq),
            reward_fn=_target_fraction,
            value_fn=(lambda seq, mask: critic(seq)) if critic is not None else None,
        )
        scores.append(round(float(ro.scores.mean()), 3))
        policy_update(
            actor, optim, ro, cfg, kl_coef, group, critic=critic, critic_optim=critic_optim, seed=it
        )
    after = _mean_reward_of_fresh_samples(palm, prompts)

    assert before < 0.12  # about 1/16 by chance
    # measured: 0.055 -> 0.34 (PPO), 0.28 (GRPO), 0.31 (RLOO); flipped advantages: -> about 0.01
    assert after > before + 0.12, f"{algorithm}: mean reward {before:.3f} -> {after:.3f}; rollouts {scores}"


# --- compute_advantages on hand-made groups ---------------------------------------------------


def _group_rollout(scores, kl_per_token, values=None) -> Rollout:
    """One group of len(scores) samples of the same prompt, every response 3 tokens long; the
    policy gives each response token log-prob -1 and the reference -1 - kl_per_token[i]."""
    k = len(scores)
    packed = pack_sequences([[1, 2]] * k, [[3, 4, 6]] * k, response_logprobs=[[-1.0] * 3] * k)
    ro = Rollout(prompts=[[1, 2]] * k, responses=[[3, 4, 6]] * k, group_ids=[0] * k, **packed)
    mask = ro.action_mask.float()
    ro.ref_logprobs = (ro.old_logprobs - torch.tensor(kl_per_token, dtype=torch.float32)[:, None]) * mask
    ro.scores = torch.tensor(scores, dtype=torch.float32)
    ro.values = values if values is not None else torch.zeros_like(mask)
    return ro


def _per_sequence(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The one advantage of each row (critic-free advantages are constant over its tokens)."""
    per_row = adv.sum(1) / mask.sum(1)
    torch.testing.assert_close(adv, per_row[:, None] * mask.float())  # and 0 off the response
    return per_row


def test_rloo_advantages_favour_the_better_sample():
    ro = _group_rollout([0.0, 0.0, 1.0, 0.0], [0.0] * 4)
    adv, returns, stats = compute_advantages(ro, PolicyUpdateConfig(algorithm="rloo"), 0.1, group_size=4)
    assert returns is None
    seq = _per_sequence(adv, ro.action_mask)
    assert seq[2] > 0 and (seq[[0, 1, 3]] < 0).all(), seq
    # leave-one-out baseline: A_i = r_i - mean_{j != i} r_j
    torch.testing.assert_close(seq, torch.tensor([-1 / 3, -1 / 3, 1.0, -1 / 3]))
    assert stats["rollout_kl"] == pytest.approx(0.0)


def test_grpo_advantages_favour_the_better_sample():
    ro = _group_rollout([0.0, 0.0, 1.0, 0.0], [0.0] * 4)
    adv, returns, _ = compute_advantages(ro, PolicyUpdateConfig(algorithm="grpo"), 0.1, group_size=4)
    assert returns is None
    seq = _per_sequence(adv, ro.action_mask)
    assert seq[2] > 0 and (seq[[0, 1, 3]] < 0).all(), seq
    r = torch.tensor([0.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(seq, (r - r.mean()) / (r.std() + 1e-6))


def test_grpo_groups_are_compared_only_within_themselves():
    """Two prompts: a sample is judged against its own group, not the other prompt's."""
    ro = _group_rollout([0.0, 1.0, 5.0, 4.0], [0.0] * 4)
    adv, _, _ = compute_advantages(ro, PolicyUpdateConfig(algorithm="grpo"), 0.0, group_size=2)
    seq = _per_sequence(adv, ro.action_mask)
    assert seq[1] > 0 > seq[0] and seq[2] > 0 > seq[3], seq  # 4.0 is the worse of its group


def test_ppo_advantages_favour_the_better_sample():
    ro = _group_rollout([0.0, 0.0, 1.0, 0.0], [0.0] * 4)
    adv, returns, _ = compute_advantages(ro, PolicyUpdateConfig(algorithm="ppo"), 0.1, group_size=1)
    mask = ro.action_mask
    assert (adv[2][mask[2]] > 0).all() and (adv[[0, 1, 3]][mask[[0, 1, 3]]] < 0).all(), adv
    assert (adv[~mask] == 0).all()
    # zero values, gamma 1: the lambda-return of a token k steps before the end is lam^k * score
    torch.testing.assert_close(returns[2][mask[2]], torch.tensor([0.95**2, 0.95, 1.0]))
    torch.testing.assert_close(returns[[0, 1, 3]], torch.zeros(3, mask.shape[1]))


def test_rloo_kl_penalty_lowers_the_advantage_of_the_drifted_sample():
    """Equal scores; sample 1 has log pi - log ref = +1 on each of its 3 tokens (KL 3 nats)."""
    kl_coef = 0.1
    ro = _group_rollout([0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0])
    cfg = PolicyUpdateConfig(algorithm="rloo", kl_estimator="k1")
    free, _, _ = compute_advantages(ro, cfg, 0.0, group_size=4)
    leashed, _, stats = compute_advantages(ro, cfg, kl_coef, group_size=4)
    free, leashed = _per_sequence(free, ro.action_mask), _per_sequence(leashed, ro.action_mask)
    torch.testing.assert_close(free, torch.zeros(4))
    assert leashed[1] < 0 and (leashed[[0, 2, 3]] > 0).all(), leashed
    # A_i = (r_i - beta KL_i) - mean_{j != i} (r_j - beta KL_j)
    torch.testing.assert_close(leashed, torch.tensor([0.1, -0.3, 0.1, 0.1]))
    assert stats["rollout_kl"] == pytest.approx(0.75)  # mean over the group of 3, 0, 0, 0 nats


def test_rloo_kl_penalty_can_outweigh_a_small_score_lead():
    """The drifted sample scores a little higher, but a strong leash still ranks it last."""
    ro = _group_rollout([0.5, 0.6, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0])
    cfg = PolicyUpdateConfig(algorithm="rloo")
    loose, _, _ = compute_advantages(ro, cfg, 0.0, group_size=4)
    tight, _, _ = compute_advantages(ro, cfg, 1.0, group_size=4)
    assert _per_sequence(loose, ro.action_mask)[1] > 0
    assert _per_sequence(tight, ro.action_mask)[1] < 0
