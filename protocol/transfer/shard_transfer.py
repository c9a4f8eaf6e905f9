"""Shard transfer: fetch a stage shard (the bytes a ShardInfo names) from peers, in chunks, resumably.

    server = ShardServer(p2p, shard_protocol(swarm), lookup)   # lookup(sha256) -> path or None
    await server.start() ... await server.stop()
    path = await fetch_shard(p2p, [peer_a, peer_b], info, dest, protocol_name=shard_protocol(swarm))

One libp2p stream per peer carries request/reply pairs: the client sends ChunkRequest(sha256, offset, length)
frames, up to ``window`` ahead of the replies, and the server answers each, in order, with a ChunkReply
(the same sha256 and offset, and exactly ``length`` bytes) or a TransferRefusal (code + one-line reason),
after which it hangs up. Frames are msgpack maps on 4-byte length frames (protocol/streams.py); every
(de)serialiser is here, in x_to_wire / x_from_wire pairs around frozen dataclasses.

The client appends each checked chunk to ``<dest>.part``; on a later call, or when a peer fails, it goes on
from the .part file's size with the next peer. Once it holds ``info.size`` bytes it fsyncs the .part,
hashes it, and renames it to ``dest`` (then fsyncs the folder) only if the sha256 matches ``info``; a
mismatch deletes the .part and raises ShardTransferError naming the peers that supplied its bytes.

Why it is built this way -- the races and attacks it handles:
  * A peer vanishing mid-transfer (crash, churn, a cut stream): every chunk it delivered is on disk, and the
    next peer, or the next call, is asked only for the bytes after them: nothing received is re-requested.
  * A peer sending oversized, misplaced or short chunks (a chunk for another offset or another shard, a
    length that is not the one asked for): each reply is bounded by read_frame before it is read, then its
    shard, offset and length are checked against the request before a byte of it is written; the peer is
    dropped and the next one asked.
  * A peer serving wrong bytes of the right size (a corrupt disk, another file, a malicious peer): the whole
    file's sha256 is checked before the rename, so ``dest`` only ever holds the shard the manifest signed;
    the error names who supplied the bytes. (Without per-chunk hashes in the manifest the bad chunk cannot be
    pinned to one peer, nor refused before it is written: a proposed manifest extension.)
  * A crash mid-fetch: the .part may end in bytes that never reached the disk; they fail the final hash, the
    .part is deleted and the next call starts over. ``dest`` itself is never partially written.
  * Two fetches of the same ``dest`` at once (two tasks, two processes): an exclusive flock on the .part
    makes the second fail at once instead of interleaving appends.
  * A client asking the server for bytes past the end, huge chunks, unknown shards or malformed requests:
    refused with a TransferRefusal frame before any read; the server caps concurrent streams (``busy``)
    and each stream's idle time, so a slow or silent client cannot pin its resources.
  * The sender of every frame is the libp2p-authenticated remote peer of the stream (the peer we dialled,
    or the one the server logs), never a field inside a frame.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import fcntl
import hashlib
import logging
import os
import pathlib
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

from protocol.streams import Stream, open_stream, peer_id, serve_on, stop_serving
from protocol.transfer.shards import MAX_SHARD_BYTES, ShardError, ShardInfo
from protocol.wire import WireError, exact_map, pack, unpack_bounded

logger = logging.getLogger(__name__)

TRANSFER_PROTOCOL_VERSION = 1
DEFAULT_CHUNK = 1 << 20  # 1 MiB: a few ms on a LAN, small enough that a cut stream loses little
MAX_CHUNK = 16 << 20  # the largest chunk any server serves or any client asks for
MAX_CONTROL_BYTES = 1024  # a request or a refusal: tag, 64-char sha, two ints, a 256-char reason
REPLY_OVERHEAD = 256  # a chunk reply besides its data: tag, version, sha, offset, bin header
MAX_REASON = 256
REFUSAL_CODES = ("unknown_shard", "out_of_range", "too_large", "bad_request", "busy", "io_error")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def shard_protocol(swarm: str) -> str:
    """The libp2p protocol name shards of ``swarm`` are served under."""
    return f"swarmnode/{swarm}/shard"


class ShardTransferError(ShardError):
    """A shard could not be fetched (no peer served it) or what was fetched is not the shard; one line."""


class BusyError(ShardTransferError):
    """Another fetch of the same destination holds the .part file's lock."""


