import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExperimentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPERIMENT_STATE_UNSPECIFIED: _ClassVar[ExperimentState]
    QUEUED: _ClassVar[ExperimentState]
    ASSIGNED: _ClassVar[ExperimentState]
    RUNNING: _ClassVar[ExperimentState]
    COMPLETED: _ClassVar[ExperimentState]
    FAILED: _ClassVar[ExperimentState]
    CANCELLED: _ClassVar[ExperimentState]

class ExperimentKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPERIMENT_KIND_UNSPECIFIED: _ClassVar[ExperimentKind]
    SPEC: _ClassVar[ExperimentKind]
    ATTACHED: _ClassVar[ExperimentKind]
    CODE: _ClassVar[ExperimentKind]

class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_UNSPECIFIED: _ClassVar[Scope]
    STEP: _ClassVar[Scope]
    EPOCH: _ClassVar[Scope]

class ControlKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTROL_KIND_UNSPECIFIED: _ClassVar[ControlKind]
    SET_LR: _ClassVar[ControlKind]
    SCALE_LR: _ClassVar[ControlKind]
    SET_LR_DECAY: _ClassVar[ControlKind]
    SET_EMA_DECAY: _ClassVar[ControlKind]
    SET_WEIGHT_DECAY: _ClassVar[ControlKind]
    SET_KNOB: _ClassVar[ControlKind]

class ControlStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTROL_STATUS_UNSPECIFIED: _ClassVar[ControlStatus]
    PENDING: _ClassVar[ControlStatus]
    APPLIED: _ClassVar[ControlStatus]
    REJECTED: _ClassVar[ControlStatus]
    EXPIRED: _ClassVar[ControlStatus]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_CANCELLED: _ClassVar[StopReason]
    STOP_FENCED: _ClassVar[StopReason]

class ControlSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTROL_SOURCE_UNSPECIFIED: _ClassVar[ControlSource]
    LIVE: _ClassVar[ControlSource]
    SCHEDULED: _ClassVar[ControlSource]
    REPLAYED: _ClassVar[ControlSource]
    CONSOLE: _ClassVar[ControlSource]

class LogStream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOG_STREAM_UNSPECIFIED: _ClassVar[LogStream]
    STDOUT: _ClassVar[LogStream]
    STDERR: _ClassVar[LogStream]
    LOGGING: _ClassVar[LogStream]
    SYSTEM: _ClassVar[LogStream]

class ArtifactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_KIND_UNSPECIFIED: _ClassVar[ArtifactKind]
    ARTIFACT_CODE: _ClassVar[ArtifactKind]
    ARTIFACT_CHECKPOINT: _ClassVar[ArtifactKind]
    ARTIFACT_FILE: _ClassVar[ArtifactKind]
EXPERIMENT_STATE_UNSPECIFIED: ExperimentState
QUEUED: ExperimentState
ASSIGNED: ExperimentState
RUNNING: ExperimentState
COMPLETED: ExperimentState
FAILED: ExperimentState
CANCELLED: ExperimentState
EXPERIMENT_KIND_UNSPECIFIED: ExperimentKind
SPEC: ExperimentKind
ATTACHED: ExperimentKind
CODE: ExperimentKind
SCOPE_UNSPECIFIED: Scope
STEP: Scope
EPOCH: Scope
CONTROL_KIND_UNSPECIFIED: ControlKind
SET_LR: ControlKind
SCALE_LR: ControlKind
SET_LR_DECAY: ControlKind
SET_EMA_DECAY: ControlKind
SET_WEIGHT_DECAY: ControlKind
SET_KNOB: ControlKind
CONTROL_STATUS_UNSPECIFIED: ControlStatus
PENDING: ControlStatus
APPLIED: ControlStatus
REJECTED: ControlStatus
EXPIRED: ControlStatus
STOP_REASON_UNSPECIFIED: StopReason
STOP_CANCELLED: StopReason
STOP_FENCED: StopReason
CONTROL_SOURCE_UNSPECIFIED: ControlSource
LIVE: ControlSource
SCHEDULED: ControlSource
REPLAYED: ControlSource
CONSOLE: ControlSource
LOG_STREAM_UNSPECIFIED: LogStream
STDOUT: LogStream
STDERR: LogStream
LOGGING: LogStream
SYSTEM: LogStream
ARTIFACT_KIND_UNSPECIFIED: ArtifactKind
ARTIFACT_CODE: ArtifactKind
ARTIFACT_CHECKPOINT: ArtifactKind
ARTIFACT_FILE: ArtifactKind

