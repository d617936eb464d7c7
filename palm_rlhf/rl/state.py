"""Optimiser state in safetensors, so that resuming a run never unpickles anything.

Every tensor of ``optimizer.state_dict()["state"]`` is stored as ``state.<param>.<key>``;
the parameter groups and any non-tensor entries go into the file's JSON metadata. Files are
written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def save_optimizer(optim: torch.optim.Optimizer, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``optim``'s state to ``path`` (a ``.safetensors`` file) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = optim.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{pid}.{key}"] = val.detach().contiguous().cpu().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = val
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    meta["extra"] = json.dumps(extra or {})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_optimizer(optim: torch.optim.Optimizer, path: str | os.PathLike) -> dict:
    """Restore ``optim`` from a file written by :func:`save_optimizer`; returns its ``extra``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no optimizer state at {path}")
    state: dict[int, dict] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = f.get_tensor(name)
    for pid, vals in json.loads(meta.get("scalars", "{}")).items():
        state.setdefault(int(pid), {}).update(vals)
    groups = json.loads(meta["param_groups"])
    for g in groups:  # JSON turns tuples (betas) into lists
        for k, v in g.items():
            if isinstance(v, list) and k != "params":
                g[k] = tuple(v)
    dev = next((p.device for g in optim.param_groups for p in g["params"]), torch.device("cpu"))
    state = {
        pid: {k: (v.to(dev) if torch.is_tensor(v) and k != "step" else v) for k, v in s.items()}
        for pid, s in state.items()
    }
    optim.load_state_dict({"state": state, "param_groups": groups})
    return json.loads(meta.get("extra", "{}"))
