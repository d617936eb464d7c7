"""The reward gRPC servicer and process."""

from __future__ import annotations

import asyncio

import grpc

from palm_rlhf.proto.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.common.config import torch_device
from services.common.metrics import ServiceMetrics
from services.common.models import default_start_checkpoint, resolve_checkpoint, store
from services.common.protoutil import model_info
from services.common.server import serve_app
from services.common.settings import RewardSettings
from services.reward.core import SCORERS, RewardCore, init_reward_store

SERVICE = reward_pb2.DESCRIPTOR.services_by_name["Reward"].full_name


def _timeout(context) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e8 else None


class RewardServicer(reward_pb2_grpc.RewardServicer):
    def __init__(self, core: RewardCore):
        self.core = core

    async def Score(self, request, context):
        items = [(it.prompt, list(it.responses)) for it in request.items]
        grouped, scorer, version = await self.core.score(items, request.scorer or None, request.all_scorers,
                                                         timeout=_timeout(context))
        return reward_pb2.ScoreResponse(
            results=[
                reward_pb2.ItemScores(scores=[
                    reward_pb2.ResponseScore(score=o.score, bin_probs=o.bin_probs, breakdown=o.breakdown) for o in item
                ])
                for item in grouped
            ],
            scorer=scorer,
            reward_version=version,
        )

    async def ModelInfo(self, request, context):
        m = self.core.model()
        return model_info("reward", m, store=self.core.store, device=self.core.device, module=m.model,
                          extra_config={"reward_head": m.manifest.get("metadata", {}).get("reward_head", {})},
                          scorers=list(SCORERS), default_scorer=self.core.default_scorer,
                          max_batch=self.core.max_batch)

    async def LoadVersion(self, request, context):
        new, old = await self.core.load_version(request.version)
        return common_pb2.LoadVersionResponse(version=new, previous_version=old)


class RewardApp:
    name = "reward"
    service_names = (SERVICE,)
    admin_methods = frozenset({f"/{SERVICE}/LoadVersion"})
    long_lived_methods = frozenset()

    def __init__(self, args: RewardSettings):
        self.args = args
        self.metrics = ServiceMetrics("reward")
        self.device = torch_device(args.device)
        self.store = store(args.data_dir, "reward")
        self.core = RewardCore(self.store, self.device, args.scorer, args.max_batch, self.metrics)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        reward_pb2_grpc.add_RewardServicer_to_server(RewardServicer(self.core), server)

    async def load(self) -> None:
        if not self.args.checkpoint and self.store.current() is None:
            policy_versions = store(self.args.data_dir, "policy").versions()
            start = (store(self.args.data_dir, "policy").path(policy_versions[0]) if policy_versions
                     else default_start_checkpoint())
            await asyncio.to_thread(init_reward_store, self.store, start, self.device)
        path, version = resolve_checkpoint(self.args.checkpoint, self.store)
        await self.core.start(path, version)

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        await self.core.close()


def run(args: RewardSettings) -> int:
    return asyncio.run(serve_app(args, RewardApp(args)))
