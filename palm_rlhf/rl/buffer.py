"""Experience storage for on-policy updates, spilling to a memory-mapped file when large.

Rows are stored as padded fixed-width arrays, one per field. While the buffer is small they
live in RAM; once it would exceed ``max_memory_bytes`` every field moves into a numpy
``memmap`` under ``spill_dir`` (a temporary folder by default) that grows by doubling, so a
long rollout phase on a big model is bounded by disk rather than memory. Minibatches come out
as torch tensors, trimmed to the longest row they contain.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_NP_DTYPES = {
    torch.long: np.int64,
    torch.int32: np.int32,
    torch.bool: np.bool_,
    torch.float32: np.float32,
    torch.float64: np.float64,
}


@dataclass(frozen=True)
class Field:
    dtype: torch.dtype
    per_token: bool = True  # (rows, width) when True, (rows,) otherwise


# The fields of a PPO rollout. ``sequences``/``attention_mask`` span the whole padded
# sequence (prompt + response); the per-token fields span action positions, one fewer.
PPO_FIELDS: dict[str, Field] = {
    "sequences": Field(torch.long),
    "attention_mask": Field(torch.bool),
    "action_mask": Field(torch.bool),
    "old_logprobs": Field(torch.float32),
    "ref_logprobs": Field(torch.float32),
    "values": Field(torch.float32),
    "rewards": Field(torch.float32),
    "advantages": Field(torch.float32),
    "returns": Field(torch.float32),
    "scores": Field(torch.float32, per_token=False),
}


class ExperienceBuffer:
    """Padded experience rows with seeded minibatch iteration.

    ``max_len`` is the width of the ``sequences``-like fields; per-token fields whose name is in
    ``action_fields`` (everything but ``sequences``/``attention_mask`` by default) are one
    narrower. ``max_memory_bytes=None`` never spills."""

    def __init__(
        self,
        max_len: int,
        fields: dict[str, Field] | None = None,
        max_memory_bytes: int | None = 256 * 2**20,
        spill_dir: str | os.PathLike | None = None,
        sequence_fields: tuple[str, ...] = ("sequences", "attention_mask"),
    ):
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {max_len}")
        self.max_len = int(max_len)
        self.fields = dict(fields or PPO_FIELDS)
        self.sequence_fields = set(sequence_fields)
        self.max_memory_bytes = max_memory_bytes
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self._spill_dir: Path | None = None
        self._owns_spill_dir = False
        self._size = 0
        self._capacity = 0
        self._arrays: dict[str, np.ndarray] = {}
        self._lengths = np.zeros(0, dtype=np.int64)  # valid width of each row (sequence fields)
        self._alloc(16)

    # -- layout ----------------------------------------------------------------------------------

    def width(self, name: str) -> int:
        f = self.fields[name]
        if not f.per_token:
            return 0
        return self.max_len if name in self.sequence_fields else self.max_len - 1

    def _shape(self, name: str, rows: int) -> tuple[int, ...]:
        w = self.width(name)
        return (rows, w) if w else (rows,)

    def row_bytes(self) -> int:
        return sum(
            np.dtype(_NP_DTYPES[f.dtype]).itemsize * max(1, self.width(n)) for n, f in self.fields.items()
        )

    @property
    def spilled(self) -> bool:
        """True once rows live in memory-mapped files."""
        return self._spill_dir is not None

    @property
    def nbytes(self) -> int:
        return self._size * self.row_bytes()

    def __len__(self) -> int:
        return self._size

    def _new_array(self, name: str, rows: int) -> np.ndarray:
        dtype = _NP_DTYPES[self.fields[name].dtype]
        shape = self._shape(name, rows)
        if self._spill_dir is None:
            return np.zeros(shape, dtype=dtype)
        path = self._spill_dir / f"{name}.{rows}.bin"
        return np.memmap(path, dtype=dtype, mode="w+", shape=shape)

    def _alloc(self, capacity: int) -> None:
        old = self._arrays
        new = {}
        for name in self.fields:
            arr = self._new_array(name, capacity)
            if name in old and self._size:
                arr[: self._size] = old[name][: self._size]
            new[name] = arr
        self._arrays = new
        lengths = np.zeros(capacity, dtype=np.int64)
        lengths[: self._size] = self._lengths[: self._size]
        self._lengths = lengths
        self._capacity = capacity
        self._drop_files(old)

    def _drop_files(self, arrays: dict[str, np.ndarray]) -> None:
        for arr in arrays.values():
            if isinstance(arr, np.memmap):
                path = arr.filename
                del arr
                try:
                    os.unlink(path)
                except (OSError, TypeError):
                    pass

    def _spill(self) -> None:
        if self._spill_root is not None:
            self._spill_root.mkdir(parents=True, exist_ok=True)
        self._spill_dir = Path(tempfile.mkdtemp(prefix="palm-rlhf-experience-", dir=self._spill_root))
        self._owns_spill_dir = True
        self._alloc(self._capacity)

    # -- writing ---------------------------------------------------------------------------------

    def add(self, **tensors: torch.Tensor) -> None:
        """Append a batch of rows. Every field must be given; per-token fields may be narrower
        than the buffer (they are zero-padded on the right) but not wider."""
        missing = set(self.fields) - set(tensors)
        extra = set(tensors) - set(self.fields)
        if missing or extra:
            raise ValueError(f"buffer fields mismatch: missing {sorted(missing)}, unknown {sorted(extra)}")
        rows = {int(t.shape[0]) for t in tensors.values()}
        if len(rows) != 1:
            raise ValueError(f"all fields need the same number of rows, got {sorted(rows)}")
        n = rows.pop()
        need = self._size + n
        if (
            not self.spilled
            and self.max_memory_bytes is not None
            and need * self.row_bytes() > self.max_memory_bytes
        ):
            self._spill()
        if need > self._capacity:
            self._alloc(max(need, 2 * self._capacity))
        for name, t in tensors.items():
            w = self.width(name)
            data = t.detach().to("cpu", self.fields[name].dtype).numpy()
            if w:
                if data.ndim != 2 or data.shape[1] > w:
                    raise ValueError(f"field {name!r}: expected (rows, <= {w}), got {tuple(data.shape)}")
                self._arrays[name][self._size : need, : data.shape[1]] = data
                self._arrays[name][self._size : need, data.shape[1] :] = 0
            else:
                self._arrays[name][self._size : need] = data.reshape(n)
        if "attention_mask" in tensors:
            lengths = tensors["attention_mask"].detach().cpu().long()
            t = torch.arange(lengths.shape[1])
            self._lengths[self._size : need] = ((lengths > 0) * (t + 1)).amax(dim=1).numpy()
        else:
            self._lengths[self._size : need] = self.max_len
        self._size = need

    def set(self, name: str, values: torch.Tensor, index: torch.Tensor | np.ndarray | None = None) -> None:
        """Overwrite a field for all rows (or the rows in ``index``), e.g. advantages."""
        data = values.detach().to("cpu", self.fields[name].dtype).numpy()
        w = self.width(name)
        idx = slice(0, self._size) if index is None else np.asarray(index)
        if w:
            self._arrays[name][idx, : data.shape[1]] = data
            self._arrays[name][idx, data.shape[1] :] = 0
        else:
            self._arrays[name][idx] = data

    def clear(self) -> None:
        """Forget every row (files are kept for reuse until :meth:`close`)."""
        self._size = 0

    def close(self) -> None:
        self._drop_files(self._arrays)
        self._arrays = {}
        if self._owns_spill_dir and self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
        self._spill_dir = None

    def __del__(self):  # pragma: no cover - best-effort clean-up of temporary files
        with contextlib.suppress(OSError, AttributeError):
            if self._owns_spill_dir:
                self.close()

    # -- reading ---------------------------------------------------------------------------------

    def get(self, name: str, index=None, trim: int | None = None) -> torch.Tensor:
        """Field ``name`` for all rows (or ``index``) as a tensor copy; ``trim`` cuts the width."""
        arr = self._arrays[name]
        idx = slice(0, self._size) if index is None else np.asarray(index)
        data = arr[idx]
        if trim is not None and data.ndim == 2:
            data = data[:, :trim]
        return torch.from_numpy(np.array(data, copy=True))

    def batch(
        self, index=None, device: torch.device | str = "cpu", trim: bool = True
    ) -> dict[str, torch.Tensor]:
        """All fields of the given rows, trimmed to the longest row they hold."""
        idx = np.arange(self._size) if index is None else np.asarray(index)
        width = int(self._lengths[idx].max()) if trim and len(idx) else self.max_len
        out = {}
        for name in self.fields:
            cut = width if name in self.sequence_fields else width - 1
            out[name] = self.get(name, idx, trim=cut if self.width(name) else None).to(device)
        return out

    def minibatches(
        self,
        batch_size: int,
        seed: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        shard: tuple[int, int] | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield minibatches in a seeded random order. ``shard=(rank, world)`` gives this process
        its slice of every global minibatch (rows ``rank::world``), the same order everywhere."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = np.arange(self._size)
        if shuffle:
            order = np.random.default_rng(seed).permutation(self._size)
        for start in range(0, self._size, batch_size):
            idx = order[start : start + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            if shard is not None:
                rank, world = shard
                idx = idx[rank::world]
                if len(idx) == 0:
                    continue
            yield self.batch(idx, device=device)
