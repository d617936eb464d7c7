"""The reference service over the wire."""

from __future__ import annotations

import grpc
import pytest
import torch

from palm_rlhf.proto.v1 import common_pb2, reference_pb2, reference_pb2_grpc
from services.common.client import create_sync_channel

from .conftest import rpc_error

R = reference_pb2


@pytest.fixture(scope="module")
def stub(spawn, policy_data):
    proc = spawn("reference", policy_data, "--max-batch", "3").wait_ready()
    with create_sync_channel(proc.addr) as ch:
        yield reference_pb2_grpc.ReferenceStub(ch)


def test_logprobs_match_the_model_in_process(stub, tiny_model):
    seqs = [([1, 10, 11, 12], [40, 41]), ([1, 7], [90, 91, 92, 93, 94])]
    r = stub.LogProbs(R.LogProbsRequest(sequences=[R.TokenSequence(prompt_token_ids=p, response_token_ids=s)
                                                   for p, s in seqs]), timeout=30)
    assert r.reference_version == "v0001"  # the oldest policy version: the frozen start
    for (p, s), out in zip(seqs, r.results):
        full = torch.tensor([p + s])
        expected = tiny_model.logprobs_of(full)[0, len(p) - 1:].tolist()
        assert list(out.logprobs) == pytest.approx(expected, abs=1e-4)
        assert out.total == pytest.approx(sum(expected), abs=1e-3)


@pytest.mark.parametrize("seqs, code", [
    ([], grpc.StatusCode.INVALID_ARGUMENT),
    ([([1], [])], grpc.StatusCode.INVALID_ARGUMENT),
    ([([], [5])], grpc.StatusCode.INVALID_ARGUMENT),
    ([([1, 300], [5])], grpc.StatusCode.INVALID_ARGUMENT),
    ([([1], [5])] * 4, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ([([1] * 200, [5] * 100)], grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_bad_requests(stub, seqs, code):
    req = R.LogProbsRequest(sequences=[R.TokenSequence(prompt_token_ids=p, response_token_ids=s) for p, s in seqs])
    assert rpc_error(stub.LogProbs, req, timeout=30).code() == code


def test_model_info(stub):
    info = stub.ModelInfo(common_pb2.ModelInfoRequest(), timeout=10)
    assert info.kind == "reference" and info.version == "v0001" and info.tokenizer.vocab_size == 260
