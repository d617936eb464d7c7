from palm_rlhf.proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreItem(_message.Message):
    __slots__ = ("prompt", "responses")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    responses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., responses: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "scorer", "all_scorers")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    ALL_SCORERS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    scorer: str
    all_scorers: bool
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., scorer: _Optional[str] = ..., all_scorers: _Optional[bool] = ...) -> None: ...

class ResponseScore(_message.Message):
    __slots__ = ("score", "bin_probs", "breakdown")
    class BreakdownEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BIN_PROBS_FIELD_NUMBER: _ClassVar[int]
    BREAKDOWN_FIELD_NUMBER: _ClassVar[int]
    score: float
    bin_probs: _containers.RepeatedScalarFieldContainer[float]
    breakdown: _containers.ScalarMap[str, float]
    def __init__(self, score: _Optional[float] = ..., bin_probs: _Optional[_Iterable[float]] = ..., breakdown: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ItemScores(_message.Message):
    __slots__ = ("scores",)
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[ResponseScore]
    def __init__(self, scores: _Optional[_Iterable[_Union[ResponseScore, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results", "scorer", "reward_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    REWARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ItemScores]
    scorer: str
    reward_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[ItemScores, _Mapping]]] = ..., scorer: _Optional[str] = ..., reward_version: _Optional[str] = ...) -> None: ...
