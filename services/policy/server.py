"""The policy gRPC servicer (thin: converts messages and calls PolicyCore) and its process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from palm_rlhf.proto.v1 import common_pb2, policy_pb2, policy_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.common.client import RetryPolicy, create_channel
from services.common.config import torch_device
from services.common.errors import InvalidArgument
from services.common.metrics import ServiceMetrics
from services.common.models import ensure_policy_store, resolve_checkpoint, store
from services.common.protoutil import model_info
from services.common.server import serve_app
from services.policy.core import GenerationOut, GenParams, PolicyCore, PolicyLimits, StreamEvent

log = logging.getLogger(__name__)

# Reconnecting to the trainer's announcement stream: a subscription is never given up, so only
# the backoff of the shared policy applies (0.5 s doubling to 10 s, jittered).
FOLLOW_RETRY = RetryPolicy(max_attempts=1, initial_backoff=0.5, max_backoff=10.0, multiplier=2.0, jitter=0.5)

SERVICE = policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name
FINISH = {
    "stop": policy_pb2.FINISH_REASON_STOP,
    "length": policy_pb2.FINISH_REASON_LENGTH,
    "cancelled": policy_pb2.FINISH_REASON_CANCELLED,
}


def _prompts(request: policy_pb2.GenerateRequest) -> list:
    out = []
    for i, p in enumerate(request.prompts):
        which = p.WhichOneof("input")
        if which == "text":
            out.append(p.text)
        elif which == "token_ids":
            out.append(list(p.token_ids.ids))
        else:
            raise InvalidArgument(f"prompt {i} has neither text nor token_ids")
    return out


def _params(request: policy_pb2.GenerateRequest) -> GenParams:
    p = request.params
    return GenParams(
        n=p.n if p.HasField("n") else None,
        temperature=p.temperature if p.HasField("temperature") else None,
        top_k=p.top_k if p.HasField("top_k") else None,
        top_p=p.top_p if p.HasField("top_p") else None,
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else None,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        seed=p.seed if p.HasField("seed") else None,
        return_logprobs=p.return_logprobs,
        min_p=p.min_p if p.HasField("min_p") else None,
        presence_penalty=p.presence_penalty if p.HasField("presence_penalty") else None,
        frequency_penalty=p.frequency_penalty if p.HasField("frequency_penalty") else None,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else None,
        logit_bias=dict(p.logit_bias),
        min_tokens=p.min_tokens if p.HasField("min_tokens") else None,
        ignore_eos=p.ignore_eos,
        top_logprobs=p.top_logprobs,
    )


def alternatives_to_proto(tops) -> list[policy_pb2.TokenAlternatives]:
    return [
        policy_pb2.TokenAlternatives(token_ids=[t for t, _, _ in top], logprobs=[lp for _, lp, _ in top],
                                     token_bytes=[b for _, _, b in top])
        for top in tops
    ]


def _timeout(context) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e8 else None


def generation_to_proto(out: GenerationOut) -> policy_pb2.GenerateResponse:
    results = []
    for ids, cands in zip(out.prompt_token_ids, out.candidates):
        results.append(policy_pb2.PromptResult(
            prompt_token_ids=ids,
            candidates=[
                policy_pb2.Candidate(text=c.text, token_ids=c.token_ids, logprobs=c.logprobs,
                                     finish_reason=FINISH[c.finish_reason], matched_stop=c.matched_stop,
                                     token_bytes=c.token_bytes, top_logprobs=alternatives_to_proto(c.top_logprobs))
                for c in cands
            ],
        ))
    usage = policy_pb2.Usage(prompt_tokens=sum(len(p) for p in out.prompt_token_ids),
                             completion_tokens=out.completion_tokens)
    return policy_pb2.GenerateResponse(results=results, policy_version=out.version, usage=usage)


def event_to_proto(ev: StreamEvent) -> policy_pb2.GenerateStreamChunk:
    return policy_pb2.GenerateStreamChunk(
        prompt_index=ev.prompt_index, sample_index=ev.sample_index, token_ids=ev.token_ids, text=ev.text,
        logprobs=ev.logprobs,
        finish_reason=FINISH[ev.finish_reason] if ev.finish_reason else policy_pb2.FINISH_REASON_UNSPECIFIED,
        policy_version=ev.version, prompt_token_ids=ev.prompt_token_ids,
        token_bytes=ev.token_bytes, top_logprobs=alternatives_to_proto(ev.top_logprobs),
    )


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    def __init__(self, core: PolicyCore, device: str):
        self.core = core
        self.device = device

    async def Generate(self, request, context):
        out = await self.core.generate(_prompts(request), _params(request), timeout=_timeout(context))
        return generation_to_proto(out)

    async def GenerateStream(self, request, context) -> AsyncIterator[policy_pb2.GenerateStreamChunk]:
        async for ev in self.core.generate_stream(_prompts(request), _params(request), timeout=_timeout(context)):
            yield event_to_proto(ev)

    async def ModelInfo(self, request, context):
        m = self.core._model()
        lim = self.core.limits
        return model_info("policy", m, store=self.core.store, device=self.device, max_prompt_tokens=lim.max_prompt_tokens,
                          max_new_tokens=lim.max_new_tokens, max_n=lim.max_n, max_batch=lim.max_batch)

    async def LoadVersion(self, request, context):
        new, old = await self.core.load_version(request.version)
        return common_pb2.LoadVersionResponse(version=new, previous_version=old)


class PolicyApp:
    """The policy process: servicer, model loading and version following."""

    name = "policy"
    service_names = (SERVICE,)
    admin_methods = frozenset({f"/{SERVICE}/LoadVersion"})
    long_lived_methods = frozenset()

    def __init__(self, args):
        """``args``: the process's PolicySettings (services/common/settings.py)."""
        self.args = args
        self.metrics = ServiceMetrics("policy")
        self.device = torch_device(args.device)
        self.store = store(args.data_dir, "policy")
        limits = PolicyLimits(
            max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
            default_max_new_tokens=min(args.default_max_new_tokens, args.max_new_tokens), max_n=args.max_n,
            max_batch=args.max_batch, max_batch_rows=args.max_batch_rows, max_queue_rows=args.max_queue_rows,
            batch_window_s=args.batch_window_ms / 1000,
            batch_threads=args.batch_threads, batch_threads_min_rows=args.batch_threads_min_rows,
            base_threads=args.torch_threads,
        )
        self.core = PolicyCore(self.store, self.device, limits, self.metrics, quantize=args.quantize)
        self._tasks: list[asyncio.Task] = []

    def add_to_server(self, server: grpc.aio.Server) -> None:
        policy_pb2_grpc.add_PolicyServicer_to_server(PolicyServicer(self.core, self.device), server)

    async def load(self) -> None:
        if not self.args.checkpoint:
            await asyncio.to_thread(ensure_policy_store, self.args.data_dir)
        path, version = resolve_checkpoint(self.args.checkpoint, self.store)
        await self.core.start(path, version)
        if str(self.device).startswith("cuda"):  # which serving paths run on the Triton kernels, and why not
            from kernels.report import format_kernel_report

            print(format_kernel_report(self.core.current.model, self.device), flush=True)
        else:  # build (or load) and self-check the CPU decode kernel now, not on the first request
            from kernels import cpu_decode

            ok = await asyncio.to_thread(cpu_decode.available)
            log.info("CPU decode kernel: %s", "on" if ok else "off (the PyTorch path decodes)")
        if self.args.follow_trainer:
            self._tasks.append(asyncio.create_task(self._follow_trainer(), name="follow-trainer"))
        if self.args.follow_store > 0:
            self._tasks.append(asyncio.create_task(self._follow_store(), name="follow-store"))

    async def _switch(self, version: str, why: str) -> None:
        if self.core.current is not None and version == self.core.current.version:
            return
        try:
            await self.core.load_version(version)
            log.info("switched to %s (%s)", version, why)
        except Exception as e:  # noqa: BLE001 - keep serving the old version
            log.warning("could not switch to %s (%s): %s", version, why, e)

    async def _follow_trainer(self) -> None:
        """Subscribe to the trainer's announcements, reconnecting with the shared backoff
        (FOLLOW_RETRY; it starts again from the shortest wait once an announcement arrives)."""
        failures = 0
        while True:
            try:
                async with create_channel(self.args.trainer_addr, max_message_bytes=self.args.max_message_bytes) as ch:
                    stub = trainer_pb2_grpc.TrainerStub(ch)
                    call = stub.WatchVersions(trainer_pb2.WatchVersionsRequest(send_current=True))
                    async for ann in call:
                        failures = 0
                        if ann.kind in ("", "policy") and ann.version:
                            await self._switch(ann.version, f"trainer: {ann.reason}")
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                log.debug("trainer %s not reachable (%s); retrying", self.args.trainer_addr, e.code())
            except Exception:
                log.exception("following the trainer failed; retrying")
            failures += 1
            await asyncio.sleep(FOLLOW_RETRY.backoff(failures))

    async def _follow_store(self) -> None:
        while True:
            await asyncio.sleep(self.args.follow_store)
            try:
                version = await asyncio.to_thread(self.store.current)
            except Exception:
                log.exception("reading the store's CURRENT failed")
                continue
            if version:
                await self._switch(version, "store CURRENT changed")

    async def drain(self) -> None:
        for t in self._tasks:
            t.cancel()

    async def close(self) -> None:
        await self.core.close()


def run(args) -> int:
    return asyncio.run(serve_app(args, PolicyApp(args)))
