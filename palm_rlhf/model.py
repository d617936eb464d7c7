"""PaLM (Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311).

Each block computes ``x + attn(norm(x)) + ff(norm(x))`` from one pre-norm and one fused
input projection split into queries, one shared key/value head (multi-query attention,
Shazeer 2019) and the two SwiGLU halves. Rotary embeddings (Su et al. 2021) with optional
xPos scaling, bias-free LayerNorm, embeddings tied to the output projection.

:meth:`ParallelBlock.forward` is the one definition of a layer's math: training, scoring,
a prefill and a one-token decode step against the KV cache all run it. The CPU decode fast
path (:mod:`palm_rlhf.cpu_decode_runner`) computes the same step with packed weights and a C
kernel, and is tested against it.
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

from kernels import dispatch
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

    def cached_tables(self, seq_len: int, device, dtype):
        key = (seq_len, device, dtype)
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = self.tables(torch.arange(seq_len, device=device), dtype)
        return self._cache[key]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the projections produce from ``t``: autocast's where it is on, else ``t``'s."""
    if torch.is_autocast_enabled(t.device.type) and t.is_floating_point():
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def key_valid_from_mask(attn_mask: torch.Tensor, causal: bool) -> torch.Tensor | None:
    """The (batch, keys) key-padding form of a dense (batch, 1, queries, keys) boolean mask,
    when the mask is exactly what :func:`kernels.dispatch.dense_key_mask` makes of it (the
    masks of left-padded prefills and of padded scoring are); else None. One comparison on
    the device and one host sync."""
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.shape[1] != 1:
        return None
    n_q, n_k = attn_mask.shape[-2:]
    if n_q != n_k:
        return None
    # the last query sees every valid key (causal: the diagonal is visible whatever its flag)
    key_valid = attn_mask[:, 0, -1, :]
    if not torch.equal(dispatch.dense_key_mask(key_valid, n_q, causal), attn_mask.expand(-1, 1, n_q, n_k)):
        return None
    return key_valid


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
        key_valid: torch.Tensor | None = None,
        first_slot: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (batch, seq, dim) -> (batch, seq, dim). ``rotary``: (cos, sin, xPos scale or None)
        for these positions (see :class:`Rotary`). Without ``cache``: full causal (or
        ``attn_mask``-masked) attention over x. With ``cache`` (k, v buffers of shape (batch, 1,
        max_len, dim_head)): write this chunk's keys and values at ``cache_pos`` and attend over
        ``[0, cache_pos + seq)``; a one-token chunk is a decode step (``decode_mask``, (batch, 1,
        1, cache_pos + 1), masks the slots each row may not see, as in a left-padded batch).

        ``key_valid`` (batch, keys) is a key-padding mask in the form the Triton kernels take
        (:func:`kernels.dispatch.dense_key_mask` gives its dense equivalent), used instead of
        ``attn_mask`` when given; ``first_slot`` (batch,) is what ``decode_mask`` says (each
        row's first visible slot), for the decode kernel."""
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
            qk = torch.cat((q, k), dim=2).to(v.dtype)
        if cos.dtype != qk.dtype:
            # under autocast the projection is in the autocast dtype, the tables may not be
            cos, sin = cos.to(qk.dtype), sin.to(qk.dtype)
        # cos/sin: (seq, d) or (batch, seq, d) -> broadcast over the head axis
        qk = apply_rotary(qk, cos.unsqueeze(-2), sin.unsqueeze(-2))
        q, k = qk[:, :, :h], qk[:, :, h]  # (b, n, h, d), (b, n, d)
        if xscale is not None:
            q = q * xscale.unsqueeze(-2)
            k = k / xscale
        if q.dtype != v.dtype:  # keep q, k and v in one dtype (autocast)
            q, k = q.to(v.dtype), k.to(v.dtype)

        if cache is None:
            q = q.transpose(1, 2)  # (batch, heads, seq, head_dim)
            k = k.unsqueeze(1)  # (batch, 1, seq, head_dim): one K/V head, never copied per head
            v = v.unsqueeze(1)
            out = dispatch.attention(
                q,
                k,
                v,
                causal=self.cfg.causal and (attn_mask is None or key_valid is not None),
                attn_mask=attn_mask if key_valid is None else None,
                dropout_p=self.attn_dropout if self.training else 0.0,
                scale=self.scale,
                key_valid=key_valid,
            )
            out = out.transpose(1, 2).reshape(b, n, self.attn_inner)
        else:
            k_cache, v_cache = cache
            k_cache[:, 0, cache_pos : cache_pos + n] = k
            v_cache[:, 0, cache_pos : cache_pos + n] = v
            end = cache_pos + n
            keys, values = k_cache[:, :, :end], v_cache[:, :, :end]  # (b, 1, end, d)
            if n == 1 and (decode_mask is None or first_slot is not None) and dispatch.triton_enabled_for(q):
                # GPU: the split-K decode kernel reads the shared K/V head once for all heads
                out = dispatch.decode_attention(
                    q.transpose(1, 2), k_cache, v_cache, end, scale=self.scale, first_slot=first_slot
                )
                out = out.transpose(1, 2).reshape(b, 1, self.attn_inner)  # (b, h, 1, d) -> (b, 1, h * d)
            elif n == 1:
                if decode_mask is not None and dispatch.kernels_wanted(q):
                    dispatch.record_fallback("decode_attention", "decode_mask")
                # One new token: its heads act as the query axis of a single-head attention
                # over the shared K/V head. (b, 1, h, d) x (b, 1, end, d): no copies, no transposes.
                out = F.scaled_dot_product_attention(
                    q.view(b, 1, h, d), keys, values, attn_mask=decode_mask, scale=self.scale
                )
                out = out.view(b, 1, self.attn_inner)
            else:
                if attn_mask is None and cache_pos != 0:
                    raise ValueError("a multi-token chunk after the cache start needs an explicit attn_mask")
                use_keys = key_valid is not None and cache_pos == 0
                out = dispatch.attention(
                    q.transpose(1, 2),
                    keys,
                    values,
                    causal=(attn_mask is None or use_keys) and self.cfg.causal,
                    attn_mask=None if use_keys else attn_mask,
                    scale=self.scale,
                    key_valid=key_valid if use_keys else None,
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


# --- the model ----------------------------------------------------------------------------


def _contiguous_state(module, state_dict, prefix, local_metadata):
    """state_dict() hands out contiguous tensors whatever the in-memory layout, so that it can
    go straight to safetensors (which refuses strided tensors)."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            state_dict[key] = value.contiguous()
    return state_dict


def _loaded(module, incompatible_keys) -> None:
    module.bump_weights_version()


class PaLM(nn.Module):
    """A PaLM language model.

    Accepts the constructor keywords of palm-rlhf-pytorch (``num_tokens``, ``dim``, ``depth``,
    ``causal``, ``dim_head``, ``heads``, ``ff_mult``, ``qk_rmsnorm``, ``lora_r``,
    ``rotary_xpos_scale_base``, ``flash_attn``, ``finetune_scopes``,
    ``cross_entropy_ignore_index``...) or a :class:`PaLMConfig` via ``config=``.

    ``weights_version`` counts the changes to the weights that do not go through a tensor's
    own version counter: ``load_state_dict`` (``assign=True`` included), a device or dtype
    move, a relayout, adding, removing or merging a LoRA scope, turning int8 decoding on or
    off. Whatever derives data from the weights (the CPU decode runner's packed copies) keys
    on it, together with the tensors' version counters (in-place updates: optimizer steps).

    The one ``nn.Module`` override, ``_apply`` (behind ``.to()``, ``.float()``...), re-lays
    the projection weights out for their new device and dtype (:meth:`use_fast_layout`),
    turns int8 decoding off when the model leaves the CPU, and bumps ``weights_version``.
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
        self.weights_version = 0
        self._int8_decoding = False
        nn.init.normal_(self.token_emb.weight, std=0.02)
        for scope in config.finetune_scopes:
            self.add_finetune_params(scope)
        self.use_fast_layout()
        self._register_state_dict_hook(_contiguous_state)
        self.register_load_state_dict_post_hook(_loaded)

    def bump_weights_version(self) -> None:
        """Record a change to the weights (see the class docstring)."""
        self.weights_version += 1

    @torch.no_grad()
    def use_fast_layout(self) -> None:
        """Lay out the fused input projection for the fastest matmul on its device: in float32
        on the CPU it is stored input-major (the (out, in) parameter is the transpose of a
        contiguous (in, out) buffer), which MKL's batch-1 GEMV streams about 30% faster than the
        usual layout; elsewhere it is one contiguous output-major buffer. Shapes, names,
        checkpoints and gradients are the same either way. ``.to()`` re-applies it."""
        for layer in self.layers:
            w = layer.fused_attn_ff_proj.weight
            if w.is_meta or w.dim() != 2:
                continue
            if w.device.type == "cpu" and w.dtype == torch.float32:
                if w.stride() != (1, w.shape[0]):
                    layer.fused_attn_ff_proj.weight.data = w.data.t().contiguous().t()
            elif not w.is_contiguous():
                layer.fused_attn_ff_proj.weight.data = w.data.contiguous()
        # the parameters may hold new tensors (a relayout here, a move in _apply): drop the
        # reordered copies of the old ones
        cpu_linear.forget(*self.parameters())
        self.bump_weights_version()

    def quantize_int8(self, enabled: bool = True) -> PaLM:
        """Weight-only int8 for decoding on the CPU: each decode step of up to
        ``cpu_linear.INT8_MAX_ROWS`` (4) rows reads int8 copies of the projection weights
        (symmetric, one scale per output channel) with bfloat16 activations, a quarter of the
        float32 bytes. The float weights stay as they are and are still used for the prefill,
        larger batches, training and checkpoints; the int8 copies (a quarter of the float32
        size) are made on first use and remade when the weights change, by the CPU decode
        runner (:mod:`palm_rlhf.cpu_decode_runner`), the path these steps take (LoRA adapters
        are merged in before quantizing; a model with qk-RMSNorm or xPos, which the runner does
        not cover, decodes with its float weights). Sampled tokens and their log-probs then
        come from the quantized model. Returns the model."""
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
        self._int8_decoding = enabled
        self.bump_weights_version()
        return self

    @property
    def int8_decoding(self) -> bool:
        """Whether decode steps read int8 weights (:meth:`quantize_int8`)."""
        return self._int8_decoding

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.use_fast_layout()  # also bumps weights_version
        if self._int8_decoding and self.device.type != "cpu":
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
        self.bump_weights_version()

    def remove_finetune_params(self, scope: str) -> nn.ModuleList:
        if scope not in self.finetune_modules:
            raise KeyError(f"no LoRA scope {scope!r}; have {list(self.finetune_modules)}")
        if self.default_lora_scope == scope:
            self.default_lora_scope = None
        self.bump_weights_version()
        return self.finetune_modules.pop(scope)

    @torch.no_grad()
    def merge_finetune_params(self, scope: str) -> None:
        """Fold the adapter ``scope`` into the base weights and remove it."""
        mods = self.remove_finetune_params(scope)
        for layer, lora in zip(self.layers, mods):
            layer.fused_attn_ff_proj.weight += lora.fused.delta_weight().to(self.dtype)
            layer.attn_out.weight += lora.attn_out.delta_weight().to(self.dtype)
            layer.ff_out.weight += lora.ff_out.delta_weight().to(self.dtype)
        self.bump_weights_version()

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

    def active_lora_scope(self, finetune_scope: str | None = None, disable_lora: bool = False) -> str | None:
        """The LoRA scope a forward with these arguments uses (None: the base model)."""
        scope = finetune_scope if finetune_scope is not None else self.default_lora_scope
        if disable_lora or scope is None:
            return None
        if scope not in self.finetune_modules:
            raise KeyError(f"no LoRA scope {scope!r}; have {list(self.finetune_modules)}")
        return scope

    def _lora_layers(self, finetune_scope: str | None, disable_lora: bool):
        scope = self.active_lora_scope(finetune_scope, disable_lora)
        if scope is None:
            return [None] * len(self.layers)
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
        self.bump_weights_version()

    def clone(self) -> PaLM:
        return copy.deepcopy(self)

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
        attn_mask = key_valid = None
        if not self.causal:
            if mask is None:
                mask = x >= 0
            x = x.masked_fill(~mask, 0)
        if mask is not None and dispatch.kernels_wanted(x):
            # the kernels take the key-padding mask as it is (no dense mask)
            key_valid = mask.to(device=x.device, dtype=torch.bool)
        elif mask is not None:
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
        rotary = self.rotary.cached_tables(x.shape[1], x.device, compute_dtype(h))
        for layer, lora in zip(self.layers, self._lora_layers(finetune_scope, disable_lora)):
            h = layer(h, rotary, lora=lora, attn_mask=attn_mask, key_valid=key_valid)
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
        keys/values at slots ``[cache_pos, cache_pos + n)``, through :meth:`ParallelBlock.forward`.
        Returns logits of the last position (batch, num_tokens) when ``last_only``, else
        (batch, n, num_tokens). ``decode_mask`` (batch, 1, 1, cache_pos + 1) masks the slots each
        row may not see in a one-token step (a left-padded batch); ``row_start`` (batch,), each
        row's first valid slot, is what ``decode_mask`` (or, for a prefill from slot 0, the
        left padding ``attn_mask``) says, for callers that have it: the CPU decode runner and
        the Triton kernels use it; without it the kernels recover it from the mask (one host
        sync per call), and PyTorch uses the masks."""
        loras = self._lora_layers(finetune_scope, disable_lora)
        h = self.token_emb(x)
        n = x.shape[1]
        key_valid = first_slot = None
        if (attn_mask is not None or decode_mask is not None) and dispatch.kernels_wanted(h):
            key_valid, first_slot = self._kernel_masks(n, cache_pos, attn_mask, decode_mask, row_start)
        rotary = self.rotary.lookup(positions, compute_dtype(h), max_position=cache_pos + n - 1)
        for layer, lora, cache in zip(self.layers, loras, caches):
            h = layer(
                h,
                rotary,
                lora=lora,
                attn_mask=attn_mask,
                cache=cache,
                cache_pos=cache_pos,
                decode_mask=decode_mask,
                key_valid=key_valid,
                first_slot=first_slot,
            )
        if last_only:
            h = h[:, -1]
        return cpu_linear.linear(self.norm(h), self.token_emb.weight)

    def _kernel_masks(self, n, cache_pos, attn_mask, decode_mask, row_start):
        """(key_valid, first_slot) for the Triton kernels from the masks of a cached forward;
        None where the mask has another pattern (that call then takes PyTorch, counted)."""
        device = self.device
        if n == 1 and decode_mask is not None:
            if row_start is not None:
                return None, row_start.to(device=device, dtype=torch.long)
            flags = decode_mask.reshape(decode_mask.shape[0], -1)
            if decode_mask.dtype != torch.bool or flags.shape[-1] != decode_mask.shape[-1]:
                return None, None
            first = flags.to(torch.int8).argmax(dim=-1)  # each row's first visible slot
            slots = torch.arange(flags.shape[-1], device=flags.device)
            if torch.equal(flags, slots[None] >= first[:, None]):
                return None, first
            return None, None
        if n > 1 and cache_pos == 0 and attn_mask is not None:
            if row_start is not None and self.causal:
                return torch.arange(n, device=device)[None] >= row_start.to(device)[:, None], None
            return key_valid_from_mask(attn_mask, self.causal), None
        return None, None

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
