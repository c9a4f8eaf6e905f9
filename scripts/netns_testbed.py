"""A network-namespace testbed: N hosts on one bridge, each host's egress capped with tc tbf.

    sudo .venv/bin/python scripts/netns_testbed.py --hosts 4 --rate-mbit 100   # create, print, tear down

Topology: namespace sn<i> holds veth "eth0" with address 100.64.77.<i+1>/24; its peer end sits on the
bridge "snbr0" in the root namespace, which has no address and no route anywhere: the hosts can reach
only each other. Why 100.64/10 (RFC 6598 shared address space): libp2p resolves a peer's address through
its LAN or WAN DHT, and go-multiaddr's filters drop RFC 2544's 198.18/15 from both ("unroutable"), so
peers that were never directly connected cannot find each other there; 100.64/10 counts as LAN. Egress of each host's
eth0 is shaped with a token bucket filter (netem is not available here): rate = --rate-mbit, burst 256 KiB (about 20 ms
at 100 Mbit/s), latency 100 ms of queue. Needs root (ip netns, tc).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
from dataclasses import dataclass

SUBNET = "100.64.77"  # RFC 6598 shared address space, only ever on this bridge (see docstring)
BRIDGE = "snbr0"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@dataclass(frozen=True)
class Host:
    ns: str
    ip: str

    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside this host (ip netns exec execs it: same pid)."""
        return ["ip", "netns", "exec", self.ns]


def teardown(n: int) -> None:
    for i in range(n):
        sh("ip", "netns", "del", f"sn{i}", check=False)
        sh("ip", "link", "del", f"snv{i}", check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


@contextlib.contextmanager
def testbed(n: int, rate_mbit: float | None):
    """Yield N hosts; always removes every namespace, link and the bridge on exit."""
    if not 1 <= n <= 200:
        raise ValueError(f"hosts must be in 1..200, got {n}")
    teardown(n)
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "link", "set", BRIDGE, "up")
        hosts = []
        for i in range(n):
            ns, ip = f"sn{i}", f"{SUBNET}.{i + 1}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"snv{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", f"snv{i}", "master", BRIDGE)
            sh("ip", "link", "set", f"snv{i}", "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            if rate_mbit:
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                   "rate", f"{rate_mbit}mbit", "burst", "256kb", "latency", "100ms")
            hosts.append(Host(ns, ip))
        yield hosts
    finally:
        teardown(n)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--rate-mbit", type=float, default=100)
    args = parser.parse_args()
    with testbed(args.hosts, args.rate_mbit) as hosts:
        for h in hosts:
            print(h.ns, h.ip, sh("ip", "netns", "exec", h.ns, "tc", "qdisc", "show", "dev", "eth0").stdout.strip())
