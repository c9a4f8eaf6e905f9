"""End-to-end security of a relayed stream: a signed ephemeral key exchange, then sealed records.

A relay pipes bytes between two peers that cannot connect to each other (protocol/relay/circuits.py). It sees
every byte, so the two ends do not trust it: they run their own handshake through the pipe and then speak
sealed records only they can open.

    hello = Hello.make(key, protocol, origin, target, relay)          # the origin; hello.secret stays here
    accept = answer(key, hello_from_wire(frame), target, relay)        # the target: WireError if hello is bad
    keys = session_keys(hello, accept, secret)                         # both ends, from their own secret
    reader, writer = SealedReader(raw_reader, keys, "origin"), SealedWriter(raw_writer, keys, "origin")

The handshake (each message one length-prefixed frame of protocol/streams.py):
  * origin -> target: Hello {protocol, origin, target, relay, X25519 ephemeral public key}, signed with the
    origin's Ed25519 identity key (the one its peer id embeds). The target checks it names this target, the
    relay it came through, a protocol it serves, and the origin's signature.
  * target -> origin: Accept {the target's ephemeral public key}, signed by the target over both ephemeral keys,
    both peer ids and the protocol; the origin checks it with the key the target's peer id embeds.
  * Both derive a 256-bit AES-GCM key with HKDF-SHA256 over the X25519 secret, salted by both ephemeral keys.

What it guarantees against the relay (or anyone on the path): it cannot pose as either end (the hello and the
accept are signed; a replayed hello is useless without its ephemeral secret, and an accept signs the origin's
fresh ephemeral key, so an old one does not verify), and it cannot read, alter, drop, reorder or replay a record
undetected (AES-GCM; nonce = direction | sequence number, each direction from 0; a record out of sequence fails
its tag). It can delay or cut the stream, which both ends see as a peer that stalls or hangs up.

Records: a 4-byte big-endian length L (at most MAX_RECORD + 16) and L bytes of AES-GCM ciphertext. The sealed
reader and writer stand in for asyncio's StreamReader/StreamWriter (the methods protocol/streams.py uses), so
every handler and caller works unchanged over a relay. No node/ imports; I/O only in the reader and writer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.records.peer_keys import PeerIdError, public_key_from_peer_id
from protocol.wire import WireError, as_map, exact_map, pack, text, unpack_bounded
from protocol.wire import field as wire_field

MAX_HANDSHAKE = 1024  # bytes of a hello or an accept frame
MAX_RECORD = 65536  # plaintext bytes of one sealed record
TAG = 16
LENGTH = 4
MAX_PROTOCOL = 200  # characters of a protocol name
HELLO_CONTEXT = b"swarmnode relay hello v1\0"
ACCEPT_CONTEXT = b"swarmnode relay accept v1\0"
_DIRECTION = {"origin": 0, "target": 1}
_MAX_SEQ = 2**64 - 1


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _peer_key(peer: str, what: str):
    try:
        return public_key_from_peer_id(peer)
    except PeerIdError as e:
        raise WireError(f"relay {what}: {e}") from None


@dataclass(frozen=True)
class Hello:
    protocol: str
    origin: str
    target: str
    relay: str
    ephemeral: bytes  # the origin's X25519 public key (32 bytes)
    signature: bytes = b""
    secret: X25519PrivateKey | None = field(default=None, compare=False, repr=False)  # the origin's side only

    def signed_part(self) -> bytes:
        return HELLO_CONTEXT + pack([self.protocol, self.origin, self.target, self.relay, self.ephemeral])

    @classmethod
    def make(cls, key: Ed25519PrivateKey, protocol: str, origin: str, target: str, relay: str) -> Hello:
        secret = X25519PrivateKey.generate()
        unsigned = cls(protocol, origin, target, relay, _raw(secret.public_key()))
        return cls(protocol, origin, target, relay, unsigned.ephemeral, key.sign(unsigned.signed_part()), secret)


def hello_to_wire(hello: Hello) -> bytes:
    return pack({"proto": hello.protocol, "from": hello.origin, "to": hello.target, "via": hello.relay,
                 "eph": hello.ephemeral, "sig": hello.signature})


def hello_from_wire(data: bytes) -> Hello:
    obj = exact_map(unpack_bounded(data, MAX_HANDSHAKE), ("proto", "from", "to", "via", "eph", "sig"), "relay hello")
    eph, sig = wire_field(obj, "eph", bytes, "relay hello"), wire_field(obj, "sig", bytes, "relay hello")
    if len(eph) != 32 or len(sig) != 64:
        raise WireError("relay hello: a 32-byte ephemeral key and a 64-byte signature expected")
    return Hello(text(obj, "proto", "relay hello", MAX_PROTOCOL), text(obj, "from", "relay hello"),
                 text(obj, "to", "relay hello"), text(obj, "via", "relay hello"), eph, sig)


@dataclass(frozen=True)
class Accept:
    ephemeral: bytes  # the target's X25519 public key
    signature: bytes = b""
    secret: X25519PrivateKey | None = field(default=None, compare=False, repr=False)  # the target's side only
    refused: str = ""  # instead of a key: why the target will not take this stream (one line)


def _accept_part(hello: Hello, ephemeral: bytes) -> bytes:
    return ACCEPT_CONTEXT + pack([hello.ephemeral, ephemeral, hello.origin, hello.target, hello.protocol])


def accept_to_wire(accept: Accept) -> bytes:
    if accept.refused:
        return pack({"refused": accept.refused[:MAX_PROTOCOL]})
    return pack({"eph": accept.ephemeral, "sig": accept.signature})


def accept_from_wire(data: bytes) -> Accept:
    obj = as_map(unpack_bounded(data, MAX_HANDSHAKE), "relay accept")
    if "refused" in obj:
        return Accept(b"", refused=text(obj, "refused", "relay accept", MAX_PROTOCOL) or "refused")
    obj = exact_map(obj, ("eph", "sig"), "relay accept")
    eph, sig = wire_field(obj, "eph", bytes, "relay accept"), wire_field(obj, "sig", bytes, "relay accept")
    if len(eph) != 32 or len(sig) != 64:
        raise WireError("relay accept: a 32-byte ephemeral key and a 64-byte signature expected")
    return Accept(eph, sig)


def check_hello(hello: Hello, target: str, relay: str, origin: str) -> None:
    """WireError unless ``hello`` is for this ``target``, came through ``relay`` from the ``origin`` the relay named,
    and carries the origin's signature."""
    if hello.target != target:
        raise WireError(f"relay hello: addressed to {hello.target[-8:]}, not this peer")
    if hello.relay != relay or hello.origin != origin:
        raise WireError("relay hello: names another relay or origin than the circuit it came on")
    try:
        _peer_key(hello.origin, "hello").verify(hello.signature, hello.signed_part())
    except InvalidSignature:
        raise WireError(f"relay hello: bad signature of {hello.origin[-8:]}") from None


