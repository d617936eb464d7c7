"""The demo world: a template corpus, a small PaLM pretrained on it, and a terminal chat.

No model hub can be reached at run time, so the package ships its own small checkpoint
(``assets/demo-v2``), trained to answer the questions of the chat exchanges written by
:mod:`palm_rlhf.demo.corpus`, with a byte-level BPE tokenizer learned on the same corpus, and
a reward model trained on that checkpoint (``assets/demo-v2-reward``).
Every service falls back to it when no other checkpoint is configured::

    from palm_rlhf.demo import demo_checkpoint_dir, load_demo_model
    model, tokenizer, manifest = load_demo_model()

If the shipped folder is missing (a stripped install), :func:`demo_checkpoint_dir` rebuilds
it: about half an hour of CPU training with a progress bar.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEMO_VERSION = "demo-v2"
DEMO_REWARD_VERSION = "demo-v2-reward"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
# Set to "0" to turn the automatic rebuild of a missing demo checkpoint into an error.
AUTOBUILD_ENV = "PALM_RLHF_DEMO_AUTOBUILD"


def demo_checkpoint_dir(build_if_missing: bool | None = None) -> Path:
    """Folder of the shipped demo checkpoint (kind ``policy``, preset ``demo``, BPE tokenizer).

    The folder is part of the package, so this normally only returns a path. When it is
    missing, it is rebuilt with the default recipe (the same command that produced the shipped
    one), unless ``build_if_missing`` is False or ``PALM_RLHF_DEMO_AUTOBUILD=0``, in which case
    a :class:`FileNotFoundError` says how to build it.
    """
    path = ASSETS_DIR / DEMO_VERSION
    if (path / "manifest.json").is_file():
        return path
    if build_if_missing is None:
        from .settings import DemoAssetSettings

        build_if_missing = DemoAssetSettings().demo_autobuild
    if not build_if_missing:
        raise FileNotFoundError(
            f"the demo checkpoint {path} is missing; build it with `palm-rlhf demo-build --out {path}` "
            f"(about 30 minutes on two CPU cores)"
        )
    import fcntl

    from palm_rlhf.demo.train import build_demo_checkpoint

    ASSETS_DIR.mkdir(parents=True, exist_ok=True)
    # Several processes may start at once without the checkpoint (a service and its tests):
    # the first builds it, the others wait on the lock and then find it built.
    with open(ASSETS_DIR / f".{DEMO_VERSION}.build-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "manifest.json").is_file():
            return path
        log.warning("demo checkpoint %s is missing: building it now (about 30 minutes on CPU)", path)
        return build_demo_checkpoint(path)


def demo_reward_dir() -> Path | None:
    """Folder of the shipped demo reward model (kind ``reward``, trained on preference pairs of
    the corpus on the demo model's trunk), or None when the install lacks it."""
    path = ASSETS_DIR / DEMO_REWARD_VERSION
    return path if (path / "manifest.json").is_file() else None


def load_demo_model(device: str = "cpu", dtype: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """(PaLM in eval mode, tokenizer, manifest) of the demo checkpoint.

    The shipped weights are stored in bfloat16 to keep the package small; they are upcast to
    float32 here by default (``dtype``), which is what CPU inference wants."""
    import torch

    from palm_rlhf.checkpoint import load_palm
    from palm_rlhf.tokenizer import load_tokenizer

    model, manifest = load_palm(demo_checkpoint_dir(), device=device, dtype=dtype or torch.float32)
    return model, load_tokenizer(manifest.get("tokenizer")), manifest


def demo_prompts() -> list[str]:
    """Held-out user questions of the demo world (never in the training corpus), for the RLHF
    loop and simulated users: ``assets/prompts.txt``, or regenerated if that file is missing."""
    path = ASSETS_DIR / "prompts.txt"
    if path.is_file():
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    from palm_rlhf.demo.corpus import held_out_prompts

    return held_out_prompts(0, 300)


__all__ = [
    "ASSETS_DIR",
    "DEMO_REWARD_VERSION",
    "DEMO_VERSION",
    "demo_checkpoint_dir",
    "demo_prompts",
    "demo_reward_dir",
    "load_demo_model",
]
