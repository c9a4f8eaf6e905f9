"""The top-k all-reduce round: matchmaking, then a butterfly (reduce-scatter + all-gather), then a commit.

Why it is built this way -- the races it handles:
  * One owner per span computes that span's aggregate once, encodes it once, and sends the *same bytes* to every member
    (and decodes those bytes itself): survivors of a round apply bit-identical results by construction, whatever the
    float summation order would otherwise do.
  * A member dies during reduce-scatter: its owner stops waiting at the part timeout and aggregates the parts it has;
    the result lists who was included, so every other member knows whether its own part was applied.
  * An owner dies before or during all-gather: some members may hold its span and others not. A commit exchange follows:
    each member tells every other which spans it holds, and a span is applied only if every member that answered holds
    it. Spans not applied are handed back to the caller's error-feedback buffer, so no gradient mass is lost. (A member
    alive but silent through the commit timeout is treated as dead; that timing failure is the one case where survivors
    can disagree, and the report's votes_missing names the members a decision was made without.)
  * A bad frame (wrong round, shape, span, codec, NaN/Inf, out-of-range indices, oversize, garbage): the owner rejects
    that sender's part and excludes it from the span; the sender still receives the result, sees it was not included,
    and keeps its part. The receiver never allocates more than the frame size bound it computed from its own plan.
  * The sender of every frame is the libp2p-authenticated remote peer of the stream; a frame claiming another sender is
    rejected.
  * Nothing is lost to rounding: a part's fp16 rounding error goes back to its sender, and an owner's rounding of the
    aggregate goes back into the owner's own buffer (server-side error feedback).
  * Too few peers ready: matchmaking fails with NoGroup before any plan exists, so nobody ran that round id; the caller
    may step() the same id again. Members of a paused job retry one id together instead of each consuming ids on its own
    and never meeting again. A leader that sent no plan (dead: its declaration outlives it in the DHT) is skipped on the
    retries of that id, by each peer that waited for it; a peer that has not noticed yet still accepts the next leader's
    invite.
  * Hostile members (RoundConfig.aggregator other than "mean"): an owner aggregates its span robustly and names the
    outliers, members check each owner's result and vote a suspicious one missing (protocol/allreduce/robust.py); peers
    the caller refuses (excluded from the job, not admitted: ``excluded``, hooks.admit) take no part in any phase.
Matchmaking races are described in protocol/allreduce/matchmaking.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import numpy as np
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from protocol import rejections
from protocol.allreduce.codecs import CodecError, extract_update, quantize_values, smallest_encoding
from protocol.allreduce.matchmaking import (
    MAX_ENTRY_TTL_S,
    MatchState,
    Seen,
    choose_leader,
    declaration_to_wire,
    declared_subkey,
    discover,
    make_plan,
    round_key,
    seen_from_entries,
    started_subkey,
    started_to_wire,
)
from protocol.allreduce.messages import (
    MAX_CONTROL_FRAME,
    MAX_ROUND_ID,
    CommitFrame,
    GroupPlan,
    Invite,
    InviteReply,
    PartFrame,
    ResultFrame,
    message_from_wire,
    message_to_wire,
    part_frame_bound,
)
from protocol.allreduce.robust import aggregate_span, check_owner_result
from protocol.allreduce.round_state import RoundState
from protocol.allreduce.rounds import Phase, RoundConfig, RoundHooks, RoundOutcome, RoundReport
from protocol.allreduce.settle import settle, span_of
from protocol.allreduce.sparsify import SparseUpdate, topk_exact
from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.streams import Stream, open_stream, request, serve_on, stop_serving
from protocol.wire import WireError

__all__ = ["Averager", "NoGroup", "RoundFailed"]
logger = logging.getLogger(__name__)
MAX_WEIGHT = 1e12


class RoundFailed(Exception):
    pass


class NoGroup(RoundFailed):
    """Matchmaking found fewer than min_group ready peers and formed no group: the round id is still unused."""


class Averager:
    """One member's side of all-reduce rounds over one flat tensor; register once, then step() per round."""

    def __init__(self, p2p: P2P, dht: DHTNode, config: RoundConfig, hooks: RoundHooks | None = None,
                 clock: Clock = SYSTEM_CLOCK):
        self.p2p, self.dht, self.config, self.clock = p2p, dht, config, clock
        self.hooks = hooks or RoundHooks()
        self.peer_id = p2p.peer_id.to_base58()
        self._rounds: dict[str, RoundState] = {}
        self._background: set[asyncio.Future] = set()
        prefix = f"swarmnode/{config.swarm}/allreduce/{config.tensor.name}"
        self._names = {"invite": f"{prefix}/invite", "part": f"{prefix}/part", "commit": f"{prefix}/commit"}
        self.excluded: set[str] = set()  # peers the caller excluded: never rounded with, as hooks.admit refusals

    def refuses(self, peer: str) -> bool:
        return peer in self.excluded or (self.hooks.admit is not None and not self.hooks.admit(peer))

    async def start(self) -> None:
        handlers = {"invite": self._on_invite, "part": self._on_part, "commit": self._on_commit}
        await serve_on(self.p2p, {self._names[kind]: h for kind, h in handlers.items()}, logger)

    async def stop(self) -> None:
        await stop_serving(self.p2p, self._names.values(), logger)

    # ---- the round, as seen by one member ---------------------------------------------------------------

    async def step(
        self, round_id: str, update: SparseUpdate | Callable[[], SparseUpdate], weight: float = 1.0
    ) -> RoundOutcome:
        """Run one round. ``update`` may be a zero-argument function (e.g. the sparsifier's top-k selection):
        it then runs in a worker thread while matchmaking goes on, and the round waits for it only before
        sending parts."""
        cfg = self.config
        if isinstance(update, SparseUpdate) and update.size != cfg.tensor.size:
            raise ValueError(f"update of size {update.size} for tensor {cfg.tensor.name} of size {cfg.tensor.size}")
        if not 0 < weight <= MAX_WEIGHT:
            raise ValueError(f"weight must be in (0, {MAX_WEIGHT:g}], got {weight}")
        self._forget_old_rounds()  # first: a round id whose budget has passed may run again
        if round_id in self._rounds and not self._rounds[round_id].no_group:
            raise ValueError(f"round {round_id!r} already ran on this member")
        loop = asyncio.get_running_loop()
        pending = asyncio.ensure_future(asyncio.to_thread(update)) if callable(update) else None
        state = RoundState(round_id, None if callable(update) else update, float(weight),
                       MatchState(round_id, cfg.tensor, plan=loop.create_future()))
        state.expires = self.clock.monotonic() + self.config.round_budget
        if round_id in self._rounds:  # a retry: a dead leader's declaration outlives it in the DHT, skip it
            state.suspects = self._rounds[round_id].suspects
        self._rounds[round_id] = state
        times: dict[str, float] = {}
        t = time.perf_counter()
        try:
            try:
                await self._phase(Phase.MATCHMAKING, round_id)
                state.plan = plan = await self._matchmake(state)
            except (TimeoutError, RoundFailed):
                raise
            except Exception as e:  # nothing was exchanged yet: failing the round loses nothing
                logger.exception("matchmaking for round %s failed", round_id)
                raise RoundFailed(f"matchmaking failed: {type(e).__name__}: {e}") from None
            finally:
                if pending is not None:
                    state.update = await pending  # a failed selection raises here, before any part is sent
                    if state.update.size != cfg.tensor.size:
                        raise ValueError(f"update of size {state.update.size} for a tensor of size {cfg.tensor.size}")
            times["matchmaking"] = time.perf_counter() - t
            t = time.perf_counter()
            state.results = results = await self._butterfly(state)
            times["butterfly"] = time.perf_counter() - t
            t = time.perf_counter()
            await self._phase(Phase.COMMIT, round_id)
            have = tuple(r is not None for r in results)
            state.have.set_result(have)
            final = await self._commit(state, have)
            times["commit"] = time.perf_counter() - t
        except (TimeoutError, RoundFailed) as e:
            if not state.have.done():
                state.have.set_result(None)
            state.match.accepting = False  # a late invite to this attempt is refused, not left hanging
            state.no_group = isinstance(e, NoGroup) and state.plan is None
            report = self._report(state, False, str(e) or type(e).__name__, (), times)
            logger.warning("round %s failed: %s", round_id, report.error)
            # cast: the deferred selection is awaited before any failure gets here; update is None only if the
            # selection itself raised TimeoutError (then there is no update to return)
            return RoundOutcome(report, None, cast(SparseUpdate, state.update))
        average, returned = self._apply(state, plan, results, final)
        report = self._report(state, any(final), None if any(final) else "no span was held by every member",
                              final, times)
        return RoundOutcome(report, average if any(final) else None, returned)

    async def _phase(self, phase: Phase, round_id: str) -> None:
        if self.hooks.on_phase is not None:
            await self.hooks.on_phase(phase, round_id)

    def _forget_old_rounds(self) -> None:
        now = self.clock.monotonic()
        for rid in [rid for rid, s in self._rounds.items() if s.expires < now]:
            del self._rounds[rid]

    # ---- matchmaking --------------------------------------------------------------------------------

    async def _matchmake(self, state: RoundState) -> GroupPlan:
        cfg = self.config
        key = round_key(cfg.swarm, cfg.tensor.name, state.round_id)
        # on the DHT's clock, whatever this component's; signed by the DHT's validator (entry_validation.py)
        expiry = get_dht_time() + min(self.config.round_budget, MAX_ENTRY_TTL_S)
        mine = declaration_to_wire(cfg.bandwidth)

        async def store() -> bool:
            return bool(await self.dht.store(key, mine, expiry, subkey=declared_subkey(self.peer_id)))

        async def read() -> Seen:  # re-checks every entry, whatever the DHT's validator did
            found = await self.dht.get(key, latest=True)
            return seen_from_entries(None if found is None else found.value, get_dht_time(), self.refuses)

        discovery = asyncio.ensure_future(discover(store, read, self.peer_id, cfg.expected_group, cfg.matchmaking_time,
                                                     poll=0.02, clock=self.clock.monotonic, sleep=self.clock.sleep))
        racers: set[asyncio.Future[Any]] = {discovery, state.offer}  # Task[Seen], Future[plan]: no common type
        try:
            await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the round itself was cancelled: stop polling the DHT for it
            discovery.cancel()
            raise
        if state.offer.done():  # a leader invited us while we were still looking
            discovery.cancel()
            return self._checked_plan(await self._await_plan(state, read))
        seen = discovery.result()
        if seen.started is not None and self.peer_id not in seen.started and state.match.accepting:
            state.match.accepting = False
            raise RoundFailed("the round started without this peer (it declared too late); next round")
        candidates = {p: bw for p, bw in seen.declared.items() if p not in state.suspects and not self.refuses(p)}
        leader = choose_leader(list(candidates), self.peer_id)
        if leader != self.peer_id or not state.match.accepting:
            try:
                return self._checked_plan(await self._await_plan(state, read))
            except NoGroup:
                if leader != self.peer_id:
                    state.suspects.add(leader)
                raise
        state.match.accepting = False
        plan = await self._lead(state, {p: bw for p, bw in candidates.items() if p != self.peer_id})
        if plan is not None:  # in the background: only late joiners read it, the round need not wait
            self._background.add(task := asyncio.ensure_future(
                self.dht.store(key, started_to_wire(plan.members), expiry, subkey=started_subkey(self.peer_id))))
            task.add_done_callback(self._background.discard)
        return self._checked_plan(plan)

    async def _await_plan(self, state: RoundState, read: Callable[[], Awaitable[Seen]]) -> GroupPlan | None:
        """Wait for the leader's plan (None: it sent none usable); give up early if the DHT shows the round started
        without us."""
        cfg = self.config
        deadline = self.clock.monotonic() + cfg.matchmaking_time + 2 * cfg.invite_timeout
        while self.clock.monotonic() < deadline:
            try:
                return await self.clock.wait_for(asyncio.shield(state.offer),
                                                 min(cfg.invite_timeout, deadline - self.clock.monotonic()))
            except TimeoutError:
                seen = await read()
                if seen.started is not None and self.peer_id not in seen.started and not state.offer.done():
                    if state.match.accepting:
                        state.match.accepting = False
                        raise RoundFailed("the round started without this peer; next round") from None
        if state.offer.done():
            return state.offer.result()
        raise NoGroup("no group: no leader sent a plan in time")

    def _checked_plan(self, plan: GroupPlan | None) -> GroupPlan:
        if plan is None or not plan.members:
            raise NoGroup("no group: fewer than min_group members")
        if self.peer_id not in plan.members:
            raise RoundFailed("the round started without this peer (the leader's group is full); next round")
        return plan

    async def _lead(self, state: RoundState, candidates: dict[str, float]) -> GroupPlan | None:
        cfg = self.config
        invite = message_to_wire(Invite(state.round_id, self.peer_id, cfg.tensor))
        accepted: dict[str, float] = {}  # candidates that accepted within invite_timeout: their bandwidth
        answered = {p: asyncio.Event() for p in candidates}
        body: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()  # the plan, once made

        async def ask(peer: str) -> None:
            """Invite ``peer``; if it accepts, its stream stays open until the plan is sent there."""
            try:
                async with open_stream(self.p2p, peer, self._names["invite"]) as stream:
                    await stream.send(invite)
                    reply = message_from_wire(await stream.receive(MAX_CONTROL_FRAME), MAX_CONTROL_FRAME, InviteReply)
                    if reply.round_id != state.round_id or reply.sender != peer or not reply.accept:
                        return
                    accepted[peer] = reply.bandwidth
                    answered[peer].set()
                    await stream.send(await body)
            except asyncio.CancelledError:  # too slow to answer: dropped from the group
                raise
            except Exception as e:  # any failure to reach or understand a candidate drops it
                logger.debug("invite to %s failed: %s", peer[-8:], e)
            finally:
                answered[peer].set()

        asks = {p: asyncio.ensure_future(ask(p)) for p in sorted(candidates)}
        try:
            waits = [asyncio.ensure_future(e.wait()) for e in answered.values()]
            if waits:
                await asyncio.wait(waits, timeout=cfg.invite_timeout)
            for w in waits:
                w.cancel()
            group = dict(accepted)
            for peer, task in asks.items():
                if peer not in group:
                    task.cancel()
            group[self.peer_id] = cfg.bandwidth
            plan = make_plan(state.round_id, self.peer_id, group, cfg.tensor, self.clock.time() + cfg.round_budget,
                             cfg.min_group, cfg.max_group)
            # members get the plan; a plan without them (too few, or over max_group) tells them to give up
            body.set_result(message_to_wire(plan if plan is not None else
                                            GroupPlan(state.round_id, self.peer_id, (), (), cfg.tensor, 0.0)))
            await asyncio.gather(*asks.values(), return_exceptions=True)
        finally:
            for task in asks.values():
                task.cancel()
        if not state.offer.done():
            state.offer.set_result(plan)
        return plan

    async def _on_invite(self, stream: Stream) -> None:
        remote = stream.peer
        invite = message_from_wire(await stream.receive(MAX_CONTROL_FRAME, self.config.invite_timeout),
                                   MAX_CONTROL_FRAME, Invite)
        state = self._rounds.get(invite.round_id)
        ok = (state is not None and invite.leader == remote and invite.tensor == self.config.tensor
              and not self.refuses(remote) and state.match.accept_invite_from(remote))
        await stream.send(message_to_wire(InviteReply(invite.round_id, self.peer_id, ok, self.config.bandwidth)))
        if state is None or not ok:
            return
        try:
            frame = await stream.receive(MAX_CONTROL_FRAME, self.config.invite_timeout * 2)
            plan = message_from_wire(frame, MAX_CONTROL_FRAME, GroupPlan)
            if plan.round_id != invite.round_id or plan.leader != remote or plan.tensor != self.config.tensor:
                raise WireError("plan does not match the invite")
        except (TimeoutError, asyncio.IncompleteReadError, WireError, ConnectionError) as e:
            logger.info("round %s: leader %s sent no usable plan (%s)", invite.round_id, remote[-8:], e)
            plan = None
        if not state.offer.done():
            state.offer.set_result(plan if plan is not None and plan.members else None)

    # ---- butterfly ------------------------------------------------------------------------------------

    async def _butterfly(self, state: RoundState) -> list[tuple[ResultFrame, SparseUpdate] | None]:
        plan, cfg = state.group(), self.config
        me = plan.members.index(self.peer_id)
        pieces = [span_of(state.selected(), s) for s in plan.spans]
        state.parts[self.peer_id] = (pieces[me].indices, quantize_values(pieces[me].values, cfg.value_codec),
                                     state.weight)
        await self._phase(Phase.REDUCE_SCATTER, state.round_id)
        aggregator = asyncio.ensure_future(self._aggregate_my_span(state))
        exchanges = [
            asyncio.ensure_future(self._exchange_part(state, owner, pieces[i], plan.spans[i]))
            for i, owner in enumerate(plan.members) if owner != self.peer_id
        ]
        if len(state.parts) == len(plan.members):
            state.parts_in.set()
        own = await aggregator  # bounded by part_timeout; never raises past this point (see _apply)
        results = iter(await asyncio.gather(*exchanges))
        return [own if owner == self.peer_id else next(results) for owner in plan.members]

    async def _exchange_part(self, state: RoundState, owner: str, piece: SparseUpdate, span: tuple[int, int]):
        """Send our part of ``owner``'s span and read back its aggregate on the same stream."""
        cfg = self.config
        if self.refuses(owner):  # an excluded owner gets no part, and its span is not applied by anyone
            return None
        frame = PartFrame(state.round_id, self.peer_id, cfg.tensor, span, state.weight,
                          piece.nnz / max(1, piece.size), smallest_encoding(piece, cfg.value_codec))
        data = message_to_wire(frame)
        if self.hooks.outgoing_part is not None:
            data = self.hooks.outgoing_part(frame, data)
        try:
            async with asyncio.timeout(cfg.result_timeout):
                async with open_stream(self.p2p, owner, self._names["part"]) as stream:
                    await stream.send(state.round_id.encode())
                    await stream.send(data)
                    state.sent[owner] += len(data) + len(state.round_id) + 8
                    raw = await stream.receive(part_frame_bound(span[1] - span[0]))
                    state.received[owner] += len(raw) + 4
            return self._check_result(state, owner, span, raw, piece)
        except Exception as e:  # timeouts, hang-ups, bad frames, p2pd "peer unreachable": no result from it
            if isinstance(e, ValueError):  # WireError, CodecError: the owner's result failed its checks
                rejections.count("all-reduce result", e)
            logger.info("round %s: no result for the span of %s (%s: %s)", state.round_id, owner[-8:],
                        type(e).__name__, e)
            return None

    def _check_result(self, state: RoundState, owner: str, span: tuple[int, int], raw: bytes, piece: SparseUpdate):
        result = message_from_wire(raw, len(raw), ResultFrame)
        plan, cfg = state.group(), self.config
        if (result.round_id != state.round_id or result.sender != owner or result.span != span
                or result.tensor != cfg.tensor or not set(result.included) <= set(plan.members)
                or (result.included and not 0 < result.total_weight <= MAX_WEIGHT * len(plan.members))):
            raise WireError(f"result from {owner[-8:]} does not match the plan")
        decoded = extract_update(result.payload, span[1] - span[0])
        if cfg.aggregator != "mean":  # robust rounds: is the owner's aggregate plausible? (robust.py)
            why = check_owner_result(result, decoded, piece, self.peer_id, cfg.value_codec)
            if why:
                state.evidence[owner] = f"its result for its span: {why}"
                raise WireError(why)
        return result, decoded

    async def _on_part(self, stream: Stream) -> None:
        remote, wait = stream.peer, self.config.part_timeout
        round_id = (await stream.receive(MAX_ROUND_ID, wait)).decode(errors="replace")
        loop = asyncio.get_running_loop()  # waiting on a peer's frame: the network's time, as the reads around it
        deadline = loop.time() + wait
        while (state := self._rounds.get(round_id)) is None or state.plan is None:
            if loop.time() > deadline:  # a round we are not in, or whose plan never reached us
                return
            await asyncio.sleep(0.005)  # the part may beat our own copy of the plan by a few ms
        plan = state.plan
        if remote not in plan.members:
            return
        if self.refuses(remote):
            state.rejected.add(remote)
        span = plan.spans[plan.members.index(self.peer_id)]
        try:
            data = await stream.receive(part_frame_bound(span[1] - span[0]), wait)  # the bound checked before the body
            state.received[remote] += len(data) + 4
            self._accept_part(state, remote, span, data)
        except (WireError, CodecError, ValueError) as e:
            state.rejected.add(remote)
            rejections.count("all-reduce part", e)
            if not state.result_bytes.done():  # a part that only came late is no evidence of hostility
                state.evidence.setdefault(remote, f"its part was rejected: {e}"[:160])
            logger.warning("round %s: rejected the part from %s: %s", state.round_id, remote[-8:], e)
        except (TimeoutError, asyncio.IncompleteReadError) as e:
            state.rejected.add(remote)
            logger.info("round %s: part from %s did not arrive (%s)", state.round_id, remote[-8:], type(e).__name__)
            return
        if len(state.parts) + len(state.rejected - set(state.parts)) >= len(plan.members):
            state.parts_in.set()
        result = await asyncio.wait_for(asyncio.shield(state.result_bytes), self.config.result_timeout)
        await stream.send(result)
        state.sent[remote] += len(result) + 4
        if not state.first_result_served:
            state.first_result_served = True
            await self._phase(Phase.ALL_GATHER, state.round_id)

    def _accept_part(self, state: RoundState, remote: str, span: tuple[int, int], data: bytes) -> None:
        part = message_from_wire(data, len(data), PartFrame)
        if part.round_id != state.round_id:
            raise WireError(f"part for round {part.round_id!r:.40}, expected {state.round_id!r}")
        if part.sender != remote:
            raise WireError(f"part claims sender {part.sender[-8:]} but came from {remote[-8:]}")
        if part.tensor != self.config.tensor or part.span != span:
            raise WireError(f"part for {part.tensor.name}{list(part.span)}, "
                            f"expected {self.config.tensor.name}{list(span)}")
        if not part.weight <= MAX_WEIGHT:
            raise WireError(f"weight {part.weight} exceeds {MAX_WEIGHT:g}")
        if remote in state.rejected:
            raise WireError("this member is excluded from the job or not admitted")
        if remote in state.parts:
            raise WireError("second part from the same sender")
        if state.result_bytes.done():
            raise WireError("part arrived after the span was aggregated")
        piece = extract_update(part.payload, span[1] - span[0])  # validates indices and finiteness
        cap = self.config.max_weight  # what the job allows one member per round, whatever it claims
        state.parts[remote] = (piece.indices, piece.values, part.weight if cap is None else min(part.weight, cap))

    async def _aggregate_my_span(self, state: RoundState) -> tuple[ResultFrame, SparseUpdate]:
        plan, cfg = state.group(), self.config
        try:
            await asyncio.wait_for(state.parts_in.wait(), cfg.part_timeout)
        except TimeoutError:
            logger.info("round %s: aggregating without %d late part(s)", state.round_id,
                        len(plan.members) - len(state.parts) - len(state.rejected))
        span = plan.spans[plan.members.index(self.peer_id)]
        length = span[1] - span[0]
        included = tuple(sorted(state.parts))  # fixed order: the aggregate is computed once, here
        agg = aggregate_span([state.parts[p] for p in included], length, cfg.aggregator)
        for i in agg.outliers:
            state.evidence.setdefault(included[i], "its part lay far outside the others' (an outlier of the span)")
        average, weight = agg.values, agg.total_weight
        support = np.flatnonzero(average)
        exact = SparseUpdate(support.astype(np.int64), average[support], length)  # (nnz,) of this span's average
        sent = exact
        if cfg.result_density is not None:  # global top-k: send the largest entries of the average only
            k = max(1, round(cfg.result_density * length))
            if exact.nnz > k:
                keep = np.sort(topk_exact(exact.values, k))
                sent = SparseUpdate(exact.indices[keep], exact.values[keep], length)
        payload = smallest_encoding(sent, cfg.result_value_codec)
        kept = agg.kept if min(agg.kept, default=1.0) < 1.0 else ()
        frame = ResultFrame(state.round_id, self.peer_id, cfg.tensor, span, included, weight, payload, kept)
        hook = self.hooks.outgoing_result  # fault injection: a byzantine owner's bytes
        state.result_bytes.set_result(message_to_wire(frame) if hook is None else hook(frame, message_to_wire(frame)))
        await self._phase(Phase.AGGREGATE, state.round_id)
        decoded = extract_update(payload, length)
        state.rounding = (exact, decoded, weight)  # server-side error feedback, applied if committed
        return frame, decoded

    # ---- commit ----------------------------------------------------------------------------------------

    async def _commit(self, state: RoundState, have: tuple[bool, ...]) -> tuple[bool, ...]:
        plan, cfg = state.group(), self.config
        body = message_to_wire(CommitFrame(state.round_id, self.peer_id, have))
        others = [m for m in plan.members if m != self.peer_id]

        async def exchange(peer: str) -> None:
            try:
                self._record_commit(state, peer, await request(self.p2p, peer, self._names["commit"], body,
                                                               MAX_CONTROL_FRAME))
            except Exception as e:  # an unreachable member simply does not vote
                logger.debug("commit exchange with %s failed: %s", peer[-8:], e)

        tasks = [asyncio.ensure_future(exchange(p)) for p in others]
        try:
            await asyncio.wait_for(self._all_commits(state, others), cfg.commit_timeout)
        except TimeoutError:
            pass
        for t in tasks:
            t.cancel()
        state.votes_missing = tuple(m for m in others if m not in state.commits)
        final = list(have)
        for votes in state.commits.values():
            final = [a and b for a, b in zip(final, votes)]
        return tuple(final)

    async def _all_commits(self, state: RoundState, others: list[str]) -> None:
        while not set(others) <= set(state.commits):
            await state.commits_in.wait()
            state.commits_in.clear()

    def _record_commit(self, state: RoundState, peer: str, raw: bytes) -> None:
        commit = message_from_wire(raw, MAX_CONTROL_FRAME, CommitFrame)
        if (commit.round_id == state.round_id and commit.sender == peer and not self.refuses(peer)
                and len(commit.have) == len(state.group().members)):
            state.commits[peer] = commit.have
            state.commits_in.set()

    async def _on_commit(self, stream: Stream) -> None:
        remote = stream.peer
        raw = await stream.receive(MAX_CONTROL_FRAME, self.config.commit_timeout)
        commit = message_from_wire(raw, MAX_CONTROL_FRAME, CommitFrame)
        state = self._rounds.get(commit.round_id)
        if state is None or state.plan is None or remote not in state.plan.members:
            return
        self._record_commit(state, remote, raw)
        have = await asyncio.wait_for(asyncio.shield(state.have),
                                      self.config.result_timeout + self.config.commit_timeout)
        if have is not None:
            await stream.send(message_to_wire(CommitFrame(state.round_id, self.peer_id, have)))

    # ---- outcome ---------------------------------------------------------------------------------------

    def _apply(self, state: RoundState, plan: GroupPlan, results, final: tuple[bool, ...]):
        """The average to apply, and everything the caller must put back into its error feedback."""
        return settle(state.selected(), plan, self.peer_id, [r[1] if r is not None else None for r in results],
                      [r[0].included if r is not None else () for r in results], final, state.rounding, state.weight,
                      self.config.value_codec, [r[0].kept if r is not None else () for r in results])

    def _report(self, state: RoundState, ok: bool, error, final, times) -> RoundReport:
        plan = state.plan
        members = plan.members if plan else ()
        excluded = (tuple(sorted((set(members) - set(state.parts)) | state.rejected))
                    if plan and state.result_bytes.done() else ())
        weights = tuple(r[0].total_weight if ok_span and r is not None else 0.0
                        for ok_span, r in zip(final, state.results or [None] * len(final)))
        return RoundReport(state.round_id, ok, error, plan.leader if plan else None, members, excluded,
                           plan.spans if plan else (), tuple(final), weights, dict(state.sent), dict(state.received),
                           times, state.no_group, state.votes_missing, dict(state.evidence))
