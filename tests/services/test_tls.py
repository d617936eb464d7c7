"""gRPC over TLS and mutual TLS, with certificates made for the test by openssl."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from palm_rlhf.proto.v1 import reward_pb2, reward_pb2_grpc

from .conftest import make_data_dir

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)
    # a second CA whose client certificates the server must refuse
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=other-ca",
             "-keyout", "other.key", "-out", "other.pem", cwd=d)
    return d


def _score(addr: str, creds: grpc.ChannelCredentials, timeout: float = 10.0):
    with grpc.secure_channel(addr, creds) as ch:
        stub = reward_pb2_grpc.RewardStub(ch)
        req = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt="hi", responses=["a lovely day"])],
                                      scorer="sentiment")
        return stub.Score(req, timeout=timeout)


def test_mutual_tls_accepts_signed_clients_and_refuses_others(spawn, pki, tmp_path_factory):
    data = make_data_dir(tmp_path_factory.mktemp("tls-data"))
    proc = spawn("reward", data, "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                 "--tls-client-ca", str(pki / "ca.pem"))
    ca = (pki / "ca.pem").read_bytes()
    good = grpc.ssl_channel_credentials(ca, (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes())
    deadline = time.monotonic() + 90
    while proc.port is None:
        assert proc.proc.poll() is None and time.monotonic() < deadline, proc.logs()
        time.sleep(0.1)
    while True:  # the model loads in the background: UNAVAILABLE until then
        try:
            resp = _score(proc.addr, good)
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, e
            time.sleep(0.2)
    assert resp.results[0].scores[0].score > 0  # VADER likes "lovely"

    # no client certificate: the handshake fails
    with pytest.raises(grpc.RpcError) as err:
        _score(proc.addr, grpc.ssl_channel_credentials(ca), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # a client certificate from another CA: refused too
    other = grpc.ssl_channel_credentials(ca, (pki / "other.key").read_bytes(), (pki / "other.pem").read_bytes())
    with pytest.raises(grpc.RpcError):
        _score(proc.addr, other, timeout=5)
    # plaintext: refused
    with grpc.insecure_channel(proc.addr) as ch, pytest.raises(grpc.RpcError):
        reward_pb2_grpc.RewardStub(ch).Score(reward_pb2.ScoreRequest(), timeout=5)
    assert proc.terminate() == 0