class Knob(_message.Message):
    __slots__ = ("name", "value", "low", "high")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    low: float
    high: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., low: _Optional[float] = ..., high: _Optional[float] = ...) -> None: ...

class Experiment(_message.Message):
    __slots__ = ("id", "name", "state", "spec", "created_at", "started_at", "finished_at", "attempt", "worker_id", "message", "summary", "last_step", "replay_of", "spec_json", "tags", "note", "kind", "knobs", "code_sha256")
    class SummaryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    REPLAY_OF_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    CODE_SHA256_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    state: ExperimentState
    spec: _struct_pb2.Struct
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    attempt: int
    worker_id: str
    message: str
    summary: _containers.ScalarMap[str, float]
    last_step: int
    replay_of: int
    spec_json: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    note: str
    kind: ExperimentKind
    knobs: _containers.RepeatedCompositeFieldContainer[Knob]
    code_sha256: str
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., state: _Optional[_Union[ExperimentState, str]] = ..., spec: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt: _Optional[int] = ..., worker_id: _Optional[str] = ..., message: _Optional[str] = ..., summary: _Optional[_Mapping[str, float]] = ..., last_step: _Optional[int] = ..., replay_of: _Optional[int] = ..., spec_json: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., note: _Optional[str] = ..., kind: _Optional[_Union[ExperimentKind, str]] = ..., knobs: _Optional[_Iterable[_Union[Knob, _Mapping]]] = ..., code_sha256: _Optional[str] = ...) -> None: ...

class MetricBatch(_message.Message):
    __slots__ = ("experiment_id", "attempt", "seq", "scope", "names", "rows")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    attempt: int
    seq: int
    scope: Scope
    names: _containers.RepeatedScalarFieldContainer[str]
    rows: _containers.RepeatedCompositeFieldContainer[MetricRow]
    def __init__(self, experiment_id: _Optional[int] = ..., attempt: _Optional[int] = ..., seq: _Optional[int] = ..., scope: _Optional[_Union[Scope, str]] = ..., names: _Optional[_Iterable[str]] = ..., rows: _Optional[_Iterable[_Union[MetricRow, _Mapping]]] = ...) -> None: ...