# ---- frames ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkRequest:
    """Send ``length`` bytes of the shard whose sha256 is ``sha256``, starting at byte ``offset``."""

    sha256: str
    offset: int
    length: int


@dataclass(frozen=True)
class ChunkReply:
    sha256: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class TransferRefusal:
    """The server will not serve the request; it hangs up after sending this."""

    code: str  # one of REFUSAL_CODES
    reason: str  # one line, for logs and error messages


def _exact(obj: Any, tag: str, names: tuple[str, ...]) -> dict:
    if not isinstance(obj, dict):
        raise WireError(f"shard transfer: expected a map, got {type(obj).__name__}")
    if obj.get("t") != tag:
        raise WireError(f"shard transfer: expected a {tag!r} frame, got {obj.get('t')!r:.40}")
    exact_map(obj, ("t", "v", *names), tag)
    if type(obj["v"]) is not int or obj["v"] != TRANSFER_PROTOCOL_VERSION:
        raise WireError(f"{tag}: unsupported shard transfer version {obj['v']!r:.20}")
    return obj


def _sha(obj: dict, where: str) -> str:
    value = obj["sha256"]
    if not isinstance(value, str) or not _SHA_RE.fullmatch(value):
        raise WireError(f"{where}.sha256: expected 64 lowercase hex digits")
    return value


def _uint(obj: dict, key: str, lo: int, hi: int, where: str) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise WireError(f"{where}.{key}: expected an integer in [{lo}, {hi}], got {value!r:.40}")
    return value


def chunk_request_to_wire(req: ChunkRequest) -> bytes:
    return pack({"t": "get", "v": TRANSFER_PROTOCOL_VERSION, "sha256": req.sha256, "offset": req.offset,
                          "length": req.length})


def chunk_request_from_wire(data: bytes) -> ChunkRequest:
    """A request, structurally checked (the server then checks it against the file and its chunk cap)."""
    obj = _exact(unpack_bounded(data, MAX_CONTROL_BYTES), "get", ("sha256", "offset", "length"))
    return ChunkRequest(_sha(obj, "get"), _uint(obj, "offset", 0, MAX_SHARD_BYTES, "get"),
                        _uint(obj, "length", 1, MAX_CHUNK, "get"))


def chunk_reply_to_wire(reply: ChunkReply) -> bytes:
    return pack({"t": "chunk", "v": TRANSFER_PROTOCOL_VERSION, "sha256": reply.sha256,
                          "offset": reply.offset, "data": reply.data})


def refusal_to_wire(refusal: TransferRefusal) -> bytes:
    reason = " ".join(refusal.reason.split())[:MAX_REASON]
    return pack({"t": "refused", "v": TRANSFER_PROTOCOL_VERSION, "code": refusal.code, "reason": reason})


def reply_bound(length: int) -> int:
    """The read_frame bound for the reply to a request of ``length`` bytes."""
    return max(length + REPLY_OVERHEAD, MAX_CONTROL_BYTES)


