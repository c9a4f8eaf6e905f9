"""Job state transfer: a joiner, or a node that fell behind, downloads a federated job's current global state.

    await serve_on(p2p, {job_state_protocol(swarm): lambda s: serve_job_state(s, state_of)}, logger)   # participant
    header, state = await fetch_job_state(p2p, peer, swarm, job_id, size, timeout, check)            # joiner

The exchange, on one libp2p stream: the joiner sends the job id; the participant answers a StateHeader, the
float32 parameters (size * 4 bytes), the outer momentum if any (as many bytes), then its round history (a
frame of history_size bytes of JSON, empty when there is none). The joiner reads nothing the header does not
bound, refuses a header for another job or size (or one its ``check`` refuses: node/jobs/federated/ checks
the hash against the swarm's signed progress) before reading the parameters, and checks the parameters'
bytes against the header's hash before using them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from hivemind.p2p import P2P

from protocol.records.job_spec import JOB_SCHEMA_VERSION, MAX_ROUNDS
from protocol.records.values import check_bool, check_int, check_job_id, check_model_hash
from protocol.streams import Stream, open_stream
from protocol.wire import WireError, fields_of, from_map, pack, unpack_bounded

MAX_STATE_HEADER_BYTES = 4 * 1024
MAX_HISTORY_BYTES = 32 * 1024 * 1024  # ~60k rounds at ~0.5 KB each; a sender drops the oldest beyond that


@dataclass(frozen=True)
class StateHeader:
    """Sent before the raw state: float32 parameters (size * 4 bytes), then the outer momentum if any."""

    job_id: str
    completed: int  # rounds completed: the parameters are the global model after them
    next_round: int  # the round id the participants will run next (failed attempts consume ids too)
    model_hash: str  # sha256 of the parameters' little-endian float32 bytes
    size: int  # number of parameters
    has_momentum: bool  # an outer momentum buffer of the same size follows the parameters
    history_size: int = 0  # bytes of the sender's round history (a JSON list) sent last; 0: none

    def __post_init__(self) -> None:
        check_job_id("job_id", self.job_id)
        check_int("completed", self.completed, 0, MAX_ROUNDS)
        check_int("next_round", self.next_round, 0, 2**31)
        check_model_hash("model_hash", self.model_hash)
        if not self.model_hash:
            raise ValueError("model_hash: required")
        check_int("size", self.size, 1, 2**34)
        check_bool("has_momentum", self.has_momentum)
        check_int("history_size", self.history_size, 0, MAX_HISTORY_BYTES)


def state_header_to_wire(header: StateHeader) -> bytes:
    return pack({"v": JOB_SCHEMA_VERSION, **fields_of(header)})


def state_header_from_wire(data: bytes) -> StateHeader:
    return from_map(StateHeader, unpack_bounded(data, MAX_STATE_HEADER_BYTES), "state header",
                    version=JOB_SCHEMA_VERSION)


# ---- the exchange ------------------------------------------------------------------------------------------

JOB_ID_BOUND = 64  # the request: a job id (16 hex digits), with room to refuse a longer one by its content


def job_state_protocol(swarm: str) -> str:
    return f"swarmnode/{swarm}/job-state"


@dataclass(frozen=True)
class JobState:
    """A participant's copy of a job's global state as of a round boundary (consistent even mid-round)."""

    completed: int  # rounds completed
    next_round: int  # the round id to run next
    params: np.ndarray  # (N,) float32: the global model after ``completed`` rounds
    momentum: np.ndarray | None  # (N,) float32 outer momentum, if the outer optimizer keeps one
    history: bytes = b""  # the sender's round history (JSON), at most MAX_HISTORY_BYTES


def params_hash(params: np.ndarray) -> str:
    """sha256 of flat parameters as little-endian float32 bytes: a federated job's model hash."""
    return hashlib.sha256(np.ascontiguousarray(params, "<f4").tobytes()).hexdigest()


async def serve_job_state(stream: Stream, state_of: Callable[[str], Awaitable[JobState | None]],
                          timeout: float = 10.0) -> None:
    """Answer one request (a job id, within ``timeout``) with the state ``state_of`` gives, or hang up if None."""
    job_id = (await stream.receive(JOB_ID_BOUND, timeout)).decode(errors="replace")
    state = await state_of(job_id)
    if state is None:
        return
    header = StateHeader(job_id, state.completed, state.next_round, params_hash(state.params), state.params.size,
                         state.momentum is not None, len(state.history))
    await stream.send(state_header_to_wire(header))
    await stream.send(np.ascontiguousarray(state.params, "<f4").tobytes())
    if state.momentum is not None:
        await stream.send(np.ascontiguousarray(state.momentum, "<f4").tobytes())
    await stream.send(state.history)


async def fetch_job_state(p2p: P2P, peer: str, swarm: str, job_id: str, size: int, timeout: float,
                          check: Callable[[StateHeader], None] = lambda header: None,
                          dial_timeout: float = 10.0) -> tuple[StateHeader, JobState]:
    """The state of job ``job_id`` (``size`` parameters) from ``peer``: the header is checked (``check`` raises
    WireError to refuse it, before anything else is read), each part is bounded by the header, and the
    parameters' bytes must hash to the header's model hash. Every read within ``timeout``; the stream opened within
    ``dial_timeout`` (a participant may have died since its last progress)."""
    async with open_stream(p2p, peer, job_state_protocol(swarm), dial_timeout=dial_timeout) as stream:
        await stream.send(job_id.encode())
        header = state_header_from_wire(await stream.receive(MAX_STATE_HEADER_BYTES, timeout))
        if header.job_id != job_id or header.size != size:
            raise WireError(f"state for {header.job_id} of {header.size} parameters, expected {size}")
        check(header)
        raw = await stream.receive(4 * size, timeout)
        if hashlib.sha256(raw).hexdigest() != header.model_hash:
            raise WireError("downloaded parameters do not match the announced model hash")
        params = np.frombuffer(raw, "<f4").astype(np.float32)
        momentum = None
        if header.has_momentum:
            momentum = np.frombuffer(await stream.receive(4 * size, timeout), "<f4").astype(np.float32)
        history = await stream.receive(header.history_size, timeout) if header.history_size else b""
        return header, JobState(header.completed, header.next_round, params, momentum, history)
