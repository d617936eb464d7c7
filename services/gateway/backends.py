"""What the gateway needs from the model services, and its gRPC implementation.

The gateway holds no model. It asks the policy for candidates and the reward service for their
scores through the small :class:`Backends` interface, so that the HTTP layer can be tested and
benchmarked against any honest implementation; :class:`GrpcBackends` is the one used in
production, speaking the ``palm_rlhf.v1`` contracts.

Every call has a deadline. Calls that fail with UNAVAILABLE (a replica restarting, a connection
not yet up) are retried by the services' shared retry policy (services/common/client.py) with
exponential backoff while the deadline allows; other failures are
reported at once as :class:`BackendError` with a category the HTTP layer maps to a status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class SamplingOptions:
    """Sampling parameters as the HTTP API names them; None means the policy's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias; <= -100 bans
    min_tokens: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    top_logprobs: int = 0  # alternatives per generated token (0: none)


# one alternative token: (token id, log-prob, the bytes it stands for)
Alternative = tuple[int, float, bytes]


@dataclass
class GeneratedCandidate:
    sample_index: int
    text: str  # decoded, without the prompt, EOS or a matched stop sequence
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "cancelled"
    token_bytes: list[bytes] = field(default_factory=list)  # per token
    top_logprobs: list[list[Alternative]] = field(default_factory=list)  # per token, with top_logprobs


@dataclass
class Generation:
    prompt_token_ids: list[int]
    candidates: list[GeneratedCandidate]
    policy_version: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class StreamEvent:
    """New tokens for one candidate; ``finish_reason`` is set on the candidate's last event."""

    sample_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    policy_version: str
    prompt_token_ids: list[int]
    token_bytes: list[bytes] = field(default_factory=list)
    top_logprobs: list[list[Alternative]] = field(default_factory=list)


@dataclass
class ScoreResult:
    scores: list[float]
    reward_version: str


class BackendError(Exception):
    """A backend call failed. ``kind`` is one of: invalid_argument, limit (the request exceeds
    a serving limit), unavailable, timeout, overloaded (try again later), internal."""

    def __init__(self, backend: str, kind: str, message: str):
        super().__init__(f"{backend}: {message}")
        self.backend = backend
        self.kind = kind
        self.message = message


class Backends(Protocol):
    async def generate(self, prompt_text: str, n: int, params: SamplingOptions) -> Generation: ...

    def generate_stream(
        self, prompt_text: str, n: int, params: SamplingOptions
    ) -> AsyncIterator[StreamEvent]: ...

    async def score(self, prompt_text: str, responses: list[str]) -> ScoreResult: ...

    async def health(self) -> dict[str, str]:
        """Backend name -> grpc.health.v1 status name ("SERVING", "NOT_SERVING", ...) or
        "UNAVAILABLE" when it cannot be reached."""
        ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------------------------
# gRPC implementation

_MAX_MESSAGE = 64 * 1024 * 1024


def _alternatives(tops) -> list[list[Alternative]]:
    return [list(zip(t.token_ids, t.logprobs, t.token_bytes)) for t in tops]
_FINISH = {1: "stop", 2: "length", 3: "cancelled"}


@dataclass
class BackendTimeouts:
    generate_s: float = 120.0
    score_s: float = 30.0
    health_s: float = 2.0
    retry_budget_s: float = 5.0  # at most this long spent waiting between UNAVAILABLE retries


