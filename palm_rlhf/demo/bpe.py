"""A byte-level BPE tokenizer for the demo model, trained on the demo corpus.

The corpus has a small vocabulary, so a few thousand merges turn most words (with their
leading space) into one token and an exchange shrinks about fourfold against raw bytes. The
tokenizer is a Hugging Face ``tokenizers`` byte-level BPE: any text encodes (unknown
characters fall back to bytes), and its ``tokenizer.json`` travels inside the checkpoint's
manifest (:meth:`palm_rlhf.tokenizer.HFTokenizer.to_dict`).

Special tokens come first: ``<pad>`` 0 (the id PaLM's loss ignores), ``<bos>`` 1, ``<eos>`` 2.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


def train_bpe(texts: Iterable[str], vocab_size: int = 1024):
    """A :class:`palm_rlhf.tokenizer.HFTokenizer` with ``vocab_size`` ids trained on ``texts``.

    Training is deterministic: the same texts give the same merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from palm_rlhf.tokenizer import HFTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(tok.to_str(), encoding="utf-8")
        out = HFTokenizer(path)
    out.path = "<in memory>"
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")
    return out


def tokenizer_json(tokenizer) -> dict:
    """The ``tokenizer.json`` content of an HFTokenizer, as stored in a manifest."""
    return json.loads(tokenizer._tok.to_str())


__all__ = ["SPECIAL_TOKENS", "tokenizer_json", "train_bpe"]
