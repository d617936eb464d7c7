"""``palm-rlhf chat``, its session logic and ``demo-build``, on tiny random checkpoints."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from palm_rlhf.chat import format_chat
from palm_rlhf.checkpoint import load_palm, verify_checkpoint
from palm_rlhf.demo.cli import ChatSession
from palm_rlhf.generation import GenerationError
from palm_rlhf.tokenizer import ByteTokenizer


@pytest.fixture
def tiny(tiny_checkpoint):
    model, _ = load_palm(tiny_checkpoint)
    return model


def test_session_prompt_is_the_chat_format_of_the_conversation(tiny, seed):
    tok = ByteTokenizer()
    s = ChatSession(tiny, tok, max_new_tokens=8, seed=1)
    first = s.reply("Hello there")
    assert len(s.history) == 2 and s.history[1] == {"role": "assistant", "content": first}
    assert "\n" not in first
    ids = s.prompt_ids("And now?")
    expected = format_chat([*s.history, {"role": "user", "content": "And now?"}])
    assert ids == [tok.bos_id] + tok.encode(expected)


def test_session_drops_the_oldest_turns_to_fit_the_context(tiny, seed):
    tok = ByteTokenizer()
    s = ChatSession(tiny, tok, max_new_tokens=16, history_turns=10)
    long = "word " * 45  # 225 bytes: with the rest, more than the 256 tokens of the tiny preset
    s.history = [
        {"role": "user", "content": f"first {long}"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "two"},
    ]
    ids = s.prompt_ids("third")
    text = tok.decode(ids)
    assert len(ids) + 16 <= tiny.config.max_seq_len
    assert "first" not in text and "User: second\nAssistant: two\nUser: third\nAssistant:" in text


def test_session_keeps_at_most_history_turns(tiny):
    tok = ByteTokenizer()
    s = ChatSession(tiny, tok, max_new_tokens=4, history_turns=1)
    s.history = [
        {"role": r, "content": c}
        for r, c in [("user", "a1"), ("assistant", "b1"), ("user", "a2"), ("assistant", "b2")]
    ]
    text = tok.decode(s.prompt_ids("a3"))
    assert text == "User: a2\nAssistant: b2\nUser: a3\nAssistant:"


def test_a_message_longer_than_the_context_is_a_clear_error(tiny):
    s = ChatSession(tiny, ByteTokenizer(), max_new_tokens=16)
    with pytest.raises(GenerationError, match="too long"):
        s.prompt_ids("x" * 400)


def test_seeded_sessions_answer_reproducibly(tiny):
    a = ChatSession(tiny, ByteTokenizer(), max_new_tokens=12, seed=3).reply("Hi")
    b = ChatSession(tiny, ByteTokenizer(), max_new_tokens=12, seed=3).reply("Hi")
    assert a == b


def test_chat_command_reads_lines_until_eof(tiny_checkpoint, python, cli_env):
    proc = subprocess.run(
        [
            python,
            "-m",
            "palm_rlhf.cli",
            "chat",
            "--checkpoint",
            str(tiny_checkpoint),
            "--max-new-tokens",
            "8",
            "--seed",
            "0",
        ],
        input="Hello\n\nHow are you?\n",
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 2  # one answer per non-empty line


def test_chat_command_with_a_missing_checkpoint_fails_clearly(tmp_path, python, cli_env):
    proc = subprocess.run(
        [python, "-m", "palm_rlhf.cli", "chat", "--checkpoint", str(tmp_path / "nope"), "--once", "hi"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env,
    )
    assert proc.returncode == 2
    assert "not a checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_demo_checkpoint_without_autobuild_says_how_to_build(monkeypatch, tmp_path):
    from palm_rlhf import demo

    monkeypatch.setattr(demo, "ASSETS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="palm-rlhf demo-build --out"):
        demo.demo_checkpoint_dir(build_if_missing=False)
    monkeypatch.setenv(demo.AUTOBUILD_ENV, "0")
    with pytest.raises(FileNotFoundError, match="demo-build"):
        demo.demo_checkpoint_dir()


def test_build_writes_a_verified_checkpoint_with_its_recipe(tmp_path):
    from palm_rlhf.demo.train import DemoTrainConfig, build_demo_checkpoint

    cfg = DemoTrainConfig(
        preset="tiny",
        steps=30,
        corpus_size=300,
        batch_size=8,
        seq_len=64,
        lr=1e-2,
        warmup_steps=3,
        eval_exchanges=20,
        num_threads=1,
        tokenizer="byte",
        loss_on="all",
    )
    out = build_demo_checkpoint(tmp_path / "demo-test", cfg, progress=False)
    manifest = verify_checkpoint(out)
    assert manifest["kind"] == "policy" and manifest["tokenizer"] == {"kind": "byte", "vocab_size": 260}
    meta = manifest["metadata"]
    assert meta["recipe"]["steps"] == 30 and meta["recipe"]["seed"] == 0
    assert "demo-build" in meta["build_command"]
    figures = meta["figures"]
    assert figures["loss_curve"][0] > figures["final_train_loss"]  # it learned something
    assert figures["heldout_loss_stored"] < 5.0
    model, _ = load_palm(out)
    assert model.token_emb.weight.dtype == torch.bfloat16
    with pytest.raises(Exception, match="exists"):
        build_demo_checkpoint(out, cfg, progress=False)
    assert json.loads((out / "manifest.json").read_text())["version"] == "demo-test"
    # --force swaps a complete new folder in and leaves nothing else behind
    created = manifest["created_at"]
    build_demo_checkpoint(out, cfg, progress=False, force=True)
    assert verify_checkpoint(out)["created_at"] > created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-test"]


def test_chat_command_int8_chats_with_a_quantized_model(tiny_checkpoint, python, cli_env, monkeypatch, capsys):
    from palm_rlhf import cpu_linear
    from palm_rlhf.cli import main
    from palm_rlhf.demo import cli as demo_cli

    if not cpu_linear.int8_available():
        pytest.skip("no working torch._weight_int8pack_mm in this PyTorch build")
    seen = []

    class Recording(demo_cli.ChatSession):
        def __init__(self, model, *a, **kw):
            seen.append(model.int8_decoding)
            super().__init__(model, *a, **kw)

    monkeypatch.setattr(demo_cli, "ChatSession", Recording)
    argv = ["chat", "--checkpoint", str(tiny_checkpoint), "--once", "Hello there", "--max-new-tokens", "4"]
    assert main([*argv, "--int8"]) == 0 and main(argv) == 0
    assert seen == [True, False]
    # and the real command runs end to end
    proc = subprocess.run([python, "-m", "palm_rlhf.cli", *argv, "--int8"], check=False, capture_output=True,
                          text=True, timeout=120, env=cli_env)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


def test_fit_messages_drops_whole_exchanges_oldest_first_and_keeps_system_and_latest():
    from palm_rlhf.chat import fit_messages

    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2a"},
        {"role": "assistant", "content": "a2b"},
        {"role": "user", "content": "u3"},
    ]
    assert fit_messages(msgs, lambda kept: True) == (msgs, 0)
    kept, dropped = fit_messages(msgs, lambda kept: len(kept) <= 5)
    assert dropped == 2 and [m["content"] for m in kept] == ["s", "u2", "a2a", "a2b", "u3"]
    kept, dropped = fit_messages(msgs, lambda kept: len(kept) <= 4)  # an exchange goes whole
    assert dropped == 5 and [m["content"] for m in kept] == ["s", "u3"]
    assert fit_messages(msgs, lambda kept: len(kept) <= 1) is None  # the latest turn cannot go
    # a conversation opening with an assistant turn loses that turn first
    lead = [{"role": "assistant", "content": "hi"}, *msgs[1:]]
    kept, dropped = fit_messages(lead, lambda kept: len(kept) <= 6)
    assert dropped == 1 and kept[0]["content"] == "u1"


def test_clean_response_cuts_at_the_first_newline_or_stop_string():
    from palm_rlhf.chat import clean_response

    assert clean_response(" I am fine.\nUser: and you?") == "I am fine."
    assert clean_response(" I am fine. Bye", ["Bye", "fine"]) == "I am"
    assert clean_response(" tab\tand\x07bell ") == "tab\tandbell"


def test_bpe_build_stores_its_tokenizer_and_trains_on_answers(tmp_path):
    from palm_rlhf.demo import corpus as C
    from palm_rlhf.demo.train import DemoTrainConfig, build_demo_checkpoint, encode_masked
    from palm_rlhf.tokenizer import HFTokenizer, load_tokenizer

    cfg = DemoTrainConfig(
        preset="tiny", steps=60, corpus_size=300, batch_size=8, seq_len=64, lr=1e-2, warmup_steps=3,
        eval_exchanges=20, num_threads=1, tokenizer="bpe", vocab_size=512, loss_on="answers",
    )
    out = build_demo_checkpoint(tmp_path / "demo-bpe", cfg, progress=False)
    manifest = verify_checkpoint(out)
    assert manifest["tokenizer"]["kind"] == "hf" and manifest["tokenizer"]["vocab_size"] == 512
    assert manifest["config"]["num_tokens"] == 512
    tok = load_tokenizer(manifest["tokenizer"])
    assert isinstance(tok, HFTokenizer) and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "User: Hey, have you ever been to Lisbon?\nAssistant: My trip to Lisbon was wonderful."
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode()) / 2  # merges learned on the corpus
    # the loss mask covers exactly the answers (with the final EOS), never the questions
    ex = C.generate_exchanges(3, 5)
    ids, mask = encode_masked(ex, tok)
    assert ids.tolist() == [i for e in ex for i in C.encode_exchange(tok, e.text())]
    answers = tok.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if m and i != tok.eos_id])
    assert answers == "".join(f" {t.answer}" for e in ex for t in e.turns)
    assert int(mask.sum()) == len(tok.encode(answers)) + len(ex)
    figures = manifest["metadata"]["figures"]
    assert figures["loss_curve"][0] > figures["final_train_loss"]
    assert "--tokenizer bpe --vocab-size 512 --loss-on answers" in manifest["metadata"]["build_command"]