def answer(key: Ed25519PrivateKey, hello: Hello) -> Accept:
    """The target's signed accept of a checked hello, holding its ephemeral secret."""
    secret = X25519PrivateKey.generate()
    eph = _raw(secret.public_key())
    return Accept(eph, key.sign(_accept_part(hello, eph)), secret)


def check_accept(accept: Accept, hello: Hello) -> None:
    """WireError unless the target ``hello`` named signed ``accept`` for this very hello."""
    if accept.refused:
        raise WireError(f"relayed stream refused by {hello.target[-8:]}: {accept.refused}")
    try:
        _peer_key(hello.target, "accept").verify(accept.signature, _accept_part(hello, accept.ephemeral))
    except InvalidSignature:
        raise WireError(f"relay accept: bad signature of {hello.target[-8:]} (not the target, or altered)") from None


def session_key(hello: Hello, accept: Accept) -> bytes:
    """The stream's AES-256-GCM key, on either end: the end's own ephemeral secret with the other's public key."""
    if hello.secret is not None:
        shared = hello.secret.exchange(X25519PublicKey.from_public_bytes(accept.ephemeral))
    elif accept.secret is not None:
        shared = accept.secret.exchange(X25519PublicKey.from_public_bytes(hello.ephemeral))
    else:
        raise ValueError("neither the hello nor the accept holds this end's ephemeral secret")
    info = b"swarmnode relay v1" + pack([hello.origin, hello.target, hello.protocol])
    return HKDF(hashes.SHA256(), 32, hello.ephemeral + accept.ephemeral, info).derive(shared)


