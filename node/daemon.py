"""The node daemon: one asyncio loop running libp2p (p2pd), the DHT, membership and the control API.

Start-up order: home lock -> identity -> [capability benchmark in a thread || p2pd + DHT bootstrap with
retries] -> first record published -> control API -> "ready" (node.json written, addresses printed).
SIGINT/SIGTERM or a Leave call withdraw the record and stop everything, p2pd included, within 5 s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pathlib
import re
import signal
import socket
import threading
import time

import torch
from aiohttp import web
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import CompositeValidator
from hivemind.p2p import P2P
from hivemind.utils.multiaddr import Multiaddr

import node
from node.api.dashboard import start_dashboard
from node.api.server import start_control_server
from node.api.service import JobSummary, NodeStatus
from node.jobs.manager import JobManager
from node.jobs.policy import JobLimits
from node.ml.user_data import sync_config_sources
from node.runtime import capability as capability_mod
from node.runtime.admission import Admission, keep_out_of_routing
from node.runtime.backoff import retry
from node.runtime.config import NodeConfig
from node.runtime.device import apply_compute_limits, resolve_device
from node.runtime.doctor import Report, diagnose
from node.runtime.errors import EXIT_FAILURE, EXIT_USAGE, NodeError
from node.runtime.files import atomic_write
from node.runtime.identity import HomeLock, load_or_create_key, write_p2p_identity
from node.runtime.membership import Membership, PeerView
from node.runtime.p2pd import OwnedP2PDaemon, P2PBootstrapError, P2PDaemonStartError
from node.runtime.private_swarm import node_certificate
from node.runtime.reachability import Reachability, start_relaying
from protocol.allreduce.entry_validation import SignedMatchmakingValidator
from protocol.allreduce.faults import RESULT_FAULTS, Fault, mangle_part, mangle_result
from protocol.allreduce.rounds import Phase, RoundHooks
from protocol.records.job_validation import SignedJobRecordValidator
from protocol.records.membership_validation import MembershipValidator
from protocol.records.peer import Capability, PeerRecord
from protocol.records.peer_keys import PeerIdError, peer_id_of, public_key_from_peer_id
from protocol.records.validation import SignedPeerRecordValidator
from protocol.relay.circuits import RelayService

logger = logging.getLogger(__name__)
STOP_AT_ENV = "SWARMNODE_FAULT_STOP_AT"  # fault injection for tests: "PHASE:ROUND", e.g. "reduce_scatter:3"


PERTURB_ENV = "SWARMNODE_FAULT_PERTURB_AFTER"  # fault injection for tests: "ROUND" (this node's model diverges)


def perturb_after(spec: str):
    """A JobRunner after_round hook that adds 1.0 to the first parameter after round ROUND (a bit flip, a bug,
    a tampered node: its model no longer matches the swarm's); None for an empty spec."""
    if not spec:
        return None
    try:
        at = int(spec)
    except ValueError:
        raise NodeError(f"{PERTURB_ENV}={spec!r}: expected a round number", EXIT_USAGE) from None

    def hook(round_id: int, params) -> None:
        if round_id == at:
            logger.warning("fault injection: perturbing this node's model after round %d", round_id)
            params[0] += 1.0

    return hook


def stop_at_phase_hooks(spec: str) -> RoundHooks | None:
    """Round hooks that freeze this process (SIGSTOP) when a job round ``/rROUND/`` reaches PHASE, so that a
    test can SIGKILL it strictly mid-round; None (no hooks) for an empty spec."""
    if not spec:
        return None
    phase_name, _, round_text = spec.partition(":")
    try:
        phase, round_part = Phase(phase_name), f"/r{int(round_text)}/"
    except ValueError:
        raise NodeError(f"{STOP_AT_ENV}={spec!r}: expected PHASE:ROUND with PHASE one of "
                        f"{', '.join(p.value for p in Phase)}", EXIT_USAGE) from None

    async def on_phase(reached: Phase, round_id: str) -> None:
        if reached == phase and round_part in round_id:
            logger.warning("fault injection: stopping at %s of round %s", phase.value, round_id)
            os.kill(os.getpid(), signal.SIGSTOP)

    return RoundHooks(on_phase=on_phase)


BYZANTINE_ENV = "SWARMNODE_FAULT_BYZANTINE"  # fault injection for tests: "FAULT:ROUND", e.g. "huge:5"


def byzantine_hooks(spec: str, hooks: RoundHooks | None) -> RoundHooks | None:
    """``hooks`` made hostile from job round ROUND on: its parts (or, as an owner, its results) replaced by FAULT's
    bytes (protocol/allreduce/faults.py); ``hooks`` unchanged for an empty spec."""
    if not spec:
        return hooks
    fault_name, _, round_text = spec.partition(":")
    try:
        fault, start = Fault(fault_name), int(round_text)
    except ValueError:
        raise NodeError(f"{BYZANTINE_ENV}={spec!r}: expected FAULT:ROUND with FAULT one of "
                        f"{', '.join(f.value for f in Fault)}", EXIT_USAGE) from None

    def hostile(round_id: str) -> bool:
        found = re.search(r"/r(\d+)/", round_id)
        return found is not None and int(found.group(1)) >= start

    def part(frame, data: bytes) -> bytes:
        return mangle_part(fault, frame, data, seed=len(data)) if hostile(frame.round_id) else data

    def result(frame, data: bytes) -> bytes:
        return mangle_result(fault, frame, data) if hostile(frame.round_id) else data

    logger.warning("fault injection: byzantine %s from round %d", fault.value, start)
    base = hooks or RoundHooks()
    if fault in RESULT_FAULTS:
        return dataclasses.replace(base, outgoing_result=result)
    return dataclasses.replace(base, outgoing_part=part)


EXPORT_STOP_ENV = "SWARMNODE_FAULT_STOP_EXPORT"  # fault injection for tests: "NAME", e.g. "report.json"


def stop_before_export_file(spec: str):
    """An export hook that freezes this process (SIGSTOP) just before it writes the export file NAME, so that a
    test can SIGKILL it strictly mid-export; None for an empty spec."""
    if not spec:
        return None

    def hook(name: str) -> None:
        if name == spec:
            logger.warning("fault injection: stopping before writing %s of an export", name)
            os.kill(os.getpid(), signal.SIGSTOP)

    return hook


SHUTDOWN_BUDGET_S = 5.0


def exit_after(seconds: float) -> threading.Timer:
    """The backstop of a hard stop: end the process ``seconds`` from now even if a worker thread is still busy
    (asyncio.run waits for the default executor's threads, and a step of a large model can outlast the budget)."""
    def hard_exit() -> None:
        logger.warning("still busy %.1f s after the stop request: exiting now", seconds)
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(seconds, hard_exit)
    timer.daemon = True
    timer.start()
    return timer


class BootstrapError(Exception):
    """None of the bootstrap peers answered."""


def parse_join_addr(text: str) -> Multiaddr:
    """A bootstrap multiaddr must parse and end in /p2p/<Ed25519 peer id>."""
    try:
        addr = Multiaddr(text)
    except Exception as e:  # the multiaddr library raises several unrelated types
        raise NodeError(f"invalid --join address {text!r}: {e}", EXIT_USAGE) from None
    try:
        peer = addr["p2p"]
    except Exception:
        raise NodeError(f"invalid --join address {text!r}: it must end in /p2p/<peer id>", EXIT_USAGE) from None
    try:
        public_key_from_peer_id(peer)
    except PeerIdError as e:
        raise NodeError(f"invalid --join address {text!r}: {e}", EXIT_USAGE) from None
    return addr


def check_listen_addrs(addrs: tuple[str, ...]) -> None:
    """Fail fast, with a clear message, on a malformed listen address or a TCP port already in use."""
    for text in addrs:
        try:
            addr = Multiaddr(text)
        except Exception as e:
            raise NodeError(f"invalid --listen address {text!r}: {e}", EXIT_USAGE) from None
        protos = [p.name for p in addr.protocols()]
        if "tcp" not in protos or not ({"ip4", "ip6"} & set(protos)):
            raise NodeError(f"invalid --listen address {text!r}: expected /ip4/HOST/tcp/PORT", EXIT_USAGE)
        port = int(addr["tcp"])
        if port == 0:
            continue
        family = socket.AF_INET if "ip4" in protos else socket.AF_INET6
        host = addr["ip4"] if "ip4" in protos else addr["ip6"]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go's listener does
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno == 98:  # EADDRINUSE
                    raise NodeError(f"port {port} on {host} is already in use (--listen {text})", EXIT_USAGE) from None
                raise NodeError(f"cannot listen on {text}: {e.strerror}", EXIT_USAGE) from None


class Daemon:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.started_at = time.time()
        self.peer_id = ""
        self.addrs: tuple[str, ...] = ()
        self.capability: Capability | None = None
        self.device: torch.device | None = None  # where this node trains (config.device resolved at start)
        self.p2p: P2P | None = None
        self.p2pd: OwnedP2PDaemon | None = None
        self.dht: DHTNode | None = None
        self.membership: Membership | None = None
        self.jobs: JobManager | None = None
        self.admission: Admission | None = None  # who counts as a member; in a private swarm, whom to serve
        self.reach: Reachability | None = None  # reachable or behind a NAT; a private node's relays
        self.relay: RelayService | None = None  # this node's relay service and dial-back check
        self._views: list[PeerView] = []  # the last read of the swarm's records (relay upkeep)
        self._server = None
        self._dashboard: web.AppRunner | None = None
        self.dashboard_url = ""  # the page's URL once up ("" when --dashboard off)
        self._lock = HomeLock(config.home_dir)
        self._stop = asyncio.Event()
        self._withdrawn = False

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        joins = [parse_join_addr(a) for a in cfg.join]
        join_peers = [a["p2p"] for a in joins]  # who checks this node's reachability, and its first relays
        check_listen_addrs(cfg.listen)
        try:
            self.device = device = resolve_device(cfg.device)
        except ValueError as e:
            raise NodeError(str(e), EXIT_USAGE) from None
        try:
            limits = JobLimits(cfg.accept_jobs_from, cfg.max_jobs, cfg.max_job_memory, cfg.max_job_steps,
                               cfg.max_job_hours, cfg.cpu_threads, cfg.gpu_memory_fraction)
        except ValueError as e:
            raise NodeError(f"bad configuration: {e}", EXIT_USAGE) from None
        bounded = apply_compute_limits(device, cfg.cpu_threads, cfg.gpu_memory_fraction)
        if bounded:
            logger.info("jobs get at most %s", " and ".join(bounded))
        self._lock.acquire()
        if cfg.datasets:  # the config's own-data sources, checked by reading them (a bad one stops the start)
            try:
                bound = await asyncio.to_thread(sync_config_sources, cfg.data_dir, cfg.datasets)
            except (ValueError, OSError) as e:
                raise NodeError(f"config: datasets: {e}", EXIT_USAGE) from None
            logger.info("own data from the config: %s", ", ".join(bound))
        key, created = load_or_create_key(cfg.identity_path)
        self.peer_id = peer_id_of(key.public_key())
        logger.info("%s identity %s (%s)", "created" if created else "loaded", self.peer_id, cfg.identity_path)
        p2p_identity = cfg.home_dir / "p2p.key"
        write_p2p_identity(key, p2p_identity)
        validators: list = [SignedPeerRecordValidator(cfg.swarm, key), SignedJobRecordValidator(cfg.swarm, key),
                            SignedMatchmakingValidator(key)]
        cert = node_certificate(cfg, self.peer_id)  # None: an open swarm
        members = None if cert is None else MembershipValidator(cfg.swarm, cert.owner, cert, key)
        if cert is not None and members is not None:  # every record carries and needs a certificate of the swarm
            validators.append(members)
            logger.info("private swarm %r of owner %s; this node's certificate expires at %s", cfg.swarm, cert.owner,
                        cert.expires)
        validator = CompositeValidator(validators)

        bench = asyncio.create_task(
            asyncio.to_thread(capability_mod.detect, cfg.home_dir, cfg.benchmark_seconds, device), name="capability"
        )
        try:
            self.p2p, self.dht = await self._join(joins, join_peers, str(p2p_identity), validator, key)
        except BaseException:
            bench.cancel()
            raise
        self.capability = await bench
        logger.info("training device %s (%.1f GiB free)", self.capability.train_device,
                    (self.capability.device_free_bytes or 0) / 2**30)
        maddrs = await self.p2p.get_visible_maddrs()
        self.addrs = tuple(str(a) for a in maddrs)

        self.membership = Membership(self.dht, cfg.swarm, self._own_record, cfg.heartbeat, cfg.ttl)
        reach = self._reach()
        if reach.private:  # relays before the first record, which tells others how to reach this node
            await reach.fill_relays(join_peers)
        if not await self.membership.publish() and joins:
            logger.warning("first record store was not acknowledged; the heartbeat will retry")
        self.membership.start()
        self.admission = admission = Admission(self.peer_id, self.membership, members and members.certified)
        if admission.private and self.p2pd is not None:  # strangers' streams are closed unread, every service's
            self.p2pd.set_admission(admission.admit_stream)
            await admission.refresh()  # the live members' certificates, read before the routing table is pruned
            keep_out_of_routing(self.dht, admission.admit)  # the DHT routes among members only
            self._relay().admit = admission.admit  # relays for members only
        reach.start(self._relay_candidates, self._private_routes, self.membership.publish)
        self.jobs = JobManager(self.p2p, self.dht, cfg.swarm, self.peer_id, cfg.home_dir, cfg.data_dir,
                               hooks=byzantine_hooks(os.environ.get(BYZANTINE_ENV, ""),
                                                     stop_at_phase_hooks(os.environ.get(STOP_AT_ENV, ""))),
                               after_round=perturb_after(os.environ.get(PERTURB_ENV, "")),
                               key=key, peers=self.membership.peers, device=device, limits=limits,
                               is_member=admission.is_member, admit=admission.admit if admission.private else None,
                               private=admission.private, http=cfg.http_address(),
                               bandwidth=12.5e6 * (cfg.relayed_span_share if reach.private else 1.0))
        self.jobs.federated.export_hook = stop_before_export_file(os.environ.get(EXPORT_STOP_ENV, ""))
        await self.jobs.start()
        self._server, endpoint = await start_control_server(self, cfg)
        dashboard = await start_dashboard(self, cfg)
        self._dashboard, self.dashboard_url = dashboard if dashboard is not None else (None, "")
        state = {"pid": os.getpid(), "peer_id": self.peer_id, "addrs": list(self.addrs), "control": endpoint,
                 "dashboard": self.dashboard_url, "swarm": cfg.swarm, "version": node.__version__}
        atomic_write(cfg.state_path, json.dumps(state, indent=2).encode(), mode=0o600)
        logger.info("node %s is up in swarm %r; control API at %s; dashboard at %s", self.peer_id, cfg.swarm,
                    endpoint, self.dashboard_url or "(off)")

    async def _join(self, joins: list[Multiaddr], join_peers: list[str], identity: str, validator,
                    key) -> tuple[P2P, DHTNode]:
        cfg = self.config
        initial = [str(a) for a in joins] or None

        async def attempt(i: int) -> tuple[P2P, DHTNode]:
            daemon = OwnedP2PDaemon()
            try:
                p2p = await daemon.start(identity_path=identity, host_maddrs=cfg.listen,
                                         announce_maddrs=cfg.announce, bootstrap=initial or ())
            except P2PBootstrapError as e:
                raise BootstrapError(str(e)) from None
            except P2PDaemonStartError as e:
                raise NodeError(f"the libp2p daemon did not start: {e}", EXIT_FAILURE) from None
            try:  # a node others cannot reach serves no DHT requests (hivemind's client mode)
                self.reach, self.relay = await start_relaying(p2p, key, self.peer_id, cfg.swarm, cfg.reachability,
                                                              cfg.relay_service, join_peers)
                dht = await DHTNode.create(
                    p2p=p2p, initial_peers=initial, record_validator=validator, ensure_bootstrap_success=bool(initial),
                    client_mode=self.reach.private,
                )
            except RuntimeError as e:  # hivemind: "bootstrap failed: none of the initial_peers responded"
                await daemon.stop()
                raise BootstrapError(str(e)) from None
            except BaseException:
                await daemon.stop()
                raise
            self.p2pd = daemon
            return p2p, dht

        try:
            return await retry(attempt, attempts=cfg.join_attempts, base_delay=cfg.join_backoff,
                               retry_on=(BootstrapError,))
        except BootstrapError:
            raise NodeError(
                f"could not reach any bootstrap peer after {cfg.join_attempts} attempts: {', '.join(cfg.join)}",
                EXIT_USAGE,
            ) from None

    def request_stop(self, withdrawn: bool = False) -> None:
        self._withdrawn = self._withdrawn or withdrawn
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """Withdraw the record (unless done already), then stop the control API, DHT and p2pd."""
        deadline = time.monotonic() + SHUTDOWN_BUDGET_S - 0.5
        if self.jobs is not None:
            self.jobs.halt()  # local training stops at its next step, not at the round's end
        if self.membership is not None and not self._withdrawn:
            await self.membership.withdraw(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
        if self._server is not None:
            await self._server.stop(grace=0.2)
        if self._dashboard is not None:
            await self._dashboard.cleanup()
        if self.jobs is not None:
            await self.jobs.stop()
        if self.reach is not None:
            await self.reach.stop()
        if self.dht is not None:
            try:
                await asyncio.wait_for(self.dht.shutdown(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                logger.warning("DHT shutdown timed out")
        if self.p2pd is not None:
            await self.p2pd.stop()
        if self._lock.held:  # only the daemon holding the lock owns the socket and node.json
            if self.config.control == "unix":
                self.config.socket_path.unlink(missing_ok=True)
            self.config.state_path.unlink(missing_ok=True)
            self._lock.release()

    # ---- what the control API serves (node/api/service.py NodeService) ---------------------------------------
    # The control API starts last in start(), so membership, jobs and capability are set whenever it calls in.

    def _membership(self) -> Membership:
        if self.membership is None:
            raise RuntimeError("the daemon has not started: no membership yet")
        return self.membership

    def _jobs(self) -> JobManager:
        if self.jobs is None:
            raise RuntimeError("the daemon has not started: no job manager yet")
        return self.jobs

    def _own_record(self) -> PeerRecord:
        if self.capability is None:  # set (benchmark done) before membership or the control API calls this
            raise RuntimeError("the daemon has not started: no capability yet")
        if self.device is not None:  # the free memory where it trains, as of this heartbeat
            self.capability = capability_mod.refresh_free(self.capability, self.device)
        reach, relay = self._reach(), self._relay()
        return PeerRecord(self.peer_id, self.addrs, node.__version__, self.capability, time.time(),
                          reachability=reach.detection.state, relays=reach.router.relays, relay_service=relay.relay)

    def _reach(self) -> Reachability:
        if self.reach is None:
            raise RuntimeError("the daemon has not joined: no reachability yet")
        return self.reach

    def _relay(self) -> RelayService:
        if self.relay is None:
            raise RuntimeError("the daemon has not joined: no relay service yet")
        return self.relay

    async def _private_routes(self) -> dict[str, tuple[str, ...]]:
        """Private peers and their relays, from a fresh read of the swarm's records (kept for _relay_candidates)."""
        self._views = await self._membership().peers()
        return {v.record.peer_id: v.record.relays for v in self._views if v.record.reachability == "private"}

    async def _relay_candidates(self) -> list[str]:
        return [v.record.peer_id for v in self._views if v.record.reachability == "public"
                and v.record.relay_service and v.record.peer_id != self.peer_id]

    def own_view(self) -> PeerView:
        return PeerView(self._own_record(), time.time() + self.config.ttl)

    def status(self) -> NodeStatus:
        m = self.membership
        return NodeStatus(
            peer_id=self.peer_id,
            addrs=self.addrs,
            swarm=self.config.swarm,
            version=node.__version__,
            uptime_s=time.time() - self.started_at,
            peers_seen=m.last_seen_count if m else 0,
            last_heartbeat_age_s=(time.time() - m.last_published) if m and m.last_published else -1.0,
            capability=self.capability,
            home=str(self.config.home_dir),
            pid=os.getpid(),
            reachability=self.reach.detection.state if self.reach is not None else "public",
            relay=self.relay.stats if self.relay is not None else None,
            dashboard=self.dashboard_url,
        )

    async def peers(self) -> list[PeerView]:
        views = await self._membership().peers()
        if not any(v.record.peer_id == self.peer_id for v in views):
            views.append(self.own_view())  # our record may not have propagated back to us yet
        return views

    async def submit(self, toml_text: str, source: str) -> str:
        return await self._jobs().submit(toml_text, source)

    async def list_jobs(self) -> list[JobSummary]:
        jobs = self._jobs()
        await jobs.refresh()
        return [JobSummary(v, jobs.local_state(j)) for j, v in sorted(jobs.views.items())]

    async def job(self, job_id: str) -> JobSummary | None:
        jobs = self._jobs()
        await jobs.refresh()
        view = jobs.views.get(job_id)
        return None if view is None else JobSummary(view, jobs.local_state(job_id))

    def job_history(self, job_id: str) -> list[dict]:
        jobs = self._jobs()
        rounds = jobs.federated.rounds.get(job_id)
        return list(jobs.pipeline.history.get(job_id, [])) if rounds is None else rounds.report(self.peer_id)

    async def cancel(self, job_id: str) -> bool:
        return await self._jobs().cancel(job_id)

    async def export(self, job_id: str, out: pathlib.Path, merge: bool = False) -> list[pathlib.Path]:
        return await self._jobs().export(job_id, out, merge)

    async def doctor(self) -> Report:
        return await diagnose(self._reach(), self._relay(), self.p2p, self.addrs, await self.peers(), self.peer_id)

    async def leave(self) -> bool:
        withdrawn = await self._membership().withdraw()
        self.request_stop(withdrawn=True)
        return withdrawn


async def run_daemon(config: NodeConfig, on_ready=None, hard_exit: bool = False) -> None:
    """Run until SIGINT/SIGTERM or a Leave call; always stop p2pd on the way out. ``hard_exit`` (the CLI's
    daemon process): the process ends within SHUTDOWN_BUDGET_S of the stop request, whatever is still running."""
    daemon = Daemon(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.request_stop)
    try:
        start = asyncio.create_task(daemon.start())
        stop_wait = asyncio.create_task(daemon.wait_stopped())
        done, _ = await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            start.result()
            if on_ready is not None:
                on_ready(daemon)
            await stop_wait
        else:
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
    finally:
        if hard_exit and daemon.stop_requested:  # not after a failed start: its error and exit code stand
            exit_after(SHUTDOWN_BUDGET_S - 0.8)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await asyncio.wait_for(daemon.stop(), SHUTDOWN_BUDGET_S)
