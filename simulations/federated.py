"""Federated rounds of many groups in parallel: local steps, then one top-k all-reduce round per group.

A federated job (node/jobs/federated/runner.py, node/jobs/manager.py) runs rounds of local training followed by an
all-reduce round (protocol/allreduce/averager.py) of at most max_group members. A swarm of 10,000 runs many such
groups at once (one job each, or one job sharded by group key); nodes joining go to the smallest group of their kind
(``grouping``: "gpu" groups nodes with the same GPU, so every member finishes its local steps at the same
moment; "random" mixes GPUs, and then members slower than the leader by more than the matchmaking window are
left out of every round, as node/jobs/federated/runner.py's fixed local_steps and the 5 s window make them). A new
group opens only when all groups of a kind are full and groups are never merged, so under churn their number creeps
up and their mean size down (625 -> 648 groups in the default 10,000-node day). Each group round, at the round's
start every member trains (unless its last round failed: node/jobs/federated/runner.py then resends the update kept
in error feedback), then:

  matchmaking  every member declares when its local steps end. The leader (choose_leader over the members
               declared within the first matchmaking window) closes its window when the expected group
               has declared, else after matchmaking_time; the expected group is the daemon's own decision
               (protocol/planning/round_policy.py: the last applied round's members, none after a failed
               round or one whose group shrank). Members that declare later are left out: they keep their
               update and must re-sync the model (node/jobs/federated/runner.py: in_sync False) before their
               next round. A member that dies before declaring costs the full window; one that dies after
               declaring costs the leader an invite_timeout; a leader that dies before sending the plan fails
               the round for all (NoGroup after matchmaking_time + 2 invite_timeouts).
  plan         protocol.allreduce.matchmaking.make_plan (real) over the declared survivors: members and spans.
  butterfly    simulations.roundtime: link-limited reduce-scatter and all-gather, selection overlapping
               matchmaking. A transfer longer than result_timeout fails the round (the slowest members hold no
               result, so no span is held by every member).
  deaths       a member that dies after the plan and before serving its span's result: that span is applied
               by nobody (the commit exchange), its share of every survivor's update goes back to error
               feedback, and survivors wait result_timeout for the silent owner, then commit_timeout for its
               vote; a death during the commit costs commit_timeout only.
Mass accounting, in units of one member's update of one round: each member's error-feedback buffer holds
``delayed`` units that churn kept from being applied (the top-k remainder that error feedback keeps by design
is not counted); a round contributes delayed + 1 (+ 0 when resending) and applies the fraction of spans that
survived. A node that leaves takes its buffer with it (``lost``).
Hostile members (``byzantine``, ``aggregator``): simulations/byzantine.py's rules, applied per round to the plan's
members. Under a robust aggregator a hostile owner's span is applied by nobody (``kept`` loses its share, like a
dead owner's, with no wait), its part is dropped, and after EXCLUDE_AFTER such rounds it leaves its group; under
"mean" every round it takes part in is poisoned. A group with a hostile member never repeats rounds as steady.
Members behind NATs (``natted``, ``relayed_span_share``): simulations/relays.py -- spans sized by their scaled
bandwidth, the relay hop in the round trip and the relays' copying when two of them must exchange parts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from protocol.allreduce.matchmaking import choose_leader, make_plan
from protocol.allreduce.messages import TensorSpec
from protocol.allreduce.rounds import RoundConfig
from protocol.allreduce.sparsify import check_density
from protocol.planning.round_policy import RoundPolicy
from simulations.byzantine import CLEAN, Verdict, check_aggregator, check_fraction, judge, strike
from simulations.engine import Engine
from simulations.relays import check_share, planning_bandwidths, relay_cpu_s, with_relays
from simulations.roundtime import Butterfly, Phases, butterfly, dht_hops, phases

GPT2_SMALL_PARAMS = 124_439_808  # GPT-2 small (Radford et al. 2019), as counted by transformers' GPT2LMHeadModel
GROUPINGS = ("gpu", "random")


@dataclass(frozen=True)
class FederatedConfig:
    params: int = GPT2_SMALL_PARAMS
    density: float = 0.01  # top-k fraction per round (README: the issue #3 benchmarks run at 1%)
    # None: owners send their whole span average (node/jobs/federated/runner.py's default)
    result_density: float | None = None
    select: str = "exact"  # node/jobs/federated/runner.py's ErrorFeedbackSparsifier(..., "exact")
    min_group: int = 2  # JobSpec.min_participants default
    max_group: int = 16  # a choice between JobSpec.max_participants' default (8) and RoundConfig.max_group's (64)
    local_steps: int = 20  # a choice: 10-30 s of local work per round on the common cards (RTX 3060: 14 s)
    batch_size: int = 8  # sequences per step (a choice that fits GPT-2 small on an 8 GB card)
    seq_len: int = 1024  # GPT-2's context
    # JobSpec.round_timeout_s; node/jobs/federated/runner.py derives the round's timeouts from it. JobSpec's default
    # (60 s) gives a 30 s result_timeout, shorter than a 10 Mbit/s member's all-gather in a group of 16 (~43 s): 120 s
    # fits it
    round_timeout_s: float = 120.0
    grouping: str = "gpu"
    byzantine: float = 0.0  # fraction of federated nodes that are hostile (drawn per node, simulations/swarm.py)
    aggregator: str = "centered_clip"  # the job's RoundConfig.aggregator (JobSpec's default; robust.AGGREGATORS)
    natted: float = 0.0  # fraction of federated nodes behind NATs, reached through relays (simulations/relays.py)
    relayed_span_share: float = 0.0  # a private member's span as a share of a public one's (the node's default 0)
    relay_lat: float = 0.020  # one-way latency of a relay hop (s): the population's median (simulations/model.py)

    def __post_init__(self) -> None:
        check_density(self.density)
        if self.params < 1 or self.local_steps < 1 or self.batch_size < 1 or self.seq_len < 1:
            raise ValueError("params, local_steps, batch_size and seq_len must be >= 1")
        if not 1 <= self.min_group <= self.max_group:
            raise ValueError(f"need 1 <= min_group <= max_group, got {self.min_group}, {self.max_group}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        check_fraction(self.byzantine)
        check_aggregator(self.aggregator)
        check_fraction(self.natted)
        check_share(self.relayed_span_share)
        if not self.relay_lat >= 0:
            raise ValueError(f"relay_lat must be >= 0 seconds, got {self.relay_lat}")
        self.round_config()  # validates the timeouts

    @property
    def flops_per_round(self) -> float:
        """Training FLOPs of one member's local steps: 6 per parameter per token (Kaplan et al. 2020, 2.1)."""
        return 6.0 * self.params * self.seq_len * self.batch_size * self.local_steps

    @property
    def state_bytes(self) -> float:
        """What a joiner or a re-syncing member downloads: fp32 parameters + outer momentum (JobRunner.snapshot)."""
        return 8.0 * self.params

    def round_config(self) -> RoundConfig:
        """The RoundConfig node/jobs/federated/runner.py's JobRunner builds from the job's round_timeout_s."""
        return RoundConfig.for_job("sim", TensorSpec("sim", self.params), self.round_timeout_s, self.min_group,
                                   self.max_group, result_density=self.result_density)


