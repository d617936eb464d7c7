"""The trainer gRPC servicer and process (a thin layer over TrainerCore)."""

from __future__ import annotations

import asyncio
import importlib
import logging

import grpc

from palm_rlhf.proto.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.metrics import ServiceMetrics
from services.common.server import serve_app
from services.common.settings import TrainerSettings
from services.trainer.core import RoundSchedule, TrainerCore, UpdateFn

log = logging.getLogger(__name__)

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    def __init__(self, core: TrainerCore):
        self.core = core

    async def Status(self, request, context):
        s = await asyncio.to_thread(self.core.status)
        return trainer_pb2.TrainerStatus(**s)

    async def Trigger(self, request, context):
        r = await self.core.trigger(wait=request.wait)
        return trainer_pb2.TriggerResponse(published=r.published, policy_version=r.policy_version, metrics=r.metrics,
                                           message=r.message, step=r.step, outcome=r.outcome)

    async def WatchVersions(self, request, context):
        async for ann in self.core.watch(send_current=request.send_current):
            yield trainer_pb2.VersionAnnouncement(kind=ann.kind, version=ann.version, previous_version=ann.previous,
                                                  reason=ann.reason, timestamp=ann.timestamp)

    async def Rollback(self, request, context):
        new, old = await self.core.rollback(request.version or None)
        return trainer_pb2.RollbackResponse(version=new, previous_version=old)


def load_update_fn(spec: str | None, args: TrainerSettings) -> UpdateFn | None:
    """``module:factory`` -> factory(args), the update callable; None for the default."""
    if not spec:
        return None
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--update-fn must look like 'package.module:factory', got {spec!r}")
    factory = getattr(importlib.import_module(module), attr)
    return factory(args)


class TrainerApp:
    name = "trainer"
    service_names = (SERVICE,)
    admin_methods = frozenset({f"/{SERVICE}/Trigger", f"/{SERVICE}/Rollback"})
    long_lived_methods = frozenset({f"/{SERVICE}/WatchVersions"})

    def __init__(self, args: TrainerSettings, update_fn: UpdateFn | None = None):
        self.args = args
        self.metrics = ServiceMetrics("trainer")
        schedule = RoundSchedule(after_feedback=int(getattr(args, "round_after_feedback", 0) or 0),
                                 after_seconds=float(getattr(args, "round_after_seconds", 0.0) or 0.0),
                                 poll=float(getattr(args, "round_poll", 5.0) or 5.0))
        self.core = TrainerCore(args.data_dir, update_fn, self.metrics, schedule)
        self._tasks: list[asyncio.Task] = []

    def add_to_server(self, server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServicer_to_server(TrainerServicer(self.core), server)

    async def load(self) -> None:
        if self.args.update_fn:
            self.core.update_fn = await asyncio.to_thread(load_update_fn, self.args.update_fn, self.args)
        await self.core.start()
        if self.args.store_poll > 0:
            self._tasks.append(asyncio.create_task(self.core.poll_store(self.args.store_poll)))
        if self.args.update_interval > 0:
            self._tasks.append(asyncio.create_task(self.core.run_periodically(self.args.update_interval)))
        elif self.core.schedule.enabled:
            self._tasks.append(asyncio.create_task(self.core.run_scheduled()))

    async def drain(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.core.close()

    async def close(self) -> None:
        pass


def run(args: TrainerSettings) -> int:
    return asyncio.run(serve_app(args, TrainerApp(args)))
