"""The KL leash must be held against the frozen reference, never the policy that sampled.

Measured against the rollout ("old") policy, the KL term is about 0 at every update: every
test that only checks shapes or that training runs still passes, but the policy may drift
without bound. These tests build a policy that has already drifted from its reference and
compare every KL the trainers use with an independent ``log pi_actor - log pi_ref`` computed
here on the same sequences:

- ``RLHFTrainer``: the per-token KL of its experience, PPO's penalised rewards, RLOO's
  penalised advantages, GRPO's in-loss KL and the KL it reports; and, behaviourally, a strong
  leash with zero task reward pulls a drifted actor back towards the reference;
- the online loop (``rollout`` + ``compute_advantages`` / ``policy_update``): ``rollout_kl``,
  the KL-penalised advantages of PPO and RLOO, and GRPO's in-loss KL.
"""

from __future__ import annotations

import copy

import pytest
import torch

from palm_rlhf import RLHFTrainer
from palm_rlhf.generation import SamplingParams
from palm_rlhf.rl import losses as L
from palm_rlhf.rl.models import Actor
from palm_rlhf.rl.online import PolicyUpdateConfig, compute_advantages, policy_update
from palm_rlhf.rl.rollout import rollout

VOCAB = 16
TARGET = 5


def _sharpen(palm) -> None:
    """Scale the (tied) token embeddings of a random tiny PaLM: its logits are otherwise so
    flat that no change of the trunk (LoRA above all) moves the distribution noticeably."""
    with torch.no_grad():
        palm.token_emb.weight.mul_(10.0)


def _drift(params, scale: float, seed: int = 1) -> None:
    """Move weights away from where they started, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


@torch.no_grad()
def _token_logprobs(model, seq, scope=None) -> torch.Tensor:
    return model.logprobs_of(seq, finetune_scope=scope, disable_lora=scope is None)


def _target_fraction(ro) -> torch.Tensor:
    hits = (ro.sequences[:, 1:] == TARGET) & ro.action_mask
    return hits.sum(1).float() / ro.action_mask.sum(1).clamp(min=1)


def _rloo(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out advantages of (B,) rewards in groups of k, written out independently."""
    r = rewards.view(-1, k)
    return (r - (r.sum(1, keepdim=True) - r) / (k - 1)).reshape(-1)


