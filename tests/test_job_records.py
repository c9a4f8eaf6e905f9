"""protocol/records/job_spec.py and job_records.py: job spec / record / progress round trips, WireError on every
malformed input, job ids, and SignedJobRecordValidator with real Ed25519 keys (records built as hivemind's
DHTNode.store_many builds them)."""

from __future__ import annotations

import random
import re
from dataclasses import replace

import msgpack
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import MSGPackSerializer

from protocol.records.job_records import (
    MAX_JOB_PROGRESS_BYTES,
    MAX_JOB_RECORD_BYTES,
    JobProgress,
    JobRecord,
    PipelineAssignment,
    job_progress_from_wire,
    job_progress_to_wire,
    job_record_from_wire,
    job_record_to_wire,
    jobs_key,
    parse_progress_subkey,
    progress_key,
    progress_subkey,
)
from protocol.records.job_spec import (
    MAX_JOB_SPEC_BYTES,
    MAX_MODEL_OVERRIDES,
    MAX_STAGE_REPLICAS,
    MAX_STAGES,
    InnerOpt,
    JobSpec,
    ModelSpec,
    OuterOpt,
    PipelineSpec,
    job_id_for,
    job_spec_from_wire,
    job_spec_to_wire,
)
from protocol.records.job_validation import SignedJobRecordValidator
from protocol.records.peer import swarm_key
from protocol.records.peer_keys import peer_id_of
from protocol.records.validation import SIGNATURE_BYTES, SignedPeerRecordValidator, key_id
from protocol.wire import WireError

SWARM = "demo"
JOBS_KEY = key_id(jobs_key(SWARM))
EXPIRATION = 1_700_000_030.25


def make_key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(random.Random(seed).randbytes(32))


KEY_A, KEY_B, KEY_C = make_key(1), make_key(2), make_key(3)
ID_A, ID_B, ID_C = (peer_id_of(k.public_key()) for k in (KEY_A, KEY_B, KEY_C))
HASH = "ab" * 32

SPEC = JobSpec(name="digits-demo", model=ModelSpec("mlp", {"hidden": 128}), dataset="digits", task="classification",
               rounds=30, inner=InnerOpt("sgd", 0.1, momentum=0.9), local_steps=20, density=0.01)
GPT_SPEC = JobSpec(
    name="bytes-gpt", model=ModelSpec("gpt2", {"n_layer": 4, "n_embd": 256, "resid_pdrop": 0.1, "act": "gelu_new",
                                                "tie_word_embeddings": False, "bias": -3}),
    dataset="pystdlib-bytes", task="causal-lm", rounds=100, inner=InnerOpt("adamw", 3e-4, weight_decay=0.1),
    outer=OuterOpt("diloco", 0.7, 0.9, True), batch_size=8, min_participants=1, max_participants=256,
    round_timeout_s=12.5, seed=2**32 - 1, eval_every=5)


def job_record(spec: JobSpec = SPEC, submitter: str = ID_A, nonce: str = "n1", **changes) -> JobRecord:
    return JobRecord.create(spec, submitter, nonce, updated_at=1_700_000_000.5).replace(**changes)


def progress(record: JobRecord | None = None, writer: str = ID_B, **changes) -> JobProgress:
    job_id = (record or job_record()).job_id
    return JobProgress(job_id, writer, 3, HASH, participants=(ID_A, ID_B), train_loss=0.25, eval_metric=0.9,
                       bytes_exchanged=12345, round_time_s=1.5, updated_at=1_700_000_001.0).replace(**changes)


# ---- round trips -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [SPEC, GPT_SPEC, SPEC.replace(model=ModelSpec("cnn"))], ids=["mlp", "gpt2", "cnn"])
def test_spec_round_trip(spec):
    assert job_spec_from_wire(job_spec_to_wire(spec)) == spec
    assert job_spec_to_wire(job_spec_from_wire(job_spec_to_wire(spec))) == job_spec_to_wire(spec)  # canonical


@pytest.mark.parametrize("record", [
    job_record(),
    job_record(GPT_SPEC, ID_B, "x" * 64, state="cancelled", round=100, model_hash=HASH, participants=(ID_A, ID_C)),
    job_record(state="paused", round=7, model_hash=HASH, participants=(ID_B,)),
    job_record(state="done", round=30, model_hash=HASH),
], ids=["fresh", "gpt2-cancelled", "paused", "done"])
def test_record_round_trip(record):
    assert job_record_from_wire(job_record_to_wire(record)) == record


