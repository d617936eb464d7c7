"""Typed clients of the reward, policy and trainer services (palm_rlhf.v1 contracts).

Each takes ``addr`` ("host:port") and keyword options shared through :class:`GrpcClient`:
``timeout`` (the overall deadline of one call, retries included), ``retry``
(:class:`RetryPolicy`), ``max_message_bytes``, ``tls`` (``True`` or a :class:`TLSConfig`),
``admin_token`` (sent as ``authorization: Bearer ...`` on admin calls only) and ``metadata``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from palm_rlhf.proto.v1 import (
    common_pb2,
    policy_pb2,
    policy_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

from ._grpc import NO_RETRY, GrpcClient
from .types import Candidate, Generation, ModelInfo, ResponseScore, ScoreResult, StreamChunk, VersionChange

_FINISH = {
    policy_pb2.FINISH_REASON_STOP: "stop",
    policy_pb2.FINISH_REASON_LENGTH: "length",
    policy_pb2.FINISH_REASON_CANCELLED: "cancelled",
}

Prompt = str | Sequence[int]


class _ServesVersions(GrpcClient):
    """ModelInfo and the admin LoadVersion, which the policy and the reward service share."""

    _service: str  # "Policy" or "Reward"

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        resp = self._call(f"{self._service}/ModelInfo", self._stub.ModelInfo, common_pb2.ModelInfoRequest(),
                          timeout=timeout)
        return ModelInfo.from_proto(resp)

    def load_version(self, version: str = "", *, timeout: float | None = None) -> VersionChange:
        """Admin: serve ``version`` from the checkpoint store ("" = its CURRENT)."""
        resp = self._call(
            f"{self._service}/LoadVersion", self._stub.LoadVersion, common_pb2.LoadVersionRequest(version=version),
            timeout=timeout, admin=True,
        )
        return VersionChange(resp.version, resp.previous_version)


class RewardClient(_ServesVersions):
    """Scores text with the reward service.

    >>> with RewardClient("127.0.0.1:50053") as rc:            # doctest: +SKIP
    ...     rc.score("User: hi\\nAssistant:", [" Hello!", " Go away."]).scores
    [0.71, -0.12]
    """

    service_name = "palm_rlhf.v1.Reward"

    def __init__(self, addr: str, **kw):
        super().__init__(addr, **kw)
        self._service = "Reward"
        self._stub = reward_pb2_grpc.RewardStub(self.channel)

    def score(
        self,
        prompt: str,
        responses: Sequence[str],
        scorer: str | None = None,
        *,
        all_scorers: bool = False,
        timeout: float | None = None,
    ) -> ScoreResult:
        """Scores of ``responses`` (in order) as answers to ``prompt``."""
        if isinstance(responses, str):
            raise TypeError("responses must be a sequence of strings, not one string")
        return self.score_batch([(prompt, responses)], scorer, all_scorers=all_scorers, timeout=timeout)[0]

    def score_batch(
        self,
        items: Sequence[tuple[str, Sequence[str]]],
        scorer: str | None = None,
        *,
        all_scorers: bool = False,
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        """One :class:`ScoreResult` per ``(prompt, responses)`` item, in one request (the service
        limits the total number of responses; see :meth:`model_info` ``max_batch``)."""
        req = reward_pb2.ScoreRequest(
            items=[reward_pb2.ScoreItem(prompt=p, responses=list(rs)) for p, rs in items],
            scorer=scorer or "",
            all_scorers=all_scorers,
        )
        resp = self._call("Reward/Score", self._stub.Score, req, timeout=timeout)
        out = []
        for item in resp.results:
            details = [ResponseScore(s.score, list(s.bin_probs), dict(s.breakdown)) for s in item.scores]
            out.append(ScoreResult([d.score for d in details], details, resp.scorer, resp.reward_version))
        return out



def _prompt_proto(p: Prompt) -> policy_pb2.Prompt:
    if isinstance(p, str):
        return policy_pb2.Prompt(text=p)
    return policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[int(t) for t in p]))


def _sampling(
    n: int | None, temperature: float | None, top_k: int | None, top_p: float | None,
    max_new_tokens: int | None, stop: Sequence[str], stop_token_ids: Sequence[int], seed: int | None,
    return_logprobs: bool,
) -> policy_pb2.SamplingParams:
    sp = policy_pb2.SamplingParams(stop=list(stop), stop_token_ids=list(stop_token_ids),
                                   return_logprobs=return_logprobs)
    # only set what the caller set, so the service's defaults apply to the rest
    for name, value in (("n", n), ("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                        ("max_new_tokens", max_new_tokens), ("seed", seed)):
        if value is not None:
            setattr(sp, name, value)
    return sp


class PolicyClient(_ServesVersions):
    """Samples completions from the policy service.

    A prompt is text (encoded by the service, BOS prepended) or a list of token ids (used as
    given). Sampling arguments left at None take the service's defaults.
    """

    service_name = "palm_rlhf.v1.Policy"

    def __init__(self, addr: str, **kw):
        super().__init__(addr, **kw)
        self._service = "Policy"
        self._stub = policy_pb2_grpc.PolicyStub(self.channel)

    def generate_many(
        self,
        prompts: Sequence[Prompt],
        *,
        n: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
        return_logprobs: bool = False,
        timeout: float | None = None,
    ) -> list[Generation]:
        """One :class:`Generation` (``n`` candidates) per prompt, all from one policy version."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of prompts; use generate() for one prompt")
        req = policy_pb2.GenerateRequest(
            prompts=[_prompt_proto(p) for p in prompts],
            params=_sampling(n, temperature, top_k, top_p, max_new_tokens, stop, stop_token_ids, seed,
                             return_logprobs),
        )
        resp = self._call("Policy/Generate", self._stub.Generate, req, timeout=timeout)
        return [
            Generation(
                prompt_token_ids=list(r.prompt_token_ids),
                candidates=[
                    Candidate(c.text, list(c.token_ids), list(c.logprobs), _FINISH.get(c.finish_reason, "stop"),
                              c.matched_stop)
                    for c in r.candidates
                ],
                policy_version=resp.policy_version,
            )
            for r in resp.results
        ]

    def generate(self, prompt: Prompt, **kw) -> Generation:
        """The candidates for one prompt (keywords as in :meth:`generate_many`)."""
        return self.generate_many([prompt], **kw)[0]

    def generate_stream(
        self,
        prompt: Prompt,
        *,
        n: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
        return_logprobs: bool = False,
        timeout: float | None = None,
    ) -> Iterator[StreamChunk]:
        """Chunks as the policy samples them; candidates interleave (see ``sample_index``).

        When the deadline is about to pass the service ends each unfinished candidate with
        ``finish_reason == "cancelled"`` instead of failing."""
        req = policy_pb2.GenerateRequest(
            prompts=[_prompt_proto(prompt)],
            params=_sampling(n, temperature, top_k, top_p, max_new_tokens, stop, stop_token_ids, seed,
                             return_logprobs),
        )
        for c in self._stream("Policy/GenerateStream", self._stub.GenerateStream, req, timeout=timeout):
            yield StreamChunk(
                prompt_index=c.prompt_index, sample_index=c.sample_index, text=c.text, token_ids=list(c.token_ids),
                logprobs=list(c.logprobs), finish_reason=_FINISH.get(c.finish_reason),
                policy_version=c.policy_version, prompt_token_ids=list(c.prompt_token_ids),
            )



class TrainerClient(GrpcClient):
    """Observes and steers the learning loop."""

    service_name = "palm_rlhf.v1.Trainer"

    def __init__(self, addr: str, **kw):
        super().__init__(addr, **kw)
        self._stub = trainer_pb2_grpc.TrainerStub(self.channel)

    def status(self, *, timeout: float | None = None) -> trainer_pb2.TrainerStatus:
        return self._call("Trainer/Status", self._stub.Status, trainer_pb2.StatusRequest(), timeout=timeout)

    def trigger(self, wait: bool = True, *, timeout: float | None = None) -> trainer_pb2.TriggerResponse:
        """Admin: run one update round. Never retried: a round that started must not run twice."""
        return self._call("Trainer/Trigger", self._stub.Trigger, trainer_pb2.TriggerRequest(wait=wait),
                          timeout=timeout, admin=True, retry=NO_RETRY)

    def rollback(self, version: str = "", *, timeout: float | None = None) -> VersionChange:
        """Admin: make ``version`` (default: the parent of the current one) the current policy."""
        resp = self._call("Trainer/Rollback", self._stub.Rollback, trainer_pb2.RollbackRequest(version=version),
                          timeout=timeout, admin=True)
        return VersionChange(resp.version, resp.previous_version)
