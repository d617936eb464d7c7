"""The reward service over the wire: learned and sentiment scorers."""

from __future__ import annotations

import grpc
import pytest

from palm_rlhf.proto.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.common.client import admin_metadata, create_sync_channel

from .conftest import ADMIN_TOKEN, make_data_dir, rpc_error

W = reward_pb2


@pytest.fixture(scope="module")
def reward(spawn, tmp_path_factory):
    data = make_data_dir(tmp_path_factory.mktemp("reward-data"))
    # the admin token comes from the environment, as `palm-rlhf up` and Kubernetes pass it
    proc = spawn("reward", data, "--max-batch", "6", env={"PALM_RLHF_ADMIN_TOKEN": ADMIN_TOKEN}).wait_ready()
    with create_sync_channel(proc.addr) as ch:
        yield reward_pb2_grpc.RewardStub(ch), data


def test_first_start_initialises_a_reward_version(reward):
    _, data = reward
    from palm_rlhf.checkpoint import CheckpointStore

    st = CheckpointStore(data / "checkpoints", "reward")
    assert st.versions() == ["v0001"]
    assert st.manifest("v0001")["metadata"]["reward_head"]["num_binned_output"] == 5


def test_learned_scores_are_expected_bin_values(reward):
    stub, _ = reward
    r = stub.Score(W.ScoreRequest(items=[W.ScoreItem(prompt="User: hi\nAssistant:", responses=["hello", "go away"]),
                                         W.ScoreItem(prompt="x", responses=["y"])]), timeout=30)
    assert r.scorer == "learned" and r.reward_version == "v0001"
    assert [len(it.scores) for it in r.results] == [2, 1]
    for it in r.results:
        for s in it.scores:
            assert len(s.bin_probs) == 5 and sum(s.bin_probs) == pytest.approx(1, abs=1e-5)
            assert s.score == pytest.approx(sum(i * p for i, p in enumerate(s.bin_probs)), abs=1e-4)
            assert dict(s.breakdown) == {"learned": pytest.approx(s.score)}


def test_sentiment_scorer_and_breakdown(reward):
    stub, _ = reward
    r = stub.Score(W.ScoreRequest(items=[W.ScoreItem(prompt="", responses=[
        "I love this, it is wonderful and great!", "This is terrible, awful and sad."])],
        scorer="sentiment", all_scorers=True), timeout=30)
    happy, sad = r.results[0].scores
    assert r.scorer == "sentiment"
    assert 0.5 < happy.score <= 1 and -1 <= sad.score < -0.5
    assert set(happy.breakdown) == {"learned", "sentiment"}
    assert happy.breakdown["sentiment"] == pytest.approx(happy.score)


@pytest.mark.parametrize("req, code", [
    (W.ScoreRequest(), grpc.StatusCode.INVALID_ARGUMENT),
    (W.ScoreRequest(items=[W.ScoreItem(prompt="p")]), grpc.StatusCode.INVALID_ARGUMENT),
    (W.ScoreRequest(items=[W.ScoreItem(prompt="p", responses=["a"])], scorer="vibes"),
     grpc.StatusCode.INVALID_ARGUMENT),
    (W.ScoreRequest(items=[W.ScoreItem(prompt="p", responses=["a"] * 7)]), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_bad_requests(reward, req, code):
    stub, _ = reward
    assert rpc_error(stub.Score, req, timeout=30).code() == code


def test_model_info_and_versions(reward):
    stub, _ = reward
    info = stub.ModelInfo(common_pb2.ModelInfoRequest(), timeout=10)
    assert info.kind == "reward" and info.version == "v0001"
    assert list(info.scorers) == ["learned", "sentiment"] and info.default_scorer == "learned"
    assert '"num_binned_output": 5' in info.config_json
    md = admin_metadata(ADMIN_TOKEN)
    assert rpc_error(stub.LoadVersion, common_pb2.LoadVersionRequest(version=""), timeout=10).code() == \
        grpc.StatusCode.UNAUTHENTICATED
    assert rpc_error(stub.LoadVersion, common_pb2.LoadVersionRequest(version="v0009"), timeout=10,
                     metadata=md).code() == grpc.StatusCode.NOT_FOUND
    same = stub.LoadVersion(common_pb2.LoadVersionRequest(version=""), timeout=30, metadata=md)
    assert (same.version, same.previous_version) == ("v0001", "v0001")