@pytest.mark.parametrize("item", [progress(), progress(train_loss=None, eval_metric=None, state="paused"),
                                  progress(round=0, model_hash="", participants=(), state="done")],
                         ids=["metrics", "no-metrics", "empty"])
def test_progress_round_trip(item):
    assert job_progress_from_wire(job_progress_to_wire(item)) == item


def test_a_decline_round_trips_and_a_participants_progress_keeps_its_bytes():
    decline = progress(round=0, model_hash="", participants=(), train_loss=None, eval_metric=None,
                       state="declined", reason="no local data for dataset 'digits'")
    assert job_progress_from_wire(job_progress_to_wire(decline)) == decline
    plain = job_progress_to_wire(progress())
    assert b"reason" not in plain  # the schema-1 form: nodes that predate declines read it unchanged
    assert job_progress_from_wire(plain).reason == ""


@pytest.mark.parametrize("changes,needle", [
    ({"state": "declined"}, "a declined writer gives one"),
    ({"reason": "busy"}, "only a declined writer"),
    ({"state": "declined", "reason": "x" * 201}, "at most 200 printable characters"),
    ({"state": "declined", "reason": "no data\x1b[2J"}, "printable"),  # no terminal escapes on other screens
    ({"state": "declined", "reason": "two\nlines"}, "printable"),
    ({"state": "declined", "reason": 7}, "printable"),
])
def test_a_decline_needs_a_short_printable_reason(changes, needle):
    with pytest.raises(ValueError, match=needle):
        progress(**changes)


def test_largest_record_fits():
    peers = tuple(peer_id_of(make_key(1000 + i).public_key()) for i in range(256))
    overrides = {f"k{i:02d}_{'x' * 59}": "v" * 64 for i in range(MAX_MODEL_OVERRIDES)}
    spec = GPT_SPEC.replace(name="n" * 64, dataset="d" * 64, model=ModelSpec("gpt2", overrides))
    record = job_record(spec, nonce="z" * 64, participants=peers, model_hash=HASH)
    assert len(job_spec_to_wire(spec)) <= MAX_JOB_SPEC_BYTES
    assert len(job_record_to_wire(record)) <= MAX_JOB_RECORD_BYTES
    assert job_record_from_wire(job_record_to_wire(record)) == record
    big_progress = progress(record, participants=peers)
    assert len(job_progress_to_wire(big_progress)) <= MAX_JOB_PROGRESS_BYTES
    signed_record = signed(dht_job(record), KEY_A)
    assert SignedJobRecordValidator(SWARM).validate(signed_record) is True
    assert SignedJobRecordValidator(SWARM).validate(signed(dht_progress(big_progress), KEY_B)) is True


# ---- job ids and dataclass rules --------------------------------------------------------------------------


def test_job_id_is_deterministic():
    job_id = job_id_for(SPEC, ID_A, "n1")
    assert job_id == job_id_for(SPEC, ID_A, "n1") == job_record().job_id
    assert len(job_id) == 16 and all(c in "0123456789abcdef" for c in job_id)
    # pinned: a change here changes every job id and the wire form peers agree on (bump JOB_SCHEMA_VERSION)
    assert job_id == "700caa3d9f38f611"


@pytest.mark.parametrize("change", [
    dict(nonce="n2"), dict(submitter=ID_B), dict(spec=SPEC.replace(rounds=31)), dict(spec=SPEC.replace(seed=1)),
    dict(spec=SPEC.replace(model=ModelSpec("mlp", {"hidden": 129}))),
    dict(spec=SPEC.replace(inner=InnerOpt("sgd", 0.1, momentum=0.8))), dict(spec=SPEC.replace(density=1.0)),
], ids=["nonce", "submitter", "rounds", "seed", "model", "inner", "density"])
def test_job_id_depends_on_every_input(change):
    args = dict(spec=SPEC, submitter=ID_A, nonce="n1") | change
    assert job_id_for(**args) != job_id_for(SPEC, ID_A, "n1")


