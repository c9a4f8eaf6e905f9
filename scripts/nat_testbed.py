"""A NAT testbed (issue 16): public hosts on an "internet" bridge, and home networks behind real NAT routers.

    sudo .venv/bin/python scripts/nat_testbed.py --public 2 --homes 2 --rate-mbit 100   # create, probe, tear down

Topology, all in network namespaces created here and removed on exit:
  * the internet: bridge "snnat0" in the root namespace (no address, no route: nothing leaves the testbed), subnet
    100.64.88.0/24 (RFC 6598, which libp2p counts as LAN: scripts/netns_testbed.py says why not 198.18/15);
  * public host i: namespace snp<i>, eth0 = 100.64.88.<i+1>, reachable by everyone;
  * home j: a router namespace snr<j> with its WAN leg on the bridge (100.64.88.<101+j>) and its LAN leg to the home
    host's namespace snh<j> (router 10.<j+1>.0.1/24, host 10.<j+1>.0.2/24, default route through the router). The
    router forwards and masquerades the LAN's outbound traffic (nftables: postrouting masquerade on the WAN leg) and
    drops every inbound connection it did not see go out (forward chain: established/related in, new only from the
    LAN): a home router with no port forwarded, which is what most volunteers have.
Every host's eth0 and every router's WAN leg is shaped with tc tbf at --rate-mbit (burst 256 KiB, 100 ms of queue).
Needs root, iproute2 and nftables (Debian's package; .ci/run installs it when missing).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

INTERNET = "100.64.88"
BRIDGE = "snnat0"
ROUTER_RULES = """
table ip nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat;
        oifname "wan0" ip saddr 10.{home}.0.0/24 masquerade
    }}
}}
table ip filter {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" accept
    }}
}}
"""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@dataclass(frozen=True)
class Host:
    ns: str
    ip: str  # the address the host itself holds
    public_ip: str  # the address others see its connections come from (its router's WAN address if NAT'd)
    natted: bool

    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside this host (ip netns exec execs it: same pid)."""
        return ["ip", "netns", "exec", self.ns]


def missing() -> str:
    """Why this machine cannot build the testbed ("" if it can)."""
    import os

    if os.geteuid() != 0:
        return "needs root for ip netns, tc and nft"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if not shutil.which(tool):
            return f"needs {tool} (Debian package {package})"
    return ""


def teardown(public: int, homes: int) -> None:
    for i in range(public):
        sh("ip", "netns", "del", f"snp{i}", check=False)
        sh("ip", "link", "del", f"snpv{i}", check=False)
    for j in range(homes):
        sh("ip", "netns", "del", f"snr{j}", check=False)
        sh("ip", "netns", "del", f"snh{j}", check=False)
        sh("ip", "link", "del", f"snrv{j}", check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


def _shape(ns: str, dev: str, rate_mbit: float | None) -> None:
    if rate_mbit:
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
           "burst", "256kb", "latency", "100ms")


def _up(ns: str, dev: str, addr: str) -> None:
    sh("ip", "netns", "exec", ns, "ip", "addr", "add", addr, "dev", dev)
    sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")


@contextlib.contextmanager
def nat_testbed(public: int, homes: int, rate_mbit: float | None = None) -> Iterator[tuple[list[Host], list[Host]]]:
    """Yield (public hosts, NAT'd home hosts); always removes every namespace, link and the bridge on exit."""
    if not 0 <= public <= 50 or not 0 <= homes <= 50 or public + homes < 1:
        raise ValueError(f"public and homes must be in 0..50 (one at least), got {public} and {homes}")
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    teardown(public, homes)
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "link", "set", BRIDGE, "up")
        out, inside = [], []
        for i in range(public):
            ns, ip = f"snp{i}", f"{INTERNET}.{i + 1}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"snpv{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", f"snpv{i}", "master", BRIDGE)
            sh("ip", "link", "set", f"snpv{i}", "up")
            _up(ns, "eth0", f"{ip}/24")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            _shape(ns, "eth0", rate_mbit)
            out.append(Host(ns, ip, ip, False))
        for j in range(homes):
            router, host, wan = f"snr{j}", f"snh{j}", f"{INTERNET}.{101 + j}"
            lan, home_ip = f"10.{j + 1}.0.1", f"10.{j + 1}.0.2"
            sh("ip", "netns", "add", router)
            sh("ip", "netns", "add", host)
            sh("ip", "link", "add", f"snrv{j}", "type", "veth", "peer", "name", "wan0", "netns", router)
            sh("ip", "link", "set", f"snrv{j}", "master", BRIDGE)
            sh("ip", "link", "set", f"snrv{j}", "up")
            _up(router, "wan0", f"{wan}/24")
            sh("ip", "netns", "exec", router, "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "eth0",
               "netns", host)
            _up(router, "lan0", f"{lan}/24")
            _up(host, "eth0", f"{home_ip}/24")
            for ns in (router, host):
                sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            sh("ip", "netns", "exec", host, "ip", "route", "add", "default", "via", lan)
            sh("ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            rules = subprocess.run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=ROUTER_RULES.format(
                home=j + 1), capture_output=True, text=True)
            if rules.returncode != 0:
                raise RuntimeError(f"nft on {router}: {rules.stderr.strip()}")
            _shape(router, "wan0", rate_mbit)
            _shape(host, "eth0", rate_mbit)
            inside.append(Host(host, home_ip, wan, True))
        yield out, inside
    finally:
        teardown(public, homes)


PROBE = """
import socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "serve":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen()
    s.settimeout(float(sys.argv[4]))
    print("ready", flush=True)
    try:
        c, addr = s.accept(); print("from", addr[0], flush=True)
    except socket.timeout:
        print("nobody", flush=True)
else:
    try:
        socket.create_connection((host, port), timeout=float(sys.argv[4])); print("connected", flush=True)
    except OSError as e:
        print("refused" if isinstance(e, ConnectionRefusedError) else "unreachable", type(e).__name__, flush=True)
"""


def probe(server: Host, client: Host, port: int = 4100, timeout: float = 2.0, dial: str | None = None
          ) -> tuple[str, str]:
    """(what the client saw, what the server saw) of one TCP connection from ``client`` to ``server``'s own
    address (or to ``dial``: e.g. a NAT'd server's router): "connected" / "from ADDR" when it goes through."""
    srv = subprocess.Popen([*server.prefix(), sys.executable, "-c", PROBE, "serve", "0.0.0.0", str(port),
                            str(timeout + 1)], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        srv.stdout.readline()  # ready
        cli = subprocess.run([*client.prefix(), sys.executable, "-c", PROBE, "connect", dial or server.ip, str(port),
                              str(timeout)], capture_output=True, text=True, timeout=timeout + 10)
        seen = srv.communicate(timeout=timeout + 5)[0].strip()
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
        if srv.stdout is not None:
            srv.stdout.close()
    return cli.stdout.strip(), seen


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--public", type=int, default=2)
    parser.add_argument("--homes", type=int, default=2)
    parser.add_argument("--rate-mbit", type=float, default=100)
    args = parser.parse_args()
    with nat_testbed(args.public, args.homes, args.rate_mbit) as (pub, homes):
        for h in pub + homes:
            print(h.ns, h.ip, "seen as", h.public_ip, "(NAT'd)" if h.natted else "(public)")
        if pub and homes:
            print("home -> public:", probe(pub[0], homes[0]))
            print("public -> home:", probe(homes[0], pub[0]))
