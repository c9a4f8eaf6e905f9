"""Reachability without a network: the verdict of a dial-back check, relay upkeep and failover, the peer record's
new fields on the wire, the configuration, and doctor's advice. (Real daemons behind real NATs:
tests/test_nat_nodes.py; relayed streams over real p2pd: tests/test_relay.py.)"""

from __future__ import annotations

import asyncio
import random

import pytest

from node.runtime.config import NodeConfig, resolve
from node.runtime.doctor import PeerCheck, Report, advise
from node.runtime.errors import NodeError
from node.runtime.reachability import Detection, Reachability, tcp_ports
from protocol.records.peer import PeerRecord, peer_record_from_wire, peer_record_to_wire
from protocol.relay.circuits import RelayStats
from protocol.wire import WireError, pack, unpack_bounded
from tests.test_wire_bytes import ID_A, ID_B, ID_C


class FakeRouter:
    """The parts of RelayRouter that Reachability calls: dial-back answers and reservations by peer."""

    def __init__(self, answers: dict, refuse: set[str] = frozenset()):
        self.own_id, self.relays, self.answers, self.refuse = "me", (), answers, set(refuse)
        self.reserved: list[str] = []

    async def dialback(self, peer, ports):
        answer = self.answers[peer]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def reserve(self, relay):
        if relay in self.refuse:
            raise ConnectionError("relay reservation refused: reservations full (32)")
        self.reserved.append(relay)
        return 60.0


def test_the_check_says_public_if_any_peer_opens_a_port_private_if_none_and_assumes_when_nobody_answers():
    seen = "/ip4/100.64.88.101/tcp/4001"
    cases = [
        ({ID_A: (seen, []), ID_B: (seen, [4001])}, ("public", "checked")),
        ({ID_A: (seen, []), ID_B: (seen, [])}, ("private", "checked")),
        ({ID_A: (seen, []), ID_B: TimeoutError()}, ("private", "checked")),  # one answer is enough
        ({ID_A: ConnectionError("gone"), ID_B: TimeoutError()}, ("public", "assumed")),
    ]
    for answers, verdict in cases:
        reach = Reachability(FakeRouter(answers), "auto", [4001])
        found = asyncio.run(reach.detect(list(answers)))
        assert (found.state, found.how) == verdict, (answers, found)
        assert len(found.asked) == len(answers)
    reach = Reachability(FakeRouter({}), "private", [4001])  # set, not checked: nobody is asked
    assert (asyncio.run(reach.detect([ID_A])).state, reach.detection.how) == ("private", "set")
    assert asyncio.run(Reachability(FakeRouter({}), "auto", [1]).detect([])).how == "assumed"  # the first node
    with pytest.raises(ValueError, match="auto, public, private"):
        Reachability(FakeRouter({}), "nat", [1])
    assert tcp_ports(["/ip4/10.1.0.2/tcp/4001/p2p/x", "/ip4/127.0.0.1/tcp/4001", "/ip6/::1/tcp/4002"]) == [4001, 4002]


def test_a_private_node_keeps_two_relays_and_replaces_one_that_fails():
    router = FakeRouter({}, refuse={ID_C})
    reach = Reachability(router, "private", [4001], rng=random.Random(0))
    assert asyncio.run(reach.fill_relays([ID_A, ID_C])) is True
    assert router.relays == (ID_A,) and ID_C in reach.relay_errors  # C was full: one relay is what there is
    assert asyncio.run(reach.fill_relays([ID_A, ID_B, ID_C])) is True
    assert set(router.relays) == {ID_A, ID_B}
    router.refuse.add(ID_A)  # A dies (its renewal fails); C has room again
    router.refuse.discard(ID_C)
    assert asyncio.run(reach.fill_relays([ID_A, ID_B, ID_C])) is True
    assert set(router.relays) == {ID_B, ID_C} and "refused" in reach.relay_errors[ID_A]
    assert asyncio.run(reach.fill_relays([ID_A, ID_B, ID_C])) is False  # renewed, nothing changed