# --- RLHFTrainer ------------------------------------------------------------------------------


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_trainer_kl_is_measured_against_the_frozen_reference(tiny_palm, algorithm, finetune):
    palm = tiny_palm(num_tokens=VOCAB, max_seq_len=32)
    _sharpen(palm)
    original = copy.deepcopy(palm).eval()  # the weights the trainer starts from: the reference
    beta = 0.5
    trainer = RLHFTrainer(
        palm=palm,
        reward_fn=_target_fraction,
        prompt_token_ids=torch.randint(1, VOCAB, (4, 3)),
        algorithm=algorithm,
        actor_finetune=finetune,
        kl_div_loss_weight=beta,
        group_size=4,
        minibatch_size=64,  # one minibatch, one epoch: GRPO's in-loss KL is read before any step
        epochs=1,
        seed=0,
        use_tqdm=False,
    )
    # the actor has been trained away from the reference (LoRA: its adapter; full: every weight)
    _drift(trainer.actor.trainable_parameters(), 0.3 if finetune == "lora" else 0.1)
    scope = trainer.actor.scope

    # catch the experience of the (single) update, with the actor's and the reference's
    # log-probs computed here, independently, before the update changes the actor
    seen = []
    make_experience = trainer.make_experience

    def spy(prompts, params):
        ro = make_experience(prompts, params)
        mf = ro.action_mask.float()
        seen.append(
            (
                ro,
                _token_logprobs(palm, ro.sequences, scope) * mf,
                _token_logprobs(original, ro.sequences) * mf,
            )
        )
        return ro

    trainer.make_experience = spy
    # 4 timesteps, one update; every prompt has 3 tokens, so 6 new tokens each
    (record,) = trainer.train(
        num_episodes=1, max_timesteps=4, update_timesteps=4, max_batch_size=64, max_seq_len=9
    )
    assert len(seen) == 1
    ro, actor_lp, ref_lp = seen[0]
    mf = ro.action_mask.float()
    kl = actor_lp - ref_lp  # k1, per token
    seq_kl = kl.sum(1)
    assert float(seq_kl.mean()) > 1.0, f"the actor should have drifted from the reference: {seq_kl}"

    torch.testing.assert_close(ro.old_logprobs, actor_lp, atol=1e-4, rtol=1e-4)  # sampled by the actor
    torch.testing.assert_close(ro.ref_logprobs, ref_lp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ro.kl, kl, atol=1e-4, rtol=1e-4)
    if algorithm == "ppo":
        expected = -beta * kl
        rows = torch.arange(len(ro))
        expected[rows, L.last_index(ro.action_mask)] += ro.scores
        torch.testing.assert_close(ro.rewards, expected, atol=1e-4, rtol=1e-4)
    elif algorithm == "rloo":
        expected = _rloo(ro.scores - beta * seq_kl, trainer.group_size)[:, None] * mf
        torch.testing.assert_close(ro.advantages, expected, atol=1e-4, rtol=1e-4)
    # what the update reports (and adapts an adaptive coefficient on)
    assert record["kl"] == pytest.approx(float(seq_kl.mean()), rel=1e-3)
    if algorithm == "grpo":  # the leash is the k3 term of the loss, on the actor before its step
        k3 = torch.expm1(ref_lp - actor_lp) + (actor_lp - ref_lp)
        assert record["ref_kl"] == pytest.approx(float((k3 * mf).sum() / mf.sum()), rel=1e-3)


@torch.no_grad()
def _exact_kl(palm, reference, seq) -> float:
    """KL(actor || reference) summed over the vocabulary, averaged over the response positions
    of fixed sequences: a deterministic distance between the two policies."""
    la = torch.log_softmax(palm(seq, disable_lora=True).float(), -1)
    lr = torch.log_softmax(reference(seq).float(), -1)
    return float((la.exp() * (la - lr)).sum(-1)[:, 2:].mean())


@pytest.mark.parametrize("algorithm, updates", [("grpo", 8), ("rloo", 20), ("ppo", 30)])
def test_strong_leash_pulls_a_drifted_actor_back_to_the_reference(tiny_palm, algorithm, updates):
    """Zero task reward and a large KL coefficient: the only signal is the leash, so training
    must bring the actor closer to the reference. Against the old policy the KL would be ~0
    and the actor would not come back."""
    palm = tiny_palm(num_tokens=VOCAB, max_seq_len=32)
    original = copy.deepcopy(palm).eval()
    trainer = RLHFTrainer(
        palm=palm,
        reward_fn=lambda ro: torch.zeros(len(ro)),
        prompt_token_ids=torch.randint(1, VOCAB, (8, 3)),
        algorithm=algorithm,
        actor_finetune="full",
        actor_lr=3e-3,
        critic_lr=3e-3,
        beta_s=0.0,  # no entropy bonus: nothing but the leash moves the actor
        max_norm=1.0,
        minibatch_size=16,
        epochs=2,
        kl_div_loss_weight=3.0,
        group_size=4,
        seed=0,
        use_tqdm=False,
    )
    _drift(trainer.actor.trainable_parameters(), 0.1)
    seq = torch.randint(1, VOCAB, (32, 8), generator=torch.Generator().manual_seed(2))
    before = _exact_kl(palm, original, seq)
    history = trainer.train(
        num_episodes=updates, max_timesteps=8, update_timesteps=8, max_seq_len=8, max_batch_size=64
    )
    after = _exact_kl(palm, original, seq)
    assert before > 0.1
    # measured: 0.173 -> 0.015 (GRPO), 0.043 (RLOO), 0.050 (PPO), at most 0.3 x before over seeds
    # 0-5; against the old policy the KL stays at 0.173 or grows
    assert after < 0.6 * before, (before, after, [round(h["kl"], 2) for h in history])


