"""Small helpers shared by the Triton kernel modules.

Nothing here launches a kernel. The helpers answer three questions:

* does this process run Triton kernels through the interpreter (``TRITON_INTERPRET=1``)?
* which autotuning configurations should a kernel consider (all rows of its table that
  suit the call on a GPU, the first suitable row when autotuning is switched off, one
  pinned configuration under the interpreter)?
* can a kernel module that was already imported run on these tensors?
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

_TRUE = ("1", "true", "on", "yes")

# Setting PALM_RLHF_KERNELS_AUTOTUNE=0 replaces autotuning with the first suitable row
# of each kernel's table: useful for quick GPU test runs (read by kernels.settings).
AUTOTUNE_ENV = "PALM_RLHF_KERNELS_AUTOTUNE"


def interpreter_enabled() -> bool:
    """Whether Triton kernels decorated now would run in the interpreter (Triton's own
    ``TRITON_INTERPRET``, through Triton's knobs where it has them)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def autotune_enabled() -> bool:
    from kernels import settings

    return settings.current().autotune


_LAUNCH_KEYS = ("num_warps", "num_stages")
_LIMIT_KEYS = ("max_block_d",)


def select_configs(
    table: Sequence[Mapping[str, int]], interpreter_config: Mapping[str, int], built_for_interpreter: bool
) -> list[Any]:
    """Turn a table of configurations (plain dicts) into ``triton.Config`` objects.

    ``num_warps`` and ``num_stages`` are launch options; ``max_block_d`` (optional)
    limits a row to head dims up to that size; every other key is a ``tl.constexpr``
    meta-parameter. Under the interpreter only ``interpreter_config`` is used (small
    tiles, so that small test shapes still cover several tiles and ragged tails).
    """
    import triton

    rows: Iterable[Mapping[str, int]] = [interpreter_config] if built_for_interpreter else table
    configs = []
    for row in rows:
        meta = {k: v for k, v in row.items() if k not in _LAUNCH_KEYS + _LIMIT_KEYS}
        config = triton.Config(meta, num_warps=row.get("num_warps", 4), num_stages=row.get("num_stages", 2))
        config.max_block_d = row.get("max_block_d")  # read by config_pruner
        configs.append(config)
    return configs


def config_pruner(keep: Callable[[Any, Mapping[str, Any]], bool]) -> Callable[..., list[Any]]:
    """Build an ``early_config_prune`` hook from a predicate ``keep(config, args)``.

    Rows limited to smaller head dims (``max_block_d``) are dropped first. With
    autotuning switched off only the first surviving row is returned, so nothing is
    benchmarked. If every row is rejected the smallest one (by tile area) is kept, so a
    launch never fails for want of a configuration.
    """

    def prune(configs: list[Any], named_args: Mapping[str, Any], **kwargs: Any) -> list[Any]:
        args = {**named_args, **kwargs}
        block_d = args.get("BLOCK_D")
        kept = [
            c
            for c in configs
            if (getattr(c, "max_block_d", None) is None or block_d is None or block_d <= c.max_block_d)
            and keep(c, args)
        ]
        if not kept:
            kept = [min(configs, key=lambda c: _tile_area(c.kwargs))]
        return kept if autotune_enabled() else kept[:1]

    return prune


def _tile_area(meta: Mapping[str, int]) -> int:
    area = 1
    for name, value in meta.items():
        if name.startswith("BLOCK"):
            area *= value
    return area


def shared_memory_budget(device: torch.device | None = None) -> int:
    """Bytes of shared memory one program may use on ``device`` (a guess off-GPU)."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
        optin = getattr(props, "shared_memory_per_block_optin", 0)
        if optin:
            return int(optin)
    return 99 * 1024


def multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def check_runnable(built_for_interpreter: bool, *tensors: torch.Tensor) -> None:
    """Raise a clear error when compiled kernels are handed tensors that are not on a GPU."""
    if built_for_interpreter:
        return
    for t in tensors:
        if t.device.type == "cpu":
            raise RuntimeError(
                "the Triton kernels were compiled for a GPU but got CPU tensors; set TRITON_INTERPRET=1 "
                "before the kernels module is first imported to run them through the Triton interpreter"
            )


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision matching what PyTorch would do for a matmul in ``dtype``."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
