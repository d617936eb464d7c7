"""The shipped demo model: intact, small, and a passable chat partner on unseen questions."""

from __future__ import annotations

import re
import subprocess

import torch

from palm_rlhf.chat import encode_prompt, format_chat
from palm_rlhf.checkpoint import verify_checkpoint
from palm_rlhf.config import PaLMConfig
from palm_rlhf.demo import corpus as C
from palm_rlhf.demo import demo_checkpoint_dir
from palm_rlhf.demo.train import encode_masked, stream_loss
from palm_rlhf.generation import SamplingParams, generate_tokens

ANSWER_LOSS_LIMIT = 1.0  # nats per answer token; the shipped model measures about 0.61 (docs/demo.md)


def test_shipped_checkpoint_verifies_and_is_small():
    path = demo_checkpoint_dir(build_if_missing=False)
    manifest = verify_checkpoint(path)  # every sha256 and size against the manifest
    assert manifest["kind"] == "policy"
    assert manifest["tokenizer"]["kind"] == "hf"  # the byte-level BPE trained on the corpus
    vocab = manifest["tokenizer"]["vocab_size"]
    assert manifest["config"] == PaLMConfig.from_name("demo", num_tokens=vocab).to_dict()
    assert manifest["config"]["max_seq_len"] >= 512  # several turns of conversation fit
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert size < 10 * 2**20, f"demo checkpoint is {size / 2**20:.1f} MiB"
    meta = manifest["metadata"]
    assert "demo-build" in meta["build_command"] and "--seed" in meta["build_command"]
    # a continued build records the checkpoint it started from, back to a fresh pretraining
    lineage = meta
    while lineage.get("continued_from"):
        lineage = lineage["continued_from"]["metadata"]
    assert not lineage["recipe"].get("init_from")
    assert "demo-build" in lineage["build_command"]
    assert meta["recipe"]["loss_on"] == "answers"
    assert meta["figures"]["final_train_loss"] < ANSWER_LOSS_LIMIT


def test_loss_on_held_out_answers_is_far_below_uniform(demo_model):
    import math

    model, tok, _ = demo_model
    stream, mask = encode_masked(C.generate_exchanges(11, 60, held_out=True), tok)
    loss = stream_loss(model, stream, seq_len=128, mask=mask)
    assert loss < ANSWER_LOSS_LIMIT < math.log(tok.vocab_size), loss
    # the answer depends on its question: after another question, the same answers cost more
    turns = [e.last for e in C.generate_exchanges(11, 60, held_out=True)]
    own = [C.Exchange((t,)) for t in turns]
    swapped = [C.Exchange((C.Turn(q.question, t.answer, t.sentiment, t.topic),))
               for q, t in zip(turns[7:] + turns[:7], turns)]
    losses = []
    for exchanges in (own, swapped):
        stream, mask = encode_masked(exchanges, tok)
        losses.append(stream_loss(model, stream, seq_len=128, mask=mask))
    assert losses[1] > losses[0] + 0.3, losses


def test_answers_to_unseen_questions_are_words_and_end_with_eos(demo_model):
    model, tok, _ = demo_model
    prompts = C.held_out_prompts(1, 16)
    ids = [encode_prompt(tok, format_chat([{"role": "user", "content": p}])) for p in prompts]
    params = SamplingParams(
        max_new_tokens=160, temperature=0.8, top_p=0.9, stop_token_ids=(tok.eos_id,), seed=0
    )
    with torch.no_grad():
        completions = [c[0] for c in generate_tokens(model, ids, params)]
    stopped = sum(c.finish_reason == "stop" and c.token_ids[-1] == tok.eos_id for c in completions)
    assert stopped >= 14, f"only {stopped}/16 answers ended with EOS"

    vocabulary = {
        w.lower() for e in C.generate_exchanges(0, 3000) for w in re.findall(r"[A-Za-z']+", e.text())
    }
    answers = [tok.decode(c.token_ids) for c in completions]
    text = " ".join(answers)
    assert sum(ch.isascii() and ch.isprintable() for ch in text) / len(text) > 0.98
    words = re.findall(r"[A-Za-z']+", text)
    assert len(words) >= 5 * len(answers)
    known = sum(w.lower() in vocabulary for w in words) / len(words)
    assert known > 0.95, (known, answers)


def test_chat_once_answers_from_the_command_line(python, cli_env):
    proc = subprocess.run(
        [python, "-m", "palm_rlhf.cli", "chat", "--once", "How are you today?", "--seed", "0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env,
    )
    assert proc.returncode == 0, proc.stderr
    answer = proc.stdout.strip()
    assert len(answer.splitlines()) == 1 and len(re.findall(r"[A-Za-z]+", answer)) >= 3, answer
