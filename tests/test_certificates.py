"""A private swarm's membership certificates (protocol/records/certificates.py), the record validator that makes
every DHT record carry its writer's (protocol/records/membership_validation.py), and their files
(node/runtime/private_swarm.py). Records are built as hivemind's DHTNode builds them and go through the same
CompositeValidator a member's daemon runs, the signed-record validators included."""

from __future__ import annotations

import dataclasses
import json

import pytest
from cryptography.exceptions import InvalidSignature
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import MSGPackSerializer

from node.runtime.errors import NodeError
from node.runtime.private_swarm import create_owner, invite, read_cert_file, write_cert_file
from protocol.allreduce.entry_validation import SignedMatchmakingValidator
from protocol.allreduce.matchmaking import declaration_to_wire, declared_subkey, round_key
from protocol.pipeline.control import MemberRecord, member_record_to_wire, stage_key
from protocol.records.certificates import (
    CertError,
    MembershipCert,
    cert_from_wire,
    cert_to_wire,
    check_cert,
    issue_cert,
)
from protocol.records.job_records import (
    JobProgress,
    JobRecord,
    job_progress_to_wire,
    job_record_to_wire,
    jobs_key,
    progress_key,
    progress_subkey,
)
from protocol.records.job_spec import InnerOpt, JobSpec, ModelSpec
from protocol.records.job_validation import SignedJobRecordValidator
from protocol.records.membership_validation import MembershipValidator
from protocol.records.peer import peer_record_to_wire, swarm_key
from protocol.records.peer_keys import peer_id_of
from protocol.records.validation import SignedPeerRecordValidator, key_id
from protocol.wire import WireError
from tests.test_validation import peer_record
from tests.test_wire_bytes import ID_A, ID_B, ID_C, KEY_A, KEY_B, KEY_C, KEY_D, KEY_E

SWARM, NOW, EXPIRES = "demo", 1_700_000_000.0, 1_700_000_000.0 + 86400
OWNER_KEY, OTHER_OWNER_KEY = KEY_D, KEY_E
OWNER = peer_id_of(OWNER_KEY.public_key())
CERT_A, CERT_B = (issue_cert(OWNER_KEY, SWARM, peer, EXPIRES) for peer in (ID_A, ID_B))
JOB = JobRecord.create(JobSpec("j", ModelSpec("mlp"), "digits", "classification", 3, InnerOpt("sgd", 0.1)), ID_A,
                       "n", NOW)


# ---- the certificate --------------------------------------------------------------------------------------

def test_a_certificate_admits_its_member_to_its_swarm_until_it_expires():
    check_cert(CERT_A, SWARM, OWNER, ID_A, NOW)
    check_cert(CERT_A, SWARM, OWNER, None, EXPIRES - 1)
    assert cert_from_wire(cert_to_wire(CERT_A)) == CERT_A and len(cert_to_wire(CERT_A)) < 300
    assert CERT_A.expires == "2023-11-15 22:13:20Z"


@pytest.mark.parametrize("cert, swarm, owner, member, now, needle", [
    (dataclasses.replace(CERT_A, signature=bytes(64)), SWARM, OWNER, ID_A, NOW, "bad owner signature"),
    (dataclasses.replace(CERT_A, expires_at=EXPIRES + 86400), SWARM, OWNER, ID_A, NOW, "bad owner signature"),
    (dataclasses.replace(CERT_A, member=ID_C), SWARM, OWNER, ID_C, NOW, "bad owner signature"),
    (CERT_A, "lab", OWNER, ID_A, NOW, "the certificate is for swarm 'demo', not 'lab'"),
    (issue_cert(OTHER_OWNER_KEY, SWARM, ID_A, EXPIRES), SWARM, OWNER, ID_A, NOW, "signed by owner ..."),
    (CERT_A, SWARM, OWNER, ID_A, EXPIRES, "expired at 2023-11-15 22:13:20Z"),
    (CERT_A, SWARM, OWNER, ID_B, NOW, f"is for peer ...{ID_A[-8:]}, not ...{ID_B[-8:]}"),
], ids=["bad signature", "extended expiry", "other member", "other swarm", "other owner", "expired", "other peer"])
def test_a_certificate_that_does_not_admit_says_why(cert, swarm, owner, member, now, needle):
    with pytest.raises(CertError) as info:
        check_cert(cert, swarm, owner, member, now)
    assert needle in str(info.value)


