"""PaLM (Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311).

Each block computes ``x + attn(norm(x)) + ff(norm(x))`` from one pre-norm and one fused
input projection split into queries, one shared key/value head (multi-query attention,
Shazeer 2019) and the two SwiGLU halves. Rotary embeddings (Su et al. 2021) with optional
xPos scaling, bias-free LayerNorm, embeddings tied to the output projection.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn

from kernels import cpu_decode, dispatch
from palm_rlhf import cpu_linear
from palm_rlhf.config import PaLMConfig
from palm_rlhf.lora import LayerLoRA


def exists(v) -> bool:
    return v is not None


# --- sampling filters, kept for the palm-rlhf-pytorch ``generate`` signature -------------


def top_k(logits: torch.Tensor, thres: float = 0.9) -> torch.Tensor:
    """Keep the top ``ceil((1 - thres) * vocab)`` logits."""
    k = max(1, math.ceil((1 - thres) * logits.shape[-1]))
    val, ind = torch.topk(logits, k)
    out = torch.full_like(logits, float("-inf"))
    return out.scatter_(-1, ind, val)


def top_p(logits: torch.Tensor, thres: float = 0.9) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of logits whose probability mass reaches ``thres``."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    remove = (cum - F.softmax(sorted_logits, dim=-1)) >= thres
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)


# --- building blocks ---------------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm with a learned gain and no bias (PaLM section 2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight)


class Rotary(nn.Module):
    """Rotary position tables. ``tables(pos)`` returns cos and a sign-folded sin so that
    ``rotate(x) = x * cos + x.roll(d/2) * sin``."""

    def __init__(self, dim_head: int, base: float, xpos: bool, xpos_scale_base: int):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim_head, 2).float() / dim_head))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.xpos = xpos
        self.xpos_scale_base = xpos_scale_base
        scale = (torch.arange(0, dim_head, 2).float() + 0.4 * dim_head) / (1.4 * dim_head)
        self.register_buffer("xpos_scale", scale, persistent=False)
        self._cache: dict = {}

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions: (batch, seq) or (seq,) integer -> cos, sin of shape (..., seq, dim_head)
        and, with xPos, the query scale (keys use its inverse)."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # (..., seq, d/2)
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat((cos, cos), dim=-1)
        sin = torch.cat((-sin, sin), dim=-1)
        scale = None
        if self.xpos:
            power = (positions.to(torch.float32) - positions.max().float() / 2) / self.xpos_scale_base
            scale = self.xpos_scale ** power[..., None]
            scale = torch.cat((scale, scale), dim=-1).to(dtype)
        return cos.to(dtype), sin.to(dtype), scale

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype, max_position: int | None = None):
        """Like ``tables`` but gathered from a cached table (cheap per decode step).
        ``max_position``, when the caller knows a bound on ``positions``, saves a host sync."""
        if self.xpos:
            return self.tables(positions, dtype)
        need = 1024
        top = int(positions.max()) if max_position is None else max_position
        while need <= top:
            need *= 2
        cos, sin, _ = self.cached_tables(need, positions.device, dtype)
        if positions.shape[0] == 1:
            flat = positions[0]
            return cos.index_select(0, flat)[None], sin.index_select(0, flat)[None], None
        return cos[positions], sin[positions], None

    def rotation(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """cos, sin (rows, dim_head) -> R (rows, dim_head, dim_head) with ``x @ R`` equal to
        ``x * cos + x.roll(dim_head / 2) * sin``: R = diag(cos) + P diag(sin), P the shift."""
        d = cos.shape[-1]
        shift = self.__dict__.get("_shift")
        if shift is None or shift.shape[0] != d or shift.device != cos.device or shift.dtype != cos.dtype:
            idx = torch.arange(d, device=cos.device)
            shift = (idx[None, :] == (idx[:, None] + d // 2) % d).to(cos.dtype)  # P[i, j] = [j = i + d/2 mod d]
            self.__dict__["_shift"] = shift
        return torch.diag_embed(cos) + shift * sin[:, None, :]

    def cached_tables(self, seq_len: int, device, dtype):
        key = (seq_len, device, dtype)
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = self.tables(torch.arange(seq_len, device=device), dtype)
        return self._cache[key]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (..., d); cos/sin broadcastable to x. roll swaps the halves: [x2, x1].
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class ParallelBlock(nn.Module):
    """One PaLM layer: attention and SwiGLU feed-forward in parallel from one pre-norm."""

    def __init__(self, cfg: PaLMConfig):
        super().__init__()
        self.cfg = cfg
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        self.attn_inner, self.ff_inner = cfg.attn_inner, cfg.ff_inner
        # fused projection layout: [q (heads * dim_head), k (dim_head), v (dim_head), ff value, ff gate]
        self.fused_dims = (self.attn_inner, cfg.dim_head, cfg.dim_head, 2 * cfg.ff_inner)
        self.norm = LayerNorm(cfg.dim)
        self.fused_attn_ff_proj = nn.Linear(cfg.dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(self.attn_inner, cfg.dim, bias=False)
        self.ff_out = nn.Linear(cfg.ff_inner, cfg.dim, bias=False)
        self.ff_dropout = nn.Dropout(cfg.ff_dropout)
        self.attn_dropout = cfg.attn_dropout
        if cfg.qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(cfg.dim_head))
            self.k_scale = nn.Parameter(torch.ones(cfg.dim_head))
        self.scale = cfg.qk_scale if cfg.qk_rmsnorm else cfg.dim_head**-0.5

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple,
        lora: LayerLoRA | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_pos: int = 0,
        decode_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (batch, seq, dim). Without ``cache``: full causal (or masked) attention over x.
        With ``cache`` (k, v buffers of shape (batch, 1, max_len, dim_head)): write this
        chunk's keys and values at ``cache_pos`` and attend over ``[0, cache_pos + seq)``."""
        b, n, _ = x.shape
        h, d = self.heads, self.dim_head
        cos, sin, xscale = rotary
        normed = self.norm(x)
        fused = cpu_linear.linear(normed, self.fused_attn_ff_proj.weight)
        if lora is not None:
            fused = fused + lora.fused(normed)
        qk, v, ff = fused.split((self.attn_inner + d, d, 2 * self.ff_inner), dim=-1)
        qk = qk.view(b, n, h + 1, d)  # (batch, seq, heads + 1 key head, head_dim)
        if self.cfg.qk_rmsnorm:
            q, k = qk[:, :, :h], qk[:, :, h:]
            q = F.normalize(q, dim=-1) * self.q_scale
            k = F.normalize(k, dim=-1) * self.k_scale
            qk = torch.cat((q, k), dim=2)
        # cos/sin: (seq, d) or (batch, seq, d) -> broadcast over the head axis
        qk = apply_rotary(qk, cos.unsqueeze(-2), sin.unsqueeze(-2))
        q, k = qk[:, :, :h], qk[:, :, h]  # (b, n, h, d), (b, n, d)
        if xscale is not None:
            q = q * xscale.unsqueeze(-2)
            k = k / xscale

        if cache is None:
            q = q.transpose(1, 2)  # (batch, heads, seq, head_dim)
            k = k.unsqueeze(1)  # (batch, 1, seq, head_dim): one K/V head, never copied per head
            v = v.unsqueeze(1)
            out = dispatch.attention(
                q,
                k,
                v,
                causal=self.cfg.causal and attn_mask is None,
                attn_mask=attn_mask,
                dropout_p=self.attn_dropout if self.training else 0.0,
                scale=self.scale,
            )
            out = out.transpose(1, 2).reshape(b, n, self.attn_inner)
        else:
            k_cache, v_cache = cache
            k_cache[:, 0, cache_pos : cache_pos + n] = k
            v_cache[:, 0, cache_pos : cache_pos + n] = v
            end = cache_pos + n
            keys, values = k_cache[:, :, :end], v_cache[:, :, :end]  # (b, 1, end, d)
            if n == 1 and decode_mask is None and dispatch.triton_enabled_for(q):
                # GPU: the split-K decode kernel reads the shared K/V head once for all heads
                out = dispatch.decode_attention(q.transpose(1, 2), k_cache, v_cache, end, scale=self.scale)
                out = out.transpose(1, 2).reshape(b, 1, self.attn_inner)  # (b, h, 1, d) -> (b, 1, h * d)
            elif n == 1:
                # One new token: its heads act as the query axis of a single-head attention
                # over the shared K/V head. (b, 1, h, d) x (b, 1, end, d): no copies, no transposes.
                out = F.scaled_dot_product_attention(
                    q.view(b, 1, h, d), keys, values, attn_mask=decode_mask, scale=self.scale
                )
                out = out.view(b, 1, self.attn_inner)
            else:
                if attn_mask is None and cache_pos != 0:
                    raise ValueError("a multi-token chunk after the cache start needs an explicit attn_mask")
                out = dispatch.attention(
                    q.transpose(1, 2),
                    keys,
                    values,
                    causal=attn_mask is None and self.cfg.causal,
                    attn_mask=attn_mask,
                    scale=self.scale,
                )
                out = out.transpose(1, 2).reshape(b, n, self.attn_inner)

        attn = cpu_linear.linear(out, self.attn_out.weight)
        if lora is not None:
            attn = attn + lora.attn_out(out)
        hidden = self.ff_dropout(dispatch.swiglu(ff))
        ffo = cpu_linear.linear(hidden, self.ff_out.weight)
        if lora is not None:
            ffo = ffo + lora.ff_out(hidden)
        return x + attn + ffo

    def decode_one(
        self,
        x: torch.Tensor,
        rotary: tuple,
        cache: tuple[torch.Tensor, torch.Tensor],
        cache_pos: int,
        lora: LayerLoRA | None = None,
        decode_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One new token per row: x (batch, dim) -> (batch, dim). The same computation as
        ``forward`` with a cache and a one-token chunk, on 2-D tensors and with fewer small
        ops: at batch 1 a decode step is mostly per-op overhead besides the weight stream.
        ``rotary``: (rotation, xscale, cos, sin, starts). Either the rotation as a matrix (rows
        or 1, dim_head, dim_head), so that one matmul rotates every head (see
        :meth:`Rotary.rotation`), and the xPos scale or None; or, when :meth:`PaLM.forward_cached`
        chose the C kernel (``kernels.cpu_decode``), cos and sin rows (one for all rows or one
        per row) and each row's first attended slot (None: slot 0), and everything between the
        two projections is one kernel call."""
        b = x.shape[0]
        h, d = self.heads, self.dim_head
        rotation, xscale, cos, sin, starts = rotary
        normed = F.layer_norm(x, x.shape[-1:], self.norm.weight)
        int8 = self.int8_weights() if b <= cpu_linear.INT8_MAX_ROWS else None
        if int8 is not None:
            fused = cpu_linear.int8_linear(normed, *int8[0])
        else:
            fused = cpu_linear.linear(normed, self.fused_attn_ff_proj.weight)
        if lora is not None:
            fused = fused + lora.fused(normed)
        if cos is not None:
            both = cpu_decode.attn_swiglu(
                fused, cos, sin, *cache, cache_pos, h, self.ff_inner, self.scale, 0 if starts is None else starts
            )
            return self._decode_out(x, both, int8, lora)
        qk, v, ff = fused.split((self.attn_inner + d, d, 2 * self.ff_inner), dim=-1)
        qk = qk.view(b, h + 1, d)
        if self.cfg.qk_rmsnorm:
            q, k = qk[:, :h], qk[:, h:]
            qk = torch.cat((F.normalize(q, dim=-1) * self.q_scale, F.normalize(k, dim=-1) * self.k_scale), dim=1)
        qk = torch.matmul(qk, rotation)
        q, k = qk[:, :h], qk[:, h]
        if xscale is not None:
            q = q * xscale
            k = k / xscale[:, 0]
        k_cache, v_cache = cache
        k_cache.select(2, cache_pos).select(1, 0).copy_(k)
        v_cache.select(2, cache_pos).select(1, 0).copy_(v)
        end = cache_pos + 1
        if decode_mask is None and dispatch.triton_enabled_for(q):
            out = dispatch.decode_attention(q.view(b, h, 1, d), k_cache, v_cache, end, scale=self.scale)
        else:
            # the heads act as the query axis of one single-head attention over the shared K/V head
            out = F.scaled_dot_product_attention(
                q.view(b, 1, h, d), k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=decode_mask, scale=self.scale
            )
        out = out.reshape(b, self.attn_inner)
        return self._decode_out(x, torch.cat((out, dispatch.swiglu(ff)), dim=-1), int8, lora)

    def decode_kernel(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple,
        cache_pos: int,
        merged: torch.Tensor,
        starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`decode_one` on its leanest path, four calls per layer: the norm, the fused
        input projection (oneDNN, reordered weight), the C kernel for everything up to the
        output projection, and the merged output projection with the residual riding in it.
        For callers that checked ``cpu_decode.supports``; ``merged``: what
        :meth:`kernel_weights` returned for this step."""
        params = self._modules["norm"]._parameters
        fused = cpu_linear.linear_packed(
            torch.layer_norm(x, x.shape[-1:], params["weight"]),
            self._modules["fused_attn_ff_proj"]._parameters["weight"],
        )
        both = cpu_decode.attn_swiglu_unchecked(
            fused, cos, sin, cache, cache_pos, self.heads, self.ff_inner, self.scale, starts
        )
        return cpu_linear.linear_packed_add(both, merged, x)

    def kernel_weights(self) -> torch.Tensor | None:
        """The merged output weight when :meth:`decode_kernel` applies (float weights, no int8
        decoding, the output projections side by side, the reordered oneDNN path on), else
        None."""
        if self.__dict__.get("_int8_on") or not cpu_linear.enabled():
            return None
        return self.merged_out_weight()

    def _decode_out(self, x: torch.Tensor, both: torch.Tensor, int8: tuple | None, lora: LayerLoRA | None):
        """The output projections of a decode step and the residual: ``both`` is
        [attention out | SwiGLU out] per row."""
        merged = None if int8 is not None else self.merged_out_weight()
        if int8 is not None:
            y = cpu_linear.int8_linear(both, *int8[1])
        elif merged is not None and lora is None:
            # the residual rides in the matmul: one op fewer per layer
            return cpu_linear.linear_add(both, merged, x)
        elif merged is not None:
            y = cpu_linear.linear(both, merged)
        else:
            out, hidden = both[:, : self.attn_inner], both[:, self.attn_inner :]
            y = cpu_linear.linear(out, self.attn_out.weight) + cpu_linear.linear(hidden, self.ff_out.weight)
        if lora is not None:
            out, hidden = both[:, : self.attn_inner], both[:, self.attn_inner :]
            y = y + lora.attn_out(out) + lora.ff_out(hidden)
        return y.add_(x)

    def int8_weights(self) -> tuple | None:
        """The int8 copies the decode step reads after :meth:`PaLM.quantize_int8`: ((fused
        input projection, scales), ([attention out | feed-forward out], scales)), or None when
        int8 decoding is off. Re-quantized when any of the weights is replaced or updated in
        place (an optimizer step, ``load_state_dict``, a LoRA merge)."""
        if not self.__dict__.get("_int8_on"):
            return None
        w, a, f = self.fused_attn_ff_proj.weight, self.attn_out.weight, self.ff_out.weight
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in (w, a, f))
        cached = self.__dict__.get("_int8")
        if cached is not None and cached[0] == key:
            return cached[1]
        weights = (cpu_linear.quantize_int8(w), cpu_linear.quantize_int8(torch.cat((a.detach(), f.detach()), dim=1)))
        self.__dict__["_int8"] = (key, weights)
        return weights

    def merged_out_weight(self) -> torch.Tensor | None:
        """The attention and feed-forward output weights as one (dim, attn_inner + ff_inner)
        matrix, when :meth:`PaLM.use_fast_layout` put them side by side in one buffer (else
        None). A view, not a copy; remade when either weight is replaced or updated in place."""
        mods = self._modules
        a, f = mods["attn_out"]._parameters["weight"], mods["ff_out"]._parameters["weight"]
        key = (a.data_ptr(), f.data_ptr(), a._version, f._version)
        cached = self.__dict__.get("_merged")
        if cached is not None and cached[0] == key:
            return cached[1]
        dim, ia = a.shape
        width = ia + f.shape[1]
        merged = None
        if (
            a.stride() == (width, 1)
            and f.stride() == (width, 1)
            and a.dtype == f.dtype
            and not a.is_meta
            and a.untyped_storage().data_ptr() == f.untyped_storage().data_ptr()
            and f.storage_offset() == a.storage_offset() + ia
        ):
            merged = a.detach().as_strided((dim, width), (width, 1), a.storage_offset())
        self.__dict__["_merged"] = (key, merged)
        return merged