def chunk_reply_from_wire(data: bytes, req: ChunkRequest) -> ChunkReply | TransferRefusal:
    """The reply to ``req``: a chunk of exactly the shard, offset and length asked for, or a refusal;
    WireError on anything else."""
    obj = unpack_bounded(data, reply_bound(req.length), max_objects=32)  # a map of a few fields and one bin
    if isinstance(obj, dict) and obj.get("t") == "refused":
        obj = _exact(obj, "refused", ("code", "reason"))
        code, reason = obj["code"], obj["reason"]
        if code not in REFUSAL_CODES:
            raise WireError(f"refused.code: unknown code {code!r:.40}")
        if not isinstance(reason, str) or len(reason) > MAX_REASON or _CONTROL.search(reason):
            raise WireError(f"refused.reason: expected one line of at most {MAX_REASON} characters")
        return TransferRefusal(code, reason)
    obj = _exact(obj, "chunk", ("sha256", "offset", "data"))
    if _sha(obj, "chunk") != req.sha256:
        raise WireError("chunk: for another shard than the one asked for")
    offset = _uint(obj, "offset", 0, MAX_SHARD_BYTES, "chunk")
    if offset != req.offset:
        raise WireError(f"chunk: at offset {offset}, {req.offset} was asked for")
    payload = obj["data"]
    if not isinstance(payload, bytes):
        raise WireError(f"chunk.data: expected bytes, got {type(payload).__name__}")
    if len(payload) != req.length:
        raise WireError(f"chunk: {len(payload)} bytes at offset {offset}, {req.length} were asked for")
    return ChunkReply(req.sha256, offset, payload)


# ---- server ------------------------------------------------------------------------------------------------


class ServeFault(enum.Enum):
    """What a faulty server does instead of answering one request (tests only, through ShardServer.fault)."""

    HANG_UP = "hang_up"  # close the stream without answering
    SHORT = "short"  # answer with one byte fewer than asked
    WRONG_OFFSET = "wrong_offset"  # answer with the next byte's offset
    OVERSIZE = "oversize"  # announce a frame far larger than the request allows


# fault(peer, request, index of the request on its stream) -> a fault to commit, or None to serve honestly
FaultHook = Callable[[str, ChunkRequest, int], ServeFault | None]


