"""The training recipe of the demo model, kept free of heavy imports so the CLI can show
its defaults in ``--help`` without loading torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DemoTrainConfig:
    """The recipe of the shipped demo model; every default is what built ``demo-v1``."""

    preset: str = "demo"
    seed: int = 0  # corpus seed and torch seed
    corpus_size: int = 20000  # exchanges: ~2.4M bytes, about one pass at the default steps
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 256  # two or three exchanges per window
    lr: float = 3e-3  # a small model tolerates a high peak rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1  # matrices only; norms and the embedding are not decayed
    grad_clip: float = 1.0
    num_threads: int = 2  # the machine the demo targets: two CPU cores
    eval_exchanges: int = 300  # held-out exchanges for the final loss
    save_dtype: str = "bfloat16"  # "float32", "float16" or "bfloat16"
    init_from: str | None = None  # continue from this checkpoint folder instead of a fresh model
