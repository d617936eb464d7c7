"""Choose between the Triton kernels and the plain PyTorch path.

The PaLM model calls :func:`attention`, :func:`decode_attention` and :func:`swiglu`
from here. By default CUDA tensors go through Triton and every other device through
PyTorch; ``triton`` or ``torch`` forces either.

The backend is explicit state, not a process-wide switch: it lives in a
:class:`contextvars.ContextVar`, so :func:`use_backend` (a context manager) or
:func:`set_backend` in one thread or asyncio task leaves every other thread's and task's
choice alone. A context that never chose one gets the default, ``PALM_RLHF_KERNELS``
(``auto``, ``torch``, ``triton``; read once, by :mod:`kernels.settings`), else ``auto``.
A new thread starts from that default, not from its creator's choice; a task copies its
creator's context as usual.

Forcing ``triton`` on CPU tensors runs the kernels through the Triton interpreter,
which needs ``TRITON_INTERPRET=1`` in the environment before the kernel modules are
first imported; without it a clear error is raised. Calls the kernels do not cover
(an explicit dense ``attn_mask``, dropout, unequal query/key lengths, head dims above 128,
dtypes other than fp16/bf16/fp32, a decode that needs gradients) always take the
PyTorch path; where the backend asked for Triton, each such call is counted by
:mod:`kernels.fallbacks`. Padding is given to the kernels as ``key_valid`` (batch, keys)
in :func:`attention` and ``first_slot`` (batch,) in :func:`decode_attention`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from functools import cache

import torch
import torch.nn.functional as F

from kernels import fallbacks, settings

_BACKENDS = settings.BACKENDS
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 128

# None: this context has not chosen; the default from the settings applies
_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("palm_rlhf_kernel_backend", default=None)


def _backend_from_env(environ: Mapping[str, str] | None = None) -> str:
    """Parse ``PALM_RLHF_KERNELS`` from ``environ`` (default: this process's environment)."""
    return settings.from_environ(environ).backend


def _check(name: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {_BACKENDS}")
    return name


def set_backend(name: str) -> None:
    """Choose the backend for the current context (thread or task) from now on."""
    _backend.set(_check(name))


def get_backend() -> str:
    """The backend of the current context."""
    name = _backend.get()
    return settings.current().backend if name is None else name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Switch the current context's backend inside a block: ``with use_backend("torch"): ...``."""
    token = _backend.set(_check(name))
    try:
        yield
    finally:
        _backend.reset(token)


@cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreter_enabled() -> bool:
    from kernels._runtime import interpreter_enabled

    return interpreter_enabled()


def _use_triton(t: torch.Tensor) -> bool:
    backend = get_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return t.is_cuda and _triton_importable()
    if t.is_cuda or _interpreter_enabled():
        return True
    raise RuntimeError(
        "the triton kernel backend was forced but the tensors are on "
        f"{t.device.type}; use CUDA tensors, or set TRITON_INTERPRET=1 before the kernels are imported "
        "to run them through the Triton interpreter"
    )


def _wants_triton(t: torch.Tensor) -> bool:
    """Whether the backend asks for Triton on ``t`` (never raises): a call it sends to
    PyTorch anyway is a fallback."""
    backend = get_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return t.is_cuda and _triton_importable()
    return True


def kernels_wanted(t: torch.Tensor) -> bool:
    """Whether the current backend asks for the Triton kernels on ``t`` (unlike
    :func:`triton_enabled_for`, never raises)."""
    return _wants_triton(t)


def record_fallback(op: str, reason: str) -> None:
    """Count a call that the caller sends to PyTorch although the kernels were asked for
    (:mod:`kernels.fallbacks`)."""
    fallbacks.record(op, reason)


def _fallback(op: str, reason: str, t: torch.Tensor) -> None:
    if _wants_triton(t):
        fallbacks.record(op, reason)


def _unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernels cannot take these tensors (None: they can)."""
    if not (q.dim() == 4 and k.dim() == 4 and k.shape == v.shape and q.shape[0] == k.shape[0]):
        return "shape"
    if q.shape[-1] != k.shape[-1] or k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        return "shape"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return "head_dim"
    if q.dtype not in _KERNEL_DTYPES:
        return "dtype"
    if not q.dtype == k.dtype == v.dtype:
        return "mixed_dtypes"
    return None


def _kernel_shapes_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return _unsupported(q, k, v) is None


def dense_key_mask(key_valid: torch.Tensor, n_queries: int, causal: bool) -> torch.Tensor:
    """The boolean mask (batch, 1, queries, keys) that ``key_valid`` stands for in
    :func:`attention`: key j is visible to every query of row b where ``key_valid[b, j]``;
    with ``causal`` also only up to the query's own position, and a query always sees its
    own key (so that no row is empty)."""
    n_keys = key_valid.shape[-1]
    mask = key_valid[:, None, None, :].bool()
    if causal:
        offset = n_keys - n_queries
        qi = torch.arange(n_queries, device=key_valid.device)[:, None] + offset
        kj = torch.arange(n_keys, device=key_valid.device)[None, :]
        mask = (mask & (kj <= qi)) | (kj == qi)
    return mask.expand(key_valid.shape[0], 1, n_queries, n_keys)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-query attention. q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim).

    ``key_valid`` (batch, keys) bool marks the keys each row may attend to (left or right
    padding, key-padding masks): see :func:`dense_key_mask` for its exact meaning, with and
    without ``causal``. The kernels take it directly; an explicit ``attn_mask`` (any
    pattern) always takes the PyTorch path. Give one or the other, not both.
    """
    if attn_mask is not None and key_valid is not None:
        raise ValueError("give attn_mask or key_valid, not both")
    if attn_mask is not None:
        reason = "attn_mask"
    elif dropout_p != 0.0:
        reason = "dropout"
    elif q.shape[-2] != k.shape[-2]:
        reason = "query_key_lengths"
    elif key_valid is not None and (key_valid.dim() != 2 or key_valid.shape != (q.shape[0], k.shape[-2])):
        reason = "key_valid_shape"
    else:
        reason = _unsupported(q, k, v)
    if reason is None and _use_triton(q):
        from kernels.attention import triton_attention

        return triton_attention(q, k, v, causal=causal, scale=scale, key_valid=key_valid)
    if reason is not None:
        _fallback("attention", reason, q)
    if key_valid is not None:
        attn_mask = dense_key_mask(key_valid, q.shape[-2], causal)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=causal and attn_mask is None,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )


def _decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: int | torch.Tensor,
    scale: float | None,
    first_slot: torch.Tensor | None = None,
) -> torch.Tensor:
    batch, _, n_new, _ = q.shape
    if isinstance(cache_len, torch.Tensor):
        lens = cache_len.to(device=q.device, dtype=torch.long).expand(batch)  # (batch,)
    else:
        k_cache = k_cache[:, :, : int(cache_len)]
        v_cache = v_cache[:, :, : int(cache_len)]
        lens = torch.full((batch,), int(cache_len), device=q.device, dtype=torch.long)
    span = k_cache.shape[2]
    # new token t sits at position lens - n_new + t and sees keys up to that position
    last_visible = lens[:, None] - n_new + torch.arange(n_new, device=q.device)  # (batch, n_new)
    keys = torch.arange(span, device=q.device)
    allowed = keys[None, None, :] <= last_visible[:, :, None]  # (batch, n_new, span)
    if first_slot is not None:
        first = first_slot.to(device=q.device, dtype=torch.long).expand(batch)
        allowed = allowed & (keys[None, None, :] >= first[:, None, None])
    return F.scaled_dot_product_attention(
        q,
        k_cache,
        v_cache,
        attn_mask=allowed[:, None],  # (batch, 1, n_new, span), broadcast over heads
        scale=scale,
        enable_gqa=k_cache.shape[1] != q.shape[1],
    )


