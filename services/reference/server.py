"""The reference gRPC servicer and process."""

from __future__ import annotations

import asyncio

import grpc

from palm_rlhf.checkpoint import CheckpointError
from palm_rlhf.proto.v1 import reference_pb2, reference_pb2_grpc
from services.common.config import torch_device
from services.common.metrics import ServiceMetrics
from services.common.models import ensure_policy_store, resolve_checkpoint, store
from services.common.protoutil import model_info
from services.common.server import serve_app
from services.common.settings import ReferenceSettings
from services.reference.core import ReferenceCore

SERVICE = reference_pb2.DESCRIPTOR.services_by_name["Reference"].full_name


def _timeout(context) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e8 else None


class ReferenceServicer(reference_pb2_grpc.ReferenceServicer):
    def __init__(self, core: ReferenceCore, store_):
        self.core = core
        self.store = store_

    async def LogProbs(self, request, context):
        seqs = [(s.prompt_token_ids, s.response_token_ids) for s in request.sequences]
        out, version = await self.core.logprobs(seqs, timeout=_timeout(context))
        return reference_pb2.LogProbsResponse(
            results=[reference_pb2.SequenceLogProbs(logprobs=lp, total=float(sum(lp))) for lp in out],
            reference_version=version,
        )

    async def ModelInfo(self, request, context):
        return model_info("reference", self.core.model(), store=self.store, device=self.core.device,
                          max_batch=self.core.max_batch)


class ReferenceApp:
    name = "reference"
    service_names = (SERVICE,)
    admin_methods = frozenset()
    long_lived_methods = frozenset()

    def __init__(self, args: ReferenceSettings):
        self.args = args
        self.metrics = ServiceMetrics("reference")
        self.device = torch_device(args.device)
        self.store = store(args.data_dir, "policy")
        self.core = ReferenceCore(self.device, args.max_batch, self.metrics)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        reference_pb2_grpc.add_ReferenceServicer_to_server(ReferenceServicer(self.core, self.store), server)

    async def load(self) -> None:
        spec = self.args.checkpoint
        if not spec:
            # The frozen start of training: the oldest policy version (seeding an empty store).
            await asyncio.to_thread(ensure_policy_store, self.args.data_dir)
            versions = self.store.versions()
            if not versions:
                raise CheckpointError(f"the policy store {self.store.root} is empty")
            spec = versions[0]
        path, version = resolve_checkpoint(spec, self.store)
        await self.core.start(path, version)

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        await self.core.close()


def run(args: ReferenceSettings) -> int:
    return asyncio.run(serve_app(args, ReferenceApp(args)))
