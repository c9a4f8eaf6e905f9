"""A live swarm's validators refuse forged, oversize and unknown-schema records from a rogue DHT peer.

The rogue is a real hivemind DHTNode (with its own p2pd) in this test process that joins the swarm by
multiaddr and stores raw records with no validator of its own; a positive control shows the same path
does get a correctly signed record accepted, so the test can fail.
"""

from __future__ import annotations

import asyncio
import time

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.node import DHTNode

from node.runtime.p2pd import OwnedP2PDaemon
from protocol.records.peer import Capability, PeerRecord, peer_record_to_wire, swarm_key
from protocol.records.peer_keys import peer_id_of
from protocol.records.validation import SignedPeerRecordValidator

CAP = Capability((), 2, 2**30, 2**30, 0.1, None, "test")


def record_for(key: Ed25519PrivateKey, **changes) -> PeerRecord:
    pid = peer_id_of(key.public_key())
    return PeerRecord(pid, (f"/ip4/127.0.0.1/tcp/1/p2p/{pid}",), "rogue", CAP, time.time()).replace(**changes)


def forged_value(signer: Ed25519PrivateKey, body: bytes, subkey: str, expiration: float, swarm: str) -> bytes:
    """Sign exactly as SignedPeerRecordValidator does, but with any key and any body."""
    from hivemind.dht.validation import DHTRecord

    from protocol.records.validation import key_id

    value = msgpack.packb(body, use_bin_type=True)
    record = DHTRecord(key_id(swarm_key(swarm, "peers")), msgpack.packb(subkey, use_bin_type=True), value, expiration)
    return value + signer.sign(msgpack.packb([record.key, record.subkey, value, expiration], use_bin_type=True))


async def rogue_session(bootstrap: str, swarm: str) -> dict[str, bool]:
    victim = Ed25519PrivateKey.generate()
    mallory = Ed25519PrivateKey.generate()
    honest = Ed25519PrivateKey.generate()
    key = swarm_key(swarm, "peers")
    exp = time.time() + 30

    daemons = [OwnedP2PDaemon(), OwnedP2PDaemon()]
    p2p, honest_p2p = [await d.start(identity_path=None, host_maddrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=[bootstrap])
                       for d in daemons]
    raw = await DHTNode.create(p2p=p2p, initial_peers=[bootstrap])  # no validator: stores bytes as given
    signed = await DHTNode.create(p2p=honest_p2p, initial_peers=[bootstrap],
                                  record_validator=SignedPeerRecordValidator(swarm, honest))
    try:
        victim_id, mallory_id = peer_id_of(victim.public_key()), peer_id_of(mallory.public_key())
        results = {}

        async def store_raw(name: str, subkey: str, value_bytes: bytes) -> None:
            results[name] = await _store_bytes(raw, key, subkey, value_bytes, exp)

        body = peer_record_to_wire(record_for(victim))
        await store_raw("wrong_signer", victim_id, forged_value(mallory, body, victim_id, exp, swarm))
        await store_raw("unsigned", victim_id, msgpack.packb(body, use_bin_type=True))
        await store_raw("id_mismatch", mallory_id, forged_value(mallory, peer_record_to_wire(record_for(victim)),
                                                                 mallory_id, exp, swarm))
        big = peer_record_to_wire(record_for(mallory, version="x" * 100)).replace(b"x" * 100, b"y" * 100)
        await store_raw("unknown_schema", mallory_id, forged_value(
            mallory, peer_record_to_wire(record_for(mallory, schema_version=99)), mallory_id, exp, swarm))
        await store_raw("oversize", mallory_id, forged_value(mallory, big + b"\0" * 17000, mallory_id, exp, swarm))
        # a whole dictionary smuggling a forged entry (hivemind's IS_DICTIONARY store path)
        from hivemind.dht.storage import DictionaryDHTValue

        smuggled = DictionaryDHTValue()
        smuggled.store(victim_id, forged_value(mallory, body, victim_id, exp, swarm), exp)
        results["whole_dictionary"] = await _store_bytes(raw, key, None, smuggled, exp)
        # positive control of the raw path: mallory's own, correctly signed record is accepted
        await store_raw("raw_valid", mallory_id, forged_value(mallory, peer_record_to_wire(record_for(mallory)),
                                                              mallory_id, exp, swarm))
        results["mallory_id"] = mallory_id
        results["honest"] = bool(await signed.store(key, peer_record_to_wire(record_for(honest)), exp,
                                                    subkey=peer_id_of(honest.public_key())))
        results["honest_id"] = peer_id_of(honest.public_key())
        return results
    finally:
        await signed.shutdown()
        await raw.shutdown()
        for d in daemons:
            await d.stop()


async def _store_bytes(node: DHTNode, key: str, subkey, value_bytes, expiration: float) -> bool:
    """Store pre-serialised bytes: call the peers' rpc_store directly (what a malicious client would do)."""
    from hivemind.dht.routing import DHTID

    key_id = DHTID.generate(source=key)
    nearest = await node.find_nearest_nodes([key_id], k_nearest=5)
    accepted = []
    for peer_id in nearest[key_id].values():
        response = await node.protocol.call_store(
            peer_id, [key_id], [value_bytes], [expiration], subkeys=[subkey]  # call_store serialises subkeys
        )
        accepted.append(bool(response and any(response)))
    return any(accepted)


def test_swarm_rejects_forged_records_and_accepts_signed_ones(swarm_factory):
    swarm = swarm_factory(2, swarm="guarded")
    swarm.wait_converged(timeout=20)
    a, b = swarm.nodes
    results = asyncio.run(rogue_session(a.addr, "guarded"))
    for case in ("wrong_signer", "unsigned", "id_mismatch", "unknown_schema", "oversize", "whole_dictionary"):
        assert results[case] is False, f"a live node accepted the {case} record"
    assert results["honest"] is True and results["raw_valid"] is True
    # the positive controls reached the swarm through the same DHT; nothing forged did
    assert b.peer_ids() - {a.peer_id, b.peer_id} == {results["honest_id"], results["mallory_id"]}
