"""DHT record validation for the swarm's signed dictionaries (hivemind RecordValidatorBase).

A record under a protected key (the swarm's ``peers`` dictionary) is accepted only if
  - its subkey is an Ed25519 peer id, and the value carries that key's signature over
    (key, subkey, value, expiration_time): only the owner can write its own entry, and a replayed
    old record cannot be given a later expiry;
  - the signed value is at most MAX_RECORD_BYTES;
  - the value decodes to a PeerRecord of a known schema version whose peer_id equals the subkey.
Records under other keys pass untouched (other protocols bring their own validators).
"""

from __future__ import annotations

import logging

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from protocol import rejections
from protocol.records.peer import MAX_RECORD_BYTES, peer_record_from_wire, swarm_key
from protocol.records.peer_keys import peer_id_of, public_key_from_peer_id
from protocol.wire import WireError, pack, unpack_bounded

logger = logging.getLogger(__name__)
SIGNATURE_BYTES = 64


def key_id(key: str) -> bytes:
    """The bytes hivemind's DHT uses for a key (validators only ever see this hash)."""
    return DHTID.generate(source=key).to_bytes()


def signed_payload(record: DHTRecord) -> bytes:
    """What an Ed25519 signature on a DHT record covers: key, subkey, value and expiration time, so that an old
    record cannot be replayed with a later expiry nor moved to another subkey, dictionary or swarm."""
    return pack([record.key, record.subkey, record.value, record.expiration_time])


class SignedDictionaryValidator(RecordValidatorBase):
    """What every signed-dictionary validator shares: values under protected keys end in a 64-byte Ed25519
    signature (added by sign_value, removed by strip_value); a subclass names its keys (``_protected``) and
    raises from ``check`` (ValueError, which WireError and PeerIdError are, or InvalidSignature) to reject."""

    what = "record"  # for the log line

    def _protected(self, record: DHTRecord) -> bool:
        raise NotImplementedError

    def check(self, record: DHTRecord) -> None:
        raise NotImplementedError

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value[:-SIGNATURE_BYTES] if self._protected(record) else record.value

    def validate(self, record: DHTRecord) -> bool:
        if not self._protected(record):
            return True
        try:
            self.check(record)
        except (ValueError, InvalidSignature) as e:
            logger.warning("rejected %s: %s", self.what, e)
            rejections.count(self.what, e)
            return False
        return True

    @property
    def priority(self) -> int:
        return 10  # sign last, validate first: the signature covers what other validators produced

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


class SignedPeerRecordValidator(SignedDictionaryValidator):
    """Signs this node's own peer record and checks everyone else's (see module docstring)."""

    what = "peer record"

    def __init__(self, swarm: str, private_key: Ed25519PrivateKey | None = None):
        self._peers_key_id = key_id(swarm_key(swarm, "peers"))
        self._private_key = private_key
        self._own_subkey = None
        if private_key is not None:
            self._own_subkey = pack(peer_id_of(private_key.public_key()))

    def _protected(self, record: DHTRecord) -> bool:
        return record.key == self._peers_key_id

    def sign_value(self, record: DHTRecord) -> bytes:
        if not self._protected(record):
            return record.value
        if record.subkey != self._own_subkey or self._private_key is None:
            raise ValueError("a node can only write its own entry in the swarm's peers dictionary")
        return record.value + self._private_key.sign(signed_payload(record))

    def check(self, record: DHTRecord) -> None:
        """Raise WireError / PeerIdError / InvalidSignature naming why ``record`` is unacceptable."""
        if record.subkey is None:
            raise WireError("peer record without a subkey")
        if len(record.value) > MAX_RECORD_BYTES:
            raise WireError(f"peer record of {len(record.value)} bytes exceeds {MAX_RECORD_BYTES}")
        if len(record.value) <= SIGNATURE_BYTES:
            raise WireError("peer record too short to carry a signature")
        subkey = unpack_bounded(record.subkey, 256)
        if not isinstance(subkey, str):
            raise WireError("peer record subkey is not a peer id string")
        public_key = public_key_from_peer_id(subkey)
        body, signature = record.value[:-SIGNATURE_BYTES], record.value[-SIGNATURE_BYTES:]
        try:
            public_key.verify(signature,
                              signed_payload(DHTRecord(record.key, record.subkey, body, record.expiration_time)))
        except InvalidSignature:
            raise InvalidSignature(f"bad signature on the peer record of {subkey}") from None
        payload = unpack_bounded(body, MAX_RECORD_BYTES)  # the DHT's msgpack wrapping of our bytes value
        if not isinstance(payload, bytes):
            raise WireError("peer record value is not a bytes payload")
        parsed = peer_record_from_wire(payload)
        if parsed.peer_id != subkey:
            raise WireError(f"peer record for {parsed.peer_id} stored under subkey {subkey}")
