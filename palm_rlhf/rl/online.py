"""The transport-neutral half of online RLHF: reward refits, policy updates on rollouts, the
candidate evaluation and the gate that decides whether a candidate may be published.

Nothing here knows about gRPC or the feedback database. Reference log-probs and rewards
arrive as callables (so the trainer service passes network clients and the tests pass local
functions), and the losses and advantages come from :mod:`palm_rlhf.rl.losses`, the module
every trainer in the project shares.

The gate (:func:`gate`) guards what users get. A candidate policy is published only if, on
held-out prompts and held-out human preference pairs,

- its reward is higher than the current policy's on the same prompts and seeds, with
  confidence (a one-sided paired test on the per-prompt differences, see :func:`paired_gain`),
- its KL to the frozen reference stays within a budget (the leash holds across versions,
  because it is measured against the reference, not against the previous version),
- its answers keep a sane length and do not start repeating themselves, and
- it agrees with held-out *human* pairs at least as often as the current policy: the reward
  model can be fooled, the people's own choices cannot, so a policy that climbs the reward
  model while moving away from what people preferred is stopped here (reward hacking).
"""

from __future__ import annotations

import copy
import hashlib
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
from palm_rlhf.rl.feedback import PreferencePair, RatingExample, ThumbExample
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
    rewards: list[float] = field(default_factory=list)  # mean reward per prompt, in prompt order

    def metrics(self, prefix: str) -> dict[str, float]:
        d = asdict(self)
        d.pop("samples")
        d.pop("rewards")
        return {f"{prefix}{k}": float(v) for k, v in d.items()}


def paired_gain(candidate: Sequence[float], current: Sequence[float]) -> tuple[float, float]:
    """(mean, t statistic) of the per-prompt reward differences candidate - current.

    Both policies answered the same prompts with the same seeds, so the differences are
    paired; t = mean / (sd / sqrt(n)) (inf when every difference is the same positive
    number, 0 when there is no difference at all)."""
    if not candidate or len(candidate) != len(current):
        return float("nan"), float("nan")
    d = [a - b for a, b in zip(candidate, current)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    if var <= 1e-18:
        return mean, (math.inf if mean > 0 else 0.0)
    return mean, mean / math.sqrt(var / n)


@dataclass
class GateConfig:
    # the candidate's reward must beat the current policy's: paired t >= reward_confidence
    # (1.645: one-sided 95% under a normal approximation) and a mean gain >= min_reward_gain
    reward_confidence: float = 1.645
    min_reward_gain: float = 0.0
    # and a one-sided Wilcoxon signed-rank test over the prompts whose rewards differ must give
    # p <= rank_alpha (1 turns it off; at least 5 changed prompts are needed for 0.05). Both
    # policies sample with the same seeds, so on most prompts a small step leaves the answers,
    # and the difference, at exactly zero; the t statistic alone then rests on the few prompts
    # that did change, and three lucky ones pass it.
    rank_alpha: float = 0.05
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

    gain, t = paired_gain(candidate.rewards, current.rewards)
    wins = losses = 0
    rank_p = 0.0
    if not math.isfinite(gain):  # no per-prompt rewards: compare the means (no confidence)
        gain, t = candidate.mean_reward - current.mean_reward, math.inf
    else:
        diffs = [a - b for a, b in zip(candidate.rewards, current.rewards)]
        wins, losses = sum(d > 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs)
        rank_p = signed_rank_p(diffs)
    if gain <= cfg.min_reward_gain:
        why = (f"reward {candidate.mean_reward:.4f} is not above the current {current.mean_reward:.4f} "
               f"(paired gain {gain:+.4f})")
    elif t < cfg.reward_confidence:
        why = (f"reward did not improve with confidence: {candidate.mean_reward:.4f} vs the current "
               f"{current.mean_reward:.4f} (paired gain {gain:+.4f}, t {t:.2f} < {cfg.reward_confidence})")
    else:
        why = (f"reward did not improve with confidence: {candidate.mean_reward:.4f} vs the current "
               f"{current.mean_reward:.4f} (paired gain {gain:+.4f}, t {t:.2f}, but over the {wins + losses} of "
               f"{len(candidate.rewards)} prompts whose rewards changed ({wins} better, {losses} worse) the signed-rank "
               f"test gives p={rank_p:.3f} > {cfg.rank_alpha})")
    check(
        "reward",
        math.isfinite(candidate.mean_reward)
        and gain > cfg.min_reward_gain
        and t >= cfg.reward_confidence
        and rank_p <= cfg.rank_alpha,
        why,
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
    samples_per_prompt: int = 1,
) -> PolicyEval:
    """Sample ``samples_per_prompt`` answers per held-out prompt (seeded, so two policies meet
    the same random stream), score them, measure their KL to the reference, length and
    repetition, and the policy's agreement with held-out human ``pairs`` (given their reference
    log-probs)."""
    if not prompt_ids:
        raise ValueError("no held-out prompts to evaluate on")
    k = max(1, int(samples_per_prompt))
    per_prompt = [replace(params, n=k, seed=seed + i) for i in range(len(prompt_ids))]
    results = generate_tokens(
        model,
        [list(p) for p in prompt_ids],
        per_prompt,
        finetune_scope=finetune_scope,
        disable_lora=disable_lora,
    )
    comps = [c for r in results for c in r[:k]]
    owners = [i for i, r in enumerate(results) for _ in r[:k]]
    texts = [response_text(tokenizer, c.token_ids) for c in comps]
    rewards = reward_fn([prompt_texts[i] for i in owners], texts)
    per_prompt_reward = [0.0] * len(prompt_ids)
    for i, r in zip(owners, rewards):
        per_prompt_reward[i] += float(r) / k
    kls = []
    nonempty = [i for i, c in enumerate(comps) if c.token_ids]
    if nonempty:
        refs = ref_logprobs_fn([prompt_ids[owners[i]] for i in nonempty], [comps[i].token_ids for i in nonempty])
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
        num_prompts=len(prompt_ids),
        num_pairs=len(pairs),
        samples=texts[:4],
        rewards=per_prompt_reward,
    )


