"""Count every call that would have run on a Triton kernel but took the PyTorch path.

:mod:`kernels.dispatch` records one event per such call, keyed by the operation
(``attention``, ``decode_attention``, ``swiglu``) and a short reason (``attn_mask``,
``dropout``, ``head_dim``, ...). Calls that take PyTorch because the backend chose it
(``torch``, or ``auto`` on a non-CUDA tensor) are not fallbacks and are not counted.

The counter is process-wide and thread-safe. The first event of each (op, reason) pair is
logged once at WARNING level; :func:`snapshot` returns the counts (the services export
them as the Prometheus counter ``palm_rlhf_kernel_fallbacks_total{op,reason}``).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

log = logging.getLogger("kernels.fallbacks")

_lock = threading.Lock()
_counts: Counter[tuple[str, str]] = Counter()
_logged: set[tuple[str, str]] = set()


def record(op: str, reason: str) -> None:
    """Count one fallback of ``op`` to PyTorch for ``reason`` (logged the first time)."""
    key = (op, reason)
    with _lock:
        _counts[key] += 1
        first = key not in _logged
        if first:
            _logged.add(key)
    if first:
        log.warning("kernel fallback: %s runs in PyTorch (%s); further ones are only counted", op, reason)


def snapshot() -> dict[tuple[str, str], int]:
    """The counts so far: {(op, reason): calls}."""
    with _lock:
        return dict(_counts)


def total() -> int:
    with _lock:
        return sum(_counts.values())


def reset() -> None:
    """Forget the counts and which reasons were logged (tests)."""
    with _lock:
        _counts.clear()
        _logged.clear()
