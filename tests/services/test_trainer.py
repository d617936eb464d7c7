"""The trainer service and a policy replica that follows its announcements."""

from __future__ import annotations

import time

import grpc
import pytest

from palm_rlhf.proto.v1 import common_pb2, policy_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.common.client import admin_metadata, create_sync_channel

from .conftest import ADMIN_TOKEN, make_data_dir, rpc_error

T = trainer_pb2
HERE = __import__("pathlib").Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def procs(spawn, tmp_path_factory):
    data = make_data_dir(tmp_path_factory.mktemp("trainer-data"))
    trainer = spawn("trainer", data, "--update-fn", "fake_update:factory", "--admin-token", ADMIN_TOKEN,
                    "--store-poll", "0.2", env={"PYTHONPATH": str(HERE)})
    trainer.wait_ready()
    policy = spawn("policy", data, "--trainer-addr", trainer.addr).wait_ready()
    return trainer, policy, data


def policy_version(addr: str) -> str:
    with create_sync_channel(addr) as ch:
        return policy_pb2_grpc.PolicyStub(ch).ModelInfo(common_pb2.ModelInfoRequest(), timeout=10).version


def wait_for_version(addr: str, version: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while policy_version(addr) != version:
        assert time.monotonic() < deadline, f"policy never switched to {version}"
        time.sleep(0.1)


def test_trigger_publishes_announces_and_policy_follows(procs):
    trainer, policy, _ = procs
    md = admin_metadata(ADMIN_TOKEN)
    with create_sync_channel(trainer.addr) as ch:
        stub = trainer_pb2_grpc.TrainerStub(ch)
        s = stub.Status(T.StatusRequest(), timeout=10)
        assert s.policy_version == "v0001" and s.step == 0 and list(s.policy_versions) == ["v0001", "v0002"]
        watch = stub.WatchVersions(T.WatchVersionsRequest(send_current=True), timeout=60)
        first = next(watch)
        assert (first.version, first.reason) == ("v0001", "current")

        assert rpc_error(stub.Trigger, T.TriggerRequest(wait=True), timeout=30).code() == \
            grpc.StatusCode.UNAUTHENTICATED
        r = stub.Trigger(T.TriggerRequest(wait=True), timeout=60, metadata=md)
        assert r.published and r.policy_version == "v0003" and r.step == 1
        assert r.metrics["loss"] == pytest.approx(0.25) and r.message == "published v0003"
        ann = next(watch)
        assert (ann.version, ann.reason, ann.previous_version) == ("v0003", "publish", "v0001")
        wait_for_version(policy.addr, "v0003")

        s = stub.Status(T.StatusRequest(), timeout=10)
        assert s.step == 1 and s.policy_version == "v0003" and s.last_metrics["kl"] == pytest.approx(0.01)

        rb = stub.Rollback(T.RollbackRequest(), timeout=30, metadata=md)
        assert (rb.version, rb.previous_version) == ("v0001", "v0003")
        ann = next(watch)
        assert (ann.version, ann.reason) == ("v0001", "rollback")
        wait_for_version(policy.addr, "v0001")

        err = rpc_error(stub.Rollback, T.RollbackRequest(version="v0077"), timeout=10, metadata=md)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        err = rpc_error(stub.Rollback, T.RollbackRequest(), timeout=10, metadata=md)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION  # v0001 has no parent
        watch.cancel()


def test_store_changes_made_elsewhere_are_announced(procs):
    trainer, policy, data = procs
    from palm_rlhf.checkpoint import CheckpointStore

    with create_sync_channel(trainer.addr) as ch:
        stub = trainer_pb2_grpc.TrainerStub(ch)
        watch = stub.WatchVersions(T.WatchVersionsRequest(send_current=False), timeout=60)
        CheckpointStore(data / "checkpoints", "policy").set_current("v0002")
        ann = next(watch)
        assert (ann.version, ann.reason) == ("v0002", "store")
        watch.cancel()
    wait_for_version(policy.addr, "v0002")


def test_default_update_fn_reports_no_new_feedback(spawn, tmp_path_factory):
    data = make_data_dir(tmp_path_factory.mktemp("trainer-noop"))
    token_file = data / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    trainer = spawn("trainer", data, "--admin-token-file", str(token_file)).wait_ready()
    with create_sync_channel(trainer.addr) as ch:
        r = trainer_pb2_grpc.TrainerStub(ch).Trigger(T.TriggerRequest(wait=True), timeout=30,
                                                     metadata=admin_metadata(ADMIN_TOKEN))
    assert not r.published and r.message == "no new feedback" and r.policy_version == "v0001"
    assert trainer.terminate() == 0


def test_admin_calls_are_refused_when_no_token_is_configured(spawn, tmp_path_factory):
    data = make_data_dir(tmp_path_factory.mktemp("trainer-no-token"))
    trainer = spawn("trainer", data).wait_ready()
    with create_sync_channel(trainer.addr) as ch:
        stub = trainer_pb2_grpc.TrainerStub(ch)
        for call, req in ((stub.Trigger, T.TriggerRequest(wait=True)), (stub.Rollback, T.RollbackRequest())):
            for md in ((), admin_metadata("anything"), (("authorization", "Bearer "),)):
                err = rpc_error(call, req, timeout=30, metadata=md)
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "without an admin token" in err.details()
        assert stub.Status(T.StatusRequest(), timeout=30).policy_version == "v0001"  # the rest stays open
    assert trainer.terminate() == 0
