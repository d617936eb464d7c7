"""Batched rollouts: sample responses with the KV-cache engine and gather what the update needs.

:func:`rollout` takes the policy model and *callables* for reference log-probs, rewards and
values, so the same function serves a trainer holding every model in one process and one
calling a reference or reward service over the network.

Layout of a :class:`Rollout` (right padding, prompt then response in every row):

- ``sequences`` (B, L): prompt tokens, response tokens, then ``pad_id``;
- ``attention_mask`` (B, L): True on prompt and response tokens;
- per-token fields (B, L - 1) at *action positions*: index ``t`` is about token ``t + 1``
  (the layout of ``PaLM.logprobs_of``); ``action_mask`` is True where token ``t + 1`` is a
  response token. Right padding keeps causal attention exact without a mask.

Two log-probs per sampled token: ``old_logprobs`` under the distribution the token was drawn
from (temperature, top-k / top-p applied: the behaviour policy of the PPO ratio) and
``policy_logprobs`` under the model's own distribution (temperature 1, unfiltered: what the
KL to the reference compares, since the reference's log-probs are plain ones too). They
coincide when sampling is plain (temperature 1, no filter).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from palm_rlhf.generation import Completion, SamplingParams, generate_tokens


@dataclass
class Rollout:
    prompts: list[list[int]]  # one per row (repeated for n samples of the same prompt)
    responses: list[list[int]]
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    prompt_mask: torch.Tensor  # (B, L): True on prompt tokens
    old_logprobs: torch.Tensor  # (B, L - 1): log pi_old (as sampled) of each sampled token, 0 elsewhere
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # (B,): the reward of each full response
    group_ids: list[int] = field(default_factory=list)  # prompt index of each row
    finish_reasons: list[str] = field(default_factory=list)
    # (B, L - 1): log-prob of each sampled token under the policy's own distribution
    # (temperature 1, unfiltered), for the KL to the reference; None: same as old_logprobs
    policy_logprobs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.action_mask.sum(dim=1)


def pack_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int = 0,
    response_logprobs: Sequence[Sequence[float]] | None = None,
    device: torch.device | str = "cpu",
    response_policy_logprobs: Sequence[Sequence[float]] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded (prompt + response) rows and their masks (see the module docstring);
    ``response_logprobs`` go to ``old_logprobs`` and, if given, ``response_policy_logprobs``
    to ``policy_logprobs``, both at the action positions."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    b = len(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(2, max(lengths))
    seq = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros(b, width, dtype=torch.bool)
    pmask = torch.zeros(b, width, dtype=torch.bool)
    amask = torch.zeros(b, width - 1, dtype=torch.bool)
    logp = torch.zeros(b, width - 1, dtype=torch.float32)
    own = torch.zeros(b, width - 1, dtype=torch.float32) if response_policy_logprobs is not None else None
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"row {i}: empty prompt")
        np_, nr = len(p), len(r)
        seq[i, :np_] = torch.as_tensor(list(p), dtype=torch.long)
        if nr:
            seq[i, np_ : np_ + nr] = torch.as_tensor(list(r), dtype=torch.long)
            amask[i, np_ - 1 : np_ - 1 + nr] = True
            if response_logprobs is not None:
                logp[i, np_ - 1 : np_ - 1 + nr] = torch.as_tensor(
                    list(response_logprobs[i]), dtype=torch.float32
                )
            if own is not None:
                own[i, np_ - 1 : np_ - 1 + nr] = torch.as_tensor(
                    list(response_policy_logprobs[i]), dtype=torch.float32
                )
        attn[i, : np_ + nr] = True
        pmask[i, :np_] = True
    out = {
        "sequences": seq,
        "attention_mask": attn,
        "prompt_mask": pmask,
        "action_mask": amask,
        "old_logprobs": logp,
    }
    if own is not None:
        out["policy_logprobs"] = own
    return {k: v.to(device) for k, v in out.items()}


RefLogprobsFn = Callable[
    [torch.Tensor, torch.Tensor], torch.Tensor
]  # (sequences, attention_mask) -> (B, L-1)
ValueFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sequences, attention_mask) -> (B, L-1)
RewardFn = Callable[["Rollout"], torch.Tensor]  # rollout -> (B,)


@torch.no_grad()
def rollout(
    policy,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    finetune_scope: str | None = None,
    ref_logprobs_fn: RefLogprobsFn | None = None,
    reward_fn: RewardFn | None = None,
    value_fn: ValueFn | None = None,
    pad_id: int = 0,
    device: torch.device | str | None = None,
) -> Rollout:
    """Sample ``params.n`` responses per prompt in one batched, KV-cached ``generate_tokens``
    call, then fill in reference log-probs, values and scores with the given callables.

    The sampler's per-token log-probs become ``old_logprobs`` (under the distribution sampled:
    temperature, top-k / top-p) and ``policy_logprobs`` (temperature 1, unfiltered): no second
    forward pass of the policy is needed. An update must then compute its new log-probs under
    the same sampling transform (``UpdateConfig.temperature`` / ``top_k`` / ``top_p``); a
    ``logits_processor`` is part of the recorded log-probs but no update can replay it."""
    device = device or policy.device
    results: list[list[Completion]] = generate_tokens(policy, prompts, params, finetune_scope=finetune_scope)
    row_prompts, responses, logps, own_logps, groups, reasons = [], [], [], [], [], []
    for gi, (p, comps) in enumerate(zip(prompts, results)):
        for c in comps:
            row_prompts.append(list(p))
            responses.append(list(c.token_ids))
            logps.append(list(c.sampled_logprobs))
            own_logps.append(list(c.logprobs))
            groups.append(gi)
            reasons.append(c.finish_reason)
    packed = pack_sequences(
        row_prompts,
        responses,
        pad_id=pad_id,
        response_logprobs=logps,
        device=device,
        response_policy_logprobs=own_logps,
    )
    ro = Rollout(
        prompts=row_prompts,
        responses=responses,
        group_ids=groups,
        finish_reasons=reasons,
        **packed,
    )
    if ref_logprobs_fn is not None:
        ro.ref_logprobs = ref_logprobs_fn(ro.sequences, ro.attention_mask).float() * ro.action_mask
    if value_fn is not None:
        ro.values = value_fn(ro.sequences, ro.attention_mask).float() * ro.action_mask
    if reward_fn is not None:
        ro.scores = torch.as_tensor(reward_fn(ro), dtype=torch.float32, device=ro.sequences.device).reshape(
            len(ro)
        )
    return ro


def model_reward_fn(reward_model) -> RewardFn:
    """Score rollouts with a local reward model called as ``reward_model(seq, mask=, prompt_mask=)``
    (a :class:`~palm_rlhf.reward.RewardModel`, or any function with that signature)."""

    def score(ro: Rollout) -> torch.Tensor:
        dev = _device_of(reward_model, ro.sequences.device)
        return reward_model(
            ro.sequences.to(dev), mask=ro.attention_mask.to(dev), prompt_mask=ro.prompt_mask.to(dev)
        ).float()

    return score


def _device_of(module, default):
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return default


def response_logps(
    model,
    sequences: torch.Tensor,
    action_mask: torch.Tensor,
    finetune_scope: str | None = None,
    disable_lora: bool = False,
    average: bool = False,
) -> torch.Tensor:
    """Summed (or, with ``average``, mean) log-probability of each row's response tokens under
    ``model``: the sequence log-likelihood that DPO and KTO compare with the reference."""
    logps = model.logprobs_of(sequences, finetune_scope=finetune_scope, disable_lora=disable_lora)
    m = action_mask.to(logps.dtype)
    total = (logps * m).sum(1)
    return total / m.sum(1).clamp(min=1.0) if average else total
