"""Low-rank adapters (LoRA, Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A PaLM holds any number of named adapter scopes (``actor``, ``critic``, ``reward``...).
Each scope has, per layer, one adapter on the fused input projection (which feeds
queries, keys, values and both SwiGLU halves), one on the attention output and one
on the feed-forward output.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRA(nn.Module):
    """delta(x) = (x @ A) @ B * scale, with B zero-initialised so a new adapter is a no-op."""

    def __init__(self, dim_in: int, dim_out: int, r: int = 8, alpha: float | None = None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.r = r
        self.scale = (alpha if alpha is not None else r) / r
        self.A = nn.Parameter(torch.empty(dim_in, r))
        self.B = nn.Parameter(torch.zeros(r, dim_out))
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A) @ self.B * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The update to add to an nn.Linear weight of shape (dim_out, dim_in)."""
        return (self.A @ self.B).T * self.scale


class LayerLoRA(nn.Module):
    """The adapters of one scope for one PaLM layer."""

    def __init__(self, dim: int, fused_dim: int, attn_inner: int, ff_inner: int, r: int, alpha):
        super().__init__()
        self.fused = LoRA(dim, fused_dim, r, alpha)
        self.attn_out = LoRA(attn_inner, dim, r, alpha)
        self.ff_out = LoRA(ff_inner, dim, r, alpha)
