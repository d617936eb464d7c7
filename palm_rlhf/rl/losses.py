"""Advantages and losses for RLHF: one module shared by every trainer.

Everything here is a pure function of tensors (or a tiny stateful controller), so the offline
trainer, the online loop and the tests all use the same code.

Shape conventions. Per-token tensors are ``(batch, T)`` over *action positions*: index ``t``
holds the quantity for the token the policy emitted at that step (``logprobs_of`` layout:
position ``t`` predicts token ``t + 1`` of the sequence). ``mask`` marks the response tokens
that count (bool or 0/1); everything outside it is ignored. Per-sequence tensors are
``(batch,)``; grouped tensors are ``(groups, group_size)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# --- masked reductions ------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``x`` over the masked entries (all of them, or along ``dim``); 0 where none."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``x`` (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    n = mask.to(x.dtype).sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, moments=None
) -> torch.Tensor:
    """Normalise the masked entries of ``x`` to zero mean and unit variance; entries outside the
    mask come back as 0. ``shift_mean=False`` only rescales (keeps the sign of a reward signal).
    ``moments=(mean, var)`` uses given statistics, e.g. ones reduced over several processes.

    Advantage whitening as used in PPO for language models (Ziegler et al. 2019,
    https://arxiv.org/abs/1909.08593; Huang et al. 2022, "The 37 implementation details of PPO")."""
    mean, var = moments if moments is not None else (masked_mean(x, mask), masked_var(x, mask))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(out.dtype)


# --- KL against the reference -----------------------------------------------------------------


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    With ``log_ratio = log pi(y) - log pi_ref(y)`` (Schulman, "Approximating KL divergence",
    http://joschu.net/blog/kl-approx.html):

    - ``k1 = log_ratio``: unbiased, high variance, can be negative for one sample;
    - ``k2 = log_ratio**2 / 2``: biased, low variance, >= 0;
    - ``k3 = exp(-log_ratio) - 1 + log_ratio``: unbiased and always >= 0 (the GRPO choice).
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose 'k1', 'k2' or 'k3'")


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593, sec. 2.2).

    ``beta <- beta * (1 + K_beta * e)`` with ``e = clip(KL / target - 1, -0.2, 0.2)`` and
    ``K_beta = n_steps / horizon``: beta grows while the policy drifts past the KL target and
    shrinks while it stays under it."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int = 10000):
        if target <= 0 or horizon <= 0:
            raise ValueError("the KL target and horizon must be positive")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def kl_penalized_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards of RLHF-PPO (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155):
    ``-kl_coef * kl_t`` at every response token, plus the sequence score at its last token."""
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    last = last_index(mask)
    has_any = mask.bool().any(dim=1)
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows[has_any], last[has_any]] += scores.to(kl.dtype)[has_any]
    return rewards


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True entry per row (0 for an empty row)."""
    t = torch.arange(mask.shape[1], device=mask.device)
    return (mask.bool().long() * (t + 1)).argmax(dim=1)


# --- generalised advantage estimation -----------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, https://arxiv.org/abs/1506.02438).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where
    the episode ends after the last masked token (its ``V_{t+1}`` and ``A_{t+1}`` are 0) and
    unmasked positions are skipped. Returns ``(advantages, returns = advantages + values)``,
    both zero outside the mask. Runs one vectorised step per position, backwards."""
    r = rewards.float() * mask
    v = values.float() * mask
    m = mask.to(torch.float32)
    b, n = r.shape
    adv = torch.zeros_like(r)
    next_value = torch.zeros(b, device=r.device)
    next_adv = torch.zeros(b, device=r.device)
    for t in range(n - 1, -1, -1):
        mt = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * mt
        # a masked-out position passes the following state's value/advantage through unchanged
        next_value = torch.where(mt > 0, v[:, t], next_value)
        next_adv = torch.where(mt > 0, a, next_adv)
    return adv, (adv + v) * m


# --- PPO losses ----------------------------------------------------------------------------------


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    constant: float | None = None,
    token_count=None,
    seq_count=None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    - ``token-mean``: sum over all masked tokens / their count (every token weighs the same;
      DAPO, Yu et al. 2025, https://arxiv.org/abs/2503.14476);
    - ``seq-mean-token-mean``: mean per sequence, then over sequences (original GRPO);
    - ``seq-mean-token-sum-norm``: sum per sequence / a ``constant`` (e.g. the generation
      budget), then mean over sequences (Dr. GRPO, Liu et al. 2025,
      https://arxiv.org/abs/2503.20783): no length bias.

    ``token_count`` / ``seq_count`` override the local counts in the denominators: data-parallel
    training passes (global count / world size) so that the averaged gradients of all processes
    equal the gradient of the loss over the global batch."""
    m = mask.to(per_token.dtype)
    if mode == "token-mean":
        denom = m.sum().clamp(min=1.0) if token_count is None else token_count
        return (per_token * m).sum() / denom
    nseq = per_token.shape[0] if seq_count is None else seq_count
    if mode == "seq-mean-token-mean":
        return ((per_token * m).sum(1) / m.sum(1).clamp(min=1.0)).sum() / nseq
    if mode == "seq-mean-token-sum-norm":
        if constant is None:
            raise ValueError("seq-mean-token-sum-norm needs a constant normaliser (e.g. max_new_tokens)")
        return ((per_token * m).sum(1) / constant).sum() / nseq
    raise ValueError(f"unknown loss aggregation {mode!r}")


@dataclass
class PolicyLossStats:
    clip_fraction: float
    approx_kl: float  # k3 estimate of KL(old || new) on the batch


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    aggregation: str = "token-mean",
    **agg,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Clipped surrogate objective (Schulman et al. 2017, https://arxiv.org/abs/1707.06347):
    ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`` per token, ``ratio = pi / pi_old``.
    Outside the clip range on the side the advantage pushes towards, the gradient is zero."""
    log_ratio = logprobs - old_logprobs.detach()
    ratio = log_ratio.exp()
    adv = advantages.detach()
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.min(unclipped, clipped)
    loss = aggregate(per_token, mask, aggregation, **agg)
    with torch.no_grad():
        clip_frac = masked_mean((clipped < unclipped).float(), mask).item()
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item()
    return loss, PolicyLossStats(clip_frac, approx_kl)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    aggregation: str = "token-mean",
    **agg,
) -> torch.Tensor:
    """Clipped value loss: ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``
    (the PPO2 baseline implementation). ``clip=None`` gives the plain squared error."""
    returns = returns.detach()
    err = (values - returns) ** 2
    if clip is not None:
        v_clipped = old_values.detach() + (values - old_values.detach()).clamp(-clip, clip)
        err = torch.max(err, (v_clipped - returns) ** 2)
    return aggregate(0.5 * err, mask, aggregation, **agg)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at every position: (..., vocab) -> (...)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] in float32: (..., vocab), (...) -> (...)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def is_plain_sampling(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> bool:
    """True when these sampling settings draw from the model's own distribution."""
    return temperature == 1.0 and not top_k and top_p >= 1.0


def sampling_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Log-prob of ``tokens`` under the distribution the sampler draws from with these settings,
    in float32: (..., vocab), (...) -> (...).

    That distribution is ``softmax(logits / temperature)`` restricted to the tokens top-k and
    top-p keep (:func:`palm_rlhf.generation.sampling_keep_mask`, the sampler's own function)
    and renormalised. The kept set is recomputed from *these* logits, and the token itself is
    always kept: right after a rollout (same weights) this reproduces the sampler's recorded
    log-probs exactly, so the PPO ratio starts at 1; after updates a token that left the new
    top-p set still gets a finite log-prob (its own mass is added to the kept set), which keeps
    the ratio and its gradient defined. Differentiable in ``logits``."""
    if not temperature > 0:
        raise ValueError(f"sampling log-probs need a temperature > 0 (greedy has none), got {temperature!r}")
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled * (1.0 / temperature)
    if top_k or top_p < 1.0:
        from palm_rlhf.generation import sampling_keep_mask

        vocab = scaled.shape[-1]
        flat = scaled.reshape(-1, vocab)
        with torch.no_grad():
            keep = sampling_keep_mask(flat.detach(), top_k or None, top_p if top_p < 1.0 else None)
            keep.scatter_(-1, tokens.reshape(-1, 1), True)
        scaled = flat.masked_fill(~keep, float("-inf")).view_as(scaled)
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


# --- critic-free advantages ----------------------------------------------------------------------


def grpo_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, https://arxiv.org/abs/2402.03300):
    ``(r - mean(group)) / (std(group) + eps)`` for rewards of shape (groups, group_size).
    ``scale_by_std=False`` is the Dr. GRPO variant (Liu et al. 2025,
    https://arxiv.org/abs/2503.20783): no division, so easy/hard prompts are not up-weighted."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (groups, group_size), got shape {tuple(rewards.shape)}")
    r = rewards.float()
    centred = r - r.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    std = r.std(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
    return centred / (std + eps)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024,
    https://arxiv.org/abs/2402.14740): each sample's baseline is the mean reward of the *other*
    samples of its prompt, ``A_i = r_i - mean_{j != i} r_j = k / (k - 1) * (r_i - mean(r))``."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"RLOO needs rewards of shape (groups, k >= 2), got {tuple(rewards.shape)}")
    r = rewards.float()
    k = r.shape[1]
    baseline = (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    return r - baseline


# --- offline preference losses -------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    ipo: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation on sequence log-probs (Rafailov et al. 2023,
    https://arxiv.org/abs/2305.18290).

    With ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``:

    - DPO: ``-log sigmoid(beta * h)``; with ``label_smoothing = eps`` the conservative variant
      (cDPO, Mitchell 2023) ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``
      for labels that are wrong with probability eps;
    - IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036): ``(h - 1 / (2 beta))^2``,
      which does not push the margin to infinity on deterministic preferences.

    Returns (mean loss, chosen implicit rewards, rejected implicit rewards), the rewards being
    ``beta * (log pi - log ref)`` (detached)."""
    chosen_ratio = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_ratio = policy_rejected_logps - ref_rejected_logps.detach()
    h = chosen_ratio - rejected_ratio
    if ipo:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_reference_point(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0``: a batch estimate of KL(pi || ref), clamped at 0 and treated
    as a constant. Pass log-probs of *mismatched* (prompt, completion) pairs, as the paper does,
    so that z0 does not simply track the completions being rated."""
    return (policy_logps - ref_logps).mean().clamp(min=0.0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky optimisation for thumbs-up/down feedback (Ethayarajh et al. 2024,
    https://arxiv.org/abs/2402.01306).

    With ``r = log pi(y|x) - log ref(y|x)`` and reference point ``z0``: the value is
    ``lambda_D * sigmoid(beta (r - z0))`` for a desirable output and
    ``lambda_U * sigmoid(beta (z0 - r))`` for an undesirable one; the loss is
    ``lambda - value``, averaged. Returns (loss, implicit rewards ``beta * r``)."""
    r = policy_logps - ref_logps.detach()
    z0 = torch.as_tensor(reference_point, dtype=r.dtype, device=r.device).detach()
    d = desirable.bool()
    lam = torch.where(d, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    value = torch.where(d, torch.sigmoid(beta * (r - z0)), torch.sigmoid(beta * (z0 - r))) * lam
    return (lam - value).mean(), beta * r.detach()


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean with ``average``) of per-token log-probs over the masked tokens: (b, T) -> (b,)."""
    if average:
        return masked_mean(token_logps, mask, dim=1)
    return masked_sum(token_logps, mask, dim=1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): how much of the return variance the critic accounts for."""
    var_r = masked_var(returns, mask).item()
    if var_r == 0 or math.isnan(var_r):
        return float("nan")
    return 1.0 - masked_var(returns - values, mask).item() / var_r
