"""protocol/records/validation.py (signed peer records in hivemind's DHT) and protocol/records/peer_keys.py (Ed25519
peer ids).

Records are built exactly as hivemind's DHTNode.store_many builds them: subkey and value serialised with
MSGPackSerializer.dumps, key = DHTID of the key string, then value := validator.sign_value(record).
"""

from __future__ import annotations

import random
from dataclasses import replace

import msgpack
import multihash
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer

from protocol.records.peer import MAX_RECORD_BYTES, Capability, GpuInfo, PeerRecord, peer_record_to_wire, swarm_key
from protocol.records.peer_keys import (
    PEER_ID_PREFIX,
    PeerIdError,
    libp2p_private_key,
    peer_id_bytes,
    peer_id_of,
    public_key_from_peer_id,
    raw_public_key,
)
from protocol.records.validation import SIGNATURE_BYTES, SignedPeerRecordValidator, key_id
from protocol.wire import WireError

SWARM = "demo"
PEERS_KEY = key_id(swarm_key(SWARM, "peers"))
EXPIRATION = 1_700_000_030.25


def make_key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(random.Random(seed).randbytes(32))


KEY_A, KEY_B = make_key(1), make_key(2)
ID_A, ID_B = peer_id_of(KEY_A.public_key()), peer_id_of(KEY_B.public_key())

CAPABILITY = Capability(
    gpus=(GpuInfo("NVIDIA H100 80GB HBM3", 80 * 2**30, (9, 0)),) * 2,
    cpu_cores=32,
    ram_bytes=256 * 2**30,
    disk_free_bytes=2**40,
    tflops_fp32=50.0,
    tflops_bf16=600.0,
    platform="Linux-6.1-x86_64 / torch 2.13.0+cu128",
)


def peer_record(peer_id: str = ID_A, **changes) -> PeerRecord:
    record = PeerRecord(
        peer_id=peer_id,
        addrs=(f"/ip4/127.0.0.1/tcp/31337/p2p/{peer_id}",),
        version="0.1.0",
        capability=CAPABILITY,
        updated_at=1_700_000_000.0,
    )
    return record.replace(**changes)


def dht_record(
    record: PeerRecord | None = None, subkey: str = ID_A, key: bytes = PEERS_KEY, expiration: float = EXPIRATION
) -> DHTRecord:
    """The unsigned record hivemind's DHTNode hands to sign_value."""
    record = peer_record() if record is None else record
    return DHTRecord(
        key=key,
        subkey=MSGPackSerializer.dumps(subkey),
        value=MSGPackSerializer.dumps(peer_record_to_wire(record)),
        expiration_time=expiration,
    )


def signed(record: DHTRecord, key: Ed25519PrivateKey = KEY_A) -> DHTRecord:
    return replace(record, value=SignedPeerRecordValidator(SWARM, key).sign_value(record))


def forge(record: DHTRecord, key: Ed25519PrivateKey) -> DHTRecord:
    """Sign ``record`` with ``key`` whatever its subkey (what a malicious node could do by hand)."""
    payload = msgpack.packb([record.key, record.subkey, record.value, record.expiration_time], use_bin_type=True)
    return replace(record, value=record.value + key.sign(payload))


@pytest.fixture
def reader() -> SignedPeerRecordValidator:
    """Another node's validator: it holds its own key and checks records written by others."""
    return SignedPeerRecordValidator(SWARM, make_key(99))


def assert_rejected(validator: SignedPeerRecordValidator, record: DHTRecord, error: type, match: str) -> None:
    assert validator.validate(record) is False
    with pytest.raises(error, match=match):
        validator.check(record)


# ---- SignedPeerRecordValidator -------------------------------------------------------------------------


def test_valid_record_accepted(reader):
    record = signed(dht_record())
    assert reader.validate(record) is True
    reader.check(record)  # does not raise
    assert SignedPeerRecordValidator(SWARM).validate(record) is True  # a validator without a key reads too
    assert SignedPeerRecordValidator(SWARM, KEY_A).validate(record) is True  # and the writer itself


def test_tombstone_accepted(reader):
    assert reader.validate(signed(dht_record(peer_record(leaving=True)))) is True


def test_signature_is_over_key_subkey_value_expiration():
    unsigned = dht_record()
    signature = signed(unsigned).value[-SIGNATURE_BYTES:]
    assert signed(unsigned).value == unsigned.value + signature
    assert signed(unsigned).value == forge(unsigned, KEY_A).value  # Ed25519 is deterministic


def test_strip_value_returns_the_original():
    unsigned = dht_record()
    record = signed(unsigned)
    for validator in (SignedPeerRecordValidator(SWARM), SignedPeerRecordValidator(SWARM, KEY_A)):
        assert validator.strip_value(record) == unsigned.value
    assert MSGPackSerializer.loads(unsigned.value) == peer_record_to_wire(peer_record())


@pytest.mark.parametrize("position", [0, 10, -1, -SIGNATURE_BYTES], ids=["body-first", "body", "sig-last", "sig-first"])
def test_flipped_byte_rejected(reader, position):
    record = signed(dht_record())
    value = bytearray(record.value)
    value[position] ^= 0x01
    assert_rejected(reader, replace(record, value=bytes(value)), InvalidSignature, "bad signature")


