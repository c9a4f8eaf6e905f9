"""Forged matchmaking entries cannot stall all-reduce rounds (issue 14: six forged, unsigned ``!started`` entries for
a job's next round ids stalled it for the whole attack).

Three real all-reduce peer processes (node/devtools/reduce_peer.py, each with its DHT's SignedMatchmakingValidator)
run rounds while an attacker -- a hivemind DHTNode with its own p2pd and no validator, joined to the swarm -- keeps
storing forged started markers and declarations under every round's key: unsigned (with the DHT's public store, as
the probe did), and signed by the attacker's key for entries naming other peers (raw bytes straight to the nearest
nodes' rpc_store). Every round completes with all three members, no live node accepts a forged entry, and a reader
with the validator finds none of them under the round keys, only the honest peers' own entries; a positive control
shows the same paths carry the attacker's own correctly signed entry, so the test can fail.
"""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

from node.runtime.p2pd import OwnedP2PDaemon
from protocol.allreduce.entry_validation import SignedMatchmakingValidator
from protocol.allreduce.matchmaking import (
    STARTED,
    declaration_to_wire,
    declared_subkey,
    round_key,
    started_subkey,
    started_to_wire,
)
from protocol.records.peer_keys import peer_id_of
from protocol.records.validation import key_id, signed_payload
from tests.test_allreduce_integration import peers, wait_done  # noqa: F401  (peers: the process fixture)
from tests.test_record_rejection import _store_bytes

ROUNDS = 3


def forged(signer: Ed25519PrivateKey, key: str, subkey: str, body: bytes, expiration: float) -> bytes:
    """Signed exactly as SignedMatchmakingValidator signs, but by ``signer`` whoever the subkey names."""
    value = msgpack.packb(body, use_bin_type=True)
    record = DHTRecord(key_id(key), msgpack.packb(subkey, use_bin_type=True), value, expiration)
    return value + signer.sign(signed_payload(record))


async def attack(bootstrap: str, honest: list[str], finished) -> dict:
    mallory = Ed25519PrivateKey.generate()
    ghost = "~"  # a real peer id smaller than every honest one: readers fooled by it would wait for its plan
    while ghost > min(honest):
        ghost = peer_id_of(Ed25519PrivateKey.generate().public_key())
    daemons = [OwnedP2PDaemon(), OwnedP2PDaemon()]
    raw_p2p, reader_p2p = [await d.start(identity_path=None, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                         bootstrap=[bootstrap]) for d in daemons]
    raw = await DHTNode.create(p2p=raw_p2p, initial_peers=[bootstrap])  # no validator: stores what it is given
    reader = await DHTNode.create(p2p=reader_p2p, initial_peers=[bootstrap],
                                  record_validator=SignedMatchmakingValidator())
    result: dict = {"stores": 0, "accepted": [], "forged_seen": [], "honest_seen": set()}
    try:
        deadline = time.monotonic() + 60
        while not finished() and time.monotonic() < deadline:
            for r in range(ROUNDS + 1):
                key, exp = round_key("reduce", "grads", f"r{r}"), get_dht_time() + 30
                # unsigned, through the public API: the probe, old and new subkey forms
                await raw.store(key, started_to_wire([ghost]), exp, subkey=STARTED)
                await raw.store(key, started_to_wire([honest[0]]), exp, subkey=started_subkey(honest[0]))
                await raw.store(key, declaration_to_wire(1e9), exp, subkey=declared_subkey(ghost))
                # signed by the attacker's own key, naming someone else
                for subkey, body in [(started_subkey(honest[0]), started_to_wire([honest[0]])),
                                     (started_subkey(ghost), started_to_wire([ghost])),
                                     (declared_subkey(ghost), declaration_to_wire(1e9))]:
                    if await _store_bytes(raw, key, subkey, forged(mallory, key, subkey, body, exp), exp):
                        result["accepted"].append(subkey)
                    result["stores"] += 1
            await asyncio.sleep(0.2)
        # positive control of the same paths: the attacker's own entry, signed by it, under an unused round id
        key, mine = round_key("reduce", "grads", "r99"), declared_subkey(peer_id_of(mallory.public_key()))
        exp = get_dht_time() + 30
        result["control_accepted"] = await _store_bytes(raw, key, mine, forged(mallory, key, mine,
                                                                                 declaration_to_wire(1.0), exp), exp)
        found = await reader.get(key, latest=True)
        result["control_seen"] = found is not None and mine in found.value
        for r in range(ROUNDS):
            found = await reader.get(round_key("reduce", "grads", f"r{r}"), latest=True)
            entries = found.value if found is not None and isinstance(found.value, dict) else {}
            result["forged_seen"] += [s for s in entries if s == STARTED or ghost in s or s.startswith("!started")
                                      and entries[s].value == started_to_wire([honest[0]])]
            result["honest_seen"] |= {s for s in entries if s in {declared_subkey(p) for p in honest}}
        return result
    finally:
        await reader.shutdown()
        await raw.shutdown()
        for d in daemons:
            await d.stop()


@pytest.mark.slow  # ~15 s with four processes: in `make chaos` (CI's own step), keeping `make test` under 10 minutes
def test_forged_started_markers_and_declarations_do_not_stall_rounds(peers):  # noqa: F811
    procs, *_ = peers(3, rounds=ROUNDS, period=3.0)
    honest = [p.wait_event(5, "ready", event="ready")["peer_id"] for p in procs]
    result = asyncio.run(attack(procs[0].wait_event(5, "ready", event="ready")["addr"], honest,
                                lambda: all(len(p.rounds()) == ROUNDS for p in procs)))
    wait_done(procs, 30)
    assert result["stores"] > 0 and result["accepted"] == [], f"a live node accepted {result['accepted']}"
    assert result["control_accepted"] and result["control_seen"]  # the same paths do carry a valid entry
    assert result["forged_seen"] == [], f"a reader found forged entries: {result['forged_seen']}"
    assert result["honest_seen"] == {declared_subkey(p) for p in honest}  # the reader does see the real entries
    per_peer = [p.rounds() for p in procs]
    for r in range(ROUNDS):
        events = [rounds[r] for rounds in per_peer]
        assert all(e["ok"] and len(e["members"]) == 3 for e in events), [e["error"] for e in events]
        assert len({e["hash"] for e in events}) == 1
