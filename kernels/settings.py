"""The environment variables this project reads, read in one place.

:func:`current` parses them once, the first time a setting is needed, into a frozen
:class:`Settings`; nothing in the project reads or writes ``os.environ`` for these names
elsewhere. :func:`reload` parses them again (tests, a process that changed its environment
on purpose); :func:`update` replaces some settings, :func:`override` does so for the
duration of a ``with`` block.

=============================== =================================================================
``PALM_RLHF_KERNELS``           default kernel backend: ``auto`` (Triton for CUDA tensors),
                                ``torch`` or ``triton`` (see :mod:`kernels.dispatch`)
``PALM_RLHF_KERNELS_AUTOTUNE``  ``0``: the first suitable row of each Triton table, no autotuning
``PALM_RLHF_CPU_PACKED``        ``0``: no oneDNN-reordered weights (:mod:`palm_rlhf.cpu_linear`)
``PALM_RLHF_CPU_KERNEL``        ``0``: no C decode kernel (:mod:`kernels.cpu_decode`)
``PALM_RLHF_CACHE_DIR``         where the C kernel is built (else ``$XDG_CACHE_HOME/palm-rlhf``,
                                else ``~/.cache/palm-rlhf``)
``CC``                          the C compiler to try first (then ``cc``, ``gcc``)
=============================== =================================================================

``TRITON_INTERPRET`` belongs to Triton, which reads it itself (see :mod:`kernels._runtime`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("auto", "torch", "triton")
_OFF = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    cache_dir: Path
    backend: str = "auto"
    autotune: bool = True
    cpu_packed: bool = True
    cpu_kernel: bool = True
    compiler: str | None = None


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "1").strip().lower() not in _OFF


def parse_backend(environ: Mapping[str, str]) -> str:
    name = environ.get("PALM_RLHF_KERNELS", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"PALM_RLHF_KERNELS={name!r} is not one of {BACKENDS}")
    return name


def from_environ(environ: Mapping[str, str] | None = None) -> Settings:
    """Parse the settings from ``environ`` (default: this process's environment)."""
    env = os.environ if environ is None else environ
    if env.get("PALM_RLHF_CACHE_DIR"):
        cache = Path(env["PALM_RLHF_CACHE_DIR"])
    else:
        base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache = Path(base) / "palm-rlhf"
    return Settings(
        backend=parse_backend(env),
        autotune=_flag(env, "PALM_RLHF_KERNELS_AUTOTUNE"),
        cpu_packed=_flag(env, "PALM_RLHF_CPU_PACKED"),
        cpu_kernel=_flag(env, "PALM_RLHF_CPU_KERNEL"),
        cache_dir=cache,
        compiler=env.get("CC") or None,
    )


_lock = threading.Lock()
_current: Settings | None = None


def current() -> Settings:
    """The settings, parsed from the environment on first use."""
    global _current
    s = _current
    if s is None:
        with _lock:
            if _current is None:
                _current = from_environ()
            s = _current
    return s


def reload() -> Settings:
    """Parse the environment again and return the new settings."""
    global _current
    with _lock:
        _current = from_environ()
        return _current


def update(**changes) -> Settings:
    """Replace some settings from now on (process-wide: for tools and test setup)."""
    global _current
    before = current()
    with _lock:
        _current = dataclasses.replace(before, **changes)
        return _current


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """Replace some settings inside a ``with`` block (process-wide: for tests and tools)."""
    global _current
    before = current()
    try:
        yield update(**changes)
    finally:
        with _lock:
            _current = before