def test_truncated_signature_rejected(reader):
    record = signed(dht_record())
    assert reader.validate(replace(record, value=record.value[:-1])) is False


def test_signer_is_not_subkey_owner(reader):
    # A signs a record and it is stored under B's peer id (payload names B, so only the signature is wrong)
    record = forge(dht_record(peer_record(ID_B), subkey=ID_B), KEY_A)
    assert_rejected(reader, record, InvalidSignature, "bad signature")


def test_valid_signature_moved_to_another_subkey(reader):
    record = signed(dht_record())
    assert_rejected(reader, replace(record, subkey=MSGPackSerializer.dumps(ID_B)), InvalidSignature, ID_B)


def test_payload_peer_id_differs_from_subkey(reader):
    # A correctly signs its own entry, but the record inside claims to be B's
    record = signed(dht_record(peer_record(ID_B), subkey=ID_A))
    assert_rejected(reader, record, WireError, "stored under subkey")


@pytest.mark.parametrize("delta", [1.0, 3600.0, -1.0, 1e-6])
def test_changed_expiration_rejected(reader, delta):
    record = signed(dht_record())
    replayed = replace(record, expiration_time=record.expiration_time + delta)
    assert_rejected(reader, replayed, InvalidSignature, "bad signature")


def test_moved_to_another_swarm_rejected():
    record = signed(dht_record())
    other_key = key_id(swarm_key("other", "peers"))
    other = SignedPeerRecordValidator("other")
    assert_rejected(other, replace(record, key=other_key), InvalidSignature, "bad signature")


@pytest.mark.parametrize("schema", [0, 2, 999])
def test_unknown_schema_version_rejected(reader, schema):
    record = signed(dht_record(peer_record(schema_version=schema)))
    assert_rejected(reader, record, WireError, "unknown schema version")


def test_oversize_record_rejected(reader):
    big = peer_record(capability=replace(CAPABILITY, platform="x" * MAX_RECORD_BYTES))
    record = signed(dht_record(big))
    assert len(record.value) > MAX_RECORD_BYTES
    assert_rejected(reader, record, WireError, "exceeds")


def _signed_with_length(length: int) -> DHTRecord:
    """A signed record whose stored value is exactly ``length`` bytes (padding in the version string)."""
    base = len(signed(dht_record(peer_record(version=""))).value)
    for pad in range(length - base - 8, length - base + 1):
        record = signed(dht_record(peer_record(version="v" * pad)))
        if len(record.value) == length:
            return record
    raise AssertionError(f"no padding gives a {length}-byte record")


def test_size_limit_boundary(reader):
    at_limit, over_limit = _signed_with_length(MAX_RECORD_BYTES), _signed_with_length(MAX_RECORD_BYTES + 1)
    assert_rejected(reader, over_limit, WireError, "exceeds")
    # exactly at the limit passes the size check (and is then refused for its over-long version string)
    assert_rejected(reader, at_limit, WireError, "longer than")


@pytest.mark.parametrize(
    "subkey, error",
    [
        (b"\xc1", WireError),  # not msgpack
        (b"", WireError),  # empty
        (MSGPackSerializer.dumps(None), WireError),  # nil
        (MSGPackSerializer.dumps(5), WireError),  # not a string
        (MSGPackSerializer.dumps(ID_A.encode()), WireError),  # bytes, not str
        (MSGPackSerializer.dumps(ID_A) + b"\x00", WireError),  # trailing bytes
        (MSGPackSerializer.dumps("not a peer id"), PeerIdError),
        (MSGPackSerializer.dumps("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"), PeerIdError),  # sha256 id
        (MSGPackSerializer.dumps("x" * 300), WireError),  # over the 256-byte subkey bound
    ],
    ids=["reserved-byte", "empty", "nil", "int", "bin", "trailing", "text", "rsa-style-id", "huge"],
)
def test_garbage_subkey_rejected(reader, subkey, error):
    record = replace(signed(dht_record()), subkey=subkey)
    assert reader.validate(record) is False
    with pytest.raises(error):
        reader.check(record)


def test_missing_subkey_rejected(reader):
    assert_rejected(reader, replace(signed(dht_record()), subkey=None), WireError, "without a subkey")


@pytest.mark.parametrize("value", [b"", b"\x00" * SIGNATURE_BYTES], ids=["empty", "signature-only"])
def test_too_short_value_rejected(reader, value):
    assert_rejected(reader, replace(signed(dht_record()), value=value), WireError, "too short")


def test_signed_non_bytes_payload_rejected(reader):
    # a correctly signed value that is not the DHT's msgpack wrapping of a bytes payload
    unsigned = replace(dht_record(), value=MSGPackSerializer.dumps({"peer_id": ID_A}))
    assert_rejected(reader, signed(unsigned), WireError, "not a bytes payload")


def test_signed_garbage_payload_rejected(reader):
    unsigned = replace(dht_record(), value=MSGPackSerializer.dumps(b"\xc1garbage"))
    assert_rejected(reader, signed(unsigned), WireError, "undecodable")