def test_malformed_certificates_are_refused_before_use():
    wire = MSGPackSerializer.loads(cert_to_wire(CERT_A))
    for data, needle in [(b"\x93\x01\x02\x03", "expected a map"), (cert_to_wire(CERT_A)[:-3], "undecodable"),
                         (MSGPackSerializer.dumps({**wire, "extra": 1}), "unknown field 'extra'"),
                         (MSGPackSerializer.dumps({**wire, "sig": b"x"}), "expected 64 bytes"),
                         (MSGPackSerializer.dumps({**wire, "expires_at": True}), "expected"),
                         (MSGPackSerializer.dumps({**wire, "member": "x" * 65}), "longer than 64")]:
        with pytest.raises(WireError, match=needle):
            cert_from_wire(data)
    with pytest.raises(CertError, match="expected 64 bytes"):
        MembershipCert(SWARM, OWNER, ID_A, EXPIRES, b"short")
    with pytest.raises(CertError, match="member: not an Ed25519 peer id"):
        issue_cert(OWNER_KEY, SWARM, "12D3KooWnotapeer", EXPIRES)


# ---- every record of a private swarm carries its writer's certificate ------------------------------------

def validators(key=None, cert=None, now=NOW, private=True) -> CompositeValidator:
    """What a member's daemon runs (node/daemon.py); private=False: an open swarm's node, or a stranger."""
    found = [SignedPeerRecordValidator(SWARM, key), SignedJobRecordValidator(SWARM, key),
             SignedMatchmakingValidator(key, now=lambda: now)]
    owner = OWNER if cert is None else cert.owner
    return CompositeValidator(found + ([MembershipValidator(SWARM, owner, cert, key, lambda: now)] if private else []))


def record(key: str, subkey: str, payload: bytes) -> DHTRecord:
    return DHTRecord(key_id(key), MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(payload), NOW + 30)


def records_of(peer: str) -> dict[str, DHTRecord]:
    """One record of each kind a node writes, as ``peer``."""
    job = JobRecord.create(JOB.spec, peer, "n", NOW)
    return {
        "peer record": record(swarm_key(SWARM, "peers"), peer, peer_record_to_wire(peer_record(peer))),
        "job record": record(jobs_key(SWARM), job.job_id, job_record_to_wire(job)),
        "decline": record(progress_key(SWARM, JOB.job_id), progress_subkey(JOB.job_id, peer), job_progress_to_wire(
            JobProgress(JOB.job_id, peer, 0, "", "declined", updated_at=NOW, reason="no data"))),
        "declaration": record(round_key(SWARM, "grads", "r-1"), declared_subkey(peer), declaration_to_wire(1e6)),
        "stage replica": record(stage_key(SWARM, "p", 0), peer,
                                member_record_to_wire(MemberRecord("replica", 1.0, 0, NOW))),
    }


def sign(validator: CompositeValidator, unsigned: DHTRecord) -> DHTRecord:
    return dataclasses.replace(unsigned, value=validator.sign_value(unsigned))


@pytest.mark.parametrize("kind", list(records_of(ID_A)))
def test_a_members_records_are_accepted_by_members_and_read_as_in_an_open_swarm(kind):
    unsigned = records_of(ID_A)[kind]
    stored = sign(validators(KEY_A, CERT_A), unsigned)
    open_swarm = sign(validators(KEY_A, private=False), unsigned)
    assert stored.value.startswith(open_swarm.value) and len(stored.value) - len(open_swarm.value) < 400
    reader = validators(KEY_B, CERT_B)
    assert reader.validate(stored)
    assert reader.strip_value(stored) == validators(private=False).strip_value(open_swarm) == unsigned.value
    member = reader._validators[-1]  # the MembershipValidator (the highest priority sorts last)
    assert isinstance(member, MembershipValidator) and member.certified(ID_A) and not member.certified(ID_C)


@pytest.mark.parametrize("kind", list(records_of(ID_C)))
def test_a_strangers_records_are_refused(kind):
    reader = validators(KEY_B, CERT_B)
    unsigned = records_of(ID_C)[kind]
    assert not reader.validate(sign(validators(KEY_C, private=False), unsigned))  # no certificate at all
    foreign = issue_cert(OTHER_OWNER_KEY, SWARM, ID_C, EXPIRES)  # another owner's swarm of the same name
    assert not reader.validate(sign(validators(KEY_C, foreign), unsigned))
    # a member's certificate copied onto the stranger's record: the envelope is signed by the stranger's key
    stolen = sign(validators(KEY_C, private=False), unsigned)
    theirs = sign(validators(KEY_A, CERT_A), records_of(ID_A)[kind])
    inner = validators(KEY_A, private=False).sign_value(records_of(ID_A)[kind])
    assert not reader.validate(dataclasses.replace(stolen, value=stolen.value + theirs.value[len(inner):]))
    assert not reader._validators[-1].certified(ID_C)