class Member:
    """A node as the federated simulation sees it (created by simulations/swarm.py)."""

    __slots__ = ("nid", "bw", "lat", "tflops", "gpu", "depart", "group", "sync_until", "resend", "delayed", "hostile",
                 "strikes", "first_round", "excluded", "natted")

    def __init__(self, nid: str, bw: float, lat: float, tflops: float, gpu: int, depart: float, sync_until: float,
                 hostile: bool = False, natted: bool = False):
        self.natted = natted  # behind a NAT: reached through relays (simulations/relays.py)
        self.nid, self.bw, self.lat, self.tflops, self.gpu, self.depart = nid, bw, lat, tflops, gpu, depart
        self.group: Group | None = None
        self.sync_until = sync_until  # the model is downloaded by then: it can take part in a round
        self.resend = False  # the last round failed: the next one resends the update instead of training
        self.delayed = 0.0  # units of update mass churn left in this member's error-feedback buffer
        self.hostile = hostile  # simulations/byzantine.py: holds no honest mass (delayed stays 0)
        self.strikes = 0  # consecutive rounds with evidence against it (its group's count)
        self.first_round: tuple[int, float] | None = None  # (group round, start time) of the first it took part in
        self.excluded = False  # excluded from the job: in no group from then on


class Group:
    __slots__ = ("gid", "key", "members", "running", "round_no", "expected", "idle_since", "cache", "version",
                 "steady", "batch", "policy")

    def __init__(self, gid: int, key: int) -> None:
        self.gid, self.key = gid, key
        self.members: dict[str, Member] = {}
        self.running = False
        self.round_no = 0
        self.expected: int | None = None  # the group to expect next (protocol/planning/round_policy.py)
        self.policy = RoundPolicy()  # the daemon's own round policy (node/jobs/federated/federated_jobs.py)
        self.idle_since: float | None = None  # when the group last fell below min_group (None: running)
        self.cache: tuple | None = None  # (members tuple, Butterfly, Phases) of the last plan
        self.version = 0  # bumped whenever a member joins or leaves
        self.steady: tuple | None = None  # (version, duration, bytes, members) of an undisturbed round
        self.batch: tuple | None = None  # (t0, duration, rounds, bytes, members, Event) of repeated rounds

    def after_round(self, ok: bool, members: int) -> int | None:
        """What the group expects after a round, as a daemon's participant decides it (the same RoundPolicy); a
        round with no group (members 0) is a pause: nobody ran it."""
        self.expected = self.policy.after_round(ok, members, paused=not members).expected_group
        return self.expected


