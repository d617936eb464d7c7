"""DPO and KTO actually move a small model the right way on a toy preference set."""

from __future__ import annotations

import copy

import torch

from palm_rlhf.rl import losses as L
from palm_rlhf.rl.rollout import pack_sequences, response_logps

GOOD, BAD = 5, 9


def _toy_pairs(n=8, length=4, gen=None):
    prompts = [torch.randint(1, 16, (3,), generator=gen).tolist() for _ in range(n)]
    noise = [torch.randint(1, 16, (length,), generator=gen).tolist() for _ in range(n)]
    chosen = [[GOOD if j % 2 == 0 else t for j, t in enumerate(row)] for row in noise]
    rejected = [[BAD if j % 2 == 0 else t for j, t in enumerate(row)] for row in noise]
    return prompts, chosen, rejected


def _train_adam(params, steps, loss_fn, lr=1e-2):
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_dpo_lowers_loss_and_widens_the_chosen_margin(tiny_palm):
    gen = torch.Generator().manual_seed(0)
    policy = tiny_palm()
    ref = copy.deepcopy(policy).requires_grad_(False)
    prompts, chosen, rejected = _toy_pairs(gen=gen)
    c = pack_sequences(prompts, chosen)
    r = pack_sequences(prompts, rejected)
    with torch.no_grad():
        ref_c = response_logps(ref, c["sequences"], c["action_mask"])
        ref_r = response_logps(ref, r["sequences"], r["action_mask"])

    def margin():
        with torch.no_grad():
            return (
                (
                    response_logps(policy, c["sequences"], c["action_mask"])
                    - response_logps(policy, r["sequences"], r["action_mask"])
                )
                .mean()
                .item()
            )

    def loss_fn():
        pc = response_logps(policy, c["sequences"], c["action_mask"])
        pr = response_logps(policy, r["sequences"], r["action_mask"])
        return L.dpo_loss(pc, pr, ref_c, ref_r, beta=0.5)[0]

    before = margin()
    losses = _train_adam(policy.parameters(), 25, loss_fn)
    assert losses[-1] < losses[0] - 0.2
    assert margin() > before + 1.0


def test_kto_raises_desirable_and_lowers_undesirable_likelihood(tiny_palm):
    gen = torch.Generator().manual_seed(1)
    policy = tiny_palm()
    ref = copy.deepcopy(policy).requires_grad_(False)
    prompts, chosen, rejected = _toy_pairs(gen=gen)
    half = len(prompts) // 2
    # thumbs only: one completion per prompt, rated up or down
    batch = pack_sequences(prompts, chosen[:half] + rejected[half:])
    desirable = torch.tensor([True] * half + [False] * (len(prompts) - half))
    # mismatched pairs (each prompt with another row's completion) estimate the reference point
    mism = pack_sequences(prompts, (chosen[:half] + rejected[half:])[1:] + chosen[:1])
    with torch.no_grad():
        ref_lp = response_logps(ref, batch["sequences"], batch["action_mask"])
        ref_mism = response_logps(ref, mism["sequences"], mism["action_mask"])

    def rewards():
        with torch.no_grad():
            return response_logps(policy, batch["sequences"], batch["action_mask"]) - ref_lp

    def loss_fn():
        lp = response_logps(policy, batch["sequences"], batch["action_mask"])
        with torch.no_grad():
            z0 = L.kto_reference_point(
                response_logps(policy, mism["sequences"], mism["action_mask"]), ref_mism
            )
        return L.kto_loss(lp, ref_lp, desirable, z0, beta=0.5)[0]

    losses = _train_adam(policy.parameters(), 25, loss_fn)
    assert losses[-1] < losses[0] - 0.05
    r = rewards()
    assert r[desirable].mean() > 0.5
    assert r[~desirable].mean() < -0.5
