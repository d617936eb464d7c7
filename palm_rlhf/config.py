"""Model configuration: one typed dataclass and a table of named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class PaLMConfig:
    """Shape and behaviour of a PaLM decoder (or encoder, with ``causal=False``)."""

    num_tokens: int = 260  # byte tokenizer: 256 bytes + pad/bos/eos/sep
    dim: int = 512
    depth: int = 8
    dim_head: int = 64  # PaLM uses a fixed head dim and varies the head count with width
    heads: int = 8
    ff_mult: int = 4  # SwiGLU inner width = dim * ff_mult (PaLM section 2)
    causal: bool = True
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    qk_rmsnorm: bool = False  # l2-normalised queries and keys with a learned per-dim scale
    qk_scale: float = 8.0  # attention temperature used only with qk_rmsnorm
    rotary_base: float = 10000.0
    rotary_xpos: bool = False  # length-extrapolating rotary (xPos, Sun et al. 2022)
    rotary_xpos_scale_base: int = 512
    lora_r: int = 8  # default rank of new LoRA adapters
    lora_alpha: float | None = None  # scaling = alpha / r; None means 1.0 (scale of r)
    finetune_scopes: tuple[str, ...] = ()  # LoRA adapters created with the model
    cross_entropy_ignore_index: int = 0  # the pad id of the byte tokenizer
    max_seq_len: int = 2048  # upper bound for generation (KV cache size)
    flash_attn: bool = True  # accepted for compatibility; fused attention is always used

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["finetune_scopes"] = list(self.finetune_scopes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PaLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PaLMConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "finetune_scopes" in d:
            d["finetune_scopes"] = tuple(d["finetune_scopes"])
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> PaLMConfig:
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @property
    def ff_inner(self) -> int:
        return self.dim * self.ff_mult

    @property
    def attn_inner(self) -> int:
        return self.dim_head * self.heads

    def num_params(self) -> int:
        """Parameter count without LoRA adapters (embedding counted once: it is tied)."""
        fused = self.dim * (self.attn_inner + 2 * self.dim_head + 2 * self.ff_inner)
        per_layer = self.dim + fused + self.attn_inner * self.dim + self.ff_inner * self.dim
        if self.qk_rmsnorm:
            per_layer += 2 * self.dim_head
        return self.num_tokens * self.dim + self.depth * per_layer + self.dim


PRESETS: dict[str, PaLMConfig] = {
    # A few kB: unit tests.
    "tiny": PaLMConfig(dim=32, depth=2, dim_head=16, heads=2, max_seq_len=256),
    # The shipped demo model: small enough to pretrain in minutes on two CPU cores.
    "demo": PaLMConfig(dim=256, depth=4, dim_head=64, heads=4, max_seq_len=512),
    # The generation benchmark's configuration.
    "bench": PaLMConfig(num_tokens=256, dim=512, depth=8, dim_head=64, heads=8, max_seq_len=1024),
    # The palm-rlhf-pytorch README example.
    "readme": PaLMConfig(num_tokens=20000, dim=512, depth=12, dim_head=64, heads=8),
    # Larger shapes for GPUs.
    "palm-150m": PaLMConfig(num_tokens=32000, dim=768, depth=12, dim_head=64, heads=12, max_seq_len=4096),
    "palm-410m": PaLMConfig(num_tokens=32000, dim=1024, depth=24, dim_head=128, heads=8, max_seq_len=4096),
}

