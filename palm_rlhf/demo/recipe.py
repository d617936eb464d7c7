"""The training recipe of the demo model, kept free of heavy imports so the CLI can show
its defaults in ``--help`` without loading torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DemoTrainConfig:
    """The recipe of the shipped demo model; every default is what built ``demo-v2``.

    ``tokenizer="byte"`` with ``loss_on="all"`` is the recipe of the first demo model
    (byte tokens, next-token loss on every token)."""

    preset: str = "demo"
    seed: int = 0  # corpus seed and torch seed
    corpus_size: int = 40000  # exchanges: ~1.2M BPE tokens, about four passes at the default steps
    steps: int = 1400
    batch_size: int = 32
    seq_len: int = 128  # three or four exchanges per window (BPE tokens)
    lr: float = 3e-3  # a small model tolerates a high peak rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1  # matrices only; norms and the embedding are not decayed
    grad_clip: float = 1.0
    num_threads: int = 2  # the machine the demo targets: two CPU cores
    eval_exchanges: int = 300  # held-out exchanges for the final loss
    save_dtype: str = "bfloat16"  # "float32", "float16" or "bfloat16"
    init_from: str | None = None  # continue from this checkpoint folder instead of a fresh model
    tokenizer: str = "bpe"  # "byte" or "bpe" (trained on this corpus, see palm_rlhf.demo.bpe)
    vocab_size: int = 2048  # ids of the BPE tokenizer, special tokens included
    loss_on: str = "answers"  # "all" tokens, or only the "answers" (answer tokens and the EOS)
