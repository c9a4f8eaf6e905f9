"""Group formation for one all-reduce round, through the DHT and direct invites (hivemind-style).

Why it is built this way -- the races it handles:
  * DHT propagation lag: peers do not see the same set of declarations at the same instant. Each peer
    declares itself under the round's key and reads the others; only the smallest peer id it sees
    *leads*. Two peers that both believe they lead (each blind to the other) form disjoint groups: a
    member accepts exactly one invite per round and a leader's group is only who accepted, so no member
    is ever in two groups.
  * A leader that dies before sending the plan: its accepted members wait for the plan only until the
    round deadline, then fail the round locally (their input stays in their error-feedback buffers).
  * A member that dies after accepting: the leader drops anyone whose reply is not in by the invite
    timeout; later deaths are handled by the butterfly (see protocol/allreduce/averager.py).
  * A peer that declares after the leader read the key (joined mid-round): it is not invited, times
    out this round without harm, and takes part from the next round id.
  * Invites that arrive before a peer started matchmaking for that round are declined, never queued,
    so a stale invite cannot pull a peer into a round it is not ready for.
  * Forged entries (a stranger writing declarations or started markers for the next round ids to stall
    them): every entry's subkey names the peer that wrote it ("!declared/<peer>", "!started/<leader>"),
    and protocol/allreduce/entry_validation.py makes every node's DHT reject an entry not signed by that
    peer or expiring later than MAX_ENTRY_TTL_S (+ clock skew) from now. The reader re-checks what it can
    (seen_from_entries): a valid peer id in the subkey, a leader inside its own started group, bounded
    expiry; anything else under a round's key is ignored.
The planning pieces (leader choice, the final plan) are pure functions, reused by simulations/.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from protocol import rejections
from protocol.allreduce.messages import MAX_BANDWIDTH, GroupPlan, TensorSpec
from protocol.planning.partition import plan_spans
from protocol.records.peer_keys import public_key_from_peer_id
from protocol.wire import WireError, pack, unpack_bounded

logger = logging.getLogger(__name__)
MAX_DECLARATION_BYTES = 256


def round_key(swarm: str, tensor: str, round_id: str) -> str:
    return f"swarmnode/{swarm}/allreduce/{tensor}/{round_id}"


def declaration_to_wire(bandwidth: float) -> bytes:
    return pack({"bw": float(bandwidth)})


def declaration_from_wire(data: object) -> float:
    """The advertised bandwidth in a declaration; WireError if malformed."""
    if not isinstance(data, bytes):
        raise WireError("declaration is not bytes")
    obj = unpack_bounded(data, MAX_DECLARATION_BYTES)
    bw = obj.get("bw") if isinstance(obj, dict) else None
    if isinstance(bw, bool) or not isinstance(bw, (int, float)) or not 0 <= bw < MAX_BANDWIDTH:
        raise WireError(f"declaration has no valid bandwidth: {obj!r:.60}")
    return float(bw)


def choose_leader(declared: Sequence[str], me: str) -> str:
    """The smallest peer id among those declared (and me): every peer with the same view picks the same."""
    return min([*declared, me])


def make_plan(
    round_id: str,
    leader: str,
    bandwidths: dict[str, float],
    tensor: TensorSpec,
    deadline: float,
    min_group: int,
    max_group: int,
) -> GroupPlan | None:
    """The group a leader announces: its accepted members (leader first among equals), at most
    max_group of them by peer id, spans by bandwidth; None if fewer than min_group remain."""
    if min_group < 1 or max_group < min_group:
        raise ValueError(f"need 1 <= min_group <= max_group, got {min_group}, {max_group}")
    if leader not in bandwidths:
        raise ValueError("the leader must be a member of its own group")
    if any(not bw >= 0 for bw in bandwidths.values()):
        raise ValueError(f"bandwidths must be >= 0, got {sorted(bandwidths.values())[:3]}")
    others = sorted(p for p in bandwidths if p != leader)[: max_group - 1]
    members = tuple(sorted([leader, *others]))
    if len(members) < min_group:
        return None
    bws = [bandwidths[m] for m in members]
    if sum(bws) <= 0:
        bws = [1.0] * len(members)
    spans = tuple(plan_spans(tensor.size, bws))
    return GroupPlan(round_id, leader, members, spans, tensor, deadline)


@dataclass
class MatchState:
    """Per-round matchmaking state shared by the round coroutine and the invite handler."""

    round_id: str
    tensor: TensorSpec
    accepting: bool = True  # False once this peer leads or has accepted an invite
    plan: asyncio.Future | None = None  # GroupPlan, set by the invite handler or by leading

    def accept_invite_from(self, leader: str) -> bool:
        if not self.accepting:
            return False
        self.accepting = False
        return True


STARTED = "!started"  # "!started/<leader>": the members of a round that leader started
DECLARED = "!declared"  # "!declared/<peer>": that peer's declaration (its bandwidth)
MAX_ENTRY_TTL_S = 300.0  # a matchmaking entry lives min(round budget, this); it is only read during matchmaking
CLOCK_SKEW_S = 60.0  # validators accept expiries up to MAX_ENTRY_TTL_S + this from their own DHT time
MAX_STARTED_BYTES = 64 * 1024


def declared_subkey(peer: str) -> str:
    return f"{DECLARED}/{peer}"


def started_subkey(leader: str) -> str:
    return f"{STARTED}/{leader}"


def parse_entry_subkey(subkey: object) -> tuple[str, str]:
    """(DECLARED or STARTED, the peer id it names) of a matchmaking subkey; WireError if it is not one. The peer
    id's form is checked by whoever verifies a signature with it (peer_keys.public_key_from_peer_id)."""
    if not isinstance(subkey, str) or len(subkey) > 128:
        raise WireError(f"not a matchmaking subkey: {subkey!r:.80}")
    kind, _, peer = subkey.partition("/")
    if kind not in (DECLARED, STARTED) or not 40 <= len(peer) <= 60:
        raise WireError(f"not a matchmaking subkey: {subkey!r:.80}")
    return kind, peer


