"""The CPU decode fast path: one new token per row, four calls per layer.

At batch 1 a CPU decode step streams every weight once and is otherwise per-op overhead, so
this path computes :meth:`palm_rlhf.model.ParallelBlock.forward`'s one-token step with as few
calls as it can:

1. the pre-norm;
2. the fused input projection, through a oneDNN-reordered weight (:mod:`palm_rlhf.cpu_linear`)
   or, with int8 decoding on (:meth:`PaLM.quantize_int8`) and at most
   ``cpu_linear.INT8_MAX_ROWS`` rows, an int8 copy;
3. everything up to the output projections (rotary, the KV-cache write, attention over the
   cache, SwiGLU) in one call of the C kernel (:mod:`kernels.cpu_decode`), or, where it cannot
   run, the same computation in PyTorch (:func:`kernels.cpu_decode.reference`);
4. both output projections as one matmul over ``[attention out | SwiGLU out]`` with the
   residual added in the same oneDNN call.

A :class:`CPUDecodeRunner` owns what that needs and the model does not keep: the two output
projections side by side (reordered, or int8, or a plain copy), the int8 copies, and, for a
LoRA scope, every weight with the adapter merged in. It is built from a PaLM and a LoRA scope
and records what it was built from: the model's ``weights_version`` (bumped by loads, moves,
LoRA changes, int8 switches) and the version counter and storage of every tensor it read (in-
place updates, such as optimizer steps). :func:`runner_for` hands out the runner for a step,
rebuilding it when any of these changed; :func:`discard` drops a model's runners.

The engine (:mod:`palm_rlhf.generation`) asks :func:`runner_for` before each decode step and
takes the general path (:meth:`PaLM.forward_cached`) when it answers None: more than one new
token, an explicit attention mask, dropout, qk-RMSNorm, xPos, a non-CPU device, a dtype other
than float32/bfloat16, the Triton backend, or neither the C kernel nor int8 decoding to gain
from.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

from kernels import cpu_decode, dispatch
from palm_rlhf import cpu_linear

DTYPES = (torch.float32, torch.bfloat16)
#: LoRA scopes with runners kept per model (each holds a merged copy of every weight)
MAX_SCOPES = 2


class _Weights:
    """The projections of one layer in one form: ``fused(x)`` and ``out_add(both, x)`` (the
    output projections of ``both`` = [attention out | SwiGLU out], plus the residual ``x``)."""

    __slots__ = ("attn_w", "ff_w", "fused_w", "kind", "out_w")

    def __init__(self, kind, fused_w, out_w=None, attn_w=None, ff_w=None):
        self.kind, self.fused_w, self.out_w, self.attn_w, self.ff_w = kind, fused_w, out_w, attn_w, ff_w

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "packed":
            return cpu_linear.apply_packed(x, self.fused_w)
        if self.kind == "int8":
            return cpu_linear.int8_linear(x, *self.fused_w)
        return F.linear(x, self.fused_w)

    def out_add(self, both: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "packed":
            return cpu_linear.apply_packed_add(both, self.out_w, x)
        if self.kind == "int8":
            return cpu_linear.int8_linear(both, *self.out_w).add_(x)
        if self.out_w is not None:
            return F.linear(both, self.out_w).add_(x)
        inner = self.attn_w.shape[1]
        return (F.linear(both[:, :inner], self.attn_w) + F.linear(both[:, inner:], self.ff_w)).add_(x)


class CPUDecodeRunner:
    """The fast one-token decode step for one PaLM and one LoRA scope (None: the base model).

    Build it with :func:`runner_for` (which also checks that it applies and is current);
    :meth:`step` then runs a decode step."""

    def __init__(self, model, scope: str | None):
        # a weak reference: the module-level table of runners must not keep models alive
        self._model = weakref.ref(model)
        self.scope = scope
        self.rotary = model.rotary
        cfg = model.config
        self.heads, self.dim_head, self.ff_inner = cfg.heads, cfg.dim_head, cfg.ff_inner
        self.attn_inner = cfg.attn_inner
        self.dtype = model.dtype
        layers = list(model.layers)
        self.scale = layers[0].scale
        self.loras = list(model.finetune_modules[scope]) if scope is not None else [None] * len(layers)
        self.norm_weights = [layer.norm.weight.detach() for layer in layers]
        self.final_norm = model.norm.weight.detach()
        self.emb = model.token_emb.weight
        self.int8 = model.int8_decoding
        watched = [model.token_emb.weight, model.norm.weight]
        for layer, lora in zip(layers, self.loras):
            watched += [layer.norm.weight, layer.fused_attn_ff_proj.weight, layer.attn_out.weight, layer.ff_out.weight]
            if lora is not None:
                watched += list(lora.parameters())
        self._watched = watched
        self._key = self._current_key()
        self._float: list[_Weights] | None = None
        self._int8: list[_Weights] | None = None
        self._lock = threading.Lock()
        # counts decode steps run (tests and benchmarks tell which path ran from it)
        self.steps = 0

    # -- freshness ----------------------------------------------------------------------

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise ReferenceError("the model of this CPU decode runner is gone")
        return model

    def _current_key(self) -> tuple:
        model = self._model()
        version = None if model is None else model.weights_version
        return (version, *[(t.data_ptr(), t._version) for t in self._watched])

    def is_current(self) -> bool:
        """Whether the weights are still the ones this runner was built from."""
        return self._current_key() == self._key

    # -- weights --------------------------------------------------------------------------

    @torch.no_grad()
    def _layer_weights(self, layer, lora) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """(fused input weight, attention out weight, feed-forward out weight, merged): the
        layer's weights with the LoRA adapter folded in, if any (then new tensors)."""
        w, a, f = layer.fused_attn_ff_proj.weight.detach(), layer.attn_out.weight.detach(), layer.ff_out.weight.detach()
        if lora is None:
            return w, a, f, False
        return (
            w + lora.fused.delta_weight().to(w.dtype),
            a + lora.attn_out.delta_weight().to(a.dtype),
            f + lora.ff_out.delta_weight().to(f.dtype),
            True,
        )

    @torch.no_grad()
    def _build_float(self) -> list[_Weights]:
        out = []
        packed = cpu_linear.enabled(self.dtype)
        for layer, lora in zip(self.model.layers, self.loras):
            w, a, f, merged = self._layer_weights(layer, lora)
            both = torch.cat((a, f), dim=1) if packed or merged else None
            if packed:
                # the base fused weight's reordered copy is the one the general path uses too
                fused = cpu_linear.pack(w) if merged else cpu_linear.packed_weight(layer.fused_attn_ff_proj.weight)
                out.append(_Weights("packed", fused, out_w=cpu_linear.pack(both)))
            elif merged:
                out.append(_Weights("plain", w, out_w=both))
            else:
                out.append(_Weights("plain", w, attn_w=a, ff_w=f))
        return out

    @torch.no_grad()
    def _build_int8(self) -> list[_Weights]:
        out = []
        for layer, lora in zip(self.model.layers, self.loras):
            w, a, f, _ = self._layer_weights(layer, lora)
            out.append(
                _Weights("int8", cpu_linear.quantize_int8(w), out_w=cpu_linear.quantize_int8(torch.cat((a, f), dim=1)))
            )
        return out

    def weights(self, rows: int) -> list[_Weights]:
        """The per-layer weights a step of ``rows`` rows reads (made on first use)."""
        if self.int8 and rows <= cpu_linear.INT8_MAX_ROWS:
            if self._int8 is None:
                with self._lock:
                    if self._int8 is None:
                        self._int8 = self._build_int8()
            return self._int8
        if self._float is None:
            with self._lock:
                if self._float is None:
                    self._float = self._build_float()
        return self._float

    def int8_weights(self, layer: int) -> tuple | None:
        """Layer ``layer``'s int8 copies, ((fused input projection, scales), ([attention out |
        feed-forward out], scales)), or None when int8 decoding is off."""
        if not self.int8:
            return None
        w = self.weights(1)[layer]
        return w.fused_w, w.out_w

    def merged_out_weight(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s output projections side by side, (dim, attn_inner + ff_inner), as
        the float step reads them; None where the step reads the two weights apart (no oneDNN
        for this dtype and no LoRA merged). A oneDNN-reordered tensor where oneDNN is on."""
        return self.weights(cpu_linear.INT8_MAX_ROWS + 1)[layer].out_w

    # -- the step ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        caches: list[tuple[torch.Tensor, torch.Tensor]],
        cache_pos: int,
        row_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decode step: ``tokens`` (rows,) at ``positions`` ((rows, 1), or (1, 1) when every
        row is at the same position) against the per-layer caches, keys and values written at
        slot ``cache_pos``; ``row_start`` (rows,): each row's first attended slot (None: 0).
        Returns the next-token logits (rows, num_tokens)."""
        h = F.embedding(tokens, self.emb)  # (rows, dim)
        rows = h.shape[0]
        cos, sin, _ = self.rotary.lookup(positions, h.dtype, max_position=cache_pos)
        # rotary rows: one for all rows, or one per row
        cos, sin = (cos[0, 0], sin[0, 0]) if positions.shape[0] == 1 else (cos[:, 0], sin[:, 0])
        starts = None if row_start is None else row_start.to(torch.int64).contiguous()
        kernel = cpu_decode.supports(h, caches, cache_pos)
        heads, ff, scale = self.heads, self.ff_inner, self.scale
        for w, norm, cache in zip(self.weights(rows), self.norm_weights, caches):
            fused = w.fused(torch.layer_norm(h, h.shape[-1:], norm))
            if kernel:
                both = cpu_decode.attn_swiglu_unchecked(fused, cos, sin, cache, cache_pos, heads, ff, scale, starts)
            else:
                both = cpu_decode.reference(
                    fused, cos, sin, *cache, cache_pos, heads, ff, scale, 0 if starts is None else starts
                )
            h = w.out_add(both, h)
        self.steps += 1
        return cpu_linear.linear(torch.layer_norm(h, h.shape[-1:], self.final_norm), self.emb)


# --- which runner, and when ----------------------------------------------------------------

_lock = threading.Lock()
# model -> {scope: runner}; an entry goes with its model
_runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def applies(model, tokens: torch.Tensor, caches, cache_pos: int, decode_mask=None, row_start=None) -> bool:
    """Whether the fast path can take this decode step (see the module docstring): ``tokens``
    (rows, 1) new token ids; ``decode_mask`` needs ``row_start`` beside it."""
    cfg = model.config
    emb = model.token_emb.weight
    if (
        tokens.dim() != 2
        or tokens.shape[1] != 1
        or emb.device.type != "cpu"
        or emb.dtype not in DTYPES
        or cfg.qk_rmsnorm
        or cfg.rotary_xpos
        or (decode_mask is not None and row_start is None)
        or (model.training and _dropout(model))
        or dispatch.triton_enabled_for(emb)
    ):
        return False
    int8 = model.int8_decoding and tokens.shape[0] <= cpu_linear.INT8_MAX_ROWS
    if int8:
        return True
    # float weights: worth it where the C kernel takes the middle of the step
    probe = emb[:1].expand(tokens.shape[0], -1)
    return cpu_decode.supports(probe, caches, cache_pos)


def _dropout(model) -> bool:
    return any(layer.attn_dropout or layer.ff_dropout.p for layer in model.layers)


def runner_for(
    model,
    tokens: torch.Tensor,
    caches,
    cache_pos: int,
    decode_mask: torch.Tensor | None = None,
    row_start: torch.Tensor | None = None,
    finetune_scope: str | None = None,
    disable_lora: bool = False,
) -> CPUDecodeRunner | None:
    """The current runner for this decode step of ``model`` (built or rebuilt as needed), or
    None when the step should take the general path (:meth:`PaLM.forward_cached`)."""
    if not applies(model, tokens, caches, cache_pos, decode_mask, row_start):
        return None
    scope = model.active_lora_scope(finetune_scope, disable_lora)
    per_model = _runners.get(model)
    runner = None if per_model is None else per_model.get(scope)
    if runner is not None and runner.is_current():
        return runner
    with _lock:
        per_model = _runners.setdefault(model, {})
        runner = per_model.get(scope)
        if runner is None or not runner.is_current():
            per_model.pop(scope, None)
            while len(per_model) >= MAX_SCOPES:
                per_model.pop(next(iter(per_model)))
            runner = per_model[scope] = CPUDecodeRunner(model, scope)
        return runner


def cached_runners(model) -> dict:
    """The runners kept for ``model``, by LoRA scope (stale ones included until replaced)."""
    return dict(_runners.get(model, {}))


def discard(model) -> None:
    """Drop ``model``'s runners and the copies they hold."""
    with _lock:
        _runners.pop(model, None)
