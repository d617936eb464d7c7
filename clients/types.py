"""Plain result types of the clients: callers get dataclasses, never protobuf messages, so their
code does not change when a contract gains a field."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TokenizerInfo:
    kind: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    sep_id: int
    spec: dict[str, Any]


@dataclass(frozen=True)
class ModelInfo:
    """What a policy, reference or reward service serves, and the limits requests must fit."""

    kind: str
    version: str
    config: dict[str, Any]
    tokenizer: TokenizerInfo
    max_seq_len: int
    num_parameters: int
    parent_version: str
    available_versions: list[str]
    device: str
    checkpoint_path: str
    scorers: list[str]
    default_scorer: str
    max_prompt_tokens: int
    max_new_tokens: int
    max_n: int
    max_batch: int

    @classmethod
    def from_proto(cls, m) -> ModelInfo:
        t = m.tokenizer
        return cls(
            kind=m.kind,
            version=m.version,
            config=json.loads(m.config_json) if m.config_json else {},
            tokenizer=TokenizerInfo(
                kind=t.kind, vocab_size=t.vocab_size, pad_id=t.pad_id, bos_id=t.bos_id, eos_id=t.eos_id,
                sep_id=t.sep_id, spec=json.loads(t.spec_json) if t.spec_json else {},
            ),
            max_seq_len=m.max_seq_len,
            num_parameters=m.num_parameters,
            parent_version=m.parent_version,
            available_versions=list(m.available_versions),
            device=m.device,
            checkpoint_path=m.checkpoint_path,
            scorers=list(m.scorers),
            default_scorer=m.default_scorer,
            max_prompt_tokens=m.max_prompt_tokens,
            max_new_tokens=m.max_new_tokens,
            max_n=m.max_n,
            max_batch=m.max_batch,
        )


@dataclass(frozen=True)
class ResponseScore:
    score: float
    bin_probs: list[float] = field(default_factory=list)
    breakdown: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoreResult:
    """Scores of the responses to one prompt, in response order."""

    scores: list[float]
    details: list[ResponseScore]
    scorer: str
    reward_version: str


@dataclass(frozen=True)
class Candidate:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "cancelled"
    matched_stop: str = ""


@dataclass(frozen=True)
class Generation:
    """The candidates sampled for one prompt."""

    prompt_token_ids: list[int]
    candidates: list[Candidate]
    policy_version: str

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.candidates]


@dataclass(frozen=True)
class StreamChunk:
    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None  # set on a candidate's last chunk
    policy_version: str
    prompt_token_ids: list[int]


@dataclass(frozen=True)
class VersionChange:
    """Result of a LoadVersion or Rollback call."""

    version: str
    previous_version: str
