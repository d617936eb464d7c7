"""The policy's sampling controls and top-k log-probs over the wire, each checked for its
effect against the in-process engine on the same checkpoint."""

from __future__ import annotations

import grpc
import pytest
import torch
import torch.nn.functional as F

from palm_rlhf.generation import SamplingParams, generate_tokens
from palm_rlhf.proto.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services.common.client import create_sync_channel

from .conftest import rpc_error

P = policy_pb2
PROMPT = [1, 76, 105, 108, 108, 112]
EOS = 2


@pytest.fixture(scope="module")
def stub(policy_proc):
    with create_sync_channel(policy_proc.addr) as ch:
        yield policy_pb2_grpc.PolicyStub(ch)


def request(prompt=PROMPT, **params) -> P.GenerateRequest:
    return P.GenerateRequest(prompts=[P.Prompt(token_ids=common_pb2.TokenIds(ids=prompt))],
                             params=P.SamplingParams(**params))


def one(stub, **params) -> P.Candidate:
    return stub.Generate(request(**params), timeout=60).results[0].candidates[0]


def test_top_logprobs_are_the_models_own_alternatives(stub, tiny_model):
    c = one(stub, temperature=0, max_new_tokens=6, return_logprobs=True, top_logprobs=4)
    assert len(c.top_logprobs) == len(c.token_ids) == len(c.token_bytes) >= 1
    seq = list(PROMPT)
    for tok, lp, tb, alts in zip(c.token_ids, c.logprobs, c.token_bytes, c.top_logprobs):
        with torch.no_grad():
            logp = F.log_softmax(tiny_model(torch.tensor([seq]))[0, -1].float(), -1)
        vals, ids = logp.topk(4)
        assert list(alts.token_ids) == ids.tolist()
        assert list(alts.logprobs) == pytest.approx(vals.tolist(), abs=1e-4)
        assert lp == pytest.approx(float(logp[tok]), abs=1e-4)
        # the byte tokenizer: token id t stands for byte t - 4
        assert tb == (bytes([tok - 4]) if tok >= 4 else b"")
        assert list(alts.token_bytes) == [bytes([t - 4]) if t >= 4 else b"" for t in alts.token_ids]
        seq.append(tok)
    # without return_logprobs (or with top_logprobs 0) nothing extra is sent
    assert list(one(stub, temperature=0, max_new_tokens=3, top_logprobs=4).top_logprobs) == []
    assert list(one(stub, temperature=0, max_new_tokens=3, return_logprobs=True).top_logprobs) == []


def test_stream_carries_the_same_alternatives(stub):
    full = one(stub, temperature=0, max_new_tokens=6, return_logprobs=True, top_logprobs=3)
    ids, alts = [], []
    for chunk in stub.GenerateStream(request(temperature=0, max_new_tokens=6, return_logprobs=True, top_logprobs=3),
                                     timeout=60):
        ids += list(chunk.token_ids)
        alts += [list(a.token_ids) for a in chunk.top_logprobs]
        assert len(chunk.top_logprobs) == len(chunk.token_ids) == len(chunk.token_bytes)
    assert ids == list(full.token_ids)
    assert alts == [list(a.token_ids) for a in full.top_logprobs]


def test_logit_bias_ban_changes_the_greedy_answer(stub):
    base = one(stub, temperature=0, max_new_tokens=8)
    first = base.token_ids[0]
    banned = one(stub, temperature=0, max_new_tokens=8, logit_bias={first: -100.0})
    assert banned.token_ids[0] != first and first not in banned.token_ids
    forced = one(stub, temperature=0, max_new_tokens=3, logit_bias={70: 100.0})
    assert list(forced.token_ids) == [70, 70, 70]


def test_ignore_eos_min_tokens_and_stop_token_ids(stub, tiny_model):
    # a bias that makes EOS the greedy choice at every step: the answer ends at once...
    eos_first = {EOS: 100.0}
    ended = one(stub, temperature=0, max_new_tokens=12, logit_bias=eos_first)
    assert ended.finish_reason == P.FINISH_REASON_STOP and list(ended.token_ids) == []
    # ...unless EOS is ignored: then it runs to max_new_tokens
    run = one(stub, temperature=0, max_new_tokens=12, logit_bias=eos_first, ignore_eos=True)
    assert run.finish_reason == P.FINISH_REASON_LENGTH and list(run.token_ids) == [EOS] * 12
    # min_tokens: no EOS before it, then EOS ends the answer
    late = one(stub, temperature=0, max_new_tokens=12, logit_bias=eos_first, min_tokens=5)
    assert late.finish_reason == P.FINISH_REASON_STOP and len(late.token_ids) == 5 and EOS not in late.token_ids
    # stop_token_ids stops at that id (excluded from the answer)
    free = generate_tokens(tiny_model, [PROMPT], SamplingParams(max_new_tokens=30, temperature=0))[0][0].token_ids
    stop_at = next(t for t in free[3:] if t not in free[:3])
    cut = one(stub, temperature=0, max_new_tokens=30, stop_token_ids=[stop_at])
    assert cut.finish_reason == P.FINISH_REASON_STOP
    assert list(cut.token_ids) == free[: free.index(stop_at)]
    assert list(one(stub, temperature=0, max_new_tokens=30).token_ids) == free


def test_penalties_and_min_p_reach_the_sampler(stub, tiny_model):
    for kw in ({"frequency_penalty": 1.5}, {"presence_penalty": 1.5}, {"repetition_penalty": 2.0}, {"min_p": 0.2}):
        sp = SamplingParams(max_new_tokens=20, temperature=0.8 if "min_p" in kw else 0, seed=3,
                            stop_token_ids=(EOS,), **kw)
        ref = [t for t in generate_tokens(tiny_model, [PROMPT], sp)[0][0].token_ids if t != EOS]
        got = one(stub, temperature=sp.temperature, max_new_tokens=20, seed=3, **kw)
        assert list(got.token_ids) == ref, kw
    plain = one(stub, temperature=0, max_new_tokens=20, ignore_eos=True)
    penalised = one(stub, temperature=0, max_new_tokens=20, ignore_eos=True, frequency_penalty=2.0)
    assert len(set(penalised.token_ids)) > len(set(plain.token_ids))


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {100000: 1.0}}, "logit_bias"),
        ({"max_new_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"return_logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_invalid_controls_are_invalid_argument(stub, params, says):
    e = rpc_error(stub.Generate, request(**params), timeout=30)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and says in e.details()


def test_token_bytes_of_a_byte_level_bpe_are_the_tokens_own_bytes():
    """Concatenated, the tokens' bytes are the text's UTF-8 bytes, also where a character is
    split over tokens; special tokens stand for no bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from palm_rlhf.tokenizer import HFTokenizer
    from services.policy.core import token_bytes

    inner = Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    inner.train_from_iterator(["héllo wörld, the sea is blue " * 20, "good day"], trainer=trainer)
    tok = HFTokenizer.__new__(HFTokenizer)
    tok._tok = inner
    text = " wörld héllo the 😀 sea"
    ids = inner.encode(text).ids
    parts = [token_bytes(tok, t) for t in ids]
    assert b"".join(parts) == text.encode("utf-8")
    assert any(p and not _valid_utf8(p) for p in parts)  # the emoji is split into byte tokens
    assert token_bytes(tok, 2) == b"" and token_bytes(tok, 0) == b""


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
