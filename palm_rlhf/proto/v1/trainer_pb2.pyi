from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainerStatus(_message.Message):
    __slots__ = ("step", "policy_version", "reward_version", "last_metrics", "last_message", "busy", "last_update_unix", "policy_versions", "pending_feedback", "next_round", "next_round_unix", "last_outcome")
    class LastMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REWARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_METRICS_FIELD_NUMBER: _ClassVar[int]
    LAST_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    LAST_UPDATE_UNIX_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROUND_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROUND_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    step: int
    policy_version: str
    reward_version: str
    last_metrics: _containers.ScalarMap[str, float]
    last_message: str
    busy: bool
    last_update_unix: float
    policy_versions: _containers.RepeatedScalarFieldContainer[str]
    pending_feedback: int
    next_round: str
    next_round_unix: float
    last_outcome: str
    def __init__(self, step: _Optional[int] = ..., policy_version: _Optional[str] = ..., reward_version: _Optional[str] = ..., last_metrics: _Optional[_Mapping[str, float]] = ..., last_message: _Optional[str] = ..., busy: _Optional[bool] = ..., last_update_unix: _Optional[float] = ..., policy_versions: _Optional[_Iterable[str]] = ..., pending_feedback: _Optional[int] = ..., next_round: _Optional[str] = ..., next_round_unix: _Optional[float] = ..., last_outcome: _Optional[str] = ...) -> None: ...

class TriggerRequest(_message.Message):
    __slots__ = ("wait",)
    WAIT_FIELD_NUMBER: _ClassVar[int]
    wait: bool
    def __init__(self, wait: _Optional[bool] = ...) -> None: ...

class TriggerResponse(_message.Message):
    __slots__ = ("published", "policy_version", "metrics", "message", "step", "outcome")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    published: bool
    policy_version: str
    metrics: _containers.ScalarMap[str, float]
    message: str
    step: int
    outcome: str
    def __init__(self, published: _Optional[bool] = ..., policy_version: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., message: _Optional[str] = ..., step: _Optional[int] = ..., outcome: _Optional[str] = ...) -> None: ...

class WatchVersionsRequest(_message.Message):
    __slots__ = ("send_current",)
    SEND_CURRENT_FIELD_NUMBER: _ClassVar[int]
    send_current: bool
    def __init__(self, send_current: _Optional[bool] = ...) -> None: ...

class VersionAnnouncement(_message.Message):
    __slots__ = ("kind", "version", "previous_version", "reason", "timestamp")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    kind: str
    version: str
    previous_version: str
    reason: str
    timestamp: float
    def __init__(self, kind: _Optional[str] = ..., version: _Optional[str] = ..., previous_version: _Optional[str] = ..., reason: _Optional[str] = ..., timestamp: _Optional[float] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("version", "previous_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    previous_version: str
    def __init__(self, version: _Optional[str] = ..., previous_version: _Optional[str] = ...) -> None: ...
