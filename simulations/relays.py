"""Members behind NATs in the simulator (issue 16): what relaying costs a round (pure, no I/O).

    spans_bw = planning_bandwidths(bws, natted, share)      # what make_plan sizes spans by
    b = with_relays(b, natted, lats, relay_lat)             # the butterfly with the relay hop in its round trips
    extra_s = relay_cpu_s(b, natted)                        # seconds the busiest relayed stream adds

The rules follow what the real nodes do (node/runtime/reachability.py, protocol/relay/):
  * A private member owns relayed_span_share of the span a public member of its bandwidth would (make_plan sizes
    spans by bandwidth; 0, the default, as hivemind's client-mode peers: it owns nothing). A group of private
    members only splits evenly (make_plan's rule when every bandwidth is 0).
  * Traffic between a private and a public member goes over the connection the private one opened: no relay.
    Traffic between two private members crosses a relay (a public node of the swarm): its round trip gains the
    relay's hop, 4 x relay_lat (to the relay and on, both ways), and its bytes are copied by the relay.
  * The copy costs RELAY_S_PER_BYTE seconds per byte (measured, below); the relay's link is not a bottleneck here
    because relays are spread over the swarm's public nodes.
A member's own link carries the same bytes whether relayed or not, so the butterfly's link times are unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from simulations.roundtime import Butterfly

# `.venv/bin/python scripts/bench_nat.py --hop 256` (README "Volunteers behind NAT", docs/bench_nat_hop.json): one
# stream of 256 MB in 1 MiB frames through real p2pd daemons on loopback, relayed (the relay's copy through its p2pd
# twice, both ends' sealing) against direct: 1 / 174.7 MiB/s - 1 / 339.1 MiB/s. The round-level benchmark on the NAT
# testbed could not resolve it: 2 of 4 members private, dense parts, 4.2 MB relayed per round with full spans and
# 3.4 KB with none, 5.384 s against 5.381 s per round.
RELAY_S_PER_BYTE = 2.65e-9


def check_share(share: float) -> None:
    if not 0.0 <= share <= 1.0:  # also refuses NaN
        raise ValueError(f"relayed_span_share must be in [0, 1], got {share!r}")


def planning_bandwidths(bandwidths: Sequence[float], natted: Sequence[bool], share: float) -> list[float]:
    """The bandwidths spans are sized by: a private member's scaled by ``share``."""
    return [bw * (share if nat else 1.0) for bw, nat in zip(bandwidths, natted)]


def relayed_bytes(b: Butterfly, natted: Sequence[bool]) -> np.ndarray:
    """(n,) bytes each member exchanges with other private members through relays in one round: its parts to
    private owners and their results to it, and (if it owns a span) the parts and results of its span."""
    nat = np.asarray(natted, bool)
    n = nat.size
    if b.part_bytes is None or b.result_bytes is None or n < 2 or nat.sum() < 2:
        return np.zeros(n)
    part, result = b.part_bytes, b.result_bytes  # (n,) per owner j
    others_owned = (part + result) * nat  # (n,) what a private member moves per private owner j
    out = np.zeros(n)
    for i in np.flatnonzero(nat):
        peers = nat.copy()
        peers[i] = False
        out[i] = others_owned[peers].sum() + (part[i] + result[i]) * peers.sum()
    return out


def with_relays(b: Butterfly, natted: Sequence[bool], latencies: Sequence[float], relay_lat: float) -> Butterfly:
    """``b`` with the relay hop in its round trip when two private members must reach each other."""
    nat = np.asarray(natted, bool)
    if nat.sum() < 2:
        return b
    lat = np.sort(np.asarray(latencies, float)[nat])[-2:]
    return dataclasses.replace(b, rtt_s=max(b.rtt_s, float(2 * lat.sum() + 4 * relay_lat)))


def relay_cpu_s(b: Butterfly, natted: Sequence[bool], per_byte: float = RELAY_S_PER_BYTE) -> float:
    """Seconds the relays' copying adds to the round: the busiest private member's relayed bytes at ``per_byte``."""
    moved = relayed_bytes(b, natted)
    return float(moved.max()) * per_byte if moved.size else 0.0
