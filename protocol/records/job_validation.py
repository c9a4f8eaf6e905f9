"""DHT validation of job records and job progress (the record types and their wire form:
protocol/records/job_records.py).

Kept apart from protocol/records/job_records.py because it builds on hivemind's RecordValidatorBase: the CLI parses and
checks job files without importing hivemind (and torch) at all.
"""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.validation import DHTRecord

from protocol.records.job_records import (
    MAX_JOB_PROGRESS_BYTES,
    MAX_JOB_RECORD_BYTES,
    PROGRESS_BUCKETS,
    job_progress_from_wire,
    job_record_from_wire,
    jobs_key,
    parse_progress_subkey,
)
from protocol.records.peer import swarm_key
from protocol.records.peer_keys import peer_id_of, public_key_from_peer_id
from protocol.records.validation import SIGNATURE_BYTES, SignedDictionaryValidator, key_id, signed_payload
from protocol.wire import WireError, unpack_bounded

_SIGNED_OVERHEAD = 16 + SIGNATURE_BYTES  # the DHT's msgpack bin header around our bytes, plus the signature


# ---- signed-record validator -----------------------------------------------------------------------------


class SignedJobRecordValidator(SignedDictionaryValidator):
    """Signs this node's job and progress records and checks everyone else's (see the module docstring).

    Accepted under ``jobs_key``: subkey = job_id, a JobRecord with that job_id, signed by its submitter.
    Accepted under a ``progress_key`` bucket: subkey = "<job_id>/<peer_id>" in that bucket, a JobProgress for
    that job written by that peer, signed by that peer. Other keys pass untouched."""

    what = "job record"

    def __init__(self, swarm: str, private_key: Ed25519PrivateKey | None = None):
        self._jobs_key_id = key_id(jobs_key(swarm))
        self._bucket_of = {key_id(swarm_key(swarm, f"job-progress/{b}")): b for b in PROGRESS_BUCKETS}
        self._private_key = private_key
        self._own_id = None if private_key is None else peer_id_of(private_key.public_key())

    def _protected(self, record: DHTRecord) -> bool:
        return record.key == self._jobs_key_id or record.key in self._bucket_of

    def sign_value(self, record: DHTRecord) -> bytes:
        if not self._protected(record):
            return record.value
        if self._private_key is None:
            raise ValueError("a node without a key cannot write job records")
        subkey = _subkey(record)
        if record.key == self._jobs_key_id:
            job = job_record_from_wire(_payload(record.value, MAX_JOB_RECORD_BYTES + _SIGNED_OVERHEAD))
            if job.submitter != self._own_id or subkey != job.job_id:
                raise ValueError("only a job's submitter can write its record, under subkey job_id")
        elif parse_progress_subkey(subkey)[1] != self._own_id:
            raise ValueError("a node can only write its own job progress entry")
        return record.value + self._private_key.sign(signed_payload(record))

    def check(self, record: DHTRecord) -> None:
        """Raise WireError / ValueError / InvalidSignature naming why ``record`` is unacceptable."""
        is_job = record.key == self._jobs_key_id
        what = "job record" if is_job else "job progress"
        limit = (MAX_JOB_RECORD_BYTES if is_job else MAX_JOB_PROGRESS_BYTES) + _SIGNED_OVERHEAD
        if record.subkey is None:
            raise WireError(f"{what} without a subkey")
        if len(record.value) > limit:
            raise WireError(f"{what} of {len(record.value)} bytes exceeds {limit}")
        if len(record.value) <= SIGNATURE_BYTES:
            raise WireError(f"{what} too short to carry a signature")
        subkey = _subkey(record)
        body, signature = record.value[:-SIGNATURE_BYTES], record.value[-SIGNATURE_BYTES:]
        if is_job:
            job = job_record_from_wire(_payload(body, limit))  # the signer is named inside, so parse first
            if subkey != job.job_id:
                raise WireError(f"job record {job.job_id} stored under subkey {subkey!r:.40}")
            signer = job.submitter
        else:
            job_id, signer = parse_progress_subkey(subkey)
            if job_id[0] != self._bucket_of[record.key]:
                raise WireError(f"job progress of {job_id} stored in bucket {self._bucket_of[record.key]}")
        try:
            public_key_from_peer_id(signer).verify(
                signature, signed_payload(DHTRecord(record.key, record.subkey, body, record.expiration_time)))
        except InvalidSignature:
            raise InvalidSignature(f"bad signature on the {what} under {subkey!r:.80}") from None
        if not is_job:
            progress = job_progress_from_wire(_payload(body, limit))
            if (progress.job_id, progress.writer) != (job_id, signer):
                raise WireError(f"job progress of {progress.job_id}/{progress.writer} stored under {subkey}")



def _subkey(record: DHTRecord) -> Any:
    if record.subkey is None:
        raise WireError("job record without a subkey")
    subkey = unpack_bounded(record.subkey, 256)
    if not isinstance(subkey, str):
        raise WireError(f"job subkey is not a string: {type(subkey).__name__}")
    return subkey


def _payload(value: bytes, limit: int) -> bytes:
    """Our bytes inside the DHT's msgpack wrapping of a stored value."""
    payload = unpack_bounded(value, limit)
    if not isinstance(payload, bytes):
        raise WireError("job record value is not a bytes payload")
    return payload