# --- the model ----------------------------------------------------------------------------


def _contiguous_state(module, state_dict, prefix, local_metadata):
    """state_dict() hands out contiguous tensors whatever the in-memory layout, so that it can
    go straight to safetensors (which refuses strided tensors)."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            state_dict[key] = value.contiguous()
    return state_dict



class PaLM(nn.Module):
    """A PaLM language model.

    Accepts the constructor keywords of palm-rlhf-pytorch (``num_tokens``, ``dim``, ``depth``,
    ``causal``, ``dim_head``, ``heads``, ``ff_mult``, ``qk_rmsnorm``, ``lora_r``,
    ``rotary_xpos_scale_base``, ``flash_attn``, ``finetune_scopes``,
    ``cross_entropy_ignore_index``...) or a :class:`PaLMConfig` via ``config=``.
    """

    def __init__(self, config: PaLMConfig | None = None, **kwargs):
        super().__init__()
        if "rotary_xpos" in kwargs and not isinstance(kwargs["rotary_xpos"], bool):
            raise TypeError("rotary_xpos must be a bool")
        if config is None:
            known = {f.name for f in fields(PaLMConfig)}
            unknown = set(kwargs) - known
            if unknown:
                raise TypeError(f"PaLM got unexpected keyword arguments {sorted(unknown)}")
            if "finetune_scopes" in kwargs:
                kwargs["finetune_scopes"] = tuple(kwargs["finetune_scopes"])
            config = PaLMConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        self.config = config
        self.num_tokens, self.dim, self.causal = config.num_tokens, config.dim, config.causal
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.layers = nn.ModuleList([ParallelBlock(config) for _ in range(config.depth)])
        self.norm = LayerNorm(config.dim)
        self.rotary = Rotary(config.dim_head, config.rotary_base, config.rotary_xpos, config.rotary_xpos_scale_base)
        self.finetune_modules = nn.ModuleDict()
        self.default_lora_scope: str | None = None
        nn.init.normal_(self.token_emb.weight, std=0.02)
        for scope in config.finetune_scopes:
            self.add_finetune_params(scope)
        self.use_fast_layout()
        self._register_state_dict_hook(_contiguous_state)

    @torch.no_grad()
    def use_fast_layout(self) -> None:
        """Lay out the projection weights for the fastest decode step on their device.

        On the CPU the two output projections (attention and feed-forward) share one
        output-major buffer, so that a decode step reads them in one GEMV over
        ``[attention out, swiglu out]``; in float32 the fused input projection is stored
        input-major (the (out, in) parameter is the transpose of a contiguous (in, out) buffer),
        which MKL's batch-1 GEMV streams about 30% faster than the usual layout. Elsewhere: one
        contiguous output-major buffer per weight. Shapes, names, checkpoints and gradients are
        the same either way. ``.to()`` re-applies it; loading with ``assign=True`` replaces the
        tensors, so loaders call it again."""
        for layer in self.layers:
            w = layer.fused_attn_ff_proj.weight
            if w.is_meta or w.dim() != 2:
                continue
            cpu = w.device.type == "cpu"
            if cpu and w.dtype == torch.float32:
                if w.stride() != (1, w.shape[0]):
                    layer.fused_attn_ff_proj.weight.data = w.data.t().contiguous().t()
            elif not w.is_contiguous():
                layer.fused_attn_ff_proj.weight.data = w.data.contiguous()
            a, f = layer.attn_out.weight, layer.ff_out.weight
            if cpu and a.dtype == f.dtype:
                if layer.merged_out_weight() is None:
                    buf = torch.cat((a.data, f.data), dim=1)  # (dim, attn_inner + ff_inner), contiguous
                    layer.attn_out.weight.data = buf[:, : a.shape[1]]
                    layer.ff_out.weight.data = buf[:, a.shape[1] :]
            else:
                for lin in (layer.attn_out, layer.ff_out):
                    if not lin.weight.is_contiguous():
                        lin.weight.data = lin.weight.data.contiguous()
            layer.__dict__.pop("_merged", None)

    def quantize_int8(self, enabled: bool = True) -> PaLM:
        """Weight-only int8 for decoding on the CPU: each decode step of up to
        ``cpu_linear.INT8_MAX_ROWS`` (4) rows reads int8 copies of the projection weights
        (symmetric, one scale per output channel) with bfloat16 activations, a quarter of the
        float32 bytes. The float weights stay as they are and are still used for the prefill,
        larger batches, training and checkpoints; the int8 copies (a quarter of the float32
        size) are made on first use and remade when the weights change. Sampled tokens and
        their log-probs then come from the quantized model. Returns the model."""
        if enabled:
            if self.device.type != "cpu":
                raise ValueError(f"int8 decoding is a CPU path; this model is on {self.device}")
            if not cpu_linear.int8_available():
                raise RuntimeError("this PyTorch build has no working torch._weight_int8pack_mm")
            block = cpu_linear.INT8_BLOCK
            cfg = self.config
            if cfg.dim % block or (cfg.attn_inner + cfg.ff_inner) % block:
                raise ValueError(
                    f"int8 decoding needs dim ({cfg.dim}) and attention + feed-forward inner width "
                    f"({cfg.attn_inner + cfg.ff_inner}) divisible by {block}"
                )
        for layer in self.layers:
            layer.__dict__.pop("_int8", None)
            if enabled:
                layer.__dict__["_int8_on"] = True
            else:
                layer.__dict__.pop("_int8_on", None)
        return self

    @property
    def int8_decoding(self) -> bool:
        return any(layer.__dict__.get("_int8_on") for layer in self.layers)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.use_fast_layout()
        if self.int8_decoding and self.device.type != "cpu":
            warnings.warn("int8 decoding is a CPU path: turned off after moving the model", stacklevel=2)
            self.quantize_int8(False)
        return out

    # -- properties -----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.token_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.token_emb.weight.dtype

    # -- LoRA -------------------------------------------------------------------------------

    def add_finetune_params(self, scope: str, lora_r: int | None = None, lora_alpha: float | None = None) -> None:
        """Create the LoRA adapter ``scope`` on every layer (a no-op until trained)."""
        if scope in self.finetune_modules:
            raise ValueError(f"LoRA scope {scope!r} already exists")
        cfg = self.config
        r = lora_r or cfg.lora_r
        alpha = lora_alpha if lora_alpha is not None else cfg.lora_alpha
        fused_dim = cfg.attn_inner + 2 * cfg.dim_head + 2 * cfg.ff_inner
        mods = nn.ModuleList(
            [LayerLoRA(cfg.dim, fused_dim, cfg.attn_inner, cfg.ff_inner, r, alpha) for _ in range(cfg.depth)]
        )
        self.finetune_modules[scope] = mods.to(device=self.device, dtype=self.dtype)

    def remove_finetune_params(self, scope: str) -> nn.ModuleList:
        if scope not in self.finetune_modules:
            raise KeyError(f"no LoRA scope {scope!r}; have {list(self.finetune_modules)}")
        if self.default_lora_scope == scope:
            self.default_lora_scope = None
        return self.finetune_modules.pop(scope)

    @torch.no_grad()
    def merge_finetune_params(self, scope: str) -> None:
        """Fold the adapter ``scope`` into the base weights and remove it."""
        mods = self.remove_finetune_params(scope)
        for layer, lora in zip(self.layers, mods):
            layer.fused_attn_ff_proj.weight += lora.fused.delta_weight().to(self.dtype)
            layer.attn_out.weight += lora.attn_out.delta_weight().to(self.dtype)
            layer.ff_out.weight += lora.ff_out.delta_weight().to(self.dtype)

    def set_lora_scope(self, scope: str | None) -> None:
        """Switch the adapter used when ``forward`` gets no ``finetune_scope`` (None: base model)."""
        if scope is not None and scope not in self.finetune_modules:
            raise KeyError(f"no LoRA scope {scope!r}; have {list(self.finetune_modules)}")
        self.default_lora_scope = scope

    @contextlib.contextmanager
    def lora_scope(self, scope: str | None) -> Iterator[None]:
        prev = self.default_lora_scope
        self.set_lora_scope(scope)
        try:
            yield
        finally:
            self.default_lora_scope = prev

    def finetune_parameters(self, scope: str = "default") -> list[nn.Parameter]:
        if scope not in self.finetune_modules:
            raise KeyError(f"no LoRA scope {scope!r}; have {list(self.finetune_modules)}")
        return list(self.finetune_modules[scope].parameters())

    def last_layers_parameters(self, n: int) -> list[nn.Parameter]:
        """Parameters of the last ``n`` layers and the final norm (for partial fine-tuning)."""
        if not 0 < n <= len(self.layers):
            raise ValueError(f"n must be in 1..{len(self.layers)}, got {n}")
        params = [p for layer in self.layers[-n:] for p in layer.parameters()]
        return params + list(self.norm.parameters())

    def freeze_all_but_last(self, n: int) -> list[nn.Parameter]:
        keep = {id(p) for p in self.last_layers_parameters(n)}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)
        return [p for p in self.parameters() if p.requires_grad]

    def _lora_layers(self, finetune_scope: str | None, disable_lora: bool):
        scope = finetune_scope if finetune_scope is not None else self.default_lora_scope
        if disable_lora or scope is None:
            return [None] * len(self.layers)
        if scope not in self.finetune_modules:
            raise KeyError(f"no LoRA scope {scope!r}; have {list(self.finetune_modules)}")
        return list(self.finetune_modules[scope])

    # -- misc compatibility helpers -----------------------------------------------------------

    def set_dropout(self, dropout: float) -> None:
        for layer in self.layers:
            layer.attn_dropout = dropout
            layer.ff_dropout.p = dropout

    def load(self, path: str) -> None:
        from palm_rlhf.checkpoint import load_state_dict

        self.load_state_dict(load_state_dict(path), strict=False)

    def rebuild_buffers(self, device) -> None:
        cfg = self.config
        self.rotary = Rotary(cfg.dim_head, cfg.rotary_base, cfg.rotary_xpos, cfg.rotary_xpos_scale_base).to(device)

    def clone(self) -> PaLM:
        return copy.deepcopy(self)

    def __deepcopy__(self, memo) -> PaLM:
        # deepcopy clones each parameter on its own, which would split the shared buffer of the
        # output projections: copy as usual, then lay the copy out again
        for layer in self.layers:
            layer.__dict__.pop("_merged", None)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        new.use_fast_layout()
        return new

    # -- forward ----------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        return_loss: bool = False,
        disable_lora: bool = False,
        finetune_scope: str | None = None,
        extra_embed: torch.Tensor | None = None,
        return_only_embedding: bool = False,
        return_logits_with_embedding: bool = False,
        mask: torch.Tensor | None = None,
    ):
        """x: (batch, seq) token ids. Returns logits (batch, seq, num_tokens), the loss with
        ``return_loss`` (next-token cross entropy, ``cross_entropy_ignore_index`` ignored), or
        the final embeddings (batch, seq, dim) with ``return_only_embedding``.

        For a non-causal model, negative ids mark padding (as in palm-rlhf-pytorch); ``mask``
        (batch, seq) marks valid keys explicitly."""
        if return_loss:
            x, labels = x[:, :-1], x[:, 1:]
        attn_mask = None
        if not self.causal:
            if mask is None:
                mask = x >= 0
            x = x.masked_fill(~mask, 0)
        if mask is not None:
            key_ok = mask[:, None, None, :]  # (batch, 1, 1, keys)
            if self.causal:
                n = x.shape[1]
                causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
                key_ok = key_ok & causal
                key_ok = key_ok | torch.eye(n, dtype=torch.bool, device=x.device)  # no empty rows
            attn_mask = key_ok

        h = self.token_emb(x)
        if extra_embed is not None:
            h = h + extra_embed
        rotary = self.rotary.cached_tables(x.shape[1], x.device, h.dtype)
        for layer, lora in zip(self.layers, self._lora_layers(finetune_scope, disable_lora)):
            h = layer(h, rotary, lora=lora, attn_mask=attn_mask)
        embeds = self.norm(h)
        if return_only_embedding:
            return embeds
        logits = cpu_linear.linear(embeds, self.token_emb.weight)
        if return_logits_with_embedding:
            return logits, embeds
        if not return_loss:
            return logits
        return F.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=self.config.cross_entropy_ignore_index
        )

    def logprobs_of(
        self,
        seq: torch.Tensor,
        mask: torch.Tensor | None = None,
        finetune_scope: str | None = None,
        disable_lora: bool = False,
    ) -> torch.Tensor:
        """Log-probability of each token given the ones before it: (batch, seq - 1)."""
        logits = self.forward(seq, mask=mask, finetune_scope=finetune_scope, disable_lora=disable_lora)
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        return logp.gather(-1, seq[:, 1:, None]).squeeze(-1)

    # -- cached forward, used by the generation engine ---------------------------------------

    def forward_cached(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        caches: list[tuple[torch.Tensor, torch.Tensor]],
        cache_pos: int,
        attn_mask: torch.Tensor | None = None,
        decode_mask: torch.Tensor | None = None,
        finetune_scope: str | None = None,
        disable_lora: bool = False,
        last_only: bool = True,
        row_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``x`` (batch, n) at ``positions`` (batch, n) against the KV caches, writing its
        keys/values at slots ``[cache_pos, cache_pos + n)``. Returns logits of the last position
        (batch, num_tokens) when ``last_only``, else (batch, n, num_tokens). ``row_start``
        (batch,), with a ``decode_mask`` that is exactly ``slot >= row_start`` per row (a
        left-padded batch), lets a one-token step take the C kernel path."""
        loras = self._lora_layers(finetune_scope, disable_lora)
        dropout = self.training and any(layer.attn_dropout or layer.ff_dropout.p for layer in self.layers)
        if x.shape[1] == 1 and attn_mask is None and not dropout:
            h = self.token_emb(x[:, 0])  # (batch, dim)
            cos, sin, xscale = self.rotary.lookup(positions, h.dtype, max_position=cache_pos)
            if (
                xscale is None
                and (decode_mask is None or row_start is not None)
                and not self.config.qk_rmsnorm
                and all(lora is None for lora in loras)
                and not dispatch.triton_enabled_for(h)
                and cpu_decode.supports(h, caches, cache_pos)
            ):
                # one C call per layer between the two projections; rotary rows: one for all
                # rows, or one per row; first attended slots: 0, or one per row
                cos, sin = (cos[0, 0], sin[0, 0]) if positions.shape[0] == 1 else (cos[:, 0], sin[:, 0])
                starts = None if decode_mask is None else row_start.to(torch.int64).contiguous()
                merged = [layer.kernel_weights() for layer in self.layers]
                if all(w is not None for w in merged):
                    for layer, cache, w in zip(self.layers, caches, merged):
                        h = layer.decode_kernel(h, cos, sin, cache, cache_pos, w, starts)
                    logits = cpu_linear.linear(self.norm(h), self.token_emb.weight)
                    return logits if last_only else logits[:, None]
                rotary = (None, None, cos, sin, starts)
            else:
                rotation = self.rotary.rotation(cos[:, 0], sin[:, 0])
                rotary = (rotation, None if xscale is None else xscale[:, 0, None], None, None, None)
            for layer, lora, cache in zip(self.layers, loras, caches):
                h = layer.decode_one(h, rotary, cache, cache_pos, lora=lora, decode_mask=decode_mask)
            logits = cpu_linear.linear(self.norm(h), self.token_emb.weight)
            return logits if last_only else logits[:, None]
        h = self.token_emb(x)
        rotary = self.rotary.lookup(positions, h.dtype, max_position=cache_pos + x.shape[1] - 1)
        for layer, lora, cache in zip(self.layers, loras, caches):
            h = layer(
                h, rotary, lora=lora, attn_mask=attn_mask, cache=cache, cache_pos=cache_pos, decode_mask=decode_mask
            )
        if last_only:
            h = h[:, -1]
        return cpu_linear.linear(self.norm(h), self.token_emb.weight)

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        seq_len: int,
        prompt: torch.Tensor | None = None,
        temperature: float = 1.0,
        filter_logits_fn: Callable = top_k,
        filter_thres: float = 0.9,
        pad_value: float = 0.0,
        eos_token: int | None = None,
        return_seq_without_prompt: bool = True,
        use_tqdm: bool = False,
        finetune_scope: str | None = None,
        disable_lora: bool = False,
        seed: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Sample until the sequence (prompt included) is ``seq_len`` long, with the KV cache.

        Returns the new tokens (batch, seq_len - prompt_len) — or, without a prompt, the whole
        sequence from one random start token. After ``eos_token`` the row is ``pad_value``."""
        from palm_rlhf.generation import SamplingParams, generate_tokens

        if prompt is None:
            prompt = torch.randint(0, self.num_tokens, (1, 1), device=self.device)
            return_seq_without_prompt = False
        prompt2d = prompt.reshape(-1, prompt.shape[-1])
        n_new = max(1, seq_len - prompt2d.shape[-1])
        params = SamplingParams(
            max_new_tokens=n_new,
            temperature=temperature,
            stop_token_ids=(eos_token,) if eos_token is not None else (),
            seed=seed,
        )
        if filter_logits_fn is top_k:
            params.top_k = max(1, math.ceil((1 - filter_thres) * self.num_tokens))
        elif filter_logits_fn is top_p:
            params.top_p = filter_thres
        elif filter_logits_fn is not None:
            params.logits_processor = lambda logits: filter_logits_fn(logits, thres=filter_thres)
        rows = [row.tolist() for row in prompt2d]
        results = generate_tokens(
            self, rows, params, finetune_scope=finetune_scope, disable_lora=disable_lora, use_tqdm=use_tqdm
        )
        out = torch.full((len(rows), n_new), int(pad_value), dtype=torch.long, device=self.device)
        for i, res in enumerate(results):
            toks = res[0].token_ids
            if toks:
                out[i, : len(toks)] = torch.tensor(toks, device=self.device)
        if not return_seq_without_prompt:
            out = torch.cat((prompt2d, out), dim=-1)
        return out.reshape(*prompt.shape[:-1], out.shape[-1])
