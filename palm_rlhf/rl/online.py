"""The transport-neutral half of online RLHF: reward refits, policy updates on rollouts, the
candidate evaluation and the gate that decides whether a candidate may be published.

Nothing here knows about gRPC or the feedback database. Reference log-probs and rewards
arrive as callables (so the trainer service passes network clients and the tests pass local
functions), and the losses and advantages come from :mod:`palm_rlhf.rl.losses`, the module
every trainer in the project shares.

The gate (:func:`gate`) guards what users get. A candidate policy is published only if, on
held-out prompts and held-out human preference pairs,

- its mean reward is not lower than the current policy's by more than a tolerance,
- its KL to the frozen reference stays within a budget (the leash holds across versions,
  because it is measured against the reference, not against the previous version),
- its answers keep a sane length and do not start repeating themselves, and
- it agrees with held-out *human* pairs at least as often as the current policy: the reward
  model can be fooled, the people's own choices cannot, so a policy that climbs the reward
  model while moving away from what people preferred is stopped here (reward hacking).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from palm_rlhf.chat import clean_response
from palm_rlhf.generation import SamplingParams, generate_tokens
from palm_rlhf.rl import losses as L
from palm_rlhf.rl.feedback import PreferencePair, RatingExample
from palm_rlhf.rl.rollout import Rollout, pack_sequences
from palm_rlhf.rl.update import UpdateConfig, policy_step, value_step

# (prompt ids, response ids) lists -> per-token reference log-probs, one list per response
RefLogprobsFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], list[list[float]]]
# (prompt texts, response texts) -> one reward per response
RewardTextFn = Callable[[Sequence[str], Sequence[str]], list[float]]


# --- text statistics ----------------------------------------------------------------------------


def repetition_rate(text: str, n: int = 3) -> float:
    """Fraction of the word ``n``-grams of ``text`` that already occurred earlier in it.

    0 for an answer that never repeats itself; a degenerate "great great great great" loop
    tends to 1. Answers shorter than ``n`` words count as 0."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def response_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The answer a user would see for generated ids: decoded, cut at the first newline."""
    return clean_response(tokenizer.decode(list(ids)))


# --- sequence log-probabilities ------------------------------------------------------------------


