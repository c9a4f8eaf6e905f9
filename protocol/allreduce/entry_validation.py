"""DHT validation of matchmaking entries (hivemind RecordValidatorBase): declarations and started markers.

Round keys are made up per round (protocol/allreduce/matchmaking.py: round_key), so unlike the swarm's peers and
jobs dictionaries they cannot be listed in advance; the validator recognises matchmaking entries by their subkey
instead. Every subkey that begins with "!" is reserved for matchmaking, under any key, and is accepted only if
  - it is "!declared/<peer>" or "!started/<peer>" with an Ed25519 peer id, and the value carries that peer's
    signature over (key, subkey, value, expiration_time) (validation.signed_payload): only the peer an entry
    names can write it, and it cannot be moved to another round or given a later expiry;
  - it expires at most MAX_ENTRY_TTL_S + CLOCK_SKEW_S after this node's DHT time;
  - the value is a well-formed declaration, or a started group that contains its leader, within its size bound.
A reader never trusts an entry under any other subkey (matchmaking.seen_from_entries), so nothing a stranger
writes elsewhere under a round's key can stall a round. Other records pass untouched.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

from protocol.allreduce.matchmaking import (
    CLOCK_SKEW_S,
    DECLARED,
    MAX_DECLARATION_BYTES,
    MAX_ENTRY_TTL_S,
    MAX_STARTED_BYTES,
    declaration_from_wire,
    parse_entry_subkey,
    started_from_wire,
)
from protocol.records.peer_keys import peer_id_of, public_key_from_peer_id
from protocol.records.validation import SIGNATURE_BYTES, SignedDictionaryValidator, signed_payload
from protocol.wire import WireError, unpack_bounded

RESERVED_PREFIX = "!"
_SIGNED_OVERHEAD = 16 + SIGNATURE_BYTES  # the DHT's msgpack bin header around our bytes, plus the signature


def _reserved_subkey(record: DHTRecord) -> str | None:
    """The decoded subkey if it is in matchmaking's reserved namespace, else None."""
    if record.subkey is None:
        return None
    try:
        subkey = unpack_bounded(record.subkey, 256)
    except WireError:
        return None  # not a subkey any reader decodes
    return subkey if isinstance(subkey, str) and subkey.startswith(RESERVED_PREFIX) else None


class SignedMatchmakingValidator(SignedDictionaryValidator):
    """Signs this node's own matchmaking entries and checks everyone's (see the module docstring)."""

    what = "matchmaking entry"

    def __init__(self, private_key: Ed25519PrivateKey | None = None, *, max_ttl: float = MAX_ENTRY_TTL_S + CLOCK_SKEW_S,
                 now: Callable[[], float] = get_dht_time):
        if not max_ttl > 0:
            raise ValueError(f"max_ttl must be > 0, got {max_ttl}")
        self._private_key = private_key
        self._own_id = None if private_key is None else peer_id_of(private_key.public_key())
        self._max_ttl, self._now = max_ttl, now

    def _protected(self, record: DHTRecord) -> bool:
        return _reserved_subkey(record) is not None

    def sign_value(self, record: DHTRecord) -> bytes:
        if not self._protected(record):
            return record.value
        if self._private_key is None or parse_entry_subkey(_reserved_subkey(record))[1] != self._own_id:
            raise ValueError("a node can only write matchmaking entries that name itself")
        return record.value + self._private_key.sign(signed_payload(record))

    def check(self, record: DHTRecord) -> None:
        """Raise WireError / PeerIdError / InvalidSignature naming why ``record`` is unacceptable."""
        kind, peer = parse_entry_subkey(_reserved_subkey(record))
        limit = (MAX_DECLARATION_BYTES if kind == DECLARED else MAX_STARTED_BYTES) + _SIGNED_OVERHEAD
        if len(record.value) > limit:
            raise WireError(f"{kind} entry of {len(record.value)} bytes exceeds {limit}")
        if len(record.value) <= SIGNATURE_BYTES:
            raise WireError(f"{kind} entry too short to carry a signature")
        ahead = record.expiration_time - self._now()
        if not ahead <= self._max_ttl:
            raise WireError(f"{kind} entry of {peer} expires {ahead:.0f} s ahead, over {self._max_ttl:.0f} s")
        body, signature = record.value[:-SIGNATURE_BYTES], record.value[-SIGNATURE_BYTES:]
        try:
            public_key_from_peer_id(peer).verify(
                signature, signed_payload(DHTRecord(record.key, record.subkey, body, record.expiration_time)))
        except InvalidSignature:
            raise InvalidSignature(f"bad signature on the {kind} entry of {peer}") from None
        payload = unpack_bounded(body, limit)  # the DHT's msgpack wrapping of our bytes value
        if kind == DECLARED:
            declaration_from_wire(payload)
        elif peer not in started_from_wire(payload):
            raise WireError(f"{kind} entry of {peer} does not list its leader")