def usable_pairs(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """Pairs whose both answers have token ids (needed for policy log-probs)."""
    return [p for p in pairs if p.chosen_token_ids and p.rejected_token_ids and p.prompt_token_ids]


# --- policy updates on rollouts -----------------------------------------------------------------


@dataclass
class PolicyUpdateConfig:
    # "ppo" (critic + GAE), "grpo", "drgrpo" or "rloo" (critic-free). "drgrpo" (Dr. GRPO, Liu et
    # al. 2025, https://arxiv.org/abs/2503.20783) is GRPO with group advantages not divided by
    # the group std and the loss summed per response over a constant (max_new_tokens)
    algorithm: str = "rloo"
    kl_estimator: str = "k1"  # for the per-token penalty (PPO/RLOO); (Dr.) GRPO's loss term uses k3
    epochs: int = 2  # passes over each batch of rollouts
    minibatch_size: int = 16
    clip_eps: float = 0.2
    entropy_coef: float = 0.0
    max_norm: float | None = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_scores: bool = False  # PPO: normalise scores over the batch before GAE
    # see losses.aggregate; "" = the algorithm's own: seq-mean-token-sum-norm for drgrpo,
    # token-mean otherwise
    loss_aggregation: str = ""
    # the generation budget (most new tokens per response): the constant normaliser of
    # seq-mean-token-sum-norm, which needs it
    max_new_tokens: int = 0
    # how the rollouts were sampled: the new log-probs of the PPO ratio are taken under the same
    # transform as the sampler's recorded ones (see UpdateConfig)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.algorithm not in ("ppo", "grpo", "drgrpo", "rloo"):
            raise ValueError(f"algorithm must be 'ppo', 'grpo', 'drgrpo' or 'rloo', got {self.algorithm!r}")
        L.aggregate(torch.zeros(1, 1), torch.ones(1, 1), self.aggregation, constant=1.0)  # validates it
        if self.aggregation == "seq-mean-token-sum-norm" and self.max_new_tokens < 1:
            raise ValueError("seq-mean-token-sum-norm (Dr. GRPO) needs max_new_tokens, the generation budget")
        if not self.temperature > 0:
            raise ValueError(f"RL updates need sampled rollouts: temperature > 0, not {self.temperature!r}")

    @property
    def aggregation(self) -> str:
        if self.loss_aggregation:
            return self.loss_aggregation
        return "seq-mean-token-sum-norm" if self.algorithm == "drgrpo" else "token-mean"


def _token_kl(ro: Rollout, estimator: str) -> torch.Tensor:
    """The per-token KL penalty: the policy's own (temperature-1) log-probs against the
    reference's, whatever transform the tokens were sampled under."""
    own = ro.policy_logprobs if ro.policy_logprobs is not None else ro.old_logprobs
    return L.kl_estimate(own, ro.ref_logprobs, estimator) * ro.action_mask


def compute_advantages(
    ro: Rollout, cfg: PolicyUpdateConfig, kl_coef: float, group_size: int
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """Per-token advantages (B, L - 1) for the rollout, returns for the critic (PPO only), and
    statistics. The KL leash enters as the algorithm's paper puts it: a per-token penalty in
    PPO's rewards, a penalty on the sequence reward in RLOO, a loss term in (Dr.) GRPO.
    Dr. GRPO's group advantages are the centred scores, not divided by the group's std."""
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
        seq_adv = L.grpo_advantages(groups, scale_by_std=cfg.algorithm != "drgrpo")
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
        aggregation=cfg.aggregation,
        constant_normalizer=float(cfg.max_new_tokens) if cfg.max_new_tokens > 0 else None,
        kl_in_loss_coef=kl_coef if cfg.algorithm in ("grpo", "drgrpo") else 0.0,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
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


def reward_batch(
    tok: Any, prompts: Sequence[str], responses: Sequence[str], max_len: int, device: Any = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reward model's input for (prompt, response) pairs: token ids right-padded with
    ``tok.pad_id`` (rows, width), the padding mask (rows, width) and each row's prompt length
    (rows,), every pair encoded by :func:`encode_for_reward`. The trainer's refits and the reward
    service both build their batches here, so the model is trained on what it is served."""
    enc = [encode_for_reward(tok, p, r, max_len) for p, r in zip(prompts, responses)]
    if not enc:
        raise ValueError("no (prompt, response) pairs to encode")
    width = max(len(ids) for ids, _ in enc)
    x = torch.full((len(enc), width), tok.pad_id, dtype=torch.long, device=device)  # (rows, width)
    mask = torch.zeros(len(enc), width, dtype=torch.bool, device=device)
    for i, (ids, _) in enumerate(enc):
        x[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = True
    plen = torch.tensor([n for _, n in enc], device=device)
    return x, mask, plen


def _reward_batch(model: Any, tok: Any, prompts: Sequence[str], responses: Sequence[str]):
    return reward_batch(tok, prompts, responses, model.palm.config.max_seq_len, model.palm.device)


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


def pair_is_heldout(pair: PreferencePair | RatingExample, fraction: float) -> bool:
    """Whether a pair (or rating) belongs to the reward model's held-out split: a stable hash of
    the prompt and both answers, so every pair keeps its side round after round and a handful of
    prompts with many pairs still gives a held-out set (the split is by pair, not by prompt)."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    if isinstance(pair, PreferencePair):
        key = f"pair\x1f{pair.prompt_text}\x1f{pair.chosen}\x1f{pair.rejected}"
    else:
        key = f"rating\x1f{pair.prompt_text}\x1f{pair.response}"
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return (h / 2**64) < fraction


def split_pairs(examples: Sequence[Any], fraction: float) -> tuple[list[Any], list[Any]]:
    """(train, held-out) by :func:`pair_is_heldout`."""
    train, held = [], []
    for x in examples:
        (held if pair_is_heldout(x, fraction) else train).append(x)
    return train, held


def latest_thumbs(thumbs: Sequence[ThumbExample]) -> list[ThumbExample]:
    """The last verdict on each shown answer (a person may change a thumb: the later row wins)."""
    last: dict[tuple[str, int], ThumbExample] = {}
    for t in sorted(thumbs, key=lambda t: t.feedback_id):
        last[(t.completion_id, t.candidate_index)] = t
    return sorted(last.values(), key=lambda t: t.feedback_id)


def thumbs_as_ratings(thumbs: Sequence[ThumbExample], num_bins: int) -> list[RatingExample]:
    """Thumbs as labels of the binned reward head: up is the top bin, down the bottom one. This
    is what a thumb says alone; most thumbs in a chat are on prompts nobody else saw, so they
    never meet an opposite verdict on the same prompt to make a pair."""
    if num_bins < 2:
        return []
    return [RatingExample(t.prompt_text, t.prompt_token_ids, t.response, t.response_token_ids,
                          num_bins - 1 if t.up else 0, t.feedback_id, t.heldout) for t in thumbs]


def thumb_check_pairs(thumbs: Sequence[ThumbExample]) -> list[tuple[ThumbExample, ThumbExample]]:
    """(liked, disliked) pairs to check a reward model on, from thumbs on different prompts:
    each answer given a thumb down is matched with one given a thumb up, in feedback order, and
    each thumb is used once (no two pairs share an answer). A reward model is right on a pair
    when the liked answer scores higher, each scored on its own prompt."""
    ups = [t for t in thumbs if t.up]
    downs = [t for t in thumbs if not t.up]
    return list(zip(ups, downs))


@torch.no_grad()
def reward_features(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    cache: dict[tuple[str, str], torch.Tensor] | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """The reward trunk's pooled features of each (prompt, response), (N, dim) float32.

    ``cache`` (keyed by the two texts) must belong to one frozen trunk: a head-only refit
    never changes the trunk, so every answer is read by the model once in the trainer's life."""
    cache = {} if cache is None else cache
    todo = sorted({(p, r) for p, r in zip(prompts, responses) if (p, r) not in cache}, key=lambda x: len(x[1]))
    model.eval()
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        x, mask, plen = _reward_batch(model, tok, [p for p, _ in chunk], [r for _, r in chunk])
        feats = model.pooled_features(x, mask=mask, prompt_lengths=plen).float().cpu()
        for key, f in zip(chunk, feats):
            cache[key] = f
    if not prompts:
        return torch.zeros(0, model.palm.dim)
    return torch.stack([cache[(p, r)] for p, r in zip(prompts, responses)])


@dataclass
class HeadFitConfig:
    steps: int = 300  # full-batch steps (features are cached, so a step costs microseconds)
    lr: float = 1e-2
    weight_decay: float = 1e-3
    rating_weight: float = 1.0
    seed: int = 0


def fit_reward_head(
    model: Any,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    rating_feats: torch.Tensor | None,
    rating_labels: torch.Tensor | None,
    cfg: HeadFitConfig,
) -> dict[str, float]:
    """Train the reward head alone (the trunk stays frozen) on cached pooled features:
    Bradley-Terry on pairs plus cross-entropy of the binned head on ratings. Continues from the
    head's current weights (warm start)."""
    n_ratings = 0 if rating_feats is None else len(rating_feats)
    if len(chosen) == 0 and n_ratings == 0:
        return {"reward_steps": 0.0}
    params = list(model.to_pred.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    dev = params[0].device
    chosen, rejected = chosen.to(dev), rejected.to(dev)
    losses = []
    for _ in range(cfg.steps):
        loss = torch.zeros((), device=dev)
        if len(chosen):
            rc = model.reward_from_logits(model.head_logits(chosen))
            rr = model.reward_from_logits(model.head_logits(rejected))
            loss = loss + F.softplus(-(rc - rr)).mean()
        if n_ratings and model.binned_output and cfg.rating_weight > 0:
            logits = model.head_logits(rating_feats.to(dev))
            loss = loss + cfg.rating_weight * F.cross_entropy(logits, rating_labels.to(dev).long())
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
    for p in params:
        p.requires_grad_(False)
    return {"reward_steps": float(cfg.steps), "reward_loss_first": losses[0], "reward_loss_last": losses[-1]}


@torch.no_grad()
def head_pair_correct(model: Any, chosen: torch.Tensor, rejected: torch.Tensor) -> list[float]:
    """Per pair: 1 if the head scores the chosen answer higher, 0.5 on a tie, else 0."""
    if len(chosen) == 0:
        return []
    rc = model.reward_from_logits(model.head_logits(chosen.float()))
    rr = model.reward_from_logits(model.head_logits(rejected.float()))
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rc.tolist(), rr.tolist())]


def signed_rank_p(diffs: Sequence[float], eps: float = 1e-9) -> float:
    """One-sided Wilcoxon signed-rank test that the differences lean positive: P(W+ >= observed)
    when each non-zero difference is as likely positive as negative. Zero differences (|d| <=
    eps) are dropped, tied magnitudes share their mean rank, and the null distribution is exact
    (all 2^n sign patterns, counted by dynamic programming over doubled ranks). 1 when nothing
    changed."""
    d = [x for x in diffs if abs(x) > eps]
    n = len(d)
    if n == 0:
        return 1.0
    order = sorted(range(n), key=lambda i: abs(d[i]))
    ranks2 = [0] * n  # twice the (mean) rank: integers even with ties
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(abs(d[order[j + 1]]) - abs(d[order[i]])) <= eps:
            j += 1
        for k in range(i, j + 1):
            ranks2[order[k]] = i + j + 2  # (i + 1 + j + 1) / 2 ranks, doubled
        i = j + 1
    observed = sum(r for r, x in zip(ranks2, d) if x > 0)
    counts = [0] * (sum(ranks2) + 1)  # ways to reach each doubled W+
    counts[0] = 1
    top = 0
    for r in ranks2:
        for w in range(top, -1, -1):
            if counts[w]:
                counts[w + r] += counts[w]
        top += r
    return sum(counts[observed:]) / 2**n


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided sign test: P(at least ``wins`` of ``wins + losses`` fair coin flips)."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def reward_publish_decision(
    before: Sequence[float], after: Sequence[float], min_heldout: int = 4, alpha: float = 0.05
) -> tuple[bool, str]:
    """Publish a refit reward model only when it beats the current one on the held-out pairs
    with confidence. ``before`` / ``after``: per held-out pair, 1 if that model ranks it right,
    0.5 on a tie, 0 if wrong. The rule: the refit is right on more pairs where the two models
    disagree than the current one, and a one-sided sign test over those pairs gives p <= alpha."""
    n = len(after)
    if n < max(min_heldout, 1):
        return False, f"not enough held-out pairs to check the refit ({n} < {max(min_heldout, 1)})"
    acc_b, acc_a = sum(before) / n, sum(after) / n
    wins = sum(a > b for a, b in zip(after, before))
    losses = sum(a < b for a, b in zip(after, before))
    p = sign_test_p(wins, losses)
    figures = f"held-out pairwise accuracy {acc_b:.3f} -> {acc_a:.3f} on {n} pairs ({wins} better, {losses} worse"
    if wins <= losses:
        return False, f"{figures}): not better"
    if p > alpha:
        return False, f"{figures}, sign test p={p:.3f} > {alpha}): not better with confidence"
    return True, f"{figures}, sign test p={p:.3f})"


# --- preference updates from logged pairs --------------------------------------------------------

PREFERENCE_ALGORITHMS = ("dpo", "ipo", "kto")


@dataclass
class PreferenceUpdateConfig:
    """Direct preference optimisation on logged pairs, no reward model and no rollouts:
    ``dpo`` (Rafailov et al. 2023), ``ipo`` (Azar et al. 2023) or ``kto`` (Ethayarajh et al.
    2024; each pair gives its chosen answer as desirable and its rejected one as undesirable).
    The losses are :func:`palm_rlhf.rl.losses.dpo_loss` / :func:`~palm_rlhf.rl.losses.kto_loss`
    on summed response log-probs."""

    algorithm: str = "dpo"
    beta: float = 0.1  # the implicit KL leash to the reference (IPO's target margin is 1 / (2 beta))
    epochs: int = 2  # passes over the pairs
    minibatch_size: int = 16  # pairs per optimiser step
    label_smoothing: float = 0.0  # DPO: probability that a label is wrong (conservative DPO)
    desirable_weight: float = 1.0  # KTO's lambda_D
    undesirable_weight: float = 1.0  # KTO's lambda_U
    max_norm: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in PREFERENCE_ALGORITHMS:
            raise ValueError(f"algorithm must be 'dpo', 'ipo' or 'kto', got {self.algorithm!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta!r}")
        if self.epochs < 1 or self.minibatch_size < 1:
            raise ValueError("epochs and minibatch_size must be at least 1")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")


def mismatched_completions(
    pairs: Sequence[PreferencePair], max_len: int | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """KTO's mismatched (prompt, completion) rows: the prompt of pair ``i`` with the chosen
    answer of pair ``i + 1`` (cyclically), the answer cut so that a row has at most ``max_len``
    tokens. Policy and reference log-probs of these rows estimate KTO's reference point z0
    (:func:`palm_rlhf.rl.losses.kto_reference_point`); give :func:`preference_update` the
    reference's summed log-probs of exactly these rows (same ``max_len``)."""
    prompts, responses = [], []
    for i, p in enumerate(pairs):
        r = list(pairs[(i + 1) % len(pairs)].chosen_token_ids)
        if max_len is not None:
            r = r[: max(1, max_len - len(p.prompt_token_ids))]
        prompts.append(list(p.prompt_token_ids))
        responses.append(r)
    return prompts, responses


def _summed_logps(
    actor: torch.nn.Module, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> torch.Tensor:
    """Summed log-prob of each response under ``actor`` (a module returning logits), (N,)."""
    device = next(actor.parameters()).device
    packed = pack_sequences(prompts, responses, pad_id=pad_id, device=device)
    seq = packed["sequences"]
    logps = L.logprobs_from_logits(actor(seq)[:, :-1], seq[:, 1:])
    return L.masked_sum(logps, packed["action_mask"], dim=1)


def preference_update(
    actor: torch.nn.Module,
    optim: torch.optim.Optimizer,
    pairs: Sequence[PreferencePair],
    ref_chosen_logps: torch.Tensor | Sequence[float],
    ref_rejected_logps: torch.Tensor | Sequence[float],
    cfg: PreferenceUpdateConfig,
    *,
    ref_mismatched_logps: torch.Tensor | Sequence[float] | None = None,
    max_len: int | None = None,
    pad_id: int = 0,
) -> dict[str, float]:
    """``cfg.epochs`` passes of minibatch DPO / IPO / KTO steps on logged preference ``pairs``.

    ``actor`` returns logits (e.g. :class:`~palm_rlhf.rl.models.Actor`); ``ref_chosen_logps``
    / ``ref_rejected_logps`` are the reference's summed log-probs of each pair's chosen and
    rejected answer (N,), e.g. from the reference service. KTO's reference point z0 is
    estimated per minibatch on :func:`mismatched_completions` (``max_len``) when
    ``ref_mismatched_logps`` gives their reference log-probs; without them z0 = 0.

    Returns training statistics, averaged over the steps: ``loss`` (also ``loss_first`` /
    ``loss_last``), the implicit rewards ``beta * (log pi - log ref)`` of the chosen and rejected
    answers, their ``reward_margin`` and ``accuracy`` (share of pairs with a positive margin),
    measured on each minibatch before its step."""
    if not pairs:
        raise ValueError("no preference pairs to train on")
    n = len(pairs)
    device = next(actor.parameters()).device

    def as_tensor(x, name: str) -> torch.Tensor:
        t = torch.as_tensor(x, dtype=torch.float32).reshape(-1).to(device)
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} entries for {n} pairs")
        return t

    ref_c = as_tensor(ref_chosen_logps, "ref_chosen_logps")
    ref_r = as_tensor(ref_rejected_logps, "ref_rejected_logps")
    kto = cfg.algorithm == "kto"
    ref_m = None
    if kto and ref_mismatched_logps is not None:
        ref_m = as_tensor(ref_mismatched_logps, "ref_mismatched_logps")
        mis_prompts, mis_responses = mismatched_completions(pairs, max_len)
    params = [p for group in optim.param_groups for p in group["params"]]
    rng = random.Random(cfg.seed)
    agg: dict[str, list[float]] = {}
    actor.train()
    for _ in range(cfg.epochs):
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n, cfg.minibatch_size):
            idx = order[start : start + cfg.minibatch_size]
            m = len(idx)
            prompts = [pairs[i].prompt_token_ids for i in idx]
            answers = [pairs[i].chosen_token_ids for i in idx] + [pairs[i].rejected_token_ids for i in idx]
            logps = _summed_logps(actor, prompts + prompts, answers, pad_id)  # chosen then rejected
            pc, pr = logps[:m], logps[m:]
            rc, rr = ref_c[idx], ref_r[idx]
            out: dict[str, float] = {}
            if kto:
                z0 = torch.zeros((), device=device)
                if ref_m is not None:
                    with torch.no_grad():
                        mis = _summed_logps(
                            actor, [mis_prompts[i] for i in idx], [mis_responses[i] for i in idx], pad_id
                        )
                    z0 = L.kto_reference_point(mis, ref_m[idx])
                desirable = torch.arange(2 * m, device=device) < m
                loss, rewards = L.kto_loss(
                    torch.cat([pc, pr]),
                    torch.cat([rc, rr]),
                    desirable,
                    z0,
                    beta=cfg.beta,
                    desirable_weight=cfg.desirable_weight,
                    undesirable_weight=cfg.undesirable_weight,
                )
                chosen_rewards, rejected_rewards = rewards[:m], rewards[m:]
                out["kto_reference_point"] = float(z0)
            else:
                ipo = cfg.algorithm == "ipo"
                loss, chosen_rewards, rejected_rewards = L.dpo_loss(
                    pc, pr, rc, rr, beta=cfg.beta, label_smoothing=cfg.label_smoothing, ipo=ipo
                )
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_norm)
            optim.step()
            optim.zero_grad(set_to_none=True)
            margin = chosen_rewards - rejected_rewards
            out.update(
                loss=float(loss.detach()),
                chosen_reward=float(chosen_rewards.mean()),
                rejected_reward=float(rejected_rewards.mean()),
                reward_margin=float(margin.mean()),
                accuracy=float((margin > 0).float().mean()),
            )
            for k, v in out.items():
                agg.setdefault(k, []).append(v)
    actor.eval()
    stats = {k: sum(v) / len(v) for k, v in agg.items()}
    stats.update(loss_first=agg["loss"][0], loss_last=agg["loss"][-1], steps=float(len(agg["loss"])),
                 pairs=float(n))
    return stats