@dataclass
class RoundRecord:
    """What one group round did, as the metrics see it."""

    end: float
    outcome: str  # "ok", "partial" (spans lost), "aborted" (no group / leader died), "timeout"
    members: int  # in the plan (0 when no group formed)
    late: int  # declared after the window closed
    bytes: float  # written by all members
    recovery_s: float  # node-seconds lost to failures in this round (waits, failed attempts, re-syncs)
    duration_s: float
    mass_applied: float  # units of update mass the round applied
    mass_delayed: float  # units it handed back to error-feedback buffers (offered, not applied)
    sync_bytes: float = 0.0  # model downloads of members left out (re-sync)
    count: int = 1  # identical undisturbed rounds this record stands for (bytes, duration, mass are totals)
    poisoned: bool = False  # applied an undefended hostile part or span (simulations/byzantine.py): the model is ruined
    vetoed_mass: float = 0.0  # of mass_delayed: honest mass in hostile owners' spans, voted missing
    dropped_parts: int = 0  # hostile parts the owners dropped as outliers (not applied, not counted as mass)
    excluded: int = 0  # hostile members excluded after this round
    exclusion_rounds: int = 0  # sum over them: group rounds from the first they took part in to this one
    exclusion_s: float = 0.0  # sum over them: seconds from the start of that first round to this round's end


