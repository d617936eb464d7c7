"""One optimisation step of the policy (and critic) on a minibatch of experience.

The same step runs in one process or under ``torchrun``: with ``torch.distributed``
initialised, wrap the actor and critic in ``DistributedDataParallel`` (see :func:`wrap_ddp`)
and give every process its shard of the global minibatch (``ExperienceBuffer.minibatches(...,
shard=(rank, world))``). Loss denominators are then global counts (reduced once per step), so
the averaged gradients equal those of one process over the whole minibatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from palm_rlhf.rl import losses as L


@dataclass
class UpdateConfig:
    clip_eps: float = 0.2  # PPO ratio clip (Schulman et al. 2017)
    value_clip: float | None = 0.4  # clip of the value change per update; None disables
    entropy_coef: float = 0.01  # entropy bonus weight (the original trainer's beta_s)
    value_coef: float = 1.0  # weight of the value loss (the critic has its own optimiser)
    max_norm: float | None = None  # gradient-norm clip per optimiser step
    aggregation: str = "token-mean"  # see losses.aggregate
    # Dr. GRPO's constant for aggregation "seq-mean-token-sum-norm": the generation budget
    # (the most new tokens a response may have)
    constant_normalizer: float | None = None
    kl_in_loss_coef: float = 0.0  # GRPO-style KL(pi || ref) term in the loss (k3 estimator)
    # How the rollouts were sampled. ``old_logprobs`` are the sampler's log-probs under the
    # distribution it drew from (logits / temperature, top-k / top-p set renormalised), so the
    # new log-probs of the ratio are taken under the same transform (losses.sampling_logprobs).
    # The KL to the reference and the entropy bonus stay on the model's own distribution.
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum scalars over all processes (identity in one process)."""
    _, size = world()
    if size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def global_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean and (unbiased) variance of ``x`` over every process's data."""
    m = mask.to(torch.float64)
    xd = x.to(torch.float64)
    s, s2, n = all_reduce_sum([(xd * m).sum().item(), (xd * xd * m).sum().item(), m.sum().item()])
    n = max(n, 1.0)
    mean = s / n
    var = max(s2 / n - mean * mean, 0.0) * n / max(n - 1.0, 1.0)
    return torch.tensor(mean, dtype=x.dtype, device=x.device), torch.tensor(
        var, dtype=x.dtype, device=x.device
    )


def wrap_ddp(module: nn.Module) -> nn.Module:
    """``DistributedDataParallel`` around ``module`` when several processes run (CPU or GPU);
    the module itself otherwise. DDP broadcasts rank 0's weights at construction."""
    _, size = world()
    if size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = None
    dev = next(module.parameters()).device
    if dev.type == "cuda":
        device_ids = [dev.index]
    return DDP(module, device_ids=device_ids)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module


def _agg_kwargs(cfg: UpdateConfig, mask: torch.Tensor) -> dict:
    """Denominators of this step: local counts in one process, global counts / world under DDP."""
    _, size = world()
    kw: dict = {"constant": cfg.constant_normalizer}
    if size > 1:
        tokens, seqs = all_reduce_sum([float(mask.sum().item()), float(mask.shape[0])])
        kw["token_count"] = max(tokens, 1.0) / size
        kw["seq_count"] = max(seqs, 1.0) / size
    return kw


def _step(optim: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float | None) -> float | None:
    norm = None
    if max_norm is not None:
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optim.step()
    optim.zero_grad(set_to_none=True)
    return norm


def action_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, cfg: UpdateConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs for the PPO ratio, the model's own log-probs) of ``tokens`` given the actor's
    ``logits`` (B, T, vocab): the first under the rollouts' sampling transform (the
    distribution ``old_logprobs`` were recorded under), the second at temperature 1, unfiltered
    (what the reference's log-probs are compared with). The same tensor when sampling was plain."""
    own = L.logprobs_from_logits(logits, tokens)
    if L.is_plain_sampling(cfg.temperature, cfg.top_k, cfg.top_p):
        return own, own
    return L.sampling_logprobs(logits, tokens, cfg.temperature, cfg.top_k, cfg.top_p), own


def policy_step(
    actor: nn.Module,
    optim: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    cfg: UpdateConfig,
) -> dict[str, float]:
    """Clipped-surrogate update of the actor on one minibatch (with an entropy bonus and, if
    configured, a KL-to-reference term). ``batch`` holds ``sequences``, ``action_mask``,
    ``old_logprobs``, ``advantages`` and, for the KL term, ``ref_logprobs``."""
    seq, mask = batch["sequences"], batch["action_mask"]
    agg = _agg_kwargs(cfg, mask)
    logits = actor(seq)[:, :-1]  # (B, L - 1, vocab): position t predicts token t + 1
    logprobs, own_logprobs = action_logprobs(logits, seq[:, 1:], cfg)
    loss, stats = L.ppo_policy_loss(
        logprobs, batch["old_logprobs"], batch["advantages"], mask, cfg.clip_eps, cfg.aggregation, **agg
    )
    entropy = L.aggregate(L.entropy_from_logits(logits), mask, cfg.aggregation, **agg)
    total = loss - cfg.entropy_coef * entropy
    kl = None
    if cfg.kl_in_loss_coef:
        kl_tokens = L.kl_estimate(own_logprobs, batch["ref_logprobs"], "k3")
        kl = L.aggregate(kl_tokens, mask, cfg.aggregation, **agg)
        total = total + cfg.kl_in_loss_coef * kl
    total.backward()
    params = [p for p in _unwrap(actor).parameters() if p.requires_grad]
    _step(optim, params, cfg.max_norm)
    out = {
        "policy_loss": float(loss.item()),
        "entropy": float(entropy.item()),
        "clip_fraction": stats.clip_fraction,
        "approx_kl": stats.approx_kl,
    }
    if kl is not None:
        out["ref_kl"] = float(kl.item())
    return out


def value_step(
    critic: nn.Module,
    optim: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    cfg: UpdateConfig,
) -> dict[str, float]:
    """Clipped value-loss update of the critic on one minibatch (``values`` are the old
    predictions, ``returns`` the GAE targets)."""
    mask = batch["action_mask"]
    agg = _agg_kwargs(cfg, mask)
    values = critic(batch["sequences"])
    loss = L.ppo_value_loss(
        values, batch["values"], batch["returns"], mask, cfg.value_clip, cfg.aggregation, **agg
    )
    (cfg.value_coef * loss).backward()
    params = [p for p in _unwrap(critic).parameters() if p.requires_grad]
    _step(optim, params, cfg.max_norm)
    return {"value_loss": float(loss.item())}


def ppo_update_step(
    actor: nn.Module,
    critic: nn.Module | None,
    actor_optim: torch.optim.Optimizer,
    critic_optim: torch.optim.Optimizer | None,
    batch: dict[str, torch.Tensor],
    cfg: UpdateConfig,
) -> dict[str, float]:
    """Actor step, then critic step (if any) on the same minibatch."""
    stats = policy_step(actor, actor_optim, batch, cfg)
    if critic is not None and critic_optim is not None:
        stats.update(value_step(critic, critic_optim, batch, cfg))
    return stats
