"""``swarmnode doctor``: this node's reachability checked afresh, its relays, a check of every live peer, and what
to do about what it finds.

    report = await diagnose(reach, relay, p2p, addrs, views, own_id)    # the daemon's pieces; about MAX_S seconds
    report.advice                                                       # one line each, the first one the most urgent

Each peer check opens a stream the way every other stream is opened (node/runtime/p2pd.py's router: through a
relay when the peer is private and not connected), then times a 1-byte frame's round trip and a 1 MiB frame's
transfer against the peer's probe service (protocol/relay/circuits.py). The advice is a pure function of the
report (``advise``) so it is tested without a network.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

from node.runtime.membership import PeerView
from node.runtime.reachability import Detection, Reachability
from protocol.relay.circuits import PROBE_BYTES, RelayService, RelayStats
from protocol.streams import Stream, close_quietly

MAX_PEERS = 16  # peers checked, the first by peer id
CHECK_S = 8.0  # the longest one peer's check may take


@dataclass
class PeerCheck:
    peer_id: str
    reachability: str
    route: str = ""  # "direct" or "relay <peer id>"
    rtt_ms: float = 0.0
    throughput_bytes_s: float = 0.0
    error: str = ""


@dataclass
class Report:
    detection: Detection
    ports: list[int]
    addrs: list[str]
    relays: list[str]
    relay_errors: list[str]
    relay_service: bool
    relay_stats: RelayStats
    peers: list[PeerCheck] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)


async def check_peer(p2p, names_probe: str, view: PeerView) -> PeerCheck:
    record = view.record
    check = PeerCheck(record.peer_id, record.reachability)
    writer = None
    try:
        async with asyncio.timeout(CHECK_S):
            info, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(record.peer_id), names_probe)
            addr = str(info.addr)
            check.route = f"relay {addr.split('/')[2]}" if "/p2p-circuit" in addr else "direct"
            stream = Stream(record.peer_id, reader, writer)
            start = time.perf_counter()
            await stream.send(b"\0")
            await stream.receive(4)
            check.rtt_ms = (time.perf_counter() - start) * 1000
            start = time.perf_counter()
            await stream.send(bytes(PROBE_BYTES))
            await stream.receive(4)
            check.throughput_bytes_s = PROBE_BYTES / max(1e-9, time.perf_counter() - start - check.rtt_ms / 1000)
    except Exception as e:  # a timeout, a refusal, no relay: the peer is unreachable from here, and why
        check.error = (str(e) or type(e).__name__)[:200]
    finally:
        close_quietly(writer)
    return check


async def diagnose(reach: Reachability, relay: RelayService, p2p, addrs: Sequence[str], views: Sequence[PeerView],
                   own_id: str) -> Report:
    others = sorted((v for v in views if v.record.peer_id != own_id), key=lambda v: v.record.peer_id)[:MAX_PEERS]
    public = [v.record.peer_id for v in others if v.record.reachability == "public"]
    if reach.mode == "auto" and public:
        detection = await reach.check(public)
    else:
        detection = reach.detection
    checks = await asyncio.gather(*(check_peer(p2p, relay.names.probe, v) for v in others))
    report = Report(detection, list(reach.ports), list(addrs), list(reach.router.relays),
                    [f"{peer}: {why}" for peer, why in reach.relay_errors.items()], relay.relay, relay.stats,
                    list(checks))
    report.advice = advise(report, acting_as=reach.detection.state)
    return report


def advise(report: Report, acting_as: str) -> list[str]:
    """What to do, most urgent first (pure: a function of the report)."""
    d, advice = report.detection, []
    port = report.ports[0] if report.ports else None
    if d.state == "private":
        seen = d.seen_as[0].split("/")[2] if d.seen_as and d.seen_as[0].startswith("/ip") else "your public address"
        advice.append(f"peers cannot open connections to this node (behind a NAT or firewall; seen as {seen}): "
                      f"forward TCP port {port if port else 'N'} on your router to this machine and run with "
                      f"--listen /ip4/0.0.0.0/tcp/{port if port else 'N'} --announce /ip4/{seen}/tcp/"
                      f"{port if port else 'N'} to serve without a relay")
    if acting_as == "private" and report.relays:
        advice.append(f"you are relayed through {', '.join(report.relays)}; rounds will be slower (each stream to a "
                      "peer that cannot reach you directly crosses the relay)")
    elif acting_as == "private":
        advice.append("no relay: no reachable peer offers the relay service yet, so only peers this node dials itself "
                      "can reach it; start a reachable node, or check that peers run without --no-relay-service")
    if acting_as != d.state and d.how == "checked":
        advice.append(f"this node acts as {acting_as} (decided at start) but the check now says {d.state}: "
                      "restart it to switch (or set --reachability)")
    if d.how == "assumed":
        advice.append("reachability not checked: no reachable peer answered; this node assumes it is reachable (a "
                      "swarm's first node must be)")
    for check in report.peers:
        if check.error:
            advice.append(f"peer {check.peer_id} ({check.reachability}) is unreachable from here: {check.error}")
    if not advice:
        advice.append("all good: reachable, and every live peer answered")
    return advice