def started_to_wire(members: Sequence[str]) -> bytes:
    return pack({"members": list(members)})


def started_from_wire(data: object) -> tuple[str, ...]:
    if not isinstance(data, bytes):
        raise WireError("started marker is not bytes")
    obj = unpack_bounded(data, MAX_STARTED_BYTES)
    members = obj.get("members") if isinstance(obj, dict) else None
    if not isinstance(members, list) or not all(isinstance(m, str) and len(m) <= 64 for m in members):
        raise WireError("started marker has no member list")
    return tuple(members)


@dataclass(frozen=True)
class Seen:
    """One read of a round's DHT dictionary: who declared (with bandwidth), and whether a leader started it."""

    declared: dict[str, float]
    started: tuple[str, ...] | None = None  # members of the group a leader already started


def seen_from_entries(entries: object, now: float, refuses: Callable[[str], bool] | None = None) -> Seen:
    """What a round's DHT dictionary (subkey -> item with .value and .expiration_time) says, re-checked here
    whatever the DHT's validator did: entries under other subkeys, naming an invalid peer id, expiring too late,
    malformed, or a started marker whose leader is not in its own group are ignored. Several started markers
    (leaders blind to each other) count as one started round: the union of their groups. Entries of a peer the
    reader ``refuses`` (excluded from the job, not admitted to a private swarm) are ignored too: a stranger's own
    signed started marker cannot fail the honest peers' round."""
    declared: dict[str, float] = {}
    started: set[str] | None = None
    if not isinstance(entries, dict):
        return Seen(declared)
    for subkey, item in entries.items():
        try:
            kind, peer = parse_entry_subkey(subkey)
            expiration = getattr(item, "expiration_time", None)
            if not isinstance(expiration, (int, float)) or not expiration <= now + MAX_ENTRY_TTL_S + CLOCK_SKEW_S:
                raise WireError(f"expiry {expiration!r:.20} is too far ahead")
            public_key_from_peer_id(peer)  # PeerIdError (a ValueError) if it names no Ed25519 peer
            if refuses is not None and refuses(peer):
                raise WireError("an entry of a refused peer")
            if kind == DECLARED:
                declared[peer] = declaration_from_wire(item.value)
                continue
            members = started_from_wire(item.value)
            if peer not in members:
                raise WireError("leader outside its own group")
            started = (started or set()) | set(members)
        except ValueError as e:  # WireError, PeerIdError
            logger.debug("ignoring matchmaking entry %.80r: %s", subkey, e)
            rejections.count("matchmaking entry", e)
    return Seen(declared, None if started is None else tuple(sorted(started)))


async def discover(
    store: Callable[[], Awaitable[bool]],
    read: Callable[[], Awaitable[Seen]],
    me: str,
    expected: int | None,
    matchmaking_time: float,
    poll: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Seen:
    """Declare, then read the round's dictionary until ``expected`` peers declared, a leader has already
    started the round, or matchmaking_time passes."""
    await store()
    deadline = clock() + matchmaking_time
    while True:
        seen = await read()
        if seen.started is not None:
            return seen
        if expected is not None and len(seen.declared.keys() | {me}) >= expected:
            return seen
        if clock() >= deadline:
            return seen
        await sleep(min(poll, max(0.0, deadline - clock())))
