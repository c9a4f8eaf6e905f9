"""Sealed frames of the direct data path: activation and gradient hops over a plain TCP connection, beside libp2p.

    key, session = new_session()                        # the stage host, answering a DirectOpen over libp2p
    trainer = DirectChannel(key, session, "trainer")    # each end of one TCP connection holds one channel
    host = DirectChannel(key, session, "host")
    frame = trainer.seal(FORWARD, activation_bytes)     # header (36 bytes) + AES-256-GCM ciphertext + tag
    head = parse_header(frame[:HEADER_SIZE], REQUESTS, max_payload)   # the host: checked before reading the body
    data = host.open(frame[:HEADER_SIZE], head, frame[HEADER_SIZE:])  # WireError on a wrong session/sequence/tag
    await send_sealed(writer, trainer, FORWARD, data); data = await read_sealed(reader, trainer, (REPLY,), bound)

Why: every hop over libp2p goes through p2pd's unix-socket relay twice, which costs ~8 ms for 1 MiB on loopback
(README "Pipeline benchmarks"). libp2p stays the control channel: the trainer asks a stage host for a session
over an authenticated, encrypted libp2p stream (protocol/pipeline/control.py DirectOpen -> DirectOffer: the
host's TCP endpoint, a fresh random 16-byte session id and a fresh random 256-bit key), then sends many frames
over one persistent TCP connection bound to that session.

A frame: header | ciphertext | 16-byte tag, the header (big-endian) being
    magic b"SWD1" (4) | kind (1) | reserved, zero (3) | session id (16) | sequence number (8) | body length (4)
and the body AES-256-GCM(key, nonce = direction (4) | sequence (8), plaintext = the frame's payload
(an activation frame of protocol/pipeline/activations.py), associated data = the header).

What it guarantees (the attacks it handles):
  * Injection and alteration: only a holder of the session key (the peer authenticated over libp2p, who
    asked for it, and the host) can produce a frame that opens; a forged or altered header or body fails the
    tag (AEAD), and the receiver closes the connection.
  * Replay, reordering, reflection: the sequence number of each direction starts at 0 and must be exactly the
    next one; the direction is part of the nonce and the kind (request / reply) part of the header, so a frame
    cannot be replayed on the same or another connection (a session is bound to the first connection that
    uses it and never offered again) nor reflected back to its sender.
  * Confidentiality: the body is encrypted (AES-GCM), so activations do not travel in the clear; the key
    travels only inside libp2p's encrypted stream. There is no forward secrecy beyond libp2p's own: a key
    taken from a live process opens that session's traffic. A swarm that wants only libp2p's transport
    security turns the direct path off (node/jobs/pipeline/stage_host.py StageConfig.direct,
    node/jobs/pipeline/trainer.py TrainerConfig.direct).
  * Resource exhaustion: the declared body length is checked against the receiver's bound (the same
    max_frame_bytes as activation frames, plus the tag) before a byte of the body is read; a (key, nonce)
    pair is never reused, since keys are per session and sequence numbers never wrap (the sender refuses).
AES-GCM was measured against keyed BLAKE2b and HMAC-SHA256 on 1 MiB (scripts/bench_pipeline.py --part hop,
"mac_ms"): with AES-NI it is several times cheaper than either and also hides the payload.
Pure apart from send_sealed / read_sealed (asyncio streams, as protocol/streams.py); no node/ imports.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol.streams import MAX_FRAME
from protocol.wire import WireError

MAGIC = b"SWD1"
FORWARD, BACKWARD, REPLY = 1, 2, 3  # frame kinds: a ForwardRequest, a BackwardRequest, the host's reply
REQUESTS = (FORWARD, BACKWARD)
KIND_NAMES = {FORWARD: "forward", BACKWARD: "backward", REPLY: "reply"}
_HEADER = struct.Struct(">4sB3s16sQI")
HEADER_SIZE = _HEADER.size  # 36
TAG_SIZE = 16
SESSION_SIZE = 16
KEY_SIZE = 32
MAX_SEQ = 2**64 - 1
_DIRECTION = {"trainer": 0, "host": 1}  # the sender's role, first 4 bytes of the nonce


def new_session() -> tuple[bytes, bytes]:
    """(key, session id): 32 and 16 random bytes from the OS CSPRNG."""
    return secrets.token_bytes(KEY_SIZE), secrets.token_bytes(SESSION_SIZE)


@dataclass(frozen=True)
class DirectHeader:
    kind: int
    session: bytes
    seq: int
    length: int  # of the body: ciphertext + tag


def parse_header(data: bytes, kinds: tuple[int, ...], max_payload: int) -> DirectHeader:
    """The header in ``data`` (HEADER_SIZE bytes); WireError unless the magic, a kind of ``kinds``, zero reserved
    bytes and a body of at most ``max_payload`` + TAG_SIZE bytes. The session and sequence number are checked by
    the receiving DirectChannel, the tag when the body is opened."""
    if not isinstance(data, (bytes, bytearray)) or len(data) != HEADER_SIZE:
        raise WireError(f"direct header: expected {HEADER_SIZE} bytes")
    magic, kind, reserved, session, seq, length = _HEADER.unpack(data)
    if magic != MAGIC:
        raise WireError(f"direct header: bad magic {magic!r}")
    if kind not in kinds:
        raise WireError(f"direct header: kind {kind} where {'/'.join(KIND_NAMES[k] for k in kinds)} is expected")
    if reserved != b"\0\0\0":
        raise WireError("direct header: reserved bytes not zero")
    if not TAG_SIZE <= length <= min(max_payload, MAX_FRAME) + TAG_SIZE:
        raise WireError(f"direct header: peer announced a {length}-byte body; at most "
                        f"{min(max_payload, MAX_FRAME) + TAG_SIZE} expected here")
    return DirectHeader(kind, session, seq, length)


class DirectChannel:
    """One end of one direct session: seals what this end sends and opens what it receives, each direction
    with its own sequence numbers from 0. ``role``: "trainer" (sends requests, receives replies) or "host"."""

    def __init__(self, key: bytes, session: bytes, role: str):
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise ValueError(f"key: expected {KEY_SIZE} bytes")
        if not isinstance(session, bytes) or len(session) != SESSION_SIZE:
            raise ValueError(f"session: expected {SESSION_SIZE} bytes")
        if role not in _DIRECTION:
            raise ValueError(f"role must be trainer or host, got {role!r}")
        self.session, self.role = session, role
        self._aead = AESGCM(key)
        self._out, self._in = _DIRECTION[role], 1 - _DIRECTION[role]
        self.sent = 0  # the next sequence number to send
        self.received = 0  # the next sequence number expected

    def seal(self, kind: int, payload: bytes) -> tuple[bytes, bytes]:
        """(header, body) of the next frame carrying ``payload``."""
        if kind not in ((REPLY,) if self.role == "host" else REQUESTS):
            raise ValueError(f"a {self.role} does not send {KIND_NAMES.get(kind, kind)} frames")
        if len(payload) > MAX_FRAME:
            raise ValueError(f"payload of {len(payload)} bytes is larger than {MAX_FRAME}")
        if self.sent > MAX_SEQ:
            raise ValueError("sequence numbers exhausted: open a new session")
        seq = self.sent
        header = _HEADER.pack(MAGIC, kind, b"\0\0\0", self.session, seq, len(payload) + TAG_SIZE)
        body = self._aead.encrypt(self._out.to_bytes(4, "big") + seq.to_bytes(8, "big"), payload, header)
        self.sent += 1
        return header, body

    def check(self, head: DirectHeader) -> None:
        """WireError unless ``head`` names this session and the next sequence number (before the body is read)."""
        if head.session != self.session:
            raise WireError("direct frame: wrong session id")
        if head.seq != self.received:
            raise WireError(f"direct frame: sequence number {head.seq}, expected {self.received} (replayed or "
                            "reordered)")

    def open(self, header: bytes, head: DirectHeader, body: bytes) -> bytes:
        """The payload of a frame whose header (raw ``header``, parsed ``head``) passed parse_header; WireError on
        a wrong session, sequence number, body length or tag. The next frame must carry the next number."""
        self.check(head)
        if len(body) != head.length:
            raise WireError(f"direct frame: {len(body)} body bytes, the header says {head.length}")
        nonce = self._in.to_bytes(4, "big") + head.seq.to_bytes(8, "big")
        try:
            payload = self._aead.decrypt(nonce, body, header)
        except InvalidTag:
            raise WireError("direct frame: authentication failed (bad tag: forged, altered or another key)") from None
        self.received += 1
        return payload

    def open_frame(self, frame: bytes, kinds: tuple[int, ...], max_payload: int) -> tuple[int, bytes]:
        """(kind, payload) of one whole frame in ``frame``; WireError on anything that would be refused."""
        if not isinstance(frame, (bytes, bytearray)) or len(frame) < HEADER_SIZE:
            raise WireError("direct frame: shorter than its header")
        header = bytes(frame[:HEADER_SIZE])
        head = parse_header(header, kinds, max_payload)
        return head.kind, self.open(header, head, bytes(frame[HEADER_SIZE:]))


def maddr_ips(maddrs) -> list[str]:
    """The IP addresses in multiaddrs ("/ip4/127.0.0.1/tcp/4001/p2p/..." -> "127.0.0.1"), in order, no repeats."""
    out = []
    for maddr in maddrs:
        parts = str(maddr).split("/")
        for proto, value in zip(parts, parts[1:]):
            if proto in ("ip4", "ip6") and value not in out:
                out.append(value)
    return out


async def send_sealed(writer: asyncio.StreamWriter, channel: DirectChannel, kind: int, payload: bytes) -> None:
    header, body = channel.seal(kind, payload)
    writer.write(header)
    writer.write(body)
    await writer.drain()


async def read_header(reader: asyncio.StreamReader, kinds: tuple[int, ...],
                      max_payload: int) -> tuple[bytes, DirectHeader]:
    header = await reader.readexactly(HEADER_SIZE)
    return header, parse_header(header, kinds, max_payload)


async def read_sealed(reader: asyncio.StreamReader, channel: DirectChannel, kinds: tuple[int, ...],
                      max_payload: int) -> tuple[int, bytes]:
    """(kind, payload) of the next frame; WireError on a refused one (before its body is read when the header
    is at fault), IncompleteReadError when the peer hangs up."""
    header, head = await read_header(reader, kinds, max_payload)
    channel.check(head)
    return head.kind, channel.open(header, head, await reader.readexactly(head.length))


__all__ = ["BACKWARD", "FORWARD", "HEADER_SIZE", "KEY_SIZE", "KIND_NAMES", "MAGIC", "REPLY", "REQUESTS",
           "SESSION_SIZE", "TAG_SIZE", "DirectChannel", "DirectHeader", "maddr_ips", "new_session", "parse_header",
           "read_header", "read_sealed", "send_sealed"]
