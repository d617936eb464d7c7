"""Advantages and losses against hand-written references and their defining properties."""

from __future__ import annotations

import math

import pytest
import torch

from palm_rlhf.rl import losses as L


def _random_mask(b, n, gen):
    """Right-aligned response masks of random lengths (some rows empty), as rollouts produce."""
    starts = torch.randint(0, n, (b,), generator=gen)
    lens = torch.randint(0, n + 1, (b,), generator=gen)
    t = torch.arange(n)
    return (t[None] >= starts[:, None]) & (t[None] < (starts + lens)[:, None])


def _gae_reference(rewards, values, mask, gamma, lam):
    b, n = rewards.shape
    adv = torch.zeros(b, n, dtype=torch.float64)
    for i in range(b):
        idx = [t for t in range(n) if mask[i, t]]
        last = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            nv = values[i, idx[j + 1]].item() if j + 1 < len(idx) else 0.0
            delta = rewards[i, t].item() + gamma * nv - values[i, t].item()
            last = delta + gamma * lam * last
            adv[i, t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_matches_reference_loop(gamma, lam):
    gen = torch.Generator().manual_seed(1)
    b, n = 7, 13
    rewards, values = torch.randn(b, n, generator=gen), torch.randn(b, n, generator=gen)
    mask = _random_mask(b, n, gen)
    adv, ret = L.gae(rewards, values, mask, gamma, lam)
    ref = _gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), (ref + values.double()) * mask, atol=1e-5, rtol=1e-5)
    assert (adv[~mask] == 0).all()


def test_gae_skips_holes_in_the_mask():
    rewards = torch.tensor([[1.0, 5.0, 2.0]])
    values = torch.tensor([[0.5, 9.0, 0.25]])
    mask = torch.tensor([[True, False, True]])
    adv, _ = L.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # the masked middle step is ignored: A_0 = r0 + r2 - v0, A_2 = r2 - v2
    torch.testing.assert_close(adv, torch.tensor([[2.5, 0.0, 1.75]]))


def test_masked_whiten_normalises_only_masked_entries():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 9, generator=gen) * 5 + 3
    mask = _random_mask(6, 9, gen)
    mask[0, :] = True
    w = L.masked_whiten(x, mask)
    vals = w[mask]
    assert abs(vals.mean().item()) < 1e-5
    assert abs(vals.std().item() - 1) < 1e-4
    assert (w[~mask] == 0).all()
    ref = (x[mask] - x[mask].mean()) / x[mask].std()
    torch.testing.assert_close(vals, ref, atol=1e-5, rtol=1e-5)
    scaled = L.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(scaled[mask], ref + x[mask].mean(), atol=1e-5, rtol=1e-5)


def test_kl_estimators_k3_nonnegative_and_k1_unbiased():
    gen = torch.Generator().manual_seed(3)
    p_logits, q_logits = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    logp, logq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    true_kl = (logp.exp() * (logp - logq)).sum().item()
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=gen)
    lp, lq = logp[samples], logq[samples]
    k1 = L.kl_estimate(lp, lq, "k1")
    k3 = L.kl_estimate(lp, lq, "k3")
    assert (k3 >= 0).all()
    assert (L.kl_estimate(lp, lq, "k2") >= 0).all()
    for est in (k1, k3):
        stderr = est.std().item() / math.sqrt(len(est))
        assert abs(est.mean().item() - true_kl) < 4 * stderr + 1e-4
    with pytest.raises(ValueError):
        L.kl_estimate(lp, lq, "k9")


def test_adaptive_kl_controller_moves_towards_target():
    ctl = L.AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(current_kl=5.0, n_steps=10)  # error clipped at +0.2
    assert ctl.value == pytest.approx(0.1 * 1.02)
    before = ctl.value
    ctl.update(current_kl=0.5, n_steps=10)  # error -0.2 (clipped from -0.5)
    assert ctl.value == pytest.approx(before * 0.98)
    assert L.FixedKLController(0.3).update(100.0, 10) == 0.3