def record(**changes) -> PeerRecord:
    from tests.test_validation import peer_record

    return peer_record(ID_A).replace(**changes)


def test_reachability_and_relays_travel_in_the_peer_record_and_are_left_out_at_their_defaults():
    plain = record()
    assert "reach" not in unpack_bounded(peer_record_to_wire(plain), 1 << 14)  # older nodes read it unchanged
    natted = record(reachability="private", relays=(ID_B, ID_C))
    assert peer_record_from_wire(peer_record_to_wire(natted)) == natted
    quiet = record(relay_service=False)
    assert peer_record_from_wire(peer_record_to_wire(quiet)).relay_service is False
    wire = unpack_bounded(peer_record_to_wire(plain), 1 << 14)
    for bad, match in ((wire | {"reach": "behind-cgnat"}, "reach"), (wire | {"relays": [ID_B] * 5}, "relays"),
                       (wire | {"relays": ["x" * 65]}, "relays"), (wire | {"relay_service": 1}, "relay_service")):
        with pytest.raises(WireError, match=match):
            peer_record_from_wire(pack(bad))


def test_the_reachability_settings_are_checked():
    assert resolve({"reachability": "private", "relay_service": False}, env={}).relay_service is False
    assert resolve({}, env={"SWARMNODE_RELAY_SERVICE": "0"}).relay_service is False
    assert NodeConfig().reachability == "auto" and NodeConfig().relay_service is True
    for flags, match in (({"reachability": "nat"}, "reachability must be"),
                         ({"relayed_span_share": 2.0}, "relayed_span_share must be in")):
        with pytest.raises(NodeError, match=match):
            resolve(flags, env={})
    with pytest.raises(NodeError, match="expected true or false"):
        resolve({}, env={"SWARMNODE_RELAY_SERVICE": "maybe"})


def report(state: str, how: str = "checked", relays=(), peers=(), open_ports=()) -> Report:
    return Report(Detection(state, how, ["/ip4/203.0.113.7/tcp/4001"], list(open_ports)), [4001], [],
                  list(relays), [], state == "public", RelayStats(), list(peers))


def test_doctor_says_what_to_do():
    private = advise(report("private", relays=[ID_B]), acting_as="private")
    assert private[0].startswith("peers cannot open connections to this node") and "forward TCP port 4001" in \
        private[0] and "--announce /ip4/203.0.113.7/tcp/4001" in private[0]
    assert private[1] == f"you are relayed through {ID_B}; rounds will be slower (each stream to a peer that " \
                         "cannot reach you directly crosses the relay)"
    assert any(line.startswith("no relay:") for line in advise(report("private"), acting_as="private"))
    assert advise(report("public", open_ports=[4001]), acting_as="public") == [
        "all good: reachable, and every live peer answered"]
    moved = advise(report("private"), acting_as="public")  # a router that closed its forwarded port since start
    assert any("restart it to switch" in line for line in moved)
    assert any("not checked" in line for line in advise(report("public", how="assumed"), acting_as="public"))
    down = advise(report("public", peers=[PeerCheck(ID_C, "private", error="could not reach private peer")]),
                  acting_as="public")
    assert down == [f"peer {ID_C} (private) is unreachable from here: could not reach private peer"]


def test_no_relay_service_serves_the_dial_back_check_and_nothing_else():
    from node.cli.main import build_parser
    from protocol.relay.circuits import RelayNames, RelayService

    args = build_parser().parse_args(["run", "--no-relay-service", "--reachability", "public"])
    assert (args.relay_service, args.reachability) == (False, "public")
    assert build_parser().parse_args(["run"]).relay_service is None  # not given: the config decides (default on)

    async def dial(peer, protocol):
        raise AssertionError("never dialled")

    names = RelayNames("s")
    assert set(RelayService(ID_A, dial, names, relay=False).handlers()) == {names.dialback, names.probe}
    assert set(RelayService(ID_A, dial, names).handlers()) == {names.dialback, names.probe, names.reserve, names.hop}
