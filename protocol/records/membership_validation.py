"""The private swarm's DHT record validator: every record carries its writer's membership certificate.

This p2pd has no pre-shared-key option, so a private swarm is closed in the protocol: a member's DHT runs
MembershipValidator beside the signed-record validators (protocol/records/validation.py, job_validation.py,
protocol/allreduce/entry_validation.py). It signs last and validates first (a higher priority): it wraps the
value they produced in an envelope

    value || cert || signature (64 bytes) || len(cert) (2 bytes, big-endian)

where cert is the writer's certificate (protocol/records/certificates.py, msgpack) and the signature is the
writer's (cert.member's key) over pack([ENVELOPE_DOMAIN, key, subkey, value, expiration_time, cert]), so the
envelope cannot be moved to another record or given a later expiry. A record is accepted only if
  - the envelope parses and its certificate is for this swarm, signed by its owner and not expired (now);
  - the envelope signature verifies with the certificate's member key;
  - the peer the record names, if any, is the certificate's member: a peer record, a job progress entry or
    decline, a matchmaking entry or a stage replica record names it in its subkey (the subkey, or its last
    "/"-separated part, is a peer id); a job record names its submitter;
then stripped of the envelope for the validators below it. Records without an envelope are rejected: a stranger
cannot publish a peer record, a job, a decline or a matchmaking entry in the swarm, nor serve one to a member.
Every accepted certificate is remembered (``certified``): node/runtime/admission.py asks it whom to serve.
An open swarm runs no such validator, so its records are byte for byte as before (tests/test_wire_bytes.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from protocol import rejections
from protocol.records.certificates import (
    MAX_CERT_BYTES,
    SIGNATURE_BYTES,
    CertError,
    MembershipCert,
    cert_from_wire,
    cert_to_wire,
    check_cert,
)
from protocol.records.job_records import MAX_JOB_RECORD_BYTES, job_record_from_wire, jobs_key
from protocol.records.peer_keys import PeerIdError, peer_id_of, public_key_from_peer_id
from protocol.records.validation import key_id
from protocol.records.values import short
from protocol.wire import WireError, pack, unpack_bounded

logger = logging.getLogger(__name__)
ENVELOPE_DOMAIN = "swarmnode/membership-envelope/v1"
LENGTH_BYTES = 2
MAX_CERTIFIED = 100_000  # members remembered (only owner-signed certificates get in); the oldest expiry goes first


def envelope_payload(record: DHTRecord, cert: bytes) -> bytes:
    return pack([ENVELOPE_DOMAIN, record.key, record.subkey, record.value, record.expiration_time, cert])


def named_peer(subkey: bytes | None) -> str | None:
    """The peer a record's subkey names (a peer id, or one after its last "/"), else None."""
    if subkey is None:
        return None
    try:
        decoded = unpack_bounded(subkey, 256)
    except WireError:
        return None
    if not isinstance(decoded, str):
        return None
    candidate = decoded.rpartition("/")[2]
    try:
        public_key_from_peer_id(candidate)
    except PeerIdError:
        return None
    return candidate


class MembershipValidator(RecordValidatorBase):
    """Wraps this node's records in its certificate and checks everyone's (see the module docstring). ``cert``
    and ``private_key``: this node's own (None: it only checks, as a test's reader does)."""

    def __init__(self, swarm: str, owner: str, cert: MembershipCert | None = None,
                 private_key: Ed25519PrivateKey | None = None, now: Callable[[], float] = time.time):
        self.swarm, self.owner, self.now = swarm, owner, now
        self._private_key, self._cert = private_key, cert
        self._cert_wire = b"" if cert is None else cert_to_wire(cert)
        if cert is not None:
            if private_key is None or cert.member != peer_id_of(private_key.public_key()):
                raise ValueError("this node's certificate must name its own key")
            check_cert(cert, swarm, owner, cert.member, now())
        self._jobs_key_id = key_id(jobs_key(swarm))
        self._certified: dict[str, float] = {} if cert is None else {cert.member: cert.expires_at}

    @property
    def priority(self) -> int:
        return 20  # above the signed-record validators (10): sign after them, validate and strip before them

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False

    def certified(self, peer: str) -> bool:
        """Whether ``peer`` holds a certificate of this swarm this validator accepted, unexpired now."""
        return self._certified.get(peer, 0.0) > self.now()

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._private_key is None or not self._cert_wire:
            raise ValueError("a node without a membership certificate cannot write to a private swarm")
        signature = self._private_key.sign(envelope_payload(record, self._cert_wire))
        return record.value + self._cert_wire + signature + len(self._cert_wire).to_bytes(LENGTH_BYTES, "big")

    def strip_value(self, record: DHTRecord) -> bytes:
        return self._split(record.value)[0]

    def _split(self, value: bytes) -> tuple[bytes, bytes, bytes]:
        """(inner value, certificate bytes, signature) of an enveloped value; WireError if it is not one."""
        if len(value) < LENGTH_BYTES + SIGNATURE_BYTES:
            raise WireError("no membership envelope")
        size = int.from_bytes(value[-LENGTH_BYTES:], "big")
        if not 0 < size <= MAX_CERT_BYTES or len(value) < LENGTH_BYTES + SIGNATURE_BYTES + size:
            raise WireError("no membership envelope")
        end = len(value) - LENGTH_BYTES - SIGNATURE_BYTES
        return value[:end - size], value[end - size:end], value[end:end + SIGNATURE_BYTES]

    def check(self, record: DHTRecord) -> MembershipCert:
        """The writer's certificate; WireError / CertError / InvalidSignature naming why ``record`` is refused."""
        inner, cert_bytes, signature = self._split(record.value)
        cert = cert_from_wire(cert_bytes)
        check_cert(cert, self.swarm, self.owner, None, self.now())
        try:
            public_key_from_peer_id(cert.member).verify(
                signature, envelope_payload(DHTRecord(record.key, record.subkey, inner, record.expiration_time),
                                            cert_bytes))
        except InvalidSignature:
            raise InvalidSignature(f"bad envelope signature by {short(cert.member)}") from None
        named = self._job_submitter(inner) if record.key == self._jobs_key_id else named_peer(record.subkey)
        if named is not None and named != cert.member:
            raise CertError(f"a record naming {short(named)} written with the certificate of {short(cert.member)}")
        return cert

    def _job_submitter(self, inner: bytes) -> str:
        """The submitter a job record names (its value: our bytes in the DHT's msgpack wrapping, then the
        submitter's 64-byte signature)."""
        payload = unpack_bounded(inner[:-SIGNATURE_BYTES], MAX_JOB_RECORD_BYTES + 16)
        if not isinstance(payload, bytes):
            raise WireError("job record value is not a bytes payload")
        return job_record_from_wire(payload).submitter

    def validate(self, record: DHTRecord) -> bool:
        try:
            cert = self.check(record)
        except (ValueError, InvalidSignature) as e:  # WireError and CertError are ValueErrors
            logger.info("rejected a record in private swarm %r: %s", self.swarm, e)
            rejections.count("record in a private swarm", e)
            return False
        if cert.member not in self._certified and len(self._certified) >= MAX_CERTIFIED:
            del self._certified[min(self._certified, key=self._certified.__getitem__)]
        self._certified[cert.member] = max(cert.expires_at, self._certified.get(cert.member, 0.0))
        return True
