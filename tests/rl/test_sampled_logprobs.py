"""Rollout log-probs are those of the distribution actually sampled, and the training forward
takes its new log-probs under the same transform, so the PPO ratio starts at exactly 1.

With temperature T and top-p, tokens come from ``softmax(logits / T)`` restricted to the
nucleus. Recording the model's plain (temperature 1, unfiltered) log-probs as the behaviour
policy's makes every ratio off-policy by a factor that has nothing to do with the update; so
does recording the right ones while the training forward computes plain ones.
"""

from __future__ import annotations

import pytest
import torch

from palm_rlhf.generation import SamplingParams, generate_tokens
from palm_rlhf.rl import losses as L
from palm_rlhf.rl.models import Actor
from palm_rlhf.rl.online import PolicyUpdateConfig, policy_update
from palm_rlhf.rl.rollout import rollout
from palm_rlhf.rl.update import UpdateConfig, action_logprobs

VOCAB = 32
T, TOP_P, TOP_K = 0.7, 0.9, 6


def _sharp_palm(tiny_palm):
    palm = tiny_palm(num_tokens=VOCAB, max_seq_len=32)
    palm.set_dropout(0.0)
    with torch.no_grad():  # a random tiny PaLM is nearly uniform: sharpen it so the nucleus is small
        palm.token_emb.weight.mul_(8.0)
    return palm


@torch.no_grad()
def _expected_sampled_logprobs(palm, seq, temperature, top_p=1.0, top_k=0):
    """log-probs of seq's tokens under softmax(logits / T) restricted to the top-k / top-p set,
    written out here from a full forward pass, independently of the library's code."""
    logits = palm(seq)[:, :-1].float() / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p  # mass before each token < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    logp = torch.log_softmax(logits.masked_fill(~keep, float("-inf")), -1)
    return logp.gather(-1, seq[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("top_k", [0, TOP_K])
def test_rollout_records_the_sampled_distribution_and_the_training_ratio_starts_at_one(tiny_palm, top_k):
    palm = _sharp_palm(tiny_palm)
    actor = Actor(palm, finetune="full")
    prompts = [[1, 2, 3], [4, 5], [7, 8, 9, 10]]
    params = SamplingParams(max_new_tokens=10, temperature=T, top_p=TOP_P, top_k=top_k, n=4, seed=0)
    ro = rollout(palm, prompts, params, finetune_scope=actor.scope)
    mask = ro.action_mask
    assert int(mask.sum()) == 3 * 4 * 10

    # the recorded old log-probs are those of the distribution sampled ...
    expected = _expected_sampled_logprobs(palm, ro.sequences, T, TOP_P, top_k)
    torch.testing.assert_close(ro.old_logprobs[mask], expected[mask], atol=1e-5, rtol=0)
    # ... which differ clearly from the plain ones, still recorded for the KL to the reference
    plain = palm.logprobs_of(ro.sequences)
    torch.testing.assert_close(ro.policy_logprobs[mask], plain[mask], atol=1e-5, rtol=0)
    assert (ro.old_logprobs - plain)[mask].abs().max() > 0.05

    # the training forward (no update in between) under the same transform: ratio == 1
    cfg = UpdateConfig(temperature=T, top_p=TOP_P, top_k=top_k)
    with torch.no_grad():
        new, own = action_logprobs(actor(ro.sequences)[:, :-1], ro.sequences[:, 1:], cfg)
    ratio = (new - ro.old_logprobs).exp()[mask]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    torch.testing.assert_close(own[mask], plain[mask], atol=1e-5, rtol=0)
    # the plain training forward would be off-policy by far more than any clip range's noise
    plain_ratio = (own - ro.old_logprobs).exp()[mask]
    assert (plain_ratio - 1).abs().max() > 0.05


def test_the_online_update_sees_no_policy_change_before_its_first_step(tiny_palm):
    """policy_update with a zero learning rate: every minibatch measures the ratio of the
    unchanged policy, so its k3 KL(old || new) is 0 and nothing is clipped, only if the update
    computes its log-probs under the rollouts' sampling transform."""
    palm = _sharp_palm(tiny_palm)
    actor = Actor(palm, finetune="full")
    prompts = [[1, 2, 3], [4, 5]]
    ro = rollout(palm, prompts, SamplingParams(max_new_tokens=8, temperature=T, top_p=TOP_P, n=4, seed=1))
    ro.ref_logprobs = ro.policy_logprobs.clone()
    ro.scores = torch.arange(len(ro), dtype=torch.float32)
    optim = torch.optim.SGD(actor.trainable_parameters(), lr=0.0)

    same = PolicyUpdateConfig(algorithm="grpo", epochs=1, minibatch_size=4, temperature=T, top_p=TOP_P)
    stats = policy_update(actor, optim, ro, same, kl_coef=0.1, group_size=4)
    assert stats["approx_kl"] < 1e-9 and stats["clip_fraction"] == 0.0
    assert stats["ref_kl"] < 1e-9  # the leash: the policy's own log-probs vs the reference's

    plain = PolicyUpdateConfig(algorithm="grpo", epochs=1, minibatch_size=4)  # the transform forgotten
    assert policy_update(actor, optim, ro, plain, kl_coef=0.1, group_size=4)["approx_kl"] > 1e-3


def test_sampling_logprobs_keep_the_sampled_token_and_stay_differentiable():
    """After an update a sampled token may leave the new nucleus: its log-prob stays finite
    (the token is kept in the renormalised set) and gradients flow."""
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]], requires_grad=True)
    tokens = torch.tensor([2])  # outside the top-p 0.9 set of these logits
    lp = L.sampling_logprobs(logits, tokens, temperature=1.0, top_p=0.9)
    expected = torch.log_softmax(torch.tensor([4.0, 3.0, 0.0]), -1)[2]
    torch.testing.assert_close(lp, expected[None])
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 3] == 0
    with pytest.raises(ValueError, match="temperature"):
        L.sampling_logprobs(logits, tokens, temperature=0.0)


def test_completions_carry_both_log_probs(tiny_palm):
    palm = _sharp_palm(tiny_palm)
    plain = generate_tokens(palm, [[1, 2]], SamplingParams(max_new_tokens=5, seed=3))[0][0]
    assert plain.sampled_logprobs == plain.logprobs  # temperature 1, unfiltered: the same
    greedy = generate_tokens(palm, [[1, 2]], SamplingParams(max_new_tokens=5, temperature=0.0))[0][0]
    assert greedy.sampled_logprobs == [0.0] * 5  # a point mass
    hot = generate_tokens(palm, [[1, 2]], SamplingParams(max_new_tokens=5, temperature=T, top_p=TOP_P, seed=3))
    c = hot[0][0]
    assert len(c.sampled_logprobs) == len(c.logprobs) == 5
    assert c.sampled_logprobs != c.logprobs