def test_equal_specs_have_equal_ids():
    same = SPEC.replace(inner=InnerOpt("sgd", 1, momentum=0.9)), SPEC.replace(inner=InnerOpt("sgd", 1.0, momentum=0.9))
    assert same[0] == same[1] and job_id_for(same[0], ID_A, "n") == job_id_for(same[1], ID_A, "n")
    a = ModelSpec("gpt2", {"n_layer": 2, "n_head": 4})
    b = ModelSpec("gpt2", (("n_head", 4), ("n_layer", 2)))
    assert a == b and a.overrides == (("n_head", 4), ("n_layer", 2)) and hash(a) == hash(b)


@pytest.mark.parametrize("args, match", [
    ((SPEC, ID_A, ""), "nonce: must be 1-64"), ((SPEC, ID_A, "x" * 65), "nonce: must be 1-64"),
    ((SPEC, ID_A, 5), "nonce"), ((SPEC, "", "n"), "submitter"), (("spec", ID_A, "n"), "spec: must be a JobSpec"),
])
def test_job_id_for_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        job_id_for(*args)


@pytest.mark.parametrize("build, match", [
    (lambda: job_record(job_id="0" * 16), "job_id: 0000000000000000 is not the id"),
    (lambda: job_record(job_id="ABCDEF0123456789"), "job_id: must be 16 lowercase hex"),
    (lambda: JobRecord.create(SPEC, "12D3KooWnot-a-peer", "n", 0.0), "submitter: not an Ed25519 peer id"),
    (lambda: job_record(round=31), "round: must be <= 30"),
    (lambda: job_record(round=-1), "round: must be >= 0"),
    (lambda: job_record(state="failed"), "state: must be one of"),
    (lambda: job_record(model_hash="ab"), "model_hash: must be '' or a 64-digit"),
    (lambda: job_record(model_hash="AB" * 32), "model_hash"),
    (lambda: job_record(participants=(ID_A, ID_A)), "participants: a peer is listed twice"),
    (lambda: job_record(participants=("nope",)), r"participants\[0\]"),
    (lambda: job_record(participants=(ID_A,) * 9), "participants: more than 8"),
    (lambda: job_record(participants=ID_A), "participants: must be a list"),
    (lambda: job_record(updated_at=float("nan")), "updated_at: must be finite"),
    (lambda: job_record(spec={"name": "x"}), "spec: must be a JobSpec"),
    (lambda: progress(state="cancelled"), "state: must be one of 'running', 'paused', 'done'"),
    (lambda: progress(train_loss=float("nan")), "train_loss: must be finite"),
    (lambda: progress(bytes_exchanged=-1), "bytes_exchanged: must be >= 0"),
    (lambda: progress(writer="x"), "writer"),
    (lambda: progress(job_id="xyz"), "job_id"),
    (lambda: SPEC.replace(model="mlp"), "model: must be a ModelSpec"),
    (lambda: ModelSpec("mlp", {f"k{i}": 1 for i in range(17)}), "at most 16 config overrides"),
    (lambda: ModelSpec("mlp", [("a", 1), ("a", 2)]), "given twice"),
    (lambda: ModelSpec("mlp", [("a", 1, 2)]), "must be a mapping"),
    (lambda: ModelSpec("mlp", {"arch": "x"}), "'arch' is not a valid config name"),
    (lambda: ModelSpec("mlp", {"big": 2**64}), "model.big: must be <= "),
    (lambda: ModelSpec("mlp", {"none": None}), "model.none: must be a number, string or boolean"),
])
def test_dataclass_rules(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ---- malformed wire input ---------------------------------------------------------------------------------


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def record_map() -> dict:
    return msgpack.unpackb(job_record_to_wire(job_record(participants=(ID_B,))), raw=False)


def assert_wire_error(decode, data, fragment: str) -> None:
    with pytest.raises(WireError) as info:
        decode(data)
    assert "\n" not in str(info.value) and fragment in str(info.value), str(info.value)


def _with(path: str, value, obj=None) -> bytes:
    """The valid record map with the field at dotted ``path`` set (or deleted when value is ...)."""
    obj = record_map() if obj is None else obj
    *parents, key = path.split(".")
    target = obj
    for parent in parents:
        target = target[parent]
    if value is ...:
        del target[key]
    else:
        target[key] = value
    return pack(obj)


RECORD_FIELDS = list(record_map())
SPEC_FIELDS = list(record_map()["spec"])


@pytest.mark.parametrize("field", RECORD_FIELDS)
def test_record_missing_field(field):
    assert_wire_error(job_record_from_wire, _with(field, ...), f"missing field {field!r}")


@pytest.mark.parametrize("field", SPEC_FIELDS + ["model.arch", "model.overrides", "inner.lr", "outer.nesterov"])
def test_spec_missing_field(field):
    assert_wire_error(job_record_from_wire, _with(f"spec.{field}", ...), f"missing field {field.split('.')[-1]!r}")


@pytest.mark.parametrize("path", ["extra", "spec.extra", "spec.model.extra", "spec.inner.extra", "spec.outer.extra"])
def test_unknown_field(path):
    assert_wire_error(job_record_from_wire, _with(path, 1), "unknown field 'extra'")


BAD_VALUES = [
    ("v", 2, "unknown schema version 2"), ("v", True, "expected"), ("spec.v", 0, "unknown schema version 0"),
    ("round", True, "round: must be an integer"), ("round", 1.0, "round: must be an integer"),
    ("round", 2**64 - 1, "round: must be <= 30"), ("round", -(2**63), "round: must be >= 0"),
    ("updated_at", float("inf"), "updated_at: must be finite"), ("updated_at", "now", "updated_at: must be a number"),
    ("state", "x" * 10_000, "state: must be one of"), ("state", None, "state: must be one of"),
    ("job_id", 12, "job_id: must be 16"), ("submitter", b"12D3KooW", "submitter"),
    ("nonce", "n" * 65, "nonce: must be 1-64"), ("model_hash", HASH.upper(), "model_hash"),
    ("participants", "x", "participants: must be a list"), ("participants", [ID_B, 5], "participants[1]"),
    ("participants", [ID_B] * 2, "listed twice"), ("participants", [ID_A, ID_B, ID_C] * 3, "more than 8 peers"),
    ("spec", [], "job spec: expected a map"), ("spec.name", "a/b", "name: must be 1-64"),
    ("spec.rounds", 0, "job spec: rounds: must be >= 1"), ("spec.density", float("nan"), "density: must be finite"),
    ("spec.density", 0.0, "density: must be > 0"), ("spec.seed", False, "seed: must be an integer"),
    ("spec.task", "causal-lm", "task: arch 'mlp' trains for"), ("spec.model", "mlp", "job spec.model: expected a map"),
    ("spec.model.arch", "resnet", "model.arch: must be one of"), ("spec.model.overrides", [["a", 1]], "mapping"),
    ("spec.model.overrides", {"a": [1]}, "model.a: must be a number"),
    ("spec.model.overrides", {f"k{i}": 1 for i in range(17)}, "at most 16"),
    ("spec.model.overrides", {b"raw": 1}, "not a valid config name"),
    ("spec.inner.lr", -1, "job spec: inner.lr: must be > 0, got -1"), ("spec.inner.kind", 3, "inner.kind"),
    ("spec.outer.nesterov", 1, "outer.nesterov: must be true or false"),
    ("spec.outer.lr", 0.5, "outer.lr: fedavg averages"),
    ("spec.max_participants", 0, "max_participants: must be >= 1"),
]


@pytest.mark.parametrize("path, value, fragment", BAD_VALUES, ids=[f"{p}-{i}" for i, (p, _,
                                                                                      _) in enumerate(BAD_VALUES)])
def test_bad_record_value(path, value, fragment):
    assert_wire_error(job_record_from_wire, _with(path, value), fragment)


@pytest.mark.parametrize("data, fragment", [
    (b"", "undecodable"), (b"\xc1", "undecodable"), (pack([1, 2]), "expected a map"), (pack(None), "expected a map"),
    ("text", "expected bytes"), (job_record_to_wire(job_record()) + b"\x00", "undecodable"),
    (msgpack.packb(msgpack.ExtType(1, b"x")), "ext"), (b"\x00" * (MAX_JOB_RECORD_BYTES + 1), "exceeds"),
    (pack({1: 2}), "undecodable"),
], ids=["empty", "reserved", "list", "nil", "str", "trailing", "ext", "huge", "int-key"])
def test_undecodable_record(data, fragment):
    assert_wire_error(job_record_from_wire, data, fragment)


def test_spec_and_progress_decoders_reject_garbage():
    assert_wire_error(job_spec_from_wire, b"\x00" * (MAX_JOB_SPEC_BYTES + 1), "exceeds")
    assert_wire_error(job_spec_from_wire, pack({"v": 1}), "missing field 'name'")
    assert_wire_error(job_spec_from_wire, job_record_to_wire(job_record()), "unknown field 'job_id'")
    obj = msgpack.unpackb(job_progress_to_wire(progress()), raw=False)
    for field in list(obj):
        assert_wire_error(job_progress_from_wire, pack({k: v for k, v in obj.items() if k != field}), repr(field))
    assert_wire_error(job_progress_from_wire, pack(obj | {"state": "cancelled"}), "job progress: state")
    assert_wire_error(job_progress_from_wire, pack(obj | {"train_loss": float("nan")}), "train_loss: must be finite")
    assert_wire_error(job_progress_from_wire, pack(obj | {"eval_metric": "high"}), "eval_metric: must be a number")
    assert_wire_error(job_progress_from_wire, pack(obj | {"bytes_exchanged": 1.5}), "bytes_exchanged")
    assert_wire_error(job_progress_from_wire, pack(obj | {"x": 1}), "unknown field 'x'")


# ---- DHT keys ------------------------------------------------------------------------------------------------


def test_keys():
    job_id = job_record().job_id
    assert jobs_key(SWARM) == swarm_key(SWARM, "jobs") == "swarmnode/demo/jobs"
    assert progress_key(SWARM, job_id) == f"swarmnode/demo/job-progress/{job_id[0]}"
    assert parse_progress_subkey(progress_subkey(job_id, ID_B)) == (job_id, ID_B)
    with pytest.raises(ValueError):
        progress_key(SWARM, "not-a-job-id")


@pytest.mark.parametrize("subkey", [5, "", "abc", f"{'0' * 16}/{ID_A}/x", f"{'0' * 15}/{ID_A}", f"{'0' * 16}/x"])
def test_parse_progress_subkey_rejects(subkey):
    with pytest.raises(ValueError):
        parse_progress_subkey(subkey)


# ---- SignedJobRecordValidator ---------------------------------------------------------------------------------


def dht_job(record: JobRecord | None = None, subkey: str | None = None, key: bytes = JOBS_KEY) -> DHTRecord:
    """The unsigned record hivemind's DHTNode hands to sign_value for dht.store(jobs_key, subkey, bytes)."""
    record = job_record() if record is None else record
    return DHTRecord(key, MSGPackSerializer.dumps(record.job_id if subkey is None else subkey),
                     MSGPackSerializer.dumps(job_record_to_wire(record)), EXPIRATION)


def dht_progress(item: JobProgress | None = None, subkey: str | None = None, key: bytes | None = None) -> DHTRecord:
    item = progress() if item is None else item
    key = key_id(progress_key(SWARM, item.job_id)) if key is None else key
    subkey = progress_subkey(item.job_id, item.writer) if subkey is None else subkey
    return DHTRecord(key, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(job_progress_to_wire(item)),
                     EXPIRATION)


def signed(record: DHTRecord, key: Ed25519PrivateKey) -> DHTRecord:
    return replace(record, value=SignedJobRecordValidator(SWARM, key).sign_value(record))


def forge(record: DHTRecord, key: Ed25519PrivateKey) -> DHTRecord:
    """Sign ``record`` with ``key`` whatever it holds (what a malicious node could do by hand)."""
    payload = msgpack.packb([record.key, record.subkey, record.value, record.expiration_time], use_bin_type=True)
    return replace(record, value=record.value + key.sign(payload))


@pytest.fixture
def reader() -> SignedJobRecordValidator:
    return SignedJobRecordValidator(SWARM, make_key(99))


def assert_rejected(validator, record: DHTRecord, error: type, match: str) -> None:
    assert validator.validate(record) is False
    with pytest.raises(error, match=match):
        validator.check(record)


def test_submitter_record_accepted(reader):
    unsigned = dht_job()
    record = signed(unsigned, KEY_A)
    assert record.value == forge(unsigned, KEY_A).value  # Ed25519 is deterministic
    assert reader.validate(record) is True and SignedJobRecordValidator(SWARM).validate(record) is True
    assert reader.strip_value(record) == unsigned.value
    cancelled = signed(dht_job(job_record(state="cancelled", round=4, model_hash=HASH)), KEY_A)
    assert reader.validate(cancelled) is True


def test_progress_accepted(reader):
    unsigned = dht_progress()
    record = signed(unsigned, KEY_B)
    assert reader.validate(record) is True
    assert reader.strip_value(record) == unsigned.value
    assert reader.validate(signed(dht_progress(progress(writer=ID_A, state="done")), KEY_A)) is True
    decline = progress(writer=ID_A, round=0, state="declined", reason="the model needs about 9.0 GiB")
    assert reader.validate(signed(dht_progress(decline), KEY_A)) is True


def test_another_peer_cannot_sign_the_submitters_record(reader):
    assert_rejected(reader, forge(dht_job(), KEY_B), InvalidSignature, "bad signature")
    cancel = dht_job(job_record(state="cancelled"))
    assert_rejected(reader, forge(cancel, KEY_B), InvalidSignature, "bad signature")


def test_hijack_by_claiming_to_be_submitter_fails(reader):
    # B writes a record under A's job id naming itself submitter: the id does not hash to B's (spec, nonce)
    hijack = msgpack.unpackb(job_record_to_wire(job_record()), raw=False) | {"submitter": ID_B, "state": "cancelled"}
    record = forge(replace(dht_job(), value=MSGPackSerializer.dumps(pack(hijack))), KEY_B)
    assert_rejected(reader, record, WireError, "is not the id of this spec")


def test_own_record_under_another_jobs_subkey(reader):
    victim = job_record().job_id
    record = forge(dht_job(job_record(submitter=ID_B, state="cancelled"), subkey=victim), KEY_B)
    assert_rejected(reader, record, WireError, "stored under subkey")


@pytest.mark.parametrize("change", [dict(expiration_time=EXPIRATION + 1), dict(key=key_id(jobs_key("other"))),
                                    dict(subkey=MSGPackSerializer.dumps("0" * 16))],
                         ids=["expiry", "swarm", "subkey"])
def test_moved_or_extended_record_rejected(change):
    reader = SignedJobRecordValidator("other" if "key" in change else SWARM)
    assert reader.validate(replace(signed(dht_job(), KEY_A), **change)) is False


@pytest.mark.parametrize("position", [0, 10, -1, -SIGNATURE_BYTES])
def test_flipped_byte_rejected(reader, position):
    for record in (signed(dht_job(), KEY_A), signed(dht_progress(), KEY_B)):
        value = bytearray(record.value)
        value[position] ^= 0x01
        assert reader.validate(replace(record, value=bytes(value))) is False


def test_progress_signed_by_another_peer(reader):
    assert_rejected(reader, forge(dht_progress(), KEY_A), InvalidSignature, "bad signature")


def test_progress_payload_names_another_writer(reader):
    # B signs its own subkey, but the record inside claims to be A's progress
    record = signed(dht_progress(progress(writer=ID_A), subkey=progress_subkey(job_record().job_id, ID_B)), KEY_B)
    assert_rejected(reader, record, WireError, "stored under")


def test_progress_payload_for_another_job(reader):
    other = job_record(nonce="other")
    subkey = progress_subkey(other.job_id, ID_B)
    key = key_id(progress_key(SWARM, other.job_id))
    assert_rejected(reader, signed(dht_progress(progress(), subkey=subkey, key=key), KEY_B), WireError, "stored under")


def test_progress_in_the_wrong_bucket(reader):
    job_id = job_record().job_id
    wrong = next(b for b in "0123456789abcdef" if b != job_id[0])
    record = forge(dht_progress(key=key_id(swarm_key(SWARM, f"job-progress/{wrong}"))), KEY_B)
    assert_rejected(reader, record, WireError, f"stored in bucket {wrong}")


@pytest.mark.parametrize("subkey", [b"\xc1", MSGPackSerializer.dumps(5), MSGPackSerializer.dumps("no-slash"),
                                    MSGPackSerializer.dumps("x" * 300),
                                    MSGPackSerializer.dumps(f"{'0' * 16}/{ID_B}/x")],
                         ids=["garbage", "int", "no-slash", "huge", "two-slashes"])
def test_garbage_subkeys_rejected(reader, subkey):
    for record in (signed(dht_job(), KEY_A), signed(dht_progress(), KEY_B)):
        assert reader.validate(replace(record, subkey=subkey)) is False
        assert reader.validate(replace(record, subkey=None)) is False


@pytest.mark.parametrize("value, fragment", [(b"", "too short"), (b"\x00" * SIGNATURE_BYTES, "too short"),
                                             (b"\x00" * (MAX_JOB_RECORD_BYTES + 200), "exceeds")])
def test_bad_lengths_rejected(reader, value, fragment):
    assert_rejected(reader, replace(signed(dht_job(), KEY_A), value=value), WireError, fragment)
    assert_rejected(reader, replace(signed(dht_progress(), KEY_B), value=value), WireError, fragment)


def test_signed_non_bytes_or_garbage_payload_rejected(reader):
    not_bytes = forge(replace(dht_job(), value=MSGPackSerializer.dumps({"job_id": "x"})), KEY_A)
    assert_rejected(reader, not_bytes, WireError, "not a bytes payload")
    garbage = signed(replace(dht_progress(), value=MSGPackSerializer.dumps(b"\xc1")), KEY_B)
    assert_rejected(reader, garbage, WireError, "undecodable")


def test_sign_value_refuses_what_the_node_may_not_write():
    with pytest.raises(ValueError, match="only a job's submitter"):
        SignedJobRecordValidator(SWARM, KEY_B).sign_value(dht_job())
    with pytest.raises(ValueError, match="only a job's submitter"):
        SignedJobRecordValidator(SWARM, KEY_A).sign_value(dht_job(subkey="0" * 16))
    with pytest.raises(ValueError, match="own job progress"):
        SignedJobRecordValidator(SWARM, KEY_A).sign_value(dht_progress())
    with pytest.raises(ValueError, match="without a key"):
        SignedJobRecordValidator(SWARM).sign_value(dht_job())


@pytest.mark.parametrize("key", [key_id(swarm_key(SWARM, "peers")), key_id(jobs_key("other")),
                                 key_id(swarm_key(SWARM, "job-progress")), b"\x00" * 20],
                         ids=["peers", "other-swarm", "progress-without-bucket", "raw"])
def test_other_keys_pass_untouched(reader, key):
    garbage = DHTRecord(key=key, subkey=b"\xc1", value=b"anything", expiration_time=EXPIRATION)
    assert reader.validate(garbage) is True
    assert reader.sign_value(garbage) == reader.strip_value(garbage) == garbage.value
    assert SignedJobRecordValidator(SWARM).sign_value(garbage) == garbage.value


def test_composes_with_the_peer_record_validator():
    """Both validators in one hivemind CompositeValidator, as a node runs them: each protects only its keys."""
    writer = CompositeValidator([SignedPeerRecordValidator(SWARM, KEY_A), SignedJobRecordValidator(SWARM, KEY_A)])
    reader = CompositeValidator([SignedPeerRecordValidator(SWARM), SignedJobRecordValidator(SWARM)])
    for unsigned in (dht_job(), dht_progress(progress(writer=ID_A))):
        record = replace(unsigned, value=writer.sign_value(unsigned))
        assert len(record.value) == len(unsigned.value) + SIGNATURE_BYTES  # signed once, by the owning validator
        assert reader.validate(record) is True
        assert reader.strip_value(record) == unsigned.value
    assert reader.validate(forge(dht_job(), KEY_B)) is False


def test_validator_never_merges_and_sorts_with_peer_validator():
    validator = SignedJobRecordValidator(SWARM)
    assert validator.merge_with(SignedJobRecordValidator(SWARM)) is False
    assert validator.priority == SignedPeerRecordValidator(SWARM).priority


# ---- pipeline jobs ------------------------------------------------------------------------------------------

PIPE_SPEC = GPT_SPEC.replace(kind="pipeline", pipeline=PipelineSpec(stages=2, replicas=2, micro_batch=4,
                                                                    micro_batches=2), batch_size=8)


def pipe_record(**changes) -> JobRecord:
    hosts = tuple(peer_id_of(make_key(100 + i).public_key()) for i in range(4))
    assignment = PipelineAssignment(((0, 2), (2, 4)), (hosts[:2], hosts[2:]), HASH, 1234)
    return JobRecord.create(PIPE_SPEC, ID_A, "n1", 1.0, assignment).replace(**changes)


def test_federated_wire_form_has_no_pipeline_fields():
    obj = msgpack.unpackb(job_record_to_wire(job_record()), raw=False)
    assert "assignment" not in obj and "kind" not in obj["spec"] and "pipeline" not in obj["spec"]


def test_pipeline_record_round_trip_and_signature():
    record = pipe_record()
    assert job_record_from_wire(job_record_to_wire(record)) == record
    assert record.assignment.stage_of(record.assignment.hosts[1][0]) == 1 and record.assignment.stage_of(ID_B) is None
    assert SignedJobRecordValidator(SWARM).validate(signed(dht_job(record), KEY_A)) is True


def test_a_pipeline_record_follows_its_hosts_within_the_replica_cap():
    """The trainer rewrites the assignment as hosts die and join: 1 to replica_cap hosts per stage."""
    record = pipe_record()
    thinned = replace(record.assignment, hosts=(record.assignment.hosts[0][:1], record.assignment.hosts[1]))
    assert job_record_from_wire(job_record_to_wire(record.replace(assignment=thinned))).assignment == thinned
    grown = PIPE_SPEC.replace(pipeline=replace(PIPE_SPEC.pipeline, max_replicas=3))
    assert grown.pipeline.replica_cap == 3 and PIPE_SPEC.pipeline.replica_cap == 2
    three = replace(record.assignment, hosts=(record.assignment.hosts[0] + (ID_B,), record.assignment.hosts[1]))
    assert JobRecord.create(grown, ID_A, "n1", 1.0, three).assignment == three


def test_largest_pipeline_record_fits():
    peers = [peer_id_of(make_key(2000 + i).public_key()) for i in range(MAX_STAGES * MAX_STAGE_REPLICAS)]
    spec = PIPE_SPEC.replace(name="n" * 64, model=ModelSpec("gpt2", {f"k{i:02d}_{'x' * 59}": "v" * 64
                                                                       for i in range(MAX_MODEL_OVERRIDES)}),
                             pipeline=PipelineSpec(MAX_STAGES, replicas=MAX_STAGE_REPLICAS, micro_batch=4,
                                                   micro_batches=2))
    spans = tuple((i, i + 1) for i in range(MAX_STAGES))
    hosts = tuple(tuple(peers[i * MAX_STAGE_REPLICAS:(i + 1) * MAX_STAGE_REPLICAS]) for i in range(MAX_STAGES))
    record = JobRecord.create(spec, ID_A, "z" * 64, 1.0, PipelineAssignment(spans, hosts, HASH, 1 << 20))
    assert len(job_record_to_wire(record)) <= MAX_JOB_RECORD_BYTES
    assert job_record_from_wire(job_record_to_wire(record)) == record


@pytest.mark.parametrize("build, match", [
    (lambda: GPT_SPEC.replace(kind="pipeline"), "pipeline: kind 'pipeline' needs"),
    (lambda: GPT_SPEC.replace(pipeline=PipelineSpec(2)), "pipeline: only for kind"),
    (lambda: PIPE_SPEC.replace(batch_size=9), "batch_size: must be pipeline.micro_batch"),
    (lambda: PipelineSpec(2, strategy="zigzag"), "pipeline.strategy"),
    (lambda: PipelineSpec(MAX_STAGES + 1), "pipeline.stages"),
    (lambda: pipe_record(assignment=replace(pipe_record().assignment, hosts=((ID_B, ID_C, peer_id_of(
        make_key(200).public_key())), (peer_id_of(make_key(201).public_key()),)))), "2 stages 1-2 hosts each"),
    (lambda: PipelineSpec(2, replicas=2, max_replicas=1), "pipeline.max_replicas: must be >= 2"),
    (lambda: PipelineSpec(2, max_replicas=MAX_STAGE_REPLICAS + 1), "pipeline.max_replicas: must be <="),
    (lambda: pipe_record(assignment=replace(pipe_record().assignment, hosts=((ID_A, ID_B), (ID_C, ID_C)))),
     "listed twice"),
    (lambda: PipelineAssignment(((0, 2), (3, 4)), ((ID_B,), (ID_C,)), HASH, 10), "assignment.spans[1]"),
    (lambda: job_record(assignment=pipe_record().assignment), "only a pipeline job"),
])
def test_pipeline_rules(build, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        build()