def test_an_expired_certificate_and_a_moved_envelope_are_refused():
    stored = sign(validators(KEY_A, CERT_A), records_of(ID_A)["peer record"])
    assert validators(KEY_B, CERT_B, now=EXPIRES - 1).validate(stored)
    later = MembershipValidator(SWARM, OWNER, None, None, lambda: EXPIRES + 1)
    with pytest.raises(CertError, match="expired"):
        later.check(stored)
    moved = dataclasses.replace(stored, expiration_time=stored.expiration_time + 3600)  # a later expiry
    with pytest.raises(InvalidSignature, match="bad envelope signature"):
        MembershipValidator(SWARM, OWNER, now=lambda: NOW).check(moved)


def test_a_member_cannot_write_a_record_naming_another_peer():
    reader = MembershipValidator(SWARM, OWNER, now=lambda: NOW)
    for kind in ("stage replica", "decline", "declaration"):  # B's certificate on a record that names A
        forged = sign(CompositeValidator([MembershipValidator(SWARM, OWNER, CERT_B, KEY_B, lambda: NOW)]),
                      records_of(ID_A)[kind])
        with pytest.raises(CertError, match=f"naming ...{ID_A[-8:]} written with the certificate of ...{ID_B[-8:]}"):
            reader.check(forged)
    # a job signed by a stranger and stored by a member: its submitter holds no certificate of the swarm
    job = JobRecord.create(JOB.spec, ID_C, "n", NOW)
    unsigned = record(jobs_key(SWARM), job.job_id, job_record_to_wire(job))
    inner = validators(KEY_C, private=False).sign_value(unsigned)
    relayed = sign(CompositeValidator([MembershipValidator(SWARM, OWNER, CERT_B, KEY_B, lambda: NOW)]),
                   dataclasses.replace(unsigned, value=inner))
    with pytest.raises(CertError, match=f"naming ...{ID_C[-8:]}"):
        reader.check(relayed)


def test_a_node_without_a_certificate_cannot_write_and_its_own_must_name_it():
    with pytest.raises(ValueError, match="without a membership certificate"):
        MembershipValidator(SWARM, OWNER, now=lambda: NOW).sign_value(records_of(ID_A)["peer record"])
    with pytest.raises(ValueError, match="must name its own key"):
        MembershipValidator(SWARM, OWNER, CERT_A, KEY_B, lambda: NOW)
    with pytest.raises(CertError, match="expired"):
        MembershipValidator(SWARM, OWNER, CERT_A, KEY_A, lambda: EXPIRES)


# ---- on disk: the owner's key, certificate files -------------------------------------------------------------

def test_owner_key_invitations_and_certificate_files(tmp_path):
    owner, created = create_owner(tmp_path / "owner", "lab")
    assert created and create_owner(tmp_path / "owner", "lab") == (owner, False)
    cert = invite(tmp_path / "owner", "lab", ID_B, days=30, now=NOW)
    assert (cert.swarm, cert.owner, cert.member, cert.expires_at) == ("lab", owner, ID_B, NOW + 30 * 86400)
    path = tmp_path / "b.cert"
    write_cert_file(path, cert)
    assert read_cert_file(path) == cert and path.stat().st_mode & 0o777 == 0o600
    data = json.loads(path.read_text())
    data["member"] = ID_C  # edited by hand: the owner's signature no longer holds
    path.write_text(json.dumps(data))
    with pytest.raises(CertError, match="bad owner signature"):
        check_cert(read_cert_file(path), "lab", owner, ID_C, NOW)
    for text, needle in [("{", "Expecting"), ("[]", "not a swarmnode membership certificate"),
                         (json.dumps({**data, "signature": "zz"}), "non-hexadecimal")]:
        path.write_text(text)
        with pytest.raises(NodeError, match=needle):
            read_cert_file(path)
    with pytest.raises(NodeError, match="owns no private swarm 'other'"):
        invite(tmp_path / "owner", "other", ID_B, days=1)
    with pytest.raises(NodeError, match="PEER_ID: not an Ed25519 peer id"):
        invite(tmp_path / "owner", "lab", "bob", days=1)
