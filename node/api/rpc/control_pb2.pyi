from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("peer_id", "addrs", "swarm", "version", "uptime_s", "peers_seen", "last_heartbeat_age_s", "capability", "home", "pid", "reachability", "relay", "dashboard")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRS_FIELD_NUMBER: _ClassVar[int]
    SWARM_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    PEERS_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    HOME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    REACHABILITY_FIELD_NUMBER: _ClassVar[int]
    RELAY_FIELD_NUMBER: _ClassVar[int]
    DASHBOARD_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    addrs: _containers.RepeatedScalarFieldContainer[str]
    swarm: str
    version: str
    uptime_s: float
    peers_seen: int
    last_heartbeat_age_s: float
    capability: Capability
    home: str
    pid: int
    reachability: str
    relay: RelayCounters
    dashboard: str
    def __init__(self, peer_id: _Optional[str] = ..., addrs: _Optional[_Iterable[str]] = ..., swarm: _Optional[str] = ..., version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., peers_seen: _Optional[int] = ..., last_heartbeat_age_s: _Optional[float] = ..., capability: _Optional[_Union[Capability, _Mapping]] = ..., home: _Optional[str] = ..., pid: _Optional[int] = ..., reachability: _Optional[str] = ..., relay: _Optional[_Union[RelayCounters, _Mapping]] = ..., dashboard: _Optional[str] = ...) -> None: ...