def test_kl_penalized_rewards_put_score_on_last_token():
    kl = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, False], [False, False, False, False]])
    r = L.kl_penalized_rewards(torch.tensor([10.0, 3.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[0.0, -0.5, 9.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_clipped_policy_loss_gradient_vanishes_outside_clip_range():
    old = torch.zeros(1, 4)
    # ratios: 1.5 and 0.5 (outside [0.8, 1.2]); 1.1 and 0.9 inside
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = L.ppo_policy_loss(new, old, adv, mask, clip_eps=0.2)
    loss.backward()
    g = new.grad[0]
    assert g[0] == 0 and g[1] == 0  # clipped on the side the advantage pushes: no gradient
    assert g[2] != 0 and g[3] != 0
    assert stats.clip_fraction == pytest.approx(0.5)
    # on the other side (ratio 1.5 with a negative advantage) the gradient flows
    new2 = torch.log(torch.tensor([[1.5]])).requires_grad_(True)
    L.ppo_policy_loss(new2, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), 0.2)[0].backward()
    assert new2.grad.item() != 0


def test_clipped_value_loss_gradient_vanishes_outside_clip_range():
    old = torch.zeros(1, 2)
    returns = torch.tensor([[2.0, -0.05]])
    values = torch.tensor([[1.0, 0.1]], requires_grad=True)
    loss = L.ppo_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    loss.backward()
    # first: clipped estimate (0.2) is farther from the return than 1.0 -> the max picks the
    # clipped branch, whose gradient is 0 outside the range; second: inside the range
    assert values.grad[0, 0] == 0
    assert values.grad[0, 1] != 0
    plain = L.ppo_value_loss(values.detach(), old, returns, torch.ones(1, 2), clip=None)
    assert plain.item() == pytest.approx(0.5 * ((1 - 2) ** 2 + 0.15**2) / 2)


def test_aggregation_modes():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[True, True, True], [True, False, False]])
    assert L.aggregate(x, m, "token-mean").item() == pytest.approx(10 / 4)
    assert L.aggregate(x, m, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert L.aggregate(x, m, "seq-mean-token-sum-norm", constant=8).item() == pytest.approx(
        (6 / 8 + 4 / 8) / 2
    )
    with pytest.raises(ValueError):
        L.aggregate(x, m, "seq-mean-token-sum-norm")


def test_grpo_and_rloo_advantage_properties():
    gen = torch.Generator().manual_seed(4)
    r = torch.randn(5, 6, generator=gen) * 3 + 1
    g = L.grpo_advantages(r)
    torch.testing.assert_close(g.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(g.std(1), torch.ones(5), atol=1e-4, rtol=0)
    dr = L.grpo_advantages(r, scale_by_std=False)
    torch.testing.assert_close(dr, r - r.mean(1, keepdim=True))
    rl = L.rloo_advantages(r)
    torch.testing.assert_close(rl.sum(1), torch.zeros(5), atol=1e-4, rtol=0)
    i, j = 2, 3
    others = torch.cat([r[i, :j], r[i, j + 1 :]]).mean()
    assert rl[i, j].item() == pytest.approx((r[i, j] - others).item(), abs=1e-5)
    # order is preserved within a group
    assert torch.equal(rl.argsort(1), r.argsort(1))
    # identical rewards: no signal
    assert torch.all(L.grpo_advantages(torch.ones(2, 4)) == 0)
    with pytest.raises(ValueError):
        L.rloo_advantages(torch.ones(3, 1))


def test_dpo_and_ipo_losses_by_formula():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -2.0])
    h = (pc - rc) - (pr - rr)
    loss, chosen, rejected = L.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(0.5 * h).mean().item())
    torch.testing.assert_close(chosen - rejected, 0.5 * h)
    smooth, _, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    expect = -(
        0.9 * torch.nn.functional.logsigmoid(0.5 * h) + 0.1 * torch.nn.functional.logsigmoid(-0.5 * h)
    ).mean()
    assert smooth.item() == pytest.approx(expect.item())
    ipo, _, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.5, ipo=True)
    assert ipo.item() == pytest.approx(((h - 1.0) ** 2).mean().item())


def test_kto_loss_by_formula_and_reference_point():
    pol, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    z0 = L.kto_reference_point(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.5]))
    assert z0.item() == pytest.approx(0.25)  # mean of (1.0, -0.5)
    assert L.kto_reference_point(torch.tensor([-3.0]), torch.tensor([-1.0])).item() == 0.0
    loss, rewards = L.kto_loss(pol, ref, torch.tensor([True, False]), z0, beta=2.0, undesirable_weight=1.5)
    r = pol - ref
    v = torch.stack([torch.sigmoid(2 * (r[0] - 0.25)), 1.5 * torch.sigmoid(2 * (0.25 - r[1]))])
    assert loss.item() == pytest.approx((torch.tensor([1.0, 1.5]) - v).mean().item())
    torch.testing.assert_close(rewards, 2 * r)