class ShardServer:
    """Serves the shards ``lookup`` knows (sha256 -> path or None) under ``protocol_name``.

    Requests are checked against the file's size and ``max_chunk`` before any read; at most ``max_streams``
    streams are served at once and a stream idle for ``idle_timeout`` seconds is closed. ``served`` keeps the
    last requests answered, as (peer, offset, length), and ``counts`` the number per peer."""

    def __init__(self, p2p: P2P, protocol_name: str, lookup: Callable[[str], os.PathLike | str | None], *,
                 max_chunk: int = 4 * DEFAULT_CHUNK, max_streams: int = 32, idle_timeout: float = 30.0,
                 fault: FaultHook | None = None):
        if not 1 <= max_chunk <= MAX_CHUNK:
            raise ValueError(f"max_chunk must be in [1, {MAX_CHUNK}], got {max_chunk}")
        if max_streams < 1 or idle_timeout <= 0:
            raise ValueError("max_streams must be >= 1 and idle_timeout > 0")
        self.p2p, self.protocol_name, self.lookup = p2p, protocol_name, lookup
        self.max_chunk, self.max_streams, self.idle_timeout, self.fault = max_chunk, max_streams, idle_timeout, fault
        self.served: collections.deque[tuple[str, int, int]] = collections.deque(maxlen=4096)
        self.counts: collections.Counter[str] = collections.Counter()
        self._active = 0

    async def start(self) -> None:
        await serve_on(self.p2p, {self.protocol_name: self._handle}, logger, "shard stream handler")

    async def stop(self) -> None:
        await stop_serving(self.p2p, [self.protocol_name], logger)

    async def _handle(self, stream: Stream) -> None:
        """Serve one client's requests for one shard (a refusal ends the stream: protocol/streams.py closes it
        after the client has read the reason and hung up, so its pipelined requests cannot reset the stream
        with the refusal in flight and leave it a bare "connection reset" instead of the reason)."""
        peer = stream.peer
        self._active += 1
        files: dict[str, tuple[int, int]] = {}  # sha256 -> (fd, size), opened once per stream
        try:
            if self._active > self.max_streams:
                await stream.send(refusal_to_wire(TransferRefusal("busy", "too many streams; try later")))
                return
            index = 0
            while True:
                try:
                    data = await stream.receive(MAX_CONTROL_BYTES, self.idle_timeout)
                except asyncio.IncompleteReadError as e:
                    if e.partial:
                        raise
                    return  # the client is done
                try:
                    req = chunk_request_from_wire(data)
                except WireError as e:
                    await stream.send(refusal_to_wire(TransferRefusal("bad_request", str(e))))
                    return
                refusal = await self._check(req, files)
                if refusal is not None:
                    await stream.send(refusal_to_wire(refusal))
                    return
                fault = self.fault(peer, req, index) if self.fault is not None else None
                index += 1
                if fault is ServeFault.HANG_UP:
                    stream.close()
                    return
                if fault is ServeFault.OVERSIZE:
                    stream.writer.write((reply_bound(req.length) + 1).to_bytes(4, "big"))
                    await stream.writer.drain()
                    stream.close()
                    return
                fd = files[req.sha256][0]
                chunk = await asyncio.to_thread(os.pread, fd, req.length, req.offset)
                if len(chunk) != req.length:  # the file shrank under us
                    await stream.send(refusal_to_wire(TransferRefusal("io_error", "short read")))
                    return
                offset = req.offset + 1 if fault is ServeFault.WRONG_OFFSET else req.offset
                chunk = chunk[:-1] if fault is ServeFault.SHORT else chunk
                self.served.append((peer, req.offset, req.length))
                self.counts[peer] += 1
                await stream.send(chunk_reply_to_wire(ChunkReply(req.sha256, offset, chunk)))
        finally:
            self._active -= 1
            for fd, _ in files.values():
                os.close(fd)

    async def _check(self, req: ChunkRequest, files: dict[str, tuple[int, int]]) -> TransferRefusal | None:
        if req.length > self.max_chunk:
            return TransferRefusal("too_large", f"chunks of at most {self.max_chunk} bytes")
        if req.sha256 not in files:
            if files:  # one shard per stream: a client fetches one file at a time
                return TransferRefusal("bad_request", "one shard per stream")
            try:
                path = self.lookup(req.sha256)
                fd = None if path is None else os.open(path, os.O_RDONLY)
            except OSError as e:
                logger.warning("shard %s: %s", req.sha256[:16], e)
                return TransferRefusal("io_error", f"cannot open shard {req.sha256[:16]}...")
            if fd is None:
                return TransferRefusal("unknown_shard", f"no shard {req.sha256[:16]}... here")
            st = os.fstat(fd)
            files[req.sha256] = (fd, st.st_size)
            if not stat.S_ISREG(st.st_mode):
                return TransferRefusal("io_error", f"shard {req.sha256[:16]}... is not a regular file")
        size = files[req.sha256][1]
        if req.offset + req.length > size:
            return TransferRefusal("out_of_range", f"bytes [{req.offset}, {req.offset + req.length}) of a "
                                                   f"{size}-byte shard")
        return None


# ---- client ------------------------------------------------------------------------------------------------


def part_path(dest: os.PathLike | str) -> pathlib.Path:
    dest = pathlib.Path(dest)
    return dest.with_name(dest.name + ".part")


def _sha256_of(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, 4 << 20, offset):
        h.update(block)
        offset += len(block)
    return h.hexdigest()


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def _fetch_from(p2p: P2P, peer: PeerID, protocol_name: str, info: ShardInfo, fd: int, offset: int,
                      chunk: int, window: int, timeout: float) -> int:
    """Append bytes [offset, ...) of the shard from ``peer`` to ``fd``; the new offset when the shard is
    complete, an exception (after keeping every checked chunk) when the peer fails."""
    async with open_stream(p2p, peer, protocol_name, dial_timeout=timeout) as stream:
        asked: collections.deque[ChunkRequest] = collections.deque()
        next_offset = offset
        while offset < info.size:
            while len(asked) < window and next_offset < info.size:
                req = ChunkRequest(info.sha256, next_offset, min(chunk, info.size - next_offset))
                await asyncio.wait_for(stream.send(chunk_request_to_wire(req)), timeout)
                asked.append(req)
                next_offset += req.length
            req = asked.popleft()
            reply = chunk_reply_from_wire(await stream.receive(reply_bound(req.length), timeout), req)
            if isinstance(reply, TransferRefusal):
                raise ShardTransferError(f"refused ({reply.code}): {reply.reason}")
            _write_all(fd, reply.data)
            offset += len(reply.data)
        return offset


