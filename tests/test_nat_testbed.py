"""The NAT testbed (issue 16, scripts/nat_testbed.py): home hosts behind real NAT routers (nftables masquerade, no
inbound port) and public hosts on one "internet" bridge, built and checked with real TCP connections. The nodes'
tests on it (relays, client mode, doctor) build on this. Needs root, iproute2 and nftables; marked `netns`, run by
`make chaos`, skipped where the machine lacks them.
"""

from __future__ import annotations

import pytest

from scripts.nat_testbed import missing, nat_testbed, probe, sh

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def bed():
    reason = missing()
    if reason:
        pytest.skip(reason)
    with nat_testbed(2, 2, rate_mbit=100) as hosts:
        yield hosts


def test_a_home_host_dials_out_and_is_seen_as_its_router(bed):
    public, homes = bed
    assert probe(public[0], homes[0]) == ("connected", f"from {homes[0].public_ip}")
    assert probe(public[1], homes[1], port=4101) == ("connected", f"from {homes[1].public_ip}")
    assert probe(public[1], public[0], port=4102) == ("connected", f"from {public[0].ip}")  # public to public


def test_nobody_reaches_a_home_host_from_outside(bed):
    public, homes = bed
    assert probe(homes[0], public[0], port=4103)[1] == "nobody"  # no route to a home's LAN
    assert probe(homes[1], homes[0], port=4104)[1] == "nobody"  # nor from another home
    # its router's public address, on the port the home host listens on: no port is forwarded
    client, seen = probe(homes[0], public[0], port=4105, dial=homes[0].public_ip)
    assert seen == "nobody" and client.startswith(("refused", "unreachable")), client


def test_links_are_shaped(bed):
    public, homes = bed
    for ns, dev in ((public[0].ns, "eth0"), ("snr0", "wan0"), (homes[0].ns, "eth0")):
        assert "tbf" in sh("ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev).stdout
