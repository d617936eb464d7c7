"""The trainable pieces of RLHF around a PaLM: the actor's view of it and the critic.

The actor is the policy PaLM seen through one LoRA scope (default), its last layers, or all of
it. The critic is a *copy* of the trunk with its own LoRA scope and a scalar value head on the
final embeddings, so its updates never disturb the policy (as in InstructGPT, where the value
function is initialised from the reward model / policy but trained separately).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from palm_rlhf.model import PaLM


class Actor(nn.Module):
    """A policy PaLM restricted to what the optimiser may change.

    ``finetune``: ``"lora"`` (train the LoRA scope ``scope``, base weights frozen; the
    reference is the same PaLM with LoRA disabled, no copy), ``"last_n"`` (train the last
    ``last_n_layers`` layers) or ``"full"``. The latter two need a frozen reference copy, which
    :meth:`make_reference` returns. ``forward`` returns logits so that the module can be wrapped
    in ``DistributedDataParallel``."""

    def __init__(
        self,
        palm: PaLM,
        finetune: str = "lora",
        scope: str = "actor",
        lora_r: int = 8,
        last_n_layers: int = 1,
    ):
        super().__init__()
        if finetune not in ("lora", "last_n", "full"):
            raise ValueError(f"finetune must be 'lora', 'last_n' or 'full', got {finetune!r}")
        self.palm = palm
        self.finetune = finetune
        self.scope = scope if finetune == "lora" else None
        if finetune == "lora":
            if scope not in palm.finetune_modules:
                palm.add_finetune_params(scope, lora_r=lora_r)
            keep = {id(p) for p in palm.finetune_parameters(scope)}
            for p in palm.parameters():
                p.requires_grad_(id(p) in keep)
        elif finetune == "last_n":
            palm.freeze_all_but_last(last_n_layers)
            for p in palm.finetune_modules.parameters():
                p.requires_grad_(False)
        else:
            for p in palm.parameters():
                p.requires_grad_(True)
            for p in palm.finetune_modules.parameters():
                p.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.palm.parameters() if p.requires_grad]

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """(B, L) -> logits (B, L, vocab) under the actor's scope."""
        return self.palm(sequences, finetune_scope=self.scope, disable_lora=self.scope is None)

    def make_reference(self) -> PaLM | None:
        """A frozen copy of the policy for the non-LoRA modes; None when LoRA-disabled calls
        on the policy itself serve as the reference."""
        if self.finetune == "lora":
            return None
        ref = copy.deepcopy(self.palm)
        for scope in list(ref.finetune_modules):
            ref.remove_finetune_params(scope)
        ref.requires_grad_(False)
        return ref.eval()

    @torch.no_grad()
    def reference_logprobs(self, reference: PaLM | None, sequences: torch.Tensor) -> torch.Tensor:
        if reference is None:
            return self.palm.logprobs_of(sequences, disable_lora=True)
        return reference.logprobs_of(sequences, disable_lora=True)


class Critic(nn.Module):
    """A value model: a copy of a PaLM trunk (LoRA scope ``critic`` by default) plus a linear
    head on the final embeddings. ``forward(seq)`` gives V at every action position, (B, L - 1):
    the value of the state *before* token ``t + 1`` was emitted."""

    def __init__(
        self,
        palm: PaLM,
        lora: bool = True,
        lora_r: int = 8,
        scope: str = "critic",
        copy_palm: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.palm = copy.deepcopy(palm) if copy_palm else palm
        if copy_palm:
            for other in [s for s in self.palm.finetune_modules if s != scope]:
                self.palm.remove_finetune_params(other)
        self.palm.set_dropout(dropout)
        self.scope = scope if lora else None
        if lora:
            if scope not in self.palm.finetune_modules:
                self.palm.add_finetune_params(scope, lora_r=lora_r)
            keep = {id(p) for p in self.palm.finetune_parameters(scope)}
            for p in self.palm.parameters():
                p.requires_grad_(id(p) in keep)
        else:
            self.palm.requires_grad_(True)
        self.value_head = nn.Linear(self.palm.dim, 1)
        # a zero head starts every value at 0: no arbitrary initial baseline
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(device=self.palm.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        embeds = self.palm(
            sequences[:, :-1],
            return_only_embedding=True,
            finetune_scope=self.scope,
            disable_lora=self.scope is None,
        )  # (B, L - 1, dim): causal, so dropping the last token changes nothing before it
        return self.value_head(embeds.float()).squeeze(-1)