@torch.no_grad()
def sequence_logps(
    model: Any,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    finetune_scope: str | None = None,
    disable_lora: bool = False,
    batch_size: int = 16,
    pad_id: int = 0,
) -> torch.Tensor:
    """Summed log-probability of each response given its prompt, (N,) float32, in batches."""
    out = []
    for start in range(0, len(prompts), batch_size):
        packed = pack_sequences(
            prompts[start : start + batch_size],
            responses[start : start + batch_size],
            pad_id=pad_id,
            device=model.device,
        )
        logps = model.logprobs_of(
            packed["sequences"], finetune_scope=finetune_scope, disable_lora=disable_lora
        )
        out.append(L.masked_sum(logps.float(), packed["action_mask"], dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def pair_agreement(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    tie_eps: float = 1e-4,
) -> float:
    """How often a policy sides with people, relative to the reference: the fraction of pairs
    whose implicit reward margin ``[log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]``
    (the DPO margin, Rafailov et al. 2023) is positive; ties (|margin| <= ``tie_eps``) count
    one half, so the reference itself scores exactly 0.5. NaN without pairs."""
    if policy_chosen.numel() == 0:
        return float("nan")
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    wins = (margin > tie_eps).float() + 0.5 * (margin.abs() <= tie_eps).float()
    return float(wins.mean())


# --- the candidate evaluation and the gate ----------------------------------------------------


@dataclass
class PolicyEval:
    """A policy measured on held-out prompts (and held-out human pairs)."""

    mean_reward: float
    kl: float  # mean over responses of sum_t [log pi - log ref] (nats per response)
    mean_length: float  # generated tokens per response
    repetition: float  # mean repetition_rate of the answers
    pair_agreement: float = float("nan")  # see pair_agreement; NaN without held-out pairs
    num_prompts: int = 0
    num_pairs: int = 0
    samples: list[str] = field(default_factory=list)  # a few answers, for the logs

    def metrics(self, prefix: str) -> dict[str, float]:
        d = asdict(self)
        d.pop("samples")
        return {f"{prefix}{k}": float(v) for k, v in d.items()}


@dataclass
class GateConfig:
    reward_tolerance: float = 0.02  # candidate reward may be this much below the current one
    kl_budget: float = 12.0  # most KL(candidate || reference) in nats per response
    min_length_ratio: float = 0.5  # mean length within [ratio_min, ratio_max] x the current one
    max_length_ratio: float = 2.0
    min_length: float = 2.0  # and at least this many tokens
    max_repetition: float = 0.25  # mean fraction of repeated word 3-grams
    pair_tolerance: float = 0.0  # candidate's human-pair agreement may drop this much at most
    min_pairs: int = 1  # below this many held-out human pairs the pair check is skipped


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]  # why it failed (empty when it passed)
    checks: dict[str, bool]

    @property
    def message(self) -> str:
        return "gate passed" if self.passed else "gate rejected: " + "; ".join(self.reasons)


def gate(candidate: PolicyEval, current: PolicyEval, cfg: GateConfig) -> GateDecision:
    """Decide whether ``candidate`` may replace ``current`` (see the module docstring)."""
    reasons: list[str] = []
    checks: dict[str, bool] = {}

    def check(name: str, ok: bool, why: str) -> None:
        checks[name] = bool(ok)
        if not ok:
            reasons.append(why)

    check(
        "reward",
        math.isfinite(candidate.mean_reward)
        and candidate.mean_reward >= current.mean_reward - cfg.reward_tolerance,
        f"mean reward {candidate.mean_reward:.4f} is below the current {current.mean_reward:.4f} "
        f"by more than {cfg.reward_tolerance}",
    )
    check(
        "kl",
        math.isfinite(candidate.kl) and candidate.kl <= cfg.kl_budget,
        f"KL to the reference {candidate.kl:.3f} exceeds the budget {cfg.kl_budget}",
    )
    lo = max(cfg.min_length, cfg.min_length_ratio * current.mean_length)
    hi = cfg.max_length_ratio * max(current.mean_length, cfg.min_length)
    check(
        "length",
        lo <= candidate.mean_length <= hi,
        f"mean length {candidate.mean_length:.1f} tokens is outside [{lo:.1f}, {hi:.1f}]",
    )
    check(
        "repetition",
        candidate.repetition <= cfg.max_repetition,
        f"repetition rate {candidate.repetition:.3f} exceeds {cfg.max_repetition}",
    )
    if candidate.num_pairs >= max(cfg.min_pairs, 1) and math.isfinite(candidate.pair_agreement):
        base = current.pair_agreement if math.isfinite(current.pair_agreement) else 0.5
        check(
            "human_pairs",
            candidate.pair_agreement >= base - cfg.pair_tolerance,
            f"agreement with held-out human pairs fell from {base:.3f} to {candidate.pair_agreement:.3f}",
        )
    return GateDecision(not reasons, reasons, checks)


@torch.no_grad()
def evaluate_policy(
    model: Any,
    tokenizer: Any,
    prompt_texts: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    ref_logprobs_fn: RefLogprobsFn,
    reward_fn: RewardTextFn,
    finetune_scope: str | None = None,
    disable_lora: bool = False,
    pairs: Sequence[PreferencePair] = (),
    pair_ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
) -> PolicyEval:
    """Sample one answer per held-out prompt (seeded, so two policies meet the same random
    stream), score them, measure their KL to the reference, length and repetition, and the
    policy's agreement with held-out human ``pairs`` (given their reference log-probs)."""
    if not prompt_ids:
        raise ValueError("no held-out prompts to evaluate on")
    per_prompt = [replace(params, n=1, seed=seed + i) for i in range(len(prompt_ids))]
    results = generate_tokens(
        model,
        [list(p) for p in prompt_ids],
        per_prompt,
        finetune_scope=finetune_scope,
        disable_lora=disable_lora,
    )
    comps = [r[0] for r in results]
    texts = [response_text(tokenizer, c.token_ids) for c in comps]
    rewards = reward_fn(list(prompt_texts), texts)
    kls = []
    nonempty = [i for i, c in enumerate(comps) if c.token_ids]
    if nonempty:
        refs = ref_logprobs_fn([prompt_ids[i] for i in nonempty], [comps[i].token_ids for i in nonempty])
        for i, ref in zip(nonempty, refs):
            kls.append(sum(a - b for a, b in zip(comps[i].logprobs, ref)))
    kls.extend(0.0 for _ in range(len(comps) - len(nonempty)))
    agreement = float("nan")
    if pairs and pair_ref_logps is not None:
        ch = sequence_logps(
            model,
            [p.prompt_token_ids for p in pairs],
            [p.chosen_token_ids for p in pairs],
            finetune_scope=finetune_scope,
            disable_lora=disable_lora,
        )
        rj = sequence_logps(
            model,
            [p.prompt_token_ids for p in pairs],
            [p.rejected_token_ids for p in pairs],
            finetune_scope=finetune_scope,
            disable_lora=disable_lora,
        )
        agreement = pair_agreement(ch, rj, pair_ref_logps[0], pair_ref_logps[1])
    return PolicyEval(
        mean_reward=float(sum(rewards) / len(rewards)),
        kl=float(sum(kls) / len(kls)),
        mean_length=float(sum(len(c.token_ids) for c in comps) / len(comps)),
        repetition=float(sum(repetition_rate(t) for t in texts) / len(texts)),
        pair_agreement=agreement,
        num_prompts=len(comps),
        num_pairs=len(pairs),
        samples=texts[:4],
    )


def usable_pairs(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """Pairs whose both answers have token ids (needed for policy log-probs)."""
    return [p for p in pairs if p.chosen_token_ids and p.rejected_token_ids and p.prompt_token_ids]


# --- policy updates on rollouts -----------------------------------------------------------------


@dataclass
class PolicyUpdateConfig:
    algorithm: str = "rloo"  # "ppo" (critic + GAE), "grpo" or "rloo" (critic-free)
    kl_estimator: str = "k1"  # for the per-token penalty (PPO/RLOO); GRPO's loss term uses k3
    epochs: int = 2  # passes over each batch of rollouts
    minibatch_size: int = 16
    clip_eps: float = 0.2
    entropy_coef: float = 0.0
    max_norm: float | None = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_scores: bool = False  # PPO: normalise scores over the batch before GAE

    def __post_init__(self) -> None:
        if self.algorithm not in ("ppo", "grpo", "rloo"):
            raise ValueError(f"algorithm must be 'ppo', 'grpo' or 'rloo', got {self.algorithm!r}")


def _token_kl(ro: Rollout, estimator: str) -> torch.Tensor:
    return L.kl_estimate(ro.old_logprobs, ro.ref_logprobs, estimator) * ro.action_mask


def compute_advantages(
    ro: Rollout, cfg: PolicyUpdateConfig, kl_coef: float, group_size: int
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """Per-token advantages (B, L - 1) for the rollout, returns for the critic (PPO only), and
    statistics. The KL leash enters as the algorithm's paper puts it: a per-token penalty in
    PPO's rewards, a penalty on the sequence reward in RLOO, a loss term in GRPO."""
    mask = ro.action_mask
    kl = _token_kl(ro, cfg.kl_estimator)
    seq_kl = kl.sum(1)
    stats = {
        "rollout_kl": float(seq_kl.mean()),
        "score_mean": float(ro.scores.mean()),
        "score_std": float(ro.scores.std()) if len(ro) > 1 else 0.0,
    }
    if cfg.algorithm == "ppo":
        scores = ro.scores
        if cfg.whiten_scores and len(ro) > 1:
            scores = (scores - scores.mean()) / (scores.std() + 1e-6)
        rewards = L.kl_penalized_rewards(scores, kl, mask, kl_coef)
        adv, returns = L.gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
        return L.masked_whiten(adv, mask), returns, stats
    groups = ro.scores.view(-1, group_size)
    if cfg.algorithm == "rloo":
        penalised = (ro.scores - kl_coef * seq_kl).view(-1, group_size)
        seq_adv = L.rloo_advantages(penalised)
    else:
        seq_adv = L.grpo_advantages(groups)
    adv = seq_adv.reshape(-1)[:, None] * mask.to(torch.float32)
    return adv, None, stats


def policy_update(
    actor: torch.nn.Module,
    actor_optim: torch.optim.Optimizer,
    ro: Rollout,
    cfg: PolicyUpdateConfig,
    kl_coef: float,
    group_size: int,
    *,
    critic: torch.nn.Module | None = None,
    critic_optim: torch.optim.Optimizer | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """``cfg.epochs`` passes of clipped-surrogate minibatch steps over one rollout batch."""
    adv, returns, stats = compute_advantages(ro, cfg, kl_coef, group_size)
    ucfg = UpdateConfig(
        clip_eps=cfg.clip_eps,
        entropy_coef=cfg.entropy_coef,
        max_norm=cfg.max_norm,
        kl_in_loss_coef=kl_coef if cfg.algorithm == "grpo" else 0.0,
    )
    fields = {
        "sequences": ro.sequences,
        "action_mask": ro.action_mask,
        "old_logprobs": ro.old_logprobs,
        "advantages": adv,
        "ref_logprobs": ro.ref_logprobs,
    }
    if cfg.algorithm == "ppo":
        fields.update(values=ro.values, returns=returns)
    lengths = ro.attention_mask.sum(1)
    rng = random.Random(seed)
    agg: dict[str, list[float]] = {}
    actor.train()
    for _ in range(cfg.epochs):
        order = list(range(len(ro)))
        rng.shuffle(order)
        for start in range(0, len(order), cfg.minibatch_size):
            idx = torch.tensor(order[start : start + cfg.minibatch_size])
            width = int(lengths[idx].max())
            batch = {
                k: (v[idx, :width] if k == "sequences" else v[idx, : width - 1]) for k, v in fields.items()
            }
            out = policy_step(actor, actor_optim, batch, ucfg)
            if critic is not None and critic_optim is not None:
                out.update(value_step(critic, critic_optim, batch, ucfg))
            for k, v in out.items():
                agg.setdefault(k, []).append(v)
    actor.eval()
    stats.update({k: sum(v) / len(v) for k, v in agg.items()})
    return stats


def merged_policy_state(palm: Any, scope: str | None) -> dict[str, torch.Tensor]:
    """The weights to serve: a copy with the LoRA ``scope`` folded in and every adapter removed
    (policy replicas serve plain PaLMs)."""
    served = copy.deepcopy(palm)
    if scope is not None and scope in served.finetune_modules:
        served.merge_finetune_params(scope)
    for other in list(served.finetune_modules):
        served.remove_finetune_params(other)
    return {k: v.detach().float().contiguous() for k, v in served.state_dict().items()}


# --- the reward model ---------------------------------------------------------------------------


def encode_for_reward(tok: Any, prompt: str, response: str, max_len: int) -> tuple[list[int], int]:
    """(ids, prompt length) of a (prompt, response) as the reward service reads it: BOS and the
    prompt, then the response and EOS; over-long pairs keep the end of the prompt and the start
    of the response. It must match the service's encoding, or the refit would learn on inputs
    the service never shows the model."""
    p = [tok.bos_id] + list(tok.encode(prompt))
    r = list(tok.encode(response)) + [tok.eos_id]
    r = r[: max(1, max_len // 2)] if len(p) + len(r) > max_len else r
    if len(p) + len(r) > max_len:
        p = p[len(p) + len(r) - max_len :]
    return p + r, len(p)


def _reward_batch(model: Any, tok: Any, prompts: Sequence[str], responses: Sequence[str]):
    max_len = model.palm.config.max_seq_len
    enc = [encode_for_reward(tok, p, r, max_len) for p, r in zip(prompts, responses)]
    device = model.palm.device
    width = max(len(ids) for ids, _ in enc)
    x = torch.full((len(enc), width), tok.pad_id, dtype=torch.long, device=device)  # (rows, width)
    mask = torch.zeros(len(enc), width, dtype=torch.bool, device=device)
    for i, (ids, _) in enumerate(enc):
        x[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = True
    plen = torch.tensor([n for _, n in enc], device=device)
    return x, mask, plen


def reward_scores(
    model: Any, tok: Any, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16
) -> torch.Tensor:
    """Scalar reward (the expected bin value for a binned head) of each response, (N,)."""
    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            x, mask, plen = _reward_batch(
                model, tok, prompts[s : s + batch_size], responses[s : s + batch_size]
            )
            out.append(model(x, mask=mask, prompt_lengths=plen).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def pairwise_accuracy(model: Any, tok: Any, pairs: Sequence[PreferencePair]) -> float:
    """Fraction of pairs whose chosen answer the reward model scores higher (ties count one
    half); NaN without pairs."""
    if not pairs:
        return float("nan")
    ch = reward_scores(model, tok, [p.prompt_text for p in pairs], [p.chosen for p in pairs])
    rj = reward_scores(model, tok, [p.prompt_text for p in pairs], [p.rejected for p in pairs])
    return float(((ch > rj).float() + 0.5 * (ch == rj).float()).mean())


@dataclass
class RewardRefitConfig:
    steps: int = 40
    batch_size: int = 16  # pairs (and ratings) per step
    lr: float = 3e-4
    rating_weight: float = 1.0  # weight of the rating cross-entropy next to Bradley-Terry
    seed: int = 0


def refit_reward_model(
    model: Any,
    tok: Any,
    pairs: Sequence[PreferencePair],
    ratings: Sequence[RatingExample],
    cfg: RewardRefitConfig,
) -> dict[str, float]:
    """Continue training ``model`` (its LoRA scope and head, the trunk stays frozen) on
    Bradley-Terry over ``pairs`` plus cross-entropy of the binned head on ``ratings``."""
    if not pairs and not ratings:
        return {"reward_steps": 0.0}
    params = model.finetune_parameters()
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    losses = []
    model.train()
    for _ in range(cfg.steps):
        loss = torch.zeros((), device=model.palm.device)
        if pairs:
            batch = [pairs[rng.randrange(len(pairs))] for _ in range(min(cfg.batch_size, max(1, len(pairs))))]
            prompts = [p.prompt_text for p in batch]
            x, mask, plen = _reward_batch(
                model, tok, prompts + prompts, [p.chosen for p in batch] + [p.rejected for p in batch]
            )
            r = model(x, mask=mask, prompt_lengths=plen).float()
            loss = loss + F.softplus(-(r[: len(batch)] - r[len(batch) :])).mean()  # -log sigmoid(diff)
        if ratings and model.binned_output and cfg.rating_weight > 0:
            batch = [ratings[rng.randrange(len(ratings))] for _ in range(min(cfg.batch_size, len(ratings)))]
            x, mask, plen = _reward_batch(
                model, tok, [e.prompt_text for e in batch], [e.response for e in batch]
            )
            labels = torch.tensor([min(e.label, model.num_binned_output - 1) for e in batch], device=x.device)
            loss = loss + cfg.rating_weight * model(x, mask=mask, prompt_lengths=plen, labels=labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return {"reward_steps": float(cfg.steps), "reward_loss_first": losses[0], "reward_loss_last": losses[-1]}


def reward_publish_decision(
    before: float, after: float, num_heldout: int, min_heldout: int = 1, tolerance: float = 0.0
) -> tuple[bool, str]:
    """Publish a refit reward model only when it was checked on held-out pairs and its
    pairwise accuracy did not get worse (beyond ``tolerance``)."""
    if num_heldout < max(min_heldout, 1) or not math.isfinite(after):
        return False, f"not enough held-out pairs to check the refit ({num_heldout} < {max(min_heldout, 1)})"
    base = before if math.isfinite(before) else 0.5
    if after + 1e-9 < base - tolerance:
        return False, f"held-out pairwise accuracy fell from {base:.3f} to {after:.3f}"
    return True, f"held-out pairwise accuracy {base:.3f} -> {after:.3f}"
