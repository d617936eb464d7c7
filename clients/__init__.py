"""Clients of the palm-rlhf services.

* :class:`RewardClient`, :class:`PolicyClient`, :class:`TrainerClient`: typed gRPC clients
  with an overall deadline per call, bounded retries on UNAVAILABLE (exponential backoff with
  jitter), explicit message-size limits, optional TLS and an admin token sent only on admin
  calls.
* :class:`GatewayClient`: the HTTP chat-completions and feedback API.

This package depends only on the generated contracts (``palm_rlhf.proto``), grpcio, httpx and
the services' channel factory and retry policy (``services.common.client``, which imports no
model code), so other programs can use it without the model code.
"""

from ._grpc import NO_RETRY, ClientError, GrpcClient, RetryPolicy, TLSConfig
from .gateway import GatewayClient, GatewayError
from .grpc_clients import PolicyClient, RewardClient, TrainerClient
from .types import Candidate, Generation, ModelInfo, ResponseScore, ScoreResult, StreamChunk, VersionChange

__all__ = [
    "NO_RETRY",
    "Candidate",
    "ClientError",
    "GatewayClient",
    "GatewayError",
    "Generation",
    "GrpcClient",
    "ModelInfo",
    "PolicyClient",
    "ResponseScore",
    "RetryPolicy",
    "RewardClient",
    "ScoreResult",
    "StreamChunk",
    "TLSConfig",
    "TrainerClient",
    "VersionChange",
]