class MetricRow(_message.Message):
    __slots__ = ("step", "epoch", "wall_time", "values")
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    step: int
    epoch: int
    wall_time: float
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, step: _Optional[int] = ..., epoch: _Optional[int] = ..., wall_time: _Optional[float] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class ControlRecord(_message.Message):
    __slots__ = ("command_id", "experiment_id", "kind", "value", "status", "source", "requested_at", "applied_at", "applied_step", "old_value", "new_value", "message", "at_step", "consequence", "hold", "knob")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_FIELD_NUMBER: _ClassVar[int]
    APPLIED_AT_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    OLD_VALUE_FIELD_NUMBER: _ClassVar[int]
    NEW_VALUE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AT_STEP_FIELD_NUMBER: _ClassVar[int]
    CONSEQUENCE_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    KNOB_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    experiment_id: int
    kind: ControlKind
    value: float
    status: ControlStatus
    source: ControlSource
    requested_at: _timestamp_pb2.Timestamp
    applied_at: _timestamp_pb2.Timestamp
    applied_step: int
    old_value: float
    new_value: float
    message: str
    at_step: int
    consequence: str
    hold: bool
    knob: str
    def __init__(self, command_id: _Optional[str] = ..., experiment_id: _Optional[int] = ..., kind: _Optional[_Union[ControlKind, str]] = ..., value: _Optional[float] = ..., status: _Optional[_Union[ControlStatus, str]] = ..., source: _Optional[_Union[ControlSource, str]] = ..., requested_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., applied_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., applied_step: _Optional[int] = ..., old_value: _Optional[float] = ..., new_value: _Optional[float] = ..., message: _Optional[str] = ..., at_step: _Optional[int] = ..., consequence: _Optional[str] = ..., hold: _Optional[bool] = ..., knob: _Optional[str] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("id", "follow", "tail", "attempt")
    ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    id: int
    follow: bool
    tail: int
    attempt: int
    def __init__(self, id: _Optional[int] = ..., follow: _Optional[bool] = ..., tail: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("name", "config", "tags", "replay_of")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_OF_FIELD_NUMBER: _ClassVar[int]
    name: str
    config: _struct_pb2.Struct
    tags: _containers.RepeatedScalarFieldContainer[str]
    replay_of: int
    def __init__(self, name: _Optional[str] = ..., config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., tags: _Optional[_Iterable[str]] = ..., replay_of: _Optional[int] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("experiment", "attempt", "worker_id", "run_token", "heartbeat_interval_s", "lease_timeout_s", "controls")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CONTROLS_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    attempt: int
    worker_id: str
    run_token: str
    heartbeat_interval_s: float
    lease_timeout_s: float
    controls: _containers.RepeatedCompositeFieldContainer[ControlRecord]
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ..., attempt: _Optional[int] = ..., worker_id: _Optional[str] = ..., run_token: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., lease_timeout_s: _Optional[float] = ..., controls: _Optional[_Iterable[_Union[ControlRecord, _Mapping]]] = ...) -> None: ...

class AnnotateRequest(_message.Message):
    __slots__ = ("id", "add_tags", "remove_tags", "note")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADD_TAGS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_TAGS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    id: int
    add_tags: _containers.RepeatedScalarFieldContainer[str]
    remove_tags: _containers.RepeatedScalarFieldContainer[str]
    note: str
    def __init__(self, id: _Optional[int] = ..., add_tags: _Optional[_Iterable[str]] = ..., remove_tags: _Optional[_Iterable[str]] = ..., note: _Optional[str] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "hostname", "connected", "last_seen", "devices", "usage", "experiment_id", "attempt")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    hostname: str
    connected: bool
    last_seen: _timestamp_pb2.Timestamp
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    usage: _containers.RepeatedCompositeFieldContainer[DeviceUsage]
    experiment_id: int
    attempt: int
    def __init__(self, worker_id: _Optional[str] = ..., hostname: _Optional[str] = ..., connected: _Optional[bool] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., usage: _Optional[_Iterable[_Union[DeviceUsage, _Mapping]]] = ..., experiment_id: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("spec", "code_sha256")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CODE_SHA256_FIELD_NUMBER: _ClassVar[int]
    spec: _struct_pb2.Struct
    code_sha256: str
    def __init__(self, spec: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., code_sha256: _Optional[str] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("states", "limit", "page_token", "tags")
    STATES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[ExperimentState]
    limit: int
    page_token: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, states: _Optional[_Iterable[_Union[ExperimentState, str]]] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("experiments", "next_page_token")
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    experiments: _containers.RepeatedCompositeFieldContainer[Experiment]
    next_page_token: str
    def __init__(self, experiments: _Optional[_Iterable[_Union[Experiment, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: int
    reason: str
    def __init__(self, id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("id", "from_step", "live_only")
    ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    LIVE_ONLY_FIELD_NUMBER: _ClassVar[int]
    id: int
    from_step: int
    live_only: bool
    def __init__(self, id: _Optional[int] = ..., from_step: _Optional[int] = ..., live_only: _Optional[bool] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("experiment", "metrics", "control")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    metrics: MetricBatch
    control: ControlRecord
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ..., metrics: _Optional[_Union[MetricBatch, _Mapping]] = ..., control: _Optional[_Union[ControlRecord, _Mapping]] = ...) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ("id", "scope", "names", "from_step", "to_step", "max_points")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    TO_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    id: int
    scope: Scope
    names: _containers.RepeatedScalarFieldContainer[str]
    from_step: int
    to_step: int
    max_points: int
    def __init__(self, id: _Optional[int] = ..., scope: _Optional[_Union[Scope, str]] = ..., names: _Optional[_Iterable[str]] = ..., from_step: _Optional[int] = ..., to_step: _Optional[int] = ..., max_points: _Optional[int] = ...) -> None: ...

class MetricSeries(_message.Message):
    __slots__ = ("name", "scope", "steps", "epochs", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    scope: Scope
    steps: _containers.RepeatedScalarFieldContainer[int]
    epochs: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., scope: _Optional[_Union[Scope, str]] = ..., steps: _Optional[_Iterable[int]] = ..., epochs: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class GetMetricsResponse(_message.Message):
    __slots__ = ("series", "total_points")
    SERIES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_POINTS_FIELD_NUMBER: _ClassVar[int]
    series: _containers.RepeatedCompositeFieldContainer[MetricSeries]
    total_points: int
    def __init__(self, series: _Optional[_Iterable[_Union[MetricSeries, _Mapping]]] = ..., total_points: _Optional[int] = ...) -> None: ...

class ControlRequest(_message.Message):
    __slots__ = ("experiment_id", "kind", "value", "command_id", "wait_seconds", "dry_run", "hold", "source", "knob")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    KNOB_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    kind: ControlKind
    value: float
    command_id: str
    wait_seconds: float
    dry_run: bool
    hold: bool
    source: ControlSource
    knob: str
    def __init__(self, experiment_id: _Optional[int] = ..., kind: _Optional[_Union[ControlKind, str]] = ..., value: _Optional[float] = ..., command_id: _Optional[str] = ..., wait_seconds: _Optional[float] = ..., dry_run: _Optional[bool] = ..., hold: _Optional[bool] = ..., source: _Optional[_Union[ControlSource, str]] = ..., knob: _Optional[str] = ...) -> None: ...

class ListControlsRequest(_message.Message):
    __slots__ = ("experiment_id",)
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    def __init__(self, experiment_id: _Optional[int] = ...) -> None: ...

class ListControlsResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[ControlRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[ControlRecord, _Mapping]]] = ...) -> None: ...

class ReplayRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("kind", "index", "name", "memory_bytes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    index: int
    name: str
    memory_bytes: int
    def __init__(self, kind: _Optional[str] = ..., index: _Optional[int] = ..., name: _Optional[str] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("worker_id", "hostname", "devices", "version", "current", "run_token", "accepts_code")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    RUN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_CODE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    hostname: str
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    version: str
    current: Heartbeat
    run_token: str
    accepts_code: bool
    def __init__(self, worker_id: _Optional[str] = ..., hostname: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., version: _Optional[str] = ..., current: _Optional[_Union[Heartbeat, _Mapping]] = ..., run_token: _Optional[str] = ..., accepts_code: _Optional[bool] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("experiment_id", "attempt", "step", "usage")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    attempt: int
    step: int
    usage: _containers.RepeatedCompositeFieldContainer[DeviceUsage]
    def __init__(self, experiment_id: _Optional[int] = ..., attempt: _Optional[int] = ..., step: _Optional[int] = ..., usage: _Optional[_Iterable[_Union[DeviceUsage, _Mapping]]] = ...) -> None: ...

class DeviceUsage(_message.Message):
    __slots__ = ("kind", "index", "utilization", "memory_used_bytes", "memory_total_bytes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    index: int
    utilization: float
    memory_used_bytes: int
    memory_total_bytes: int
    def __init__(self, kind: _Optional[str] = ..., index: _Optional[int] = ..., utilization: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ...) -> None: ...

class StateUpdate(_message.Message):
    __slots__ = ("experiment_id", "attempt", "state", "message", "summary")
    class SummaryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    attempt: int
    state: ExperimentState
    message: str
    summary: _containers.ScalarMap[str, float]
    def __init__(self, experiment_id: _Optional[int] = ..., attempt: _Optional[int] = ..., state: _Optional[_Union[ExperimentState, str]] = ..., message: _Optional[str] = ..., summary: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ControlAck(_message.Message):
    __slots__ = ("experiment_id", "attempt", "command_id", "ok", "applied_step", "old_value", "new_value", "message", "consequence")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    OLD_VALUE_FIELD_NUMBER: _ClassVar[int]
    NEW_VALUE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONSEQUENCE_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    attempt: int
    command_id: str
    ok: bool
    applied_step: int
    old_value: float
    new_value: float
    message: str
    consequence: str
    def __init__(self, experiment_id: _Optional[int] = ..., attempt: _Optional[int] = ..., command_id: _Optional[str] = ..., ok: _Optional[bool] = ..., applied_step: _Optional[int] = ..., old_value: _Optional[float] = ..., new_value: _Optional[float] = ..., message: _Optional[str] = ..., consequence: _Optional[str] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "metrics", "state", "ack", "knobs", "logs")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    metrics: MetricBatch
    state: StateUpdate
    ack: ControlAck
    knobs: KnobDeclaration
    logs: LogBatch
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., metrics: _Optional[_Union[MetricBatch, _Mapping]] = ..., state: _Optional[_Union[StateUpdate, _Mapping]] = ..., ack: _Optional[_Union[ControlAck, _Mapping]] = ..., knobs: _Optional[_Union[KnobDeclaration, _Mapping]] = ..., logs: _Optional[_Union[LogBatch, _Mapping]] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("attempt", "index", "stream", "wall_time", "text")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    index: int
    stream: LogStream
    wall_time: float
    text: str
    def __init__(self, attempt: _Optional[int] = ..., index: _Optional[int] = ..., stream: _Optional[_Union[LogStream, str]] = ..., wall_time: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class LogBatch(_message.Message):
    __slots__ = ("experiment_id", "attempt", "lines")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    attempt: int
    lines: _containers.RepeatedCompositeFieldContainer[LogLine]
    def __init__(self, experiment_id: _Optional[int] = ..., attempt: _Optional[int] = ..., lines: _Optional[_Iterable[_Union[LogLine, _Mapping]]] = ...) -> None: ...

class LogAck(_message.Message):
    __slots__ = ("experiment_id", "attempt", "index")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    attempt: int
    index: int
    def __init__(self, experiment_id: _Optional[int] = ..., attempt: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class KnobDeclaration(_message.Message):
    __slots__ = ("experiment_id", "attempt", "knobs")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    attempt: int
    knobs: _containers.RepeatedCompositeFieldContainer[Knob]
    def __init__(self, experiment_id: _Optional[int] = ..., attempt: _Optional[int] = ..., knobs: _Optional[_Iterable[_Union[Knob, _Mapping]]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("heartbeat_interval_s", "lease_timeout_s")
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    lease_timeout_s: float
    def __init__(self, heartbeat_interval_s: _Optional[float] = ..., lease_timeout_s: _Optional[float] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("experiment_id", "attempt", "name", "spec", "controls", "store_id", "delivered_steps", "delivered_epochs", "code_sha256", "checkpoint")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CONTROLS_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_STEPS_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    CODE_SHA256_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    attempt: int
    name: str
    spec: _struct_pb2.Struct
    controls: _containers.RepeatedCompositeFieldContainer[ControlRecord]
    store_id: str
    delivered_steps: int
    delivered_epochs: int
    code_sha256: str
    checkpoint: Artifact
    def __init__(self, experiment_id: _Optional[int] = ..., attempt: _Optional[int] = ..., name: _Optional[str] = ..., spec: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., controls: _Optional[_Iterable[_Union[ControlRecord, _Mapping]]] = ..., store_id: _Optional[str] = ..., delivered_steps: _Optional[int] = ..., delivered_epochs: _Optional[int] = ..., code_sha256: _Optional[str] = ..., checkpoint: _Optional[_Union[Artifact, _Mapping]] = ...) -> None: ...

class ControlCommand(_message.Message):
    __slots__ = ("experiment_id", "attempt", "command_id", "kind", "value", "hold", "knob")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    KNOB_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    attempt: int
    command_id: str
    kind: ControlKind
    value: float
    hold: bool
    knob: str
    def __init__(self, experiment_id: _Optional[int] = ..., attempt: _Optional[int] = ..., command_id: _Optional[str] = ..., kind: _Optional[_Union[ControlKind, str]] = ..., value: _Optional[float] = ..., hold: _Optional[bool] = ..., knob: _Optional[str] = ...) -> None: ...

class CancelRun(_message.Message):
    __slots__ = ("experiment_id", "attempt", "reason", "kind")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    attempt: int
    reason: str
    kind: StopReason
    def __init__(self, experiment_id: _Optional[int] = ..., attempt: _Optional[int] = ..., reason: _Optional[str] = ..., kind: _Optional[_Union[StopReason, str]] = ...) -> None: ...

class BatchAck(_message.Message):
    __slots__ = ("experiment_id", "attempt", "seq", "final")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    attempt: int
    seq: int
    final: bool
    def __init__(self, experiment_id: _Optional[int] = ..., attempt: _Optional[int] = ..., seq: _Optional[int] = ..., final: _Optional[bool] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("welcome", "assignment", "control", "cancel", "batch_ack", "log_ack")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    BATCH_ACK_FIELD_NUMBER: _ClassVar[int]
    LOG_ACK_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    assignment: Assignment
    control: ControlCommand
    cancel: CancelRun
    batch_ack: BatchAck
    log_ack: LogAck
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., control: _Optional[_Union[ControlCommand, _Mapping]] = ..., cancel: _Optional[_Union[CancelRun, _Mapping]] = ..., batch_ack: _Optional[_Union[BatchAck, _Mapping]] = ..., log_ack: _Optional[_Union[LogAck, _Mapping]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("experiment_id", "attempt", "name", "kind", "sha256", "size", "step", "created_at")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    attempt: int
    name: str
    kind: ArtifactKind
    sha256: str
    size: int
    step: int
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, experiment_id: _Optional[int] = ..., attempt: _Optional[int] = ..., name: _Optional[str] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., step: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("artifact", "run_token")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    RUN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    artifact: Artifact
    run_token: str
    def __init__(self, artifact: _Optional[_Union[Artifact, _Mapping]] = ..., run_token: _Optional[str] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ArtifactRef(_message.Message):
    __slots__ = ("sha256", "experiment_id", "name", "offset")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    experiment_id: int
    name: str
    offset: int
    def __init__(self, sha256: _Optional[str] = ..., experiment_id: _Optional[int] = ..., name: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class DownloadChunk(_message.Message):
    __slots__ = ("artifact", "data")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    artifact: Artifact
    data: bytes
    def __init__(self, artifact: _Optional[_Union[Artifact, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ListArtifactsRequest(_message.Message):
    __slots__ = ("experiment_id", "kind")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    experiment_id: int
    kind: ArtifactKind
    def __init__(self, experiment_id: _Optional[int] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ...) -> None: ...

class ListArtifactsResponse(_message.Message):
    __slots__ = ("artifacts",)
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    def __init__(self, artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ...) -> None: ...

class GcRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class GcResponse(_message.Message):
    __slots__ = ("artifacts_removed", "blobs_removed", "bytes_freed")
    ARTIFACTS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    BLOBS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    artifacts_removed: int
    blobs_removed: int
    bytes_freed: int
    def __init__(self, artifacts_removed: _Optional[int] = ..., blobs_removed: _Optional[int] = ..., bytes_freed: _Optional[int] = ...) -> None: ...
