"""A reward model on a PaLM trunk (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155).

Prompt and response tokens get learned marker embeddings; the trunk's final embeddings are
pooled over the response and mapped to a scalar, or to ``num_binned_output`` rating bins whose
expected value is the reward. Losses: Bradley-Terry on preference pairs (optional margin, as in
Llama 2), cross-entropy on ratings, and regression.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from palm_rlhf.model import PaLM


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    mask = mask.to(x.dtype).unsqueeze(-1)  # (batch, seq, 1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1e-5)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None):
    """-log sigmoid(r_chosen - r_rejected - margin), averaged over pairs."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


class RewardModel(nn.Module):
    def __init__(
        self,
        palm: PaLM,
        dropout: float = 0.1,
        num_binned_output: int = 0,
        use_lora: bool = True,
        lora_r: int = 8,
        reward_lora_scope: str = "reward",
        pooling: str = "mean",
        copy_palm: bool = True,
    ):
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        self.palm = copy.deepcopy(palm) if copy_palm else palm
        self.palm.set_dropout(dropout)
        self.use_lora = use_lora
        self.reward_lora_scope = reward_lora_scope if use_lora else None
        if use_lora and reward_lora_scope not in self.palm.finetune_modules:
            self.palm.add_finetune_params(reward_lora_scope, lora_r=lora_r)
        self.lora_r = lora_r
        self.pooling = pooling
        dim = self.palm.dim
        self.num_binned_output = int(num_binned_output)
        self.binned_output = self.num_binned_output > 1
        self.prompt_embed = nn.Parameter(torch.zeros(1, 1, dim))
        self.response_embed = nn.Parameter(torch.zeros(1, 1, dim))
        if self.binned_output:
            self.to_pred = nn.Linear(dim, self.num_binned_output)
            # bin i is worth i: a 1..5 rating stored as label 0..4 has expected value in [0, 4]
            self.register_buffer("bin_values", torch.arange(self.num_binned_output).float(), persistent=False)
        else:
            self.to_pred = nn.Linear(dim, 1, bias=False)

    def head_config(self) -> dict:
        return {
            "num_binned_output": self.num_binned_output,
            "use_lora": self.use_lora,
            "lora_r": self.lora_r,
            "reward_lora_scope": self.reward_lora_scope or "reward",
            "pooling": self.pooling,
        }

    def finetune_parameters(self) -> list[nn.Parameter]:
        head = [self.prompt_embed, self.response_embed, *self.to_pred.parameters()]
        if self.reward_lora_scope is not None:
            return head + self.palm.finetune_parameters(self.reward_lora_scope)
        return head + [p for n, p in self.palm.named_parameters() if not n.startswith("finetune_modules.")]

    def load(self, path: str | Path) -> None:
        from palm_rlhf.checkpoint import load_state_dict

        self.load_state_dict(load_state_dict(path), strict=False)

    def pooled_features(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        disable_lora: bool = False,
    ) -> torch.Tensor:
        """The trunk's output pooled over the response tokens, (batch, dim): what the head reads."""
        b, n = x.shape
        if prompt_mask is not None and prompt_lengths is not None:
            raise ValueError("give prompt_mask or prompt_lengths, not both")
        if prompt_lengths is not None:
            prompt_mask = torch.arange(n, device=x.device)[None] < prompt_lengths.to(x.device)[:, None]
        if prompt_mask is None:
            prompt_mask = torch.zeros_like(x, dtype=torch.bool)
        extra = torch.where(prompt_mask[..., None], self.prompt_embed, self.response_embed)
        embeds = self.palm(
            x,
            mask=mask,
            extra_embed=extra,
            return_only_embedding=True,
            disable_lora=disable_lora,
            finetune_scope=self.reward_lora_scope,
        )
        valid = mask if mask is not None else torch.ones_like(x, dtype=torch.bool)
        response = valid & ~prompt_mask
        # a row without response tokens is pooled over all its tokens
        pool = torch.where(response.any(dim=1, keepdim=True), response, valid)
        if self.pooling == "mean":
            return masked_mean(embeds, pool)
        last = (pool.long() * torch.arange(n, device=x.device)).argmax(dim=1)
        return embeds[torch.arange(b, device=x.device), last]

    def head_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Bin logits (batch, bins) for a binned head, else the reward (batch,)."""
        pred = self.to_pred(pooled)
        return pred if self.binned_output else pred.squeeze(-1)

    def reward_from_logits(self, pred: torch.Tensor) -> torch.Tensor:
        """The scalar reward: the expected bin value for a binned head."""
        if not self.binned_output:
            return pred
        return pred.softmax(dim=-1) @ self.bin_values.to(pred.dtype)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sample: bool = False,
        sample_temperature: float = 1.0,
        disable_lora: bool = False,
        return_logits: bool = False,
    ):
        """x: (batch, seq). ``mask`` marks real tokens (default: all), ``prompt_mask`` or
        ``prompt_lengths`` the prompt. Without labels: one reward per sequence (batch,), or the
        bin logits (batch, bins) with ``return_logits``. With labels: the loss (rating
        cross-entropy for a binned head, mean squared error otherwise)."""
        pooled = self.pooled_features(x, mask, prompt_mask, prompt_lengths, disable_lora=disable_lora)
        pred = self.head_logits(pooled)
        if labels is not None:
            if self.binned_output:
                return F.cross_entropy(pred, labels.long())
            return F.mse_loss(pred, labels.to(pred.dtype))
        if not self.binned_output or return_logits:
            return pred
        if sample:
            return torch.distributions.Categorical(logits=pred / sample_temperature).sample().float()
        return self.reward_from_logits(pred)

    def pairwise_loss(
        self,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        chosen_prompt_mask: torch.Tensor | None = None,
        rejected_prompt_mask: torch.Tensor | None = None,
        chosen_mask: torch.Tensor | None = None,
        rejected_mask: torch.Tensor | None = None,
        margin: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Bradley-Terry loss of preferring ``chosen`` over ``rejected``."""
        rc = self(chosen, mask=chosen_mask, prompt_mask=chosen_prompt_mask)
        rr = self(rejected, mask=rejected_mask, prompt_mask=rejected_prompt_mask)
        return bradley_terry_loss(rc, rr, margin)

    # -- checkpoints ---------------------------------------------------------------------

    def save(self, path: str | Path, **kw) -> Path:
        from palm_rlhf.checkpoint import save_checkpoint

        meta = dict(kw.pop("metadata", {}) or {})
        meta["reward_head"] = self.head_config()
        return save_checkpoint(path, self, self.palm.config, kind="reward", metadata=meta, **kw)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device="cpu") -> tuple[RewardModel, dict]:
        from palm_rlhf.checkpoint import CheckpointError, build_palm, load_checkpoint

        state, manifest = load_checkpoint(path, device=device)
        head = manifest.get("metadata", {}).get("reward_head")
        if head is None:
            raise CheckpointError(f"{path} is not a reward model checkpoint (no reward_head metadata)")
        palm = build_palm(manifest)
        model = cls(palm, dropout=0.0, copy_palm=False, **head)
        model.load_state_dict(state, strict=True)
        return model.to(device).eval(), manifest
