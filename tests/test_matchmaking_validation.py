"""Matchmaking DHT entries (declarations, started markers) are accepted only signed by the peer they name, with a
bounded expiry; the matchmaking reader re-checks what it reads and ignores anything else under a round's key
(protocol/allreduce/entry_validation.py, matchmaking.seen_from_entries)."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.exceptions import InvalidSignature
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer

from protocol.allreduce.entry_validation import SignedMatchmakingValidator
from protocol.allreduce.matchmaking import (
    CLOCK_SKEW_S,
    MAX_ENTRY_TTL_S,
    STARTED,
    declaration_to_wire,
    declared_subkey,
    round_key,
    seen_from_entries,
    started_subkey,
    started_to_wire,
)
from protocol.records.validation import key_id
from protocol.wire import WireError
from tests.test_wire_bytes import ID_A, ID_B, ID_C, KEY_A, KEY_B

NOW = 1_700_000_000.0
KEY = key_id(round_key("demo", "grads", "r-8"))


def validator(private_key=None) -> SignedMatchmakingValidator:
    return SignedMatchmakingValidator(private_key, now=lambda: NOW)


def entry(subkey: object, body: bytes, ttl: float = 10.0, key: bytes = KEY) -> DHTRecord:
    return DHTRecord(key, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(body), NOW + ttl)


def signed(record: DHTRecord, signer=KEY_A) -> DHTRecord:
    return dataclasses.replace(record, value=validator(signer).sign_value(record))


def forge(record: DHTRecord, signer) -> DHTRecord:
    """Sign as the validator does, with any key, whatever the subkey names."""
    from protocol.records.validation import signed_payload

    return dataclasses.replace(record, value=record.value + signer.sign(signed_payload(record)))


def assert_rejected(record: DHTRecord, error: type[Exception], match: str) -> None:
    reader = validator()
    assert reader.validate(record) is False
    with pytest.raises(error, match=match):
        reader.check(record)


DECLARED_A = entry(declared_subkey(ID_A), declaration_to_wire(1e6))
STARTED_A = entry(started_subkey(ID_A), started_to_wire([ID_A, ID_B]))


@pytest.mark.parametrize("record", [DECLARED_A, STARTED_A], ids=["declaration", "started"])
def test_a_signed_entry_of_its_own_peer_is_accepted_and_stripped(record):
    stored = signed(record)
    reader = validator()
    assert reader.validate(stored) is True
    assert reader.strip_value(stored) == record.value


@pytest.mark.parametrize("record", [DECLARED_A, STARTED_A], ids=["declaration", "started"])
def test_forged_entries_are_rejected(record):
    assert_rejected(dataclasses.replace(record, value=record.value + b"\0" * 64), InvalidSignature, ID_A)  # unsigned
    assert validator().validate(record) is False  # the bare body, as a node without a validator stores it
    assert_rejected(forge(record, KEY_B), InvalidSignature, "bad signature")  # signed by another key
    # moved to another round, or given a later expiry: the signature covers key and expiration
    assert_rejected(dataclasses.replace(signed(record), key=key_id(round_key("demo", "grads", "r-9"))),
                    InvalidSignature, "bad signature")
    assert_rejected(dataclasses.replace(signed(record), expiration_time=NOW + 11), InvalidSignature, "bad signature")


def test_an_entry_naming_another_peer_is_rejected_and_cannot_be_written():
    record = entry(declared_subkey(ID_B), declaration_to_wire(1e6))
    assert_rejected(forge(record, KEY_A), InvalidSignature, "bad signature")  # A's signature on B's entry
    with pytest.raises(ValueError, match="name itself"):
        validator(KEY_A).sign_value(record)
    with pytest.raises(ValueError, match="name itself"):
        validator(None).sign_value(DECLARED_A)


def test_a_started_marker_must_list_its_leader():
    assert_rejected(signed(entry(started_subkey(ID_A), started_to_wire([ID_B, ID_C]))), WireError, "leader")


def test_an_expiry_too_far_ahead_is_rejected():
    limit = MAX_ENTRY_TTL_S + CLOCK_SKEW_S
    assert validator().validate(signed(entry(declared_subkey(ID_A), declaration_to_wire(1.0), ttl=limit))) is True
    assert_rejected(signed(entry(declared_subkey(ID_A), declaration_to_wire(1.0), ttl=limit + 1)), WireError,
                    "expires")


@pytest.mark.parametrize("subkey", [STARTED, "!started/not-a-peer-id-but-long-enough-to-look-like-one-xx",
                                    "!other/" + ID_A, "!", "!declared"])
def test_every_reserved_subkey_is_protected(subkey):
    record = forge(entry(subkey, started_to_wire([ID_A])), KEY_A)
    assert validator().validate(record) is False
    with pytest.raises(ValueError):
        validator(KEY_A).sign_value(record)


def test_oversize_and_malformed_bodies_are_rejected():
    assert_rejected(signed(entry(declared_subkey(ID_A), b"\x81\xa2bw" + b"\xcb" + b"\0" * 300)), WireError, "exceeds")
    assert_rejected(signed(entry(declared_subkey(ID_A), b"not msgpack \xc1")), WireError, "msgpack")


def test_other_records_pass_untouched():
    other = DHTRecord(KEY, MSGPackSerializer.dumps(ID_A), b"anything", NOW + 1e6)
    assert validator().validate(other) is True and validator(KEY_A).sign_value(other) == b"anything"
    assert validator().validate(dataclasses.replace(other, subkey=None)) is True
    assert validator().validate(dataclasses.replace(other, subkey=b"\xc1")) is True


@dataclasses.dataclass
class Item:
    value: object
    expiration_time: float = NOW + 10


def test_the_reader_ignores_what_it_cannot_trust():
    entries = {
        declared_subkey(ID_A): Item(declaration_to_wire(5.0)),
        declared_subkey(ID_B): Item(declaration_to_wire(7.0), NOW + MAX_ENTRY_TTL_S + CLOCK_SKEW_S + 1),  # too late
        ID_C: Item(declaration_to_wire(1.0)),  # the old bare-peer-id form
        STARTED: Item(started_to_wire([ID_C])),  # the old unsigned marker an attacker wrote
        declared_subkey("0ghost-of-a-peer-that-never-was-at-all-xx"): Item(declaration_to_wire(1.0)),
        started_subkey(ID_B): Item(started_to_wire([ID_C])),  # leader outside its group
        started_subkey(ID_C): Item(b"garbage"),
    }
    assert seen_from_entries(entries, NOW) == seen_from_entries({declared_subkey(ID_A): entries[declared_subkey(ID_A)]},
                                                                NOW)
    seen = seen_from_entries(entries, NOW)
    assert seen.declared == {ID_A: 5.0} and seen.started is None
    assert seen_from_entries(None, NOW).declared == {}


def test_the_reader_unites_the_groups_of_several_leaders():
    entries = {started_subkey(ID_A): Item(started_to_wire([ID_A])), started_subkey(ID_B): Item(started_to_wire([ID_B,
                                                                                                              ID_C]))}
    assert seen_from_entries(entries, NOW).started == tuple(sorted((ID_A, ID_B, ID_C)))


def test_the_reader_ignores_entries_of_peers_it_refuses():
    """A stranger's (or an excluded member's) own, correctly signed started marker listing only itself would tell
    every honest reader that the round started without it; a reader that refuses that peer ignores the marker and
    the stranger's declaration, and still sees everyone else's."""
    entries = {started_subkey(ID_C): Item(started_to_wire([ID_C])),
               declared_subkey(ID_C): Item(declaration_to_wire(1.0)),
               declared_subkey(ID_A): Item(declaration_to_wire(5.0))}
    assert seen_from_entries(entries, NOW).started == (ID_C,)  # without the rule: the round "started without" A
    seen = seen_from_entries(entries, NOW, refuses=lambda peer: peer == ID_C)
    assert seen.started is None and seen.declared == {ID_A: 5.0}