class GrpcBackends:
    """Backends over gRPC: policy ``Generate``/``GenerateStream``, reward ``Score``, and the
    standard health service of each."""

    def __init__(
        self,
        policy_addr: str,
        reward_addr: str,
        *,
        timeouts: BackendTimeouts | None = None,
        scorer: str = "",
        on_error: Callable[[str, str], None] | None = None,
    ):
        import grpc

        from palm_rlhf.proto.v1 import policy_pb2_grpc, reward_pb2_grpc

        self._grpc = grpc
        self.timeouts = timeouts or BackendTimeouts()
        self.scorer = scorer
        self._on_error = on_error or (lambda backend, kind: None)
        from services.common.client import RetryPolicy, create_channel

        # UNAVAILABLE (a replica restarting, a connection not yet up) is retried by _call under
        # the call's deadline and the retry budget; gRPC's built-in retries stay off so the two
        # never multiply. Reconnects are as eager as these retries.
        self.retry = RetryPolicy(max_attempts=1_000, initial_backoff=0.05, max_backoff=1.0,
                                 budget=self.timeouts.retry_budget_s)
        self.addrs = {"policy": policy_addr, "reward": reward_addr}
        self._channels = {
            name: create_channel(addr, max_message_bytes=_MAX_MESSAGE, retries=0)
            for name, addr in self.addrs.items()
        }
        self._policy = policy_pb2_grpc.PolicyStub(self._channels["policy"])
        self._reward = reward_pb2_grpc.RewardStub(self._channels["reward"])

    # -- helpers -------------------------------------------------------------------------

    def _error(self, backend: str, e: Exception) -> BackendError:
        grpc = self._grpc
        if isinstance(e, grpc.aio.AioRpcError):
            code = e.code()
            kind = {
                grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
                grpc.StatusCode.OUT_OF_RANGE: "invalid_argument",
                grpc.StatusCode.FAILED_PRECONDITION: "invalid_argument",
                grpc.StatusCode.UNAVAILABLE: "unavailable",
                grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
                # the services use RESOURCE_EXHAUSTED for a request over a serving limit (too
                # many tokens, samples or prompts): the client must ask for less
                grpc.StatusCode.RESOURCE_EXHAUSTED: "limit",
            }.get(code, "internal")
            msg = e.details() or code.name
            from services.common.errors import OVERLOADED_KEY

            if kind == "limit" and any(k == OVERLOADED_KEY for k, _ in (e.trailing_metadata() or ())):
                kind = "overloaded"  # at capacity, not over a limit: the same request may pass soon
            if kind == "timeout":
                msg = f"no answer from the {backend} service before the deadline"
            elif kind == "unavailable":
                msg = f"the {backend} service at {self.addrs[backend]} is unavailable ({e.details()})"
            err = BackendError(backend, kind, msg)
        else:
            err = BackendError(backend, "internal", f"{type(e).__name__}: {e}")
        self._on_error(backend, err.kind)
        return err

    async def _call(self, backend: str, fn: Callable[[float], Awaitable[T]], timeout: float) -> T:
        """Run ``fn(remaining_timeout)``, retrying UNAVAILABLE per ``self.retry`` until the
        deadline (and the retry budget) runs out."""
        from services.common.client import call_with_retry

        def retrying(attempt: int, code, wait: float) -> None:
            log.info("%s %s, retrying in %.2fs", backend, code.name, wait)

        try:
            return await call_with_retry(fn, timeout=timeout, policy=self.retry, on_retry=retrying)
        except self._grpc.aio.AioRpcError as e:
            raise self._error(backend, e) from None

    def _request(self, prompt_text: str, n: int, params: SamplingOptions):
        from palm_rlhf.proto.v1 import policy_pb2

        sp = policy_pb2.SamplingParams(n=n, return_logprobs=True, stop=list(params.stop))
        if params.max_tokens is not None:
            sp.max_new_tokens = params.max_tokens
        if params.temperature is not None:
            sp.temperature = params.temperature
        if params.top_p is not None:
            sp.top_p = params.top_p
        if params.top_k is not None:
            sp.top_k = params.top_k
        if params.seed is not None:
            sp.seed = params.seed
        for name in ("min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens"):
            value = getattr(params, name)
            if value is not None:
                setattr(sp, name, value)
        for token, bias in params.logit_bias.items():
            sp.logit_bias[int(token)] = float(bias)
        sp.stop_token_ids.extend(params.stop_token_ids)
        sp.ignore_eos = params.ignore_eos
        sp.top_logprobs = params.top_logprobs
        return policy_pb2.GenerateRequest(prompts=[policy_pb2.Prompt(text=prompt_text)], params=sp)

    # -- Backends ------------------------------------------------------------------------

    async def generate(self, prompt_text: str, n: int, params: SamplingOptions) -> Generation:
        req = self._request(prompt_text, n, params)
        resp = await self._call(
            "policy", lambda t: self._policy.Generate(req, timeout=t), self.timeouts.generate_s
        )
        result = resp.results[0]
        return Generation(
            prompt_token_ids=list(result.prompt_token_ids),
            candidates=[
                GeneratedCandidate(
                    sample_index=i,
                    text=c.text,
                    token_ids=list(c.token_ids),
                    logprobs=list(c.logprobs),
                    finish_reason=_FINISH.get(c.finish_reason, "stop"),
                    token_bytes=list(c.token_bytes),
                    top_logprobs=_alternatives(c.top_logprobs),
                )
                for i, c in enumerate(result.candidates)
            ],
            policy_version=resp.policy_version,
            prompt_tokens=int(resp.usage.prompt_tokens),
            completion_tokens=int(resp.usage.completion_tokens),
        )

    async def generate_stream(
        self, prompt_text: str, n: int, params: SamplingOptions
    ) -> AsyncIterator[StreamEvent]:
        from services.common.client import stream_with_retry

        req = self._request(prompt_text, n, params)
        # retried only while nothing has been received yet
        stream = stream_with_retry(lambda t: self._policy.GenerateStream(req, timeout=t),
                                   timeout=self.timeouts.generate_s, policy=self.retry)
        try:
            async for chunk in stream:
                yield StreamEvent(
                    sample_index=chunk.sample_index,
                    text=chunk.text,
                    token_ids=list(chunk.token_ids),
                    logprobs=list(chunk.logprobs),
                    finish_reason=_FINISH.get(chunk.finish_reason) if chunk.finish_reason else None,
                    policy_version=chunk.policy_version,
                    prompt_token_ids=list(chunk.prompt_token_ids),
                    token_bytes=list(chunk.token_bytes),
                    top_logprobs=_alternatives(chunk.top_logprobs),
                )
        except self._grpc.aio.AioRpcError as e:
            raise self._error("policy", e) from None
        finally:
            await stream.aclose()

    async def score(self, prompt_text: str, responses: list[str]) -> ScoreResult:
        from palm_rlhf.proto.v1 import reward_pb2

        req = reward_pb2.ScoreRequest(
            items=[reward_pb2.ScoreItem(prompt=prompt_text, responses=responses)], scorer=self.scorer
        )
        resp = await self._call("reward", lambda t: self._reward.Score(req, timeout=t), self.timeouts.score_s)
        scores = [float(s.score) for s in resp.results[0].scores]
        if len(scores) != len(responses):
            raise BackendError("reward", "internal", f"{len(scores)} scores for {len(responses)} responses")
        # the learned scorer names its checkpoint version; a rule-based scorer is its own version
        version = resp.reward_version or (f"{resp.scorer}" if resp.scorer else "")
        return ScoreResult(scores=scores, reward_version=version)

    async def health(self) -> dict[str, str]:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async def check(name: str) -> str:
            stub = health_pb2_grpc.HealthStub(self._channels[name])
            try:
                resp = await stub.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=self.timeouts.health_s
                )
            except self._grpc.aio.AioRpcError as e:
                return "UNAVAILABLE" if e.code() != self._grpc.StatusCode.NOT_FOUND else "SERVICE_UNKNOWN"
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

        names = list(self._channels)
        statuses = await asyncio.gather(*(check(n) for n in names))
        return dict(zip(names, statuses))

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