# --- the online loop: rollout + compute_advantages / policy_update ----------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_online_rollout_kl_is_measured_against_the_reference(tiny_palm, algorithm, temperature):
    """At temperature 1 the sampler's log-probs are the policy's own; at 0.7 the tokens come
    from a sharpened distribution, but the leash still compares the policy's own (temperature
    1) log-probs with the reference's."""
    policy = tiny_palm(num_tokens=VOCAB, max_seq_len=32)
    _sharpen(policy)
    reference = copy.deepcopy(policy).eval()
    _drift(policy.parameters(), 0.1)  # the policy has moved on; the reference has not
    beta, group = 0.2, 4
    prompts = [torch.randint(1, VOCAB, (3,)).tolist() for _ in range(3)]
    ro = rollout(
        policy,
        prompts,
        SamplingParams(max_new_tokens=6, n=group, seed=0, temperature=temperature),
        ref_logprobs_fn=lambda seq, mask: reference.logprobs_of(seq),
        reward_fn=lambda ro: torch.zeros(len(ro)),  # only the leash in the advantages
        value_fn=(lambda seq, mask: torch.zeros(seq.shape[0], seq.shape[1] - 1))
        if algorithm == "ppo"
        else None,
    )
    mask = ro.action_mask
    mf = mask.float()
    pol_lp = _token_logprobs(policy, ro.sequences) * mf
    ref_lp = _token_logprobs(reference, ro.sequences) * mf
    kl = pol_lp - ref_lp
    seq_kl = kl.sum(1)
    # clearly apart (a k1 sum over a few samples may still average near 0, so use |log ratio|)
    assert float(kl.abs().sum() / mf.sum()) > 0.3, f"the policy should have drifted from the reference: {kl}"
    if temperature == 1.0:
        torch.testing.assert_close(ro.old_logprobs, pol_lp, atol=1e-4, rtol=1e-4)
    else:  # the behaviour policy of the ratio is the distribution the tokens were drawn from
        with torch.no_grad():
            tempered = torch.log_softmax(policy(ro.sequences)[:, :-1].float() / temperature, -1)
        sampled_lp = tempered.gather(-1, ro.sequences[:, 1:, None]).squeeze(-1) * mf
        torch.testing.assert_close(ro.old_logprobs, sampled_lp, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(sampled_lp, pol_lp, atol=1e-2)
    torch.testing.assert_close(ro.ref_logprobs, ref_lp, atol=1e-4, rtol=1e-4)

    cfg = PolicyUpdateConfig(
        algorithm=algorithm, kl_estimator="k1", epochs=1, minibatch_size=64, temperature=temperature
    )
    adv, returns, stats = compute_advantages(ro, cfg, beta, group)
    assert stats["rollout_kl"] == pytest.approx(float(seq_kl.mean()), rel=1e-3)
    if algorithm == "rloo":
        torch.testing.assert_close(adv, _rloo(-beta * seq_kl, group)[:, None] * mf, atol=1e-4, rtol=1e-4)
    elif algorithm == "ppo":  # per-token penalty -beta * KL_t, zero values, then GAE and whitening
        exp_adv, exp_ret = L.gae(-beta * kl, torch.zeros_like(kl), mask, cfg.gamma, cfg.lam)
        torch.testing.assert_close(adv, L.masked_whiten(exp_adv, mask), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(returns, exp_ret, atol=1e-4, rtol=1e-4)
    else:  # GRPO: the leash is the k3 loss term, read on the policy before its (only) step
        actor = Actor(policy, finetune="full")
        out = policy_update(
            actor, torch.optim.SGD(actor.trainable_parameters(), lr=0.0), ro, cfg, beta, group
        )
        k3 = torch.expm1(ref_lp - pol_lp) + (pol_lp - ref_lp)
        assert out["ref_kl"] == pytest.approx(float((k3 * mf).sum() / mf.sum()), rel=1e-3)
