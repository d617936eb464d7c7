"""Finding and loading the checkpoints a service serves.

Checkpoints live in ``DATA_DIR/checkpoints/<kind>/vNNNN`` (palm_rlhf.checkpoint.CheckpointStore).
A fresh data directory is seeded from the shipped demo model (and the reward store from the
demo reward model trained on it), so every served model has a store version and every
response can name it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from palm_rlhf.checkpoint import CheckpointError, CheckpointStore, load_palm
from palm_rlhf.tokenizer import load_tokenizer
from services.common.errors import NotFound

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"^v\d{4,}$")


def store(data_dir: str | Path, kind: str) -> CheckpointStore:
    return CheckpointStore(Path(data_dir) / "checkpoints", kind)


def default_start_checkpoint() -> Path:
    """The shipped demo checkpoint (built on first use if the install lacks it)."""
    from palm_rlhf.demo import demo_checkpoint_dir

    return demo_checkpoint_dir()


def shipped_reward_for(policy: str | Path) -> Path | None:
    """The shipped demo reward checkpoint when ``policy`` is the demo model it was trained on
    (the shipped folder itself or its copy in a store), else None.

    A reward model only ranks a policy's answers well with the trunk and tokenizer it was
    trained with, so any other starting policy gets a fresh head instead."""
    from palm_rlhf.checkpoint import read_manifest
    from palm_rlhf.demo import demo_reward_dir

    shipped = demo_reward_dir()
    if shipped is None:
        return None
    try:
        pm, rm = read_manifest(policy), read_manifest(shipped)
    except CheckpointError:
        return None
    trained_on = rm.get("metadata", {}).get("policy")
    names = {pm.get("version"), pm.get("metadata", {}).get("source")}
    if trained_on in names and pm.get("config") == rm.get("config") and pm.get("tokenizer") == rm.get("tokenizer"):
        return shipped
    return None


def ensure_policy_store(data_dir: str | Path, start: str | Path | None = None) -> str:
    """Make sure the policy store holds at least one version; returns its current version.

    An empty store is seeded with ``start`` (default: the demo model) as ``v0001``, keeping the
    stored dtype. Several processes may race here: the loser of the atomic rename re-reads.
    """
    st = store(data_dir, "policy")
    current = st.current()
    if current is not None:
        return current
    src = Path(start) if start is not None else default_start_checkpoint()
    model, manifest = load_palm(src)
    try:
        version = st.save(
            model, manifest["config"], tokenizer=manifest.get("tokenizer"),
            metadata={"source": str(manifest.get("version") or src.name), "seeded_from": str(src)},
        )
        log.info("seeded policy store %s with %s as %s", st.root, src, version)
    except CheckpointError:
        version = st.current()
        if version is None:
            raise
    return version


def resolve_checkpoint(spec: str | None, st: CheckpointStore) -> tuple[Path, str]:
    """(folder, version label) for ``--checkpoint``: a store version name, a folder, or None
    for the store's current version."""
    if spec is None or spec == "":
        version = st.current()
        if version is None:
            raise CheckpointError(f"the {st.kind} store {st.root} is empty")
        return st.path(version), version
    if VERSION_RE.match(spec):
        return version_path(st, spec), spec
    path = Path(spec)
    if not (path / "manifest.json").is_file():
        raise CheckpointError(f"--checkpoint {spec!r} is neither a version of {st.root} nor a checkpoint folder")
    from palm_rlhf.checkpoint import read_manifest

    return path, str(read_manifest(path).get("version") or path.name)


def version_path(st: CheckpointStore, version: str) -> Path:
    """The folder of ``version`` in ``st``; NotFound (a client error) when it does not exist."""
    try:
        return st.path(version)
    except CheckpointError as e:
        raise NotFound(f"unknown {st.kind} version {version!r}; known: {', '.join(st.versions()) or 'none'}") from e


def model_dtype(device: str) -> torch.dtype | None:
    """float32 on CPU (bfloat16 matmuls are slow there); the stored dtype on accelerators."""
    return torch.float32 if device == "cpu" else None


@dataclass
class LoadedPalm:
    """One immutable served model: swapping versions replaces the whole object."""

    model: Any
    tokenizer: Any
    manifest: dict[str, Any]
    version: str
    path: Path

    @property
    def config(self):
        return self.model.config


def load_palm_version(path: Path, version: str, device: str, quantize: str = "none") -> LoadedPalm:
    """Load one stored PaLM version for inference; ``quantize="int8"``: weight-only int8
    decode steps (``PaLM.quantize_int8``, CPU only)."""
    model, manifest = load_palm(path, device=device, dtype=model_dtype(device))
    model.eval()
    if quantize == "int8":
        model.quantize_int8()
    elif quantize != "none":
        raise ValueError(f"unknown quantization {quantize!r}: use none or int8")
    return LoadedPalm(model, load_tokenizer(manifest.get("tokenizer")), manifest, version, Path(path))


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