@pytest.mark.parametrize(
    "key",
    [key_id(swarm_key(SWARM, "rounds")), key_id(swarm_key("other", "peers")), b"\x00" * 20],
    ids=["other-dictionary", "other-swarm", "raw"],
)
def test_records_under_other_keys_pass_untouched(reader, key):
    garbage = DHTRecord(key=key, subkey=b"\xc1", value=b"anything at all", expiration_time=EXPIRATION)
    assert reader.validate(garbage) is True
    assert reader.sign_value(garbage) == garbage.value
    assert reader.strip_value(garbage) == garbage.value
    # and sign_value does not refuse other keys even for a keyless validator or a foreign subkey
    foreign = dht_record(peer_record(ID_B), subkey=ID_B, key=key)
    assert SignedPeerRecordValidator(SWARM).sign_value(foreign) == foreign.value


def test_sign_value_refuses_another_nodes_subkey():
    with pytest.raises(ValueError, match="own entry"):
        SignedPeerRecordValidator(SWARM, KEY_A).sign_value(dht_record(peer_record(ID_B), subkey=ID_B))


def test_sign_value_without_a_key_refuses():
    with pytest.raises(ValueError, match="own entry"):
        SignedPeerRecordValidator(SWARM).sign_value(dht_record())


def test_validator_never_merges():
    assert SignedPeerRecordValidator(SWARM).merge_with(SignedPeerRecordValidator(SWARM)) is False


def test_key_id_matches_hivemind():
    from hivemind.dht.routing import DHTID

    assert PEERS_KEY == DHTID.generate(source="swarmnode/demo/peers").to_bytes()
    assert len(PEERS_KEY) == 20
    assert key_id(swarm_key("a", "peers")) != key_id(swarm_key("b", "peers"))


# ---- peer_keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_peer_id_round_trip(seed):
    public = make_key(seed).public_key()
    peer_id = peer_id_of(public)
    assert peer_id.startswith(PEER_ID_PREFIX) and PEER_ID_PREFIX == "12D3KooW"
    assert raw_public_key(public_key_from_peer_id(peer_id)) == raw_public_key(public)


def test_peer_ids_are_distinct_and_stable():
    assert ID_A != ID_B
    assert peer_id_of(make_key(1).public_key()) == ID_A


@pytest.mark.parametrize("seed", range(3))
def test_hivemind_accepts_peer_id(seed):
    public = make_key(seed).public_key()
    peer_id = peer_id_of(public)
    parsed = PeerID.from_base58(peer_id)
    assert parsed.to_base58() == peer_id
    assert parsed.to_bytes() == peer_id_bytes(public)


def test_peer_id_is_identity_multihash_of_protobuf_public_key():
    public = KEY_A.public_key()
    decoded = multihash.decode(peer_id_bytes(public))
    assert decoded.code == 0x00  # identity
    key_pb = crypto_pb2.PublicKey.FromString(decoded.digest)
    assert key_pb.key_type == crypto_pb2.Ed25519
    assert key_pb.data == raw_public_key(public)


@pytest.mark.parametrize(
    "peer_id",
    [
        "",
        "12D3KooW",
        ID_A[:-1],  # truncated: wrong length after decoding
        ID_A + "1",  # one digit too many
        ID_A[:20] + "0" + ID_A[21:],  # '0' is not a base58 digit
        ID_A[:20] + "l" + ID_A[21:],  # nor is 'l'
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # sha256 multihash (RSA key)
        "16Uiu2HAmLhLvBoYaoZfaMUKuibM6ac163GwKY74c5kiSLg5KvLpY",  # secp256k1-style id
        "x" * 100,
        None,
        b"12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
        52,
    ],
    ids=repr,
)
def test_malformed_peer_id(peer_id):
    with pytest.raises(PeerIdError):
        public_key_from_peer_id(peer_id)


def test_peer_id_with_wrong_key_type_header():
    from base58 import b58encode

    raw = bytearray(peer_id_bytes(KEY_A.public_key()))
    raw[3] = 2  # protobuf key type Secp256k1 instead of Ed25519
    with pytest.raises(PeerIdError, match="identity"):
        public_key_from_peer_id(b58encode(bytes(raw)).decode())


def test_peer_id_error_is_a_value_error():
    assert issubclass(PeerIdError, ValueError)


def test_libp2p_private_key_layout():
    data = libp2p_private_key(KEY_A)
    assert len(data) == 68
    assert data[:4] == bytes([0x08, 0x01, 0x12, 0x40])  # key_type=Ed25519, data: 64 bytes
    seed = KEY_A.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                               serialization.NoEncryption())
    assert data[4:36] == seed
    assert data[36:] == raw_public_key(KEY_A.public_key())
    pb = crypto_pb2.PrivateKey.FromString(data)
    assert pb.key_type == crypto_pb2.Ed25519 and pb.data == data[4:]
    assert Ed25519PrivateKey.from_private_bytes(data[4:36]).public_key().public_bytes_raw() == data[36:]
