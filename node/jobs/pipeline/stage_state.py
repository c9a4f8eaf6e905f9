"""A pipeline stage's training state: its safetensors form, the checks on a peer's copy, and its transfer.

    data = state_to_bytes(named, optimizer)          # param/{name} and opt/{i}/{slot} tensors
    params, opt_state = state_from_bytes(head, data, stage, named, OPTIMIZERS["adamw"])   # Refused if unfit
    head, data = await fetch_state(p2p, peers, pipe_protocol(swarm, pipeline, "state"), stage, bound)
    await send_state(stream, head, data)             # a StateHead frame, then the bytes in 1-MiB frames
    data = await receive_body(stream, head, bound, timeout)

node/jobs/pipeline/stage_host.py StageHost snapshots, loads, serves and pushes these states (resyncs, takeovers,
backups); node/devtools/stage_peer.py fetches one before a takeover. The messages (StateRequest, StateHead,
BackupAck) are in protocol/pipeline/control.py.

Why it is built this way -- what a peer's state could do to us:
  * A huge or endless body: refused before a byte of it is read when StateHead.size exceeds the receiver's
    bound (its own parameter count, or the manifest's for a backup), and read in frames of at most STATE_CHUNK.
  * Corrupted or substituted bytes: the body's sha256 must equal the head's; then every tensor name, shape and
    dtype is checked against this stage and its optimizer, and the parameters' hash (node/ml/models.py
    params_sha256, computed over the incoming tensors) against the sender's claim -- all before anything is
    loaded into the stage.
  * A holder that is gone, slow or serving an older step: fetch_state tries the next peer, each within
    ``timeout``, and names every failure if none serves it.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import re
from collections.abc import Iterable, Sequence

import safetensors
import safetensors.torch
import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from protocol.pipeline.control import (
    CONTROL_BOUND,
    ControlError,
    StateHead,
    StateRequest,
    control_from_wire,
    control_to_wire,
    member_record_from_wire,
    one_line,
    stage_key,
)
from protocol.streams import Stream, open_stream

STATE_CHUNK = 1 << 20
OPTIMIZERS = {"sgd": ("momentum_buffer",), "adamw": ("step", "exp_avg", "exp_avg_sq")}  # torch state slot names
_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")  # a parameter index as state_to_bytes writes it: ASCII, canonical


class Refused(ValueError):
    """A request a stage host will not serve, or state it will not take; the message is the one-line reason."""


def state_to_bytes(named: Sequence[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer) -> bytes:
    """Parameters ``named`` and ``optimizer``'s state (of those parameters, in order) as safetensors bytes."""
    tensors = {f"param/{n}": p.detach().clone() for n, p in named}
    for i, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt/{i}/{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().clone()
    return safetensors.torch.save(tensors, metadata={"format": "pt"})


def state_bound(size: int, num_params: int, optimizer: str) -> int:
    """The most state bytes a stage of ``size`` values in ``num_params`` tensors can need: the parameters and
    the optimizer's slots, fp32, + headers."""
    return size * 4 * (1 + len(OPTIMIZERS[optimizer])) + 256 * num_params * 4 + (1 << 16)


def state_from_bytes(head: StateHead, data: bytes, stage: int, named: Sequence[tuple[str, torch.Tensor]],
                     slots: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[int, dict]]:
    """The parameters (name -> tensor) and the optimizer state (index -> slot -> tensor, for load_state_dict) in
    ``data``, checked against its ``head``, stage ``stage``, its parameters ``named`` and the optimizer's state
    ``slots``; Refused naming the first problem."""
    params = [p for _, p in named]
    if head.stage != stage or len(data) != head.size or hashlib.sha256(data).hexdigest() != head.sha256:
        raise Refused("state does not match its header (stage, size or sha256)")
    try:
        tensors = safetensors.torch.load(bytes(data))
    except (safetensors.SafetensorError, ValueError, RuntimeError) as e:
        raise Refused(f"state is not a safetensors file ({one_line(e)[:80]})") from None
    state: dict[int, dict] = collections.defaultdict(dict)
    for name, t in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "opt":
            i, _, slot = rest.partition("/")
            if not _INDEX.fullmatch(i) or int(i) >= len(params) or slot not in slots:  # not str.isdigit: '²'
                raise Refused(f"state: unexpected tensor {name[:80]!r}")
            want = () if slot == "step" else tuple(params[int(i)].shape)
            if tuple(t.shape) != want or t.dtype != torch.float32:
                raise Refused(f"state: {name[:80]!r} is {t.dtype} {tuple(t.shape)}, expected float32 {want}")
            state[int(i)][slot] = t
        elif kind != "param":
            raise Refused(f"state: unexpected tensor {name[:80]!r}")
    for n, p in named:
        given = tensors.get(f"param/{n}")
        if given is None or given.shape != p.shape or given.dtype != p.dtype:
            raise Refused(f"state: parameter {n!r} missing or of the wrong shape/dtype")
    if len(tensors) != len(named) + sum(len(s) for s in state.values()):
        raise Refused("state: unexpected tensors")
    incomplete = [i for i, s in state.items() if set(s) != set(slots)]
    if incomplete:
        raise Refused(f"state: optimizer slots of parameter {incomplete[0]} incomplete")
    digest = hashlib.sha256()  # node/ml/models.py params_sha256, over the incoming tensors: checked before loading
    for n, _ in named:
        digest.update(tensors[f"param/{n}"].to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
    if digest.hexdigest() != head.params_hash:
        raise Refused("state: parameters do not match the sender's hash")
    return {n: tensors[f"param/{n}"] for n, _ in named}, dict(state)


async def send_state(stream: Stream, head: StateHead, data: bytes) -> None:
    await stream.send(control_to_wire(head))
    for offset in range(0, len(data), STATE_CHUNK):
        await stream.send(data[offset:offset + STATE_CHUNK])


async def receive_body(stream: Stream, head: StateHead, bound: int, timeout: float) -> bytes:
    """The ``head.size`` bytes after a StateHead, refused before reading if larger than ``bound``; sha256-checked."""
    if head.size > bound:
        raise Refused(f"state of {head.size} bytes; at most {bound} expected for stage {head.stage}")
    body = bytearray()
    while len(body) < head.size:
        body += await stream.receive(min(STATE_CHUNK, head.size - len(body)), timeout)
    if hashlib.sha256(body).hexdigest() != head.sha256:
        raise Refused("state bytes do not match their sha256")
    return bytes(body)


async def fetch_state(p2p: P2P, peers: Iterable[str], protocol: str, stage: int, bound: int, min_step: int = 0,
                      timeout: float = 30.0) -> tuple[StateHead, bytes]:
    """The state of ``stage`` at ``min_step`` or later from the first of ``peers`` that serves it (its own or a
    backup), sha256-checked; Refused naming every peer's failure if none does."""
    errors = []
    for peer in peers:
        try:
            async with asyncio.timeout(timeout), open_stream(p2p, peer, protocol) as stream:
                await stream.send(control_to_wire(StateRequest(stage, min_step)))
                head = control_from_wire(await stream.receive(CONTROL_BOUND), (StateHead, ControlError))
                if isinstance(head, ControlError):
                    raise Refused(head.reason)
                if head.stage != stage or head.step < min_step:
                    raise Refused(f"sent stage {head.stage} step {head.step}")
                return head, await receive_body(stream, head, bound, timeout)
        except (Exception, TimeoutError) as e:  # noqa: B014 (p2pd errors, timeouts, WireError, Refused)
            errors.append(f"{peer[-8:]}: {type(e).__name__}: {one_line(e)[:100]}")
    raise Refused(f"no peer served the state of stage {stage}: {'; '.join(errors) or 'no peers'}")


async def holders(dht: DHTNode, swarm: str, pipeline: str, stages) -> list[tuple[int, str]]:
    """(step, peer) of every replica or backup holder announced for ``stages``: the newest step first, and among
    equal steps the latest heartbeat first (a replica just killed still has a record, but an old beat)."""
    found = []
    for stage in stages:
        got = await dht.get(stage_key(swarm, pipeline, stage), latest=True)
        for peer, item in (got.value.items() if got is not None and isinstance(got.value, dict) else ()):
            try:
                rec = member_record_from_wire(item.value)
            except ValueError:
                continue
            if rec.role in ("replica", "backup") and isinstance(peer, str):
                found.append((-rec.step, -rec.beat, peer))
    return [(-step, peer) for step, _, peer in sorted(found)]


__all__ = ["OPTIMIZERS", "STATE_CHUNK", "Refused", "fetch_state", "holders", "receive_body", "send_state",
           "state_bound", "state_from_bytes", "state_to_bytes"]
