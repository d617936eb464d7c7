"""Which of a model's paths run on the Triton kernels on a device, and which in PyTorch.

:func:`kernel_report` answers from the model's configuration and dtype and the current
context's backend (:mod:`kernels.dispatch`), without running anything;
:func:`format_kernel_report` turns it into the lines a server prints at start-up. The
fallbacks actually taken while serving are counted by :mod:`kernels.fallbacks`.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels import dispatch

# what each path is, in the order printed
PATHS = {
    "prefill": "prompt prefill, equal lengths",
    "prefill_padded": "prompt prefill, mixed lengths (left padding)",
    "decode": "decode step, equal lengths",
    "decode_padded": "decode step, left-padded / continuous batch",
    "scoring_masked": "scoring / reward with a padding mask",
    "training": "training step (forward and backward)",
    "swiglu": "SwiGLU feed-forward",
}


def kernel_report(model: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> dict:
    """{path: {"backend": "triton" | "torch" | "cpu", "reason": str | None}} for ``model``
    (a PaLM, or anything with a ``config`` holding ``dim_head`` and ``attn_dropout``) on
    ``device`` (default: the model's) in ``dtype`` (default: the model's), under the
    current context's backend. ``cpu`` marks the CPU decode fast path."""
    cfg = getattr(model, "config", model)
    if device is None:
        device = getattr(model, "device", torch.device("cpu"))
    device = torch.device(device)
    if dtype is None:
        dtype = getattr(model, "dtype", torch.float32)
    backend = dispatch.get_backend()
    wanted = backend == "triton" or (backend == "auto" and device.type == "cuda" and dispatch._triton_importable())

    def entry(name: str) -> dict:
        if not wanted:
            if device.type == "cpu" and name in ("decode", "decode_padded"):
                return {"backend": "cpu", "reason": f"backend {backend!r} on cpu: the CPU decode path"}
            return {"backend": "torch", "reason": f"backend {backend!r} on {device.type}"}
        reason = None
        if dtype not in dispatch._KERNEL_DTYPES:
            reason = f"dtype {dtype}"
        elif name != "swiglu" and cfg.dim_head > dispatch._MAX_HEAD_DIM:
            reason = f"head dim {cfg.dim_head} > {dispatch._MAX_HEAD_DIM}"
        elif name == "training" and getattr(cfg, "attn_dropout", 0.0) > 0:
            reason = f"attention dropout {cfg.attn_dropout}"
        return {"backend": "torch" if reason else "triton", "reason": reason}

    return {name: entry(name) for name in PATHS}


def format_kernel_report(model: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str:
    """:func:`kernel_report` as text, one line per path."""
    report = kernel_report(model, device, dtype)
    dev = torch.device(device) if device is not None else getattr(model, "device", torch.device("cpu"))
    lines = [f"kernels on {dev} (backend {dispatch.get_backend()!r}):"]
    for name, what in PATHS.items():
        r = report[name]
        tail = f" ({r['reason']})" if r["reason"] else ""
        lines.append(f"  {what:<46} {r['backend']}{tail}")
    return "\n".join(lines)
