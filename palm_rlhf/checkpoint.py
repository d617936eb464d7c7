"""Checkpoints: safetensors weights plus a JSON manifest (config, version, parent, sha256).

A checkpoint is a folder ``<version>/`` holding ``model.safetensors`` and ``manifest.json``.
It is written under a temporary name, flushed to disk and renamed, so a crash never leaves a
half-written folder that looks whole. Nothing is ever unpickled.

:class:`CheckpointStore` keeps numbered versions of one model kind (``policy``, ``reward``...)
and a ``CURRENT`` pointer that publishing moves forward and rollback moves back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "palm-rlhf-checkpoint/1"
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_dict(model_or_state) -> dict[str, torch.Tensor]:
    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else dict(model_or_state)
    # safetensors refuses shared storage: tied or viewed tensors are saved as their own copies
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def lora_spec(model) -> dict[str, dict[str, float]]:
    """{scope: {"r": rank, "scale": scale}} of the LoRA adapters a PaLM (or a model holding
    one as ``.palm``) carries, so that loading can rebuild them before the weights arrive."""
    palm = getattr(model, "palm", model)
    mods = getattr(palm, "finetune_modules", None)
    if not mods:
        return {}
    return {name: {"r": m[0].fused.r, "scale": m[0].fused.scale} for name, m in mods.items()}


def build_palm(manifest: dict[str, Any]):
    """An empty PaLM with the config and LoRA scopes a manifest describes."""
    from palm_rlhf.config import PaLMConfig
    from palm_rlhf.model import PaLM

    config = PaLMConfig.from_dict({**manifest["config"], "finetune_scopes": []})
    model = PaLM(config)
    for scope, info in manifest.get("lora", {}).items():
        model.add_finetune_params(scope, lora_r=int(info["r"]), lora_alpha=float(info["scale"]) * int(info["r"]))
    return model


def save_checkpoint(
    path: str | Path,
    model_or_state,
    config: dict[str, Any] | Any,
    *,
    version: str | None = None,
    parent: str | None = None,
    kind: str = "policy",
    tokenizer: dict | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder at ``path`` atomically and return it."""
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"refusing to overwrite existing checkpoint {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        # readable by the serving processes, which may run as another user on a shared volume
        os.chmod(tmp, 0o755)
        weights = tmp / WEIGHTS
        save_file(_state_dict(model_or_state), str(weights))
        with open(weights, "rb+") as f:
            os.fsync(f.fileno())
        manifest = {
            "format": FORMAT,
            "kind": kind,
            "version": version or path.name,
            "parent": parent,
            "created_at": time.time(),
            "config": cfg,
            "tokenizer": tokenizer or {"kind": "byte"},
            "lora": lora_spec(model_or_state),
            "files": {WEIGHTS: {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}},
            "metadata": metadata or {},
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        for f in (weights, tmp / MANIFEST):
            os.chmod(f, 0o644)
        _fsync_dir(tmp)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: unknown format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file's size and sha256 against the manifest; return the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name}")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} has {f.stat().st_size} bytes, manifest says {info['bytes']}")
        digest = sha256_file(f)
        if digest != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} sha256 {digest[:12]}... does not match the manifest")
    return manifest


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", verify: bool = True):
    """Return (state_dict, manifest) of a checkpoint folder, its hashes checked first."""
    path = Path(path)
    manifest = verify_checkpoint(path) if verify else read_manifest(path)
    state = load_file(str(path / WEIGHTS), device=str(device))
    return state, manifest


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a checkpoint folder or a bare ``.safetensors`` file."""
    path = Path(path)
    if path.is_dir():
        return load_checkpoint(path)[0]
    if path.suffix != ".safetensors":
        raise CheckpointError(f"only safetensors checkpoints are loaded, not {path.name}")
    return load_file(str(path))


def load_palm(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Build a PaLM from a checkpoint folder: on the meta device, then weights assigned."""
    state, manifest = load_checkpoint(path, device=device)
    with torch.device("meta"):
        model = build_palm(manifest)
    model.load_state_dict(state, strict=True, assign=True)
    model.rebuild_buffers(device)  # non-persistent tables are not in the file
    model.to(device=device, dtype=dtype)  # also lays the weights out for this device and dtype
    return model.eval(), manifest


_VERSION_RE = re.compile(r"^v(\d{4,})$")


class CheckpointStore:
    """Numbered versions of one model kind under ``root/<kind>/`` plus a ``CURRENT`` pointer."""

    def __init__(self, root: str | Path, kind: str = "policy"):
        self.root = Path(root) / kind
        self.kind = kind
        self.root.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[str]:
        """Complete versions, oldest first (temporary folders of interrupted writes are ignored)."""
        found = []
        for p in self.root.iterdir():
            m = _VERSION_RE.match(p.name)
            if m and p.is_dir() and (p / MANIFEST).is_file():
                found.append((int(m.group(1)), p.name))
        return [name for _, name in sorted(found)]

    def path(self, version: str) -> Path:
        if not _VERSION_RE.match(version):
            raise CheckpointError(f"bad version name {version!r}")
        p = self.root / version
        if not (p / MANIFEST).is_file():
            raise CheckpointError(f"no {self.kind} version {version} in {self.root}")
        return p

    def next_version(self) -> str:
        vs = self.versions()
        n = int(_VERSION_RE.match(vs[-1]).group(1)) + 1 if vs else 1
        return f"v{n:04d}"

    def current(self) -> str | None:
        f = self.root / "CURRENT"
        if f.is_file():
            v = f.read_text().strip()
            if v in self.versions():
                return v
        vs = self.versions()
        return vs[-1] if vs else None

    def set_current(self, version: str) -> None:
        self.path(version)
        tmp = self.root / f".CURRENT.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / "CURRENT")
        _fsync_dir(self.root)

    def remove_partial(self, older_than_s: float = 60.0) -> list[str]:
        """Delete temporary folders left by writes that were killed half-way (the store has one
        writer, so a temporary folder older than ``older_than_s`` belongs to no live write)."""
        removed = []
        now = time.time()
        for p in self.root.iterdir():
            if p.name.startswith(".v") and ".tmp-" in p.name and now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    def save(self, model_or_state, config, *, parent: str | None = None, make_current: bool = True, **kw) -> str:
        self.remove_partial()
        version = self.next_version()
        save_checkpoint(self.root / version, model_or_state, config, version=version, parent=parent, kind=self.kind, **kw)
        if make_current:
            self.set_current(version)
        return version

    def manifest(self, version: str) -> dict[str, Any]:
        return read_manifest(self.path(version))

    def rollback(self, to: str | None = None) -> str:
        """Point CURRENT at ``to`` or, by default, at the parent of the current version."""
        cur = self.current()
        if to is None:
            if cur is None:
                raise CheckpointError("nothing to roll back: the store is empty")
            to = self.manifest(cur).get("parent")
            if not to:
                raise CheckpointError(f"version {cur} has no parent to roll back to")
        self.set_current(to)
        return to
