"""A stranger's forged peer record reaches a real daemon's DHT (protocol/records/validation.py refuses it) and
the daemon's /metrics counts the refusal by what and why (protocol/rejections.py, node/api/metrics.py)."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time
from prometheus_client.parser import text_string_to_metric_families

from node.devtools.localswarm import wait_for
from node.runtime.p2pd import OwnedP2PDaemon
from protocol.records.peer import swarm_key
from tests.test_dashboard_live import dashboard_url

SWARM = "refusals"


async def store_forged_peer_records(bootstrap: str, n: int) -> None:
    """A real DHT node that never joined as a swarmnode peer writes ``n`` unsigned entries into the swarm's peers
    dictionary (no validator of its own: it sends what it likes)."""
    daemon = OwnedP2PDaemon()
    p2p = await daemon.start(identity_path=None, host_maddrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=[bootstrap])
    dht = await DHTNode.create(p2p=p2p, initial_peers=[bootstrap])
    try:
        for i in range(n):
            await dht.store(swarm_key(SWARM, "peers"), b"not a signed peer record %d" % i, get_dht_time() + 30,
                            subkey=str(p2p.peer_id))
    finally:
        await dht.shutdown()
        await daemon.stop()


def refused(url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(url + "metrics", timeout=20) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    family = families.get("swarmnode_rejected")
    return {} if family is None else {(s.labels["what"], s.labels["reason"]): s.value for s in family.samples
                                      if s.name == "swarmnode_rejected_total"}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_forged_peer_record_is_refused_and_counted_in_the_metrics(node_factory):
    node = node_factory("n0", ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", SWARM]).wait_ready()
    url = dashboard_url(node)
    def peer_records() -> float:
        return sum(n for (what, _), n in refused(url).items() if what == "peer record")

    before = peer_records()
    asyncio.run(store_forged_peer_records(node.addr, 3))
    wait_for(lambda: peer_records() >= before + 1, 30, "the refusal in /metrics")
    reasons = {why for (what, why) in refused(url) if what == "peer record"}
    assert reasons <= {"WireError", "InvalidSignature", "PeerIdError"}, reasons  # class names, never peer text