class FederatedSim:
    """Groups of Members running rounds on an Engine; ``on_round`` receives every RoundRecord."""

    def __init__(self, config: FederatedConfig, engine: Engine, swarm_size: Callable[[], int],
                 on_round: Callable[[RoundRecord], None], on_idle: Callable[[float, int], None],
                 sample_s: float = math.inf) -> None:
        self.config, self.engine, self.swarm_size, self.sample_s = config, engine, swarm_size, sample_s
        self.on_round, self.on_idle = on_round, on_idle
        self.rc = config.round_config()
        self.tensor = self.rc.tensor
        self.groups: list[Group] = []
        self._by_size: dict[int, list[set[int]]] = {}  # key -> [gids of groups with s members for s in 0..max]
        self.delayed_total = 0.0  # sum of members' delayed mass
        self.lost_total = 0.0  # mass that left with departing members
        self.late_total = 0
        self.hostile: list[Member] = []  # every hostile member ever added
        self.poisoned_groups: set[int] = set()  # gids of groups that applied a poisoned round

    # ---- membership ---------------------------------------------------------------------------------------

    def _key(self, m: Member) -> int:
        return m.gpu if self.config.grouping == "gpu" else 0

    def _resize(self, g: Group, old: int) -> None:
        buckets = self._by_size[g.key]
        buckets[old].discard(g.gid)
        buckets[len(g.members)].add(g.gid)

    def add(self, m: Member) -> None:
        """Place a member in the smallest group of its kind that has room (a new group if none)."""
        key, cap = self._key(m), self.config.max_group
        if m.hostile:
            self.hostile.append(m)
        buckets = self._by_size.setdefault(key, [set() for _ in range(cap + 1)])
        size = next((s for s in range(1, cap) if buckets[s]), None)
        if size is None:
            size = 0 if buckets[0] else None
        if size is None:
            g = Group(len(self.groups), key)
            g.idle_since = self.engine.now()
            self.groups.append(g)
            buckets[0].add(g.gid)
            size = 0
        g = self.groups[min(buckets[size])]
        self._flush_idle(g)
        g.members[m.nid] = m
        m.group = g
        self._resize(g, size)
        self._changed(g)
        self._wake(g, m.sync_until)

    def remove(self, m: Member) -> None:
        """A member left the swarm: its buffer leaves with it."""
        g = m.group
        if g is not None:
            self._flush_idle(g)
        if g is not None and g.members.pop(m.nid, None) is not None:
            self._resize(g, len(g.members) + 1)
            m.group = None
            self._changed(g)
        self.delayed_total -= m.delayed
        self.lost_total += m.delayed
        m.delayed = 0.0

    def _changed(self, g: Group) -> None:
        """Membership changed: repeated rounds stop at the end of the round under way."""
        g.version += 1
        if g.batch is not None:
            t0, duration, rounds, nbytes, n, event = g.batch
            done = max(1, math.ceil((self.engine.now() - t0) / duration))
            if done < rounds:
                event.cancel()
                self._repeat(g, t0, duration, done, nbytes, n)

    def _wake(self, g: Group, when: float) -> None:
        if not g.running:
            self.engine.at(max(when, self.engine.now()), self._maybe_start, g)

    def _maybe_start(self, g: Group) -> None:
        if not g.running:
            self._start_round(g)

    def _flush_idle(self, g: Group) -> None:
        """Report the node-time a group below min_group has been idle so far (before its members change)."""
        if not g.running and g.idle_since is not None:
            now = self.engine.now()
            self.on_idle(now - g.idle_since, sum(1 for m in g.members.values() if m.sync_until <= g.idle_since))
            g.idle_since = now

    def flush_idle(self) -> None:
        """At the end of the run: the idle time of groups still below min_group."""
        for g in self.groups:
            self._flush_idle(g)

    # ---- repeated undisturbed rounds ---------------------------------------------------------------------

    def _steady_rounds(self, g: Group, t0: float) -> int:
        """How many copies of the group's last undisturbed round can run from t0 with nothing changing: none
        if the group changed since, and only rounds that end before any member's departure (sessions are
        drawn when nodes join, so departures are known) and, where possible, before the next sample."""
        if g.steady is None or g.steady[0] != g.version or any(m.hostile for m in g.members.values()):
            return 0  # (a hostile member still in the group makes every round it takes part in different)
        duration = g.steady[1]
        first_leave = min(m.depart for m in g.members.values())
        cap = 1 << 30
        by_leave = math.ceil((first_leave - t0) / duration) - 1 if first_leave < math.inf else cap  # end before it
        if math.isfinite(self.sample_s):
            boundary = (math.floor(t0 / self.sample_s) + 1) * self.sample_s
            by_leave = min(by_leave, max(1, math.ceil((boundary - t0) / duration) - 1))
        return max(0, min(by_leave, cap))

    def _repeat(self, g: Group, t0: float, duration: float, rounds: int, nbytes: float, n: int) -> None:
        event = self.engine.at(t0 + rounds * duration, self._repeated, g)
        g.batch = (t0, duration, rounds, nbytes, n, event)

    def _repeated(self, g: Group) -> None:
        if g.batch is None:  # _repeat set it when it scheduled this event, and _changed reschedules
            raise RuntimeError(f"group {g.gid}: repeated rounds ended without a batch")
        t0, duration, rounds, nbytes, n, _ = g.batch
        g.batch = None
        g.round_no += rounds
        self.on_round(RoundRecord(self.engine.now(), "ok", n, 0, nbytes * rounds, 0.0, duration * rounds,
                                  float(n * rounds), 0.0, 0.0, rounds))
        self._start_round(g)

    # ---- one round ----------------------------------------------------------------------------------------

    def _start_round(self, g: Group) -> None:
        cfg, rc, t0 = self.config, self.rc, self.engine.now()
        rounds = self._steady_rounds(g, t0)
        if rounds and g.steady is not None:  # rounds > 0 only with a steady round to repeat
            _, duration, nbytes, n = g.steady
            return self._repeat(g, t0, duration, rounds, nbytes, n)
        parts = [m for m in g.members.values() if m.sync_until <= t0]
        self._flush_idle(g)
        if len(parts) < cfg.min_group:
            g.running = False
            g.idle_since = t0
            return
        g.running, g.idle_since = True, None
        g.round_no += 1
        train_s = cfg.flops_per_round / 1e12
        ready = {m.nid: t0 + (0.0 if m.resend else train_s / m.tflops) for m in parts}
        declared = [m for m in parts if m.depart > ready[m.nid]]
        if not declared:
            return self._finish(g, parts, [], t0, t0 + rc.matchmaking_time, "aborted", 0.0, None, t0)
        first = min(ready[m.nid] for m in declared)
        visible = [m.nid for m in declared if ready[m.nid] <= first + rc.matchmaking_time]
        leader = choose_leader(visible[1:], visible[0])
        r_lead = ready[leader]
        last = max(ready[m.nid] for m in declared)
        expected_met = g.expected is not None and len(declared) >= g.expected
        close = last if expected_met and last <= r_lead + rc.matchmaking_time else r_lead + rc.matchmaking_time
        on_time = [m for m in declared if ready[m.nid] <= close]
        late = [m for m in declared if ready[m.nid] > close]
        hops = dht_hops(self.swarm_size())
        lat2 = sorted(m.lat for m in on_time)[-2:]
        rtt = 2 * sum(lat2) if len(lat2) == 2 else 0.0
        t_plan = close + 2 * hops * rtt + 2.5 * rtt
        if g.members[leader].depart <= t_plan:  # the leader died before sending the plan: NoGroup for everyone
            end = close + rc.matchmaking_time + 2 * rc.invite_timeout
            return self._finish(g, parts, late, t0, end, "aborted", 0.0, None, close)
        if any(ready[m.nid] < m.depart <= t_plan for m in on_time):
            t_plan += rc.invite_timeout  # the leader waited for a reply that never came
        group = [m for m in on_time if m.depart > t_plan]
        if len(group) < cfg.min_group:
            end = close + rc.matchmaking_time + 2 * rc.invite_timeout
            return self._finish(g, parts, late, t0, end, "aborted", 0.0, None, close)
        spans_bw = planning_bandwidths([m.bw for m in group], [m.natted for m in group], cfg.relayed_span_share)
        plan = make_plan(f"g{g.gid}/r{g.round_no}", leader, dict(zip((m.nid for m in group), spans_bw)), self.tensor,
                         t_plan + rc.result_timeout, cfg.min_group, cfg.max_group)
        if plan is None:  # unreachable: the group has at least min_group members
            raise RuntimeError(f"group {g.gid}: no plan for {len(group)} members")
        b, ph = self._model(g, plan, group, hops)
        t_bs = max(t_plan, max(ready[m.nid] for m in group) + ph.select_s)
        exchange = ph.reduce_scatter_s + ph.all_gather_s + ph.cpu_s
        t_ag = t_bs + exchange
        nominal_end = t_ag + ph.commit_s + ph.overhead_s
        by_id = {m.nid: m for m in group}
        members = [by_id[p] for p in plan.members]
        if exchange > rc.result_timeout:
            end = t_bs + rc.result_timeout + rc.commit_timeout + ph.overhead_s
            return self._finish(g, parts, late, t0, end, "timeout", b.total_bytes, plan, close, members=members,
                                verdict=judge([m.hostile for m in members], (), cfg.aggregator))
        lost = [i for i, m in enumerate(members) if m.depart <= t_ag]
        verdict = judge([m.hostile for m in members], lost, cfg.aggregator)
        vetoed = sum(b.spans[i] for i in verdict.vetoed)  # spans members vote missing at once: no wait for them
        if lost:
            wait = max(exchange, rc.part_timeout + ph.all_gather_s + ph.cpu_s, rc.result_timeout)
            end = t_bs + wait + ph.commit_s + rc.commit_timeout + ph.overhead_s
            kept = 1.0 - (sum(b.spans[i] for i in lost) + vetoed) / cfg.params
            outcome = "partial" if kept > 0 else "aborted"
        else:
            end = nominal_end + rc.commit_timeout if any(m.depart <= nominal_end for m in members) else nominal_end
            kept = 1.0 - vetoed / cfg.params
            outcome = "ok" if not vetoed else "partial" if kept > 0 else "aborted"
        # nothing disturbed it and nothing carried over: the same round repeats until the group changes
        clean = (outcome == "ok" and end == nominal_end and close == last and not late and not verdict.hostile
                 and len(members) == len(g.members) and all(not m.resend and m.delayed == 0 for m in members))
        self._finish(g, parts, late, t0, end, outcome, b.total_bytes, plan, close, members=members, kept=kept,
                     nominal_end=nominal_end, clean=g.version if clean else None, verdict=verdict,
                     veto=vetoed / cfg.params)

    def _model(self, g: Group, plan, group: list, hops: int) -> tuple[Butterfly, Phases]:
        """The butterfly of this plan, cached while the group's plan stays the same."""
        key = (plan.members, hops)
        if g.cache is not None and g.cache[0] == key:
            return g.cache[1], g.cache[2]
        cfg = self.config
        by_id = {m.nid: m for m in group}
        ms = [by_id[p] for p in plan.members]
        b = butterfly([m.bw for m in ms], [m.lat for m in ms], cfg.params, cfg.density,
                      result_density=cfg.result_density, spans=[e - s for s, e in plan.spans])
        natted = [m.natted for m in ms]
        b = with_relays(b, natted, [m.lat for m in ms], cfg.relay_lat)
        ph = phases(b, cfg.params, select=cfg.select, swarm_size=self.swarm_size())
        if sum(natted) >= 2:  # the relays' copying of parts and results between private members
            ph = dataclasses.replace(ph, cpu_s=ph.cpu_s + relay_cpu_s(b, natted))
        g.cache = (key, b, ph)
        return b, ph

    def _finish(self, g: Group, parts: list, late: list, t0: float, end: float, outcome: str, nbytes: float,
                plan, close: float, members: list | None = None, kept: float = 0.0,
                nominal_end: float | None = None, clean: int | None = None, verdict: Verdict = CLEAN,
                veto: float = 0.0) -> None:
        """Settle the round's effects at its end time; the next round starts there."""
        self.engine.at(end, self._settle, g, parts, late, t0, outcome, nbytes, members or [], kept, close,
                       nominal_end, clean, verdict, veto)

    def _settle(self, g: Group, parts, late, t0, outcome, nbytes, members, kept, close, nominal_end,
                clean, verdict: Verdict, veto: float) -> None:
        now, cfg = self.engine.now(), self.config
        if clean is not None and clean == g.version:  # the group did not change while the round ran
            g.steady = (clean, now - t0, nbytes, len(members))
        recovery = applied = delayed = vetoed = 0.0
        alive = [m for m in members if m.group is g]  # those still in the swarm
        ok = outcome in ("ok", "partial")
        for m in alive:
            if m.hostile:  # its part: dropped or poison, never honest mass (simulations/byzantine.py)
                m.resend = not ok
                continue
            contrib = self._offered(m)
            keep = contrib * (1.0 - kept) if ok else contrib
            applied += contrib - keep
            if ok and veto:
                vetoed += contrib * veto
            delayed += self._keep(m, keep, resend=not ok)
        poisoned = verdict.poisoned(ok)
        if poisoned:
            self.poisoned_groups.add(g.gid)
        excluded = self._weigh_evidence(g, [m for m in alive if m.hostile], verdict, t0)
        if ok and nominal_end is not None and now > nominal_end:
            recovery += (now - nominal_end) * len(alive)
        if not ok:  # everyone who declared waited for nothing (their update is kept, not lost)
            waiting = [m for m in parts if m.group is g and m not in late]
            if not members:  # no plan was formed: nobody ran this round id, so it is retried
                for m in waiting:
                    delayed += self._keep(m, self._offered(m), resend=True)
            recovery += (now - close) * len(waiting)
        sync = cfg.state_bytes
        late = [m for m in late if m.group is g]
        for m in late:  # left out: keep the update, download the model again, then train afresh
            delayed += self._keep(m, self._offered(m), resend=False)
            m.sync_until = now + sync / m.bw
            recovery += m.sync_until - close
            self.late_total += 1
            self._wake(g, m.sync_until)
        g.after_round(ok, len(members))
        self.on_round(RoundRecord(now, outcome, len(members), len(late), nbytes, recovery, now - t0, applied,
                                  delayed, sync * len(late), poisoned=poisoned, vetoed_mass=vetoed,
                                  dropped_parts=len(verdict.hostile) if ok and verdict.defended else 0,
                                  excluded=len(excluded), exclusion_rounds=sum(r for r, _ in excluded),
                                  exclusion_s=sum(s for _, s in excluded)))
        self._start_round(g)

    def _weigh_evidence(self, g: Group, hostile: list[Member], verdict: Verdict, t0: float) -> list[tuple[int, float]]:
        """A defended round is evidence against each hostile member in it; EXCLUDE_AFTER in a row exclude it from
        the job (node/jobs/federated/runner.py): it leaves its group. Returns (group rounds, seconds) from the first
        round each excluded member took part in."""
        now, out = self.engine.now(), []
        for m in hostile:
            first = m.first_round = m.first_round or (g.round_no, t0)
            if not verdict.defended:  # no evidence against it this round: the runner's count starts again
                m.strikes = 0
                continue
            m.strikes, excluded = strike(m.strikes)
            if excluded:
                out.append((g.round_no - first[0] + 1, now - first[1]))
                m.excluded = True
                g.members.pop(m.nid)
                self._resize(g, len(g.members) + 1)
                m.group = None
                self._changed(g)
        return out

    @staticmethod
    def _offered(m: Member) -> float:
        """What the member's round carries: its buffer's delayed mass plus a fresh update unless it resends."""
        return m.delayed + (0.0 if m.resend else 1.0)

    def _keep(self, m: Member, keep: float, resend: bool) -> float:
        """The member's buffer now holds ``keep`` units the round did not apply; returns keep (0 for a hostile
        member: it holds no honest mass)."""
        if m.hostile:
            m.resend = resend
            return 0.0
        self.delayed_total += keep - m.delayed
        m.delayed, m.resend = keep, resend
        return keep