class Capability(_message.Message):
    __slots__ = ("gpus", "cpu_cores", "ram_bytes", "disk_free_bytes", "tflops_fp32", "tflops_bf16", "platform", "train_device", "device_free_bytes")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TFLOPS_FP32_FIELD_NUMBER: _ClassVar[int]
    TFLOPS_BF16_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    TRAIN_DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    cpu_cores: int
    ram_bytes: int
    disk_free_bytes: int
    tflops_fp32: float
    tflops_bf16: float
    platform: str
    train_device: str
    device_free_bytes: int
    def __init__(self, gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., cpu_cores: _Optional[int] = ..., ram_bytes: _Optional[int] = ..., disk_free_bytes: _Optional[int] = ..., tflops_fp32: _Optional[float] = ..., tflops_bf16: _Optional[float] = ..., platform: _Optional[str] = ..., train_device: _Optional[str] = ..., device_free_bytes: _Optional[int] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("name", "memory_bytes", "cc_major", "cc_minor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CC_MAJOR_FIELD_NUMBER: _ClassVar[int]
    CC_MINOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    memory_bytes: int
    cc_major: int
    cc_minor: int
    def __init__(self, name: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., cc_major: _Optional[int] = ..., cc_minor: _Optional[int] = ...) -> None: ...

class PeersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeersResponse(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[Peer]
    def __init__(self, peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("peer_id", "addrs", "version", "capability", "last_seen", "expires_at", "is_self", "reachability", "relays", "relay_service")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    IS_SELF_FIELD_NUMBER: _ClassVar[int]
    REACHABILITY_FIELD_NUMBER: _ClassVar[int]
    RELAYS_FIELD_NUMBER: _ClassVar[int]
    RELAY_SERVICE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    addrs: _containers.RepeatedScalarFieldContainer[str]
    version: str
    capability: Capability
    last_seen: float
    expires_at: float
    is_self: bool
    reachability: str
    relays: _containers.RepeatedScalarFieldContainer[str]
    relay_service: bool
    def __init__(self, peer_id: _Optional[str] = ..., addrs: _Optional[_Iterable[str]] = ..., version: _Optional[str] = ..., capability: _Optional[_Union[Capability, _Mapping]] = ..., last_seen: _Optional[float] = ..., expires_at: _Optional[float] = ..., is_self: _Optional[bool] = ..., reachability: _Optional[str] = ..., relays: _Optional[_Iterable[str]] = ..., relay_service: _Optional[bool] = ...) -> None: ...

class DoctorRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DoctorResponse(_message.Message):
    __slots__ = ("reachability", "how", "seen_as", "ports", "open_ports", "asked", "addrs", "relays", "relay_errors", "relay_service", "relay", "peers", "advice")
    REACHABILITY_FIELD_NUMBER: _ClassVar[int]
    HOW_FIELD_NUMBER: _ClassVar[int]
    SEEN_AS_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    OPEN_PORTS_FIELD_NUMBER: _ClassVar[int]
    ASKED_FIELD_NUMBER: _ClassVar[int]
    ADDRS_FIELD_NUMBER: _ClassVar[int]
    RELAYS_FIELD_NUMBER: _ClassVar[int]
    RELAY_ERRORS_FIELD_NUMBER: _ClassVar[int]
    RELAY_SERVICE_FIELD_NUMBER: _ClassVar[int]
    RELAY_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    reachability: str
    how: str
    seen_as: _containers.RepeatedScalarFieldContainer[str]
    ports: _containers.RepeatedScalarFieldContainer[int]
    open_ports: _containers.RepeatedScalarFieldContainer[int]
    asked: _containers.RepeatedScalarFieldContainer[str]
    addrs: _containers.RepeatedScalarFieldContainer[str]
    relays: _containers.RepeatedScalarFieldContainer[str]
    relay_errors: _containers.RepeatedScalarFieldContainer[str]
    relay_service: bool
    relay: RelayCounters
    peers: _containers.RepeatedCompositeFieldContainer[PeerCheck]
    advice: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, reachability: _Optional[str] = ..., how: _Optional[str] = ..., seen_as: _Optional[_Iterable[str]] = ..., ports: _Optional[_Iterable[int]] = ..., open_ports: _Optional[_Iterable[int]] = ..., asked: _Optional[_Iterable[str]] = ..., addrs: _Optional[_Iterable[str]] = ..., relays: _Optional[_Iterable[str]] = ..., relay_errors: _Optional[_Iterable[str]] = ..., relay_service: _Optional[bool] = ..., relay: _Optional[_Union[RelayCounters, _Mapping]] = ..., peers: _Optional[_Iterable[_Union[PeerCheck, _Mapping]]] = ..., advice: _Optional[_Iterable[str]] = ...) -> None: ...

class RelayCounters(_message.Message):
    __slots__ = ("reservations", "circuits", "circuits_total", "bytes_relayed", "cut", "refused")
    RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    CIRCUITS_FIELD_NUMBER: _ClassVar[int]
    CIRCUITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_RELAYED_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    reservations: int
    circuits: int
    circuits_total: int
    bytes_relayed: int
    cut: int
    refused: int
    def __init__(self, reservations: _Optional[int] = ..., circuits: _Optional[int] = ..., circuits_total: _Optional[int] = ..., bytes_relayed: _Optional[int] = ..., cut: _Optional[int] = ..., refused: _Optional[int] = ...) -> None: ...

class PeerCheck(_message.Message):
    __slots__ = ("peer_id", "reachability", "route", "rtt_ms", "throughput_bytes_s", "error")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REACHABILITY_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_BYTES_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    reachability: str
    route: str
    rtt_ms: float
    throughput_bytes_s: float
    error: str
    def __init__(self, peer_id: _Optional[str] = ..., reachability: _Optional[str] = ..., route: _Optional[str] = ..., rtt_ms: _Optional[float] = ..., throughput_bytes_s: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ("withdrawn",)
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    withdrawn: bool
    def __init__(self, withdrawn: _Optional[bool] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("job_toml", "source")
    JOB_TOML_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    job_toml: str
    source: str
    def __init__(self, job_toml: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("job_id", "follow")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    follow: bool
    def __init__(self, job_id: _Optional[str] = ..., follow: _Optional[bool] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "name", "submitter", "state", "round", "rounds", "model_hash", "participants", "train_loss", "eval_metric", "bytes_exchanged", "round_time_s", "summary", "declined", "local_round", "local_model_hash", "stage_hosts", "declines", "takers", "round_timeout_s", "exclusions")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUBMITTER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_METRIC_FIELD_NUMBER: _ClassVar[int]
    BYTES_EXCHANGED_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIME_S_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    DECLINED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ROUND_FIELD_NUMBER: _ClassVar[int]
    LOCAL_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    STAGE_HOSTS_FIELD_NUMBER: _ClassVar[int]
    DECLINES_FIELD_NUMBER: _ClassVar[int]
    TAKERS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIONS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    submitter: str
    state: str
    round: int
    rounds: int
    model_hash: str
    participants: _containers.RepeatedScalarFieldContainer[str]
    train_loss: float
    eval_metric: float
    bytes_exchanged: int
    round_time_s: float
    summary: str
    declined: str
    local_round: int
    local_model_hash: str
    stage_hosts: _containers.RepeatedScalarFieldContainer[str]
    declines: _containers.RepeatedCompositeFieldContainer[Decline]
    takers: int
    round_timeout_s: float
    exclusions: _containers.RepeatedCompositeFieldContainer[Exclusion]
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., submitter: _Optional[str] = ..., state: _Optional[str] = ..., round: _Optional[int] = ..., rounds: _Optional[int] = ..., model_hash: _Optional[str] = ..., participants: _Optional[_Iterable[str]] = ..., train_loss: _Optional[float] = ..., eval_metric: _Optional[float] = ..., bytes_exchanged: _Optional[int] = ..., round_time_s: _Optional[float] = ..., summary: _Optional[str] = ..., declined: _Optional[str] = ..., local_round: _Optional[int] = ..., local_model_hash: _Optional[str] = ..., stage_hosts: _Optional[_Iterable[str]] = ..., declines: _Optional[_Iterable[_Union[Decline, _Mapping]]] = ..., takers: _Optional[int] = ..., round_timeout_s: _Optional[float] = ..., exclusions: _Optional[_Iterable[_Union[Exclusion, _Mapping]]] = ...) -> None: ...

class Exclusion(_message.Message):
    __slots__ = ("peer_id", "by", "evidence")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    by: str
    evidence: str
    def __init__(self, peer_id: _Optional[str] = ..., by: _Optional[str] = ..., evidence: _Optional[str] = ...) -> None: ...

class Decline(_message.Message):
    __slots__ = ("peer_id", "reason")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    reason: str
    def __init__(self, peer_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("job_id", "out_dir", "merge")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OUT_DIR_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    out_dir: str
    merge: bool
    def __init__(self, job_id: _Optional[str] = ..., out_dir: _Optional[str] = ..., merge: _Optional[bool] = ...) -> None: ...

class ExportResponse(_message.Message):
    __slots__ = ("files", "round", "model_hash")
    FILES_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[str]
    round: int
    model_hash: str
    def __init__(self, files: _Optional[_Iterable[str]] = ..., round: _Optional[int] = ..., model_hash: _Optional[str] = ...) -> None: ...
