"""The demo model's byte-level BPE: trained on the corpus, stored in the manifest, and safe
to decode token by token (as the policy service streams)."""

from __future__ import annotations

from palm_rlhf.demo import corpus as C
from palm_rlhf.demo.bpe import SPECIAL_TOKENS, train_bpe
from palm_rlhf.tokenizer import load_tokenizer


def _tok(vocab: int = 600):
    return train_bpe([e.text() for e in C.generate_exchanges(0, 400)], vocab)


def test_training_is_deterministic_and_specials_come_first():
    a, b = _tok(), _tok()
    assert a.to_dict() == b.to_dict()
    assert a.vocab_size == 600
    assert [a._tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert (a.pad_id, a.bos_id, a.eos_id) == (0, 1, 2)


def test_round_trip_through_the_manifest_spec_for_any_text():
    tok = load_tokenizer(_tok().to_dict())
    for text in ["User: How is your garden?\nAssistant: My roses are blooming.", "naïve café ☂ 日本語 🙂", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.bos_id, *tok.encode("Hi."), tok.eos_id]) == "Hi."


def test_token_by_token_decoding_only_ever_extends_the_text():
    """What services/policy/core.py relies on: decoding a growing id list gives a growing
    text once a trailing U+FFFD (a character still missing bytes) is held back."""
    tok = _tok(300)  # few merges: multi-byte characters are split over several tokens
    text = "Snow in Zürich ☃ and 日本 🙂."
    ids = tok.encode(text)
    assert len(ids) > len(text.split())
    emitted = ""
    split_chars = 0
    for i in range(1, len(ids) + 1):
        decoded = tok.decode(ids[:i])
        stable = decoded.rstrip("\ufffd")
        split_chars += stable != decoded
        assert stable.startswith(emitted), (emitted, stable)
        emitted = stable
    assert emitted == text and split_chars > 0