def _nonce(direction: int, seq: int) -> bytes:
    if seq > _MAX_SEQ:
        raise WireError("relayed stream: sequence numbers exhausted")
    return direction.to_bytes(4, "big") + seq.to_bytes(8, "big")


class SealedWriter:
    """Seals what is written into records; stands in for asyncio.StreamWriter (write, drain, close, ...). Writes
    are gathered until drain() or close() so that a frame's header and body travel in one record."""

    def __init__(self, raw: asyncio.StreamWriter, key: bytes, role: str):
        self.raw, self._aead, self._dir = raw, AESGCM(key), _DIRECTION[role]
        self._pending = bytearray()
        self.sent = 0  # records sealed so far (the next sequence number)

    def write(self, data: bytes) -> None:
        self._pending += data

    def _flush(self) -> None:
        view, self._pending = memoryview(bytes(self._pending)), bytearray()
        for start in range(0, len(view), MAX_RECORD):
            sealed = self._aead.encrypt(_nonce(self._dir, self.sent), view[start:start + MAX_RECORD], None)
            self.sent += 1
            self.raw.write(len(sealed).to_bytes(LENGTH, "big") + sealed)

    async def drain(self) -> None:
        self._flush()
        await self.raw.drain()

    def can_write_eof(self) -> bool:
        return self.raw.can_write_eof()

    def write_eof(self) -> None:
        self._flush()
        self.raw.write_eof()

    def is_closing(self) -> bool:
        return self.raw.is_closing()

    def close(self) -> None:
        try:
            if self._pending and not self.raw.is_closing():
                self._flush()
        finally:
            self.raw.close()

    async def wait_closed(self) -> None:
        await self.raw.wait_closed()

    def get_extra_info(self, name: str, default=None):
        return self.raw.get_extra_info(name, default)


class SealedReader:
    """Opens records as they are needed; stands in for asyncio.StreamReader (readexactly, read, at_eof). It holds
    at most one record beyond what the caller asked for, so a caller's frame bound stays its memory bound."""

    def __init__(self, raw: asyncio.StreamReader, key: bytes, role: str):
        self.raw, self._aead, self._dir = raw, AESGCM(key), 1 - _DIRECTION[role]
        self._buffer = bytearray()
        self.received = 0  # records opened so far
        self._eof = False

    async def _record(self) -> bool:
        """Open the next record into the buffer; False at a clean end of stream (between records)."""
        try:
            header = await self.raw.readexactly(LENGTH)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise
            self._eof = True
            return False
        length = int.from_bytes(header, "big")
        if not TAG <= length <= MAX_RECORD + TAG:
            raise WireError(f"relayed stream: a {length}-byte record; at most {MAX_RECORD + TAG} expected")
        sealed = await self.raw.readexactly(length)
        try:
            self._buffer += self._aead.decrypt(_nonce(self._dir, self.received), sealed, None)
        except InvalidTag:
            raise WireError("relayed stream: a record failed authentication (altered, replayed or reordered)") \
                from None
        self.received += 1
        return True

    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if not await self._record():
                partial, self._buffer = bytes(self._buffer), bytearray()
                raise asyncio.IncompleteReadError(partial, n)
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def read(self, n: int = -1) -> bytes:
        if not self._buffer and not self._eof:
            await self._record()
        take = len(self._buffer) if n < 0 else min(n, len(self._buffer))
        out = bytes(self._buffer[:take])
        del self._buffer[:take]
        return out

    def at_eof(self) -> bool:
        return self._eof and not self._buffer
