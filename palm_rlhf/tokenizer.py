"""Tokenizers: byte-level by default, a Hugging Face ``tokenizer.json`` when given.

Checkpoints store their tokenizer in the manifest (``to_dict``): the byte tokenizer by its
kind, a Hugging Face one with its whole ``tokenizer.json`` (the demo model's byte-level BPE,
:mod:`palm_rlhf.demo.bpe`). Both decode any id sequence; a multi-byte character split over
tokens decodes as U+FFFD until its last byte arrives, so incremental decoders re-decode the
whole sequence and hold back a trailing U+FFFD."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_dict(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past four special ids: 0 pad, 1 bos, 2 eos, 3 sep.

    Decoding drops special ids and replaces invalid UTF-8 with U+FFFD, so any id sequence
    (including a half-written multi-byte character) decodes."""

    PAD, BOS, EOS, SEP = 0, 1, 2, 3
    OFFSET = 4
    vocab_size = 256 + OFFSET
    pad_id, bos_id, eos_id, sep_id = PAD, BOS, EOS, SEP
    kind = "byte"

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        if add_bos:
            ids.insert(0, self.BOS)
        if add_eos:
            ids.append(self.EOS)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size}


class HFTokenizer:
    """A Hugging Face ``tokenizers`` file (``tokenizer.json``), loaded from disk only."""

    kind = "hf"

    def __init__(self, path: str | Path, pad_token: str | None = None, eos_token: str | None = None):
        from tokenizers import Tokenizer as _Tok

        self.path = str(path)
        self._tok = _Tok.from_file(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

        def find(candidates):
            for c in candidates:
                if c is not None and self._tok.token_to_id(c) is not None:
                    return self._tok.token_to_id(c)
            return None

        self.pad_id = find([pad_token, "<pad>", "[PAD]", "<|padding|>"]) or 0
        self.eos_id = find([eos_token, "</s>", "<|endoftext|>", "[SEP]", "<eos>"])
        if self.eos_id is None:
            self.eos_id = self.pad_id
        self.bos_id = find(["<s>", "<|startoftext|>", "[CLS]", "<bos>"])
        if self.bos_id is None:
            self.bos_id = self.eos_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_dict(self) -> dict:
        return {"kind": "hf", "vocab_size": self.vocab_size, "json": json.loads(self._tok.to_str())}


def load_tokenizer(spec: str | Path | dict | None = None):
    """``None``/``"byte"``: the byte tokenizer; a path to a ``tokenizer.json``; or a dict saved
    by ``to_dict`` (as stored in checkpoint manifests)."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    if isinstance(spec, dict):
        if spec.get("kind") == "byte":
            return ByteTokenizer()
        if spec.get("kind") == "hf":
            import os
            import tempfile

            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(spec["json"], f)
            try:
                return HFTokenizer(f.name)  # read into memory: the file is not needed afterwards
            finally:
                os.unlink(f.name)
        raise ValueError(f"unknown tokenizer spec kind {spec.get('kind')!r}")
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    return HFTokenizer(path)