async def fetch_shard(p2p: P2P, peers: Iterable[PeerID | str], info: ShardInfo, dest: os.PathLike | str, *,
                      protocol_name: str, chunk: int = DEFAULT_CHUNK, window: int = 4,
                      timeout: float = 30.0) -> pathlib.Path:
    """Fetch the shard ``info`` names into ``dest`` from ``peers`` (tried in order, each going on from the
    bytes already in ``<dest>.part``) and return ``dest``, sha256-verified and atomically in place.

    ``timeout`` bounds dialling a peer and each chunk's round trip. ShardTransferError (one line) when no peer
    completes the shard, naming each peer's failure, or when the bytes fail the sha256, naming who sent
    them; BusyError when another fetch of ``dest`` is running. ``dest`` is returned at once if it already
    holds the shard."""
    if not isinstance(info, ShardInfo):
        raise ValueError(f"info must be a ShardInfo, got {type(info).__name__}")
    if not 1 <= chunk <= MAX_CHUNK or window < 1 or timeout <= 0:
        raise ValueError(f"chunk must be in [1, {MAX_CHUNK}], window >= 1 and timeout > 0")
    peer_ids = [peer_id(p) for p in peers]
    dest = pathlib.Path(dest)
    part = part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and dest.stat().st_size == info.size:
        fd = os.open(dest, os.O_RDONLY)
        try:
            if await asyncio.to_thread(_sha256_of, fd) == info.sha256:
                return dest
        finally:
            os.close(fd)
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"{info.file}: another fetch into {dest} is running") from None
        offset = resumed = os.fstat(fd).st_size
        if offset > info.size:  # not a prefix of this shard: start over
            os.ftruncate(fd, 0)
            offset = resumed = 0
        errors, sources = [], []
        for peer in peer_ids:
            if offset >= info.size:
                break
            before = offset
            try:
                offset = await _fetch_from(p2p, peer, protocol_name, info, fd, offset, chunk, window, timeout)
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                errors.append(f"{peer}: hung up ({type(e).__name__})")
            except TimeoutError:
                errors.append(f"{peer}: no answer within {timeout:g} s")
            except Exception as e:  # WireError, refusals, and the p2pd client's own (P2PDaemonError, ...)
                errors.append(f"{peer}: {type(e).__name__}: {e}")
            offset = os.fstat(fd).st_size
            if offset > before:
                sources.append(peer.to_base58())
                logger.debug("%s: bytes [%d, %d) from %s", info.file, before, offset, peer)
        if offset < info.size:
            if offset == 0:  # nothing to resume from: leave no empty .part behind
                part.unlink(missing_ok=True)
            raise ShardTransferError(f"{info.file}: fetched {offset} of {info.size} bytes; "
                                     f"{'; '.join(errors) or 'no peers to ask'}")
        await asyncio.to_thread(os.fsync, fd)
        digest = await asyncio.to_thread(_sha256_of, fd)
        if digest != info.sha256:
            part.unlink(missing_ok=True)
            earlier = f" and {resumed} bytes resumed from an earlier .part" if resumed else ""
            raise ShardTransferError(f"{info.file}: sha256 {digest[:16]}... is not the manifest's "
                                     f"{info.sha256[:16]}...; bytes from {', '.join(sources) or 'no peer'}{earlier}")
        os.replace(part, dest)
        _fsync_dir(dest.parent)
        return dest
    finally:
        os.close(fd)


__all__ = ["DEFAULT_CHUNK", "MAX_CHUNK", "BusyError", "ChunkReply", "ChunkRequest", "ServeFault", "ShardServer",
           "ShardTransferError", "TransferRefusal", "chunk_reply_from_wire", "chunk_reply_to_wire",
           "chunk_request_from_wire", "chunk_request_to_wire", "fetch_shard", "part_path", "refusal_to_wire",
           "reply_bound", "shard_protocol"]