def triton_enabled_for(t: torch.Tensor) -> bool:
    """Whether calls on ``t`` would go to Triton under the current backend setting."""
    return _use_triton(t)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: int | torch.Tensor,
    scale: float | None = None,
    first_slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``n_new`` new tokens against a KV cache.

    q: (batch, heads, n_new, head_dim); k_cache, v_cache: (batch, kv_heads, max_len,
    head_dim); ``cache_len`` (int or (batch,) int tensor) counts the valid cache
    entries including the new tokens, which are the last ``n_new`` of them and are
    causal among themselves. ``first_slot`` ((batch,) int tensor, optional) is each
    row's first visible slot: keys before it are masked (a left-padded batch).
    Returns (batch, heads, n_new, head_dim).
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
    reason = "needs_grad" if needs_grad else _unsupported(q, k_cache, v_cache)
    if reason is None and _use_triton(q):
        from kernels.attention import triton_decode_attention

        return triton_decode_attention(q, k_cache, v_cache, cache_len, scale=scale, first_slot=first_slot)
    if reason is not None:
        _fallback("decode_attention", reason, q)
    return _decode_attention_torch(q, k_cache, v_cache, cache_len, scale, first_slot)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(second half of the last dim) * first half."""
    if x.dtype not in _KERNEL_DTYPES:
        reason: str | None = "dtype"
    elif x.dim() < 1 or x.shape[-1] % 2 != 0:
        reason = "shape"
    else:
        reason = None
    if reason is None and _use_triton(x):
        from kernels.swiglu import triton_swiglu

        return triton_swiglu(x)
    if reason is not None:
        _fallback("swiglu", reason, x)
    value, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * value
