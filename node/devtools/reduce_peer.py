"""A standalone all-reduce participant process, for the multi-process tests and the benchmarks.

    python -m node.devtools.reduce_peer --out DIR --size 100000 --rounds 3 --start-at $(date +%s.%N) [--join ADDR]

It runs its own p2pd and DHT node (as a daemon does), then one all-reduce round every ``--period``
seconds on seeded random gradients (round r starts at start_at + r * period), sparsified with error
feedback. It prints JSON lines on stdout (ready, phase, round, done) and writes, under --out, each
applied average (round_<r>.npy) and, at the end, its error-feedback residual and the sum of all the
gradients it produced, so a test can check bit-identity across peers and conservation of mass.
Faults for tests: --stop-at PHASE (the process SIGSTOPs itself there, for the test to SIGKILL it) and
--fault NAME (sends a malformed part, see protocol/allreduce/faults.py), each at --fault-round.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.node import DHTNode

from node.devtools.localswarm import wait_for
from node.runtime.identity import write_p2p_identity
from node.runtime.p2pd import OwnedP2PDaemon
from protocol.allreduce.averager import Averager
from protocol.allreduce.codecs import select_quantizer
from protocol.allreduce.entry_validation import SignedMatchmakingValidator
from protocol.allreduce.faults import RESULT_FAULTS, Fault, mangle_part, mangle_result
from protocol.allreduce.messages import TensorSpec
from protocol.allreduce.robust import AGGREGATORS
from protocol.allreduce.rounds import Phase, RoundConfig, RoundHooks
from protocol.allreduce.sparsify import ErrorFeedbackSparsifier, SparseUpdate


def emit(**event) -> None:
    print(json.dumps(event), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--join", action="append", default=[])
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    p.add_argument("--swarm", default="reduce")
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--mode", choices=["exact", "approx"], default="exact")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--first-round", type=int, default=None, help="default: the next round to start")
    p.add_argument("--start-at", required=True,
                   help="unix time of round 0, or file:PATH holding it (written once every peer is ready)")
    p.add_argument("--period", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--expected-group", type=int, default=None)
    p.add_argument("--min-group", type=int, default=2)
    p.add_argument("--matchmaking-time", type=float, default=1.0)
    p.add_argument("--part-timeout", type=float, default=3.0)
    p.add_argument("--result-timeout", type=float, default=6.0)
    p.add_argument("--commit-timeout", type=float, default=1.5)
    p.add_argument("--bandwidth", type=float, default=12.5e6)
    p.add_argument("--value-codec", default="fp16")
    p.add_argument("--result-value-codec", default="fp16")
    p.add_argument("--result-density", type=float, default=None, help="global top-k of each span's average")
    p.add_argument("--aggregator", choices=AGGREGATORS, default="mean", help="how owners aggregate their span")
    p.add_argument("--max-weight", type=float, default=None, help="cap on a part's claimed weight")
    p.add_argument("--stop-at", choices=[ph.value for ph in Phase], default=None)
    p.add_argument("--fault", choices=[f.value for f in Fault], default=None)
    p.add_argument("--fault-round", type=int, default=0)
    p.add_argument("--fault-schedule", default="",
                   help="comma-separated fault per round (- for none), e.g. -,nan,garbage")
    p.add_argument("--save-averages", action="store_true",
                   help="write each applied average as round_<r>.npy, and what each round took out of the "
                        "error-feedback buffer as removed_<r>.npy")
    return p.parse_args(argv)


def gradient(seed: int, round_no: int, size: int) -> np.ndarray:
    """(size,) float32: this peer's gradient in this round, reproducible from (seed, round)."""
    return np.random.default_rng([seed, round_no]).standard_normal(size, dtype=np.float32)


async def resolve_start(spec: str, timeout: float = 120.0) -> float:
    """--start-at: a unix time, or file:PATH that a launcher writes once all peers are up (no start-up race)."""
    if not spec.startswith("file:"):
        return float(spec)
    path = pathlib.Path(spec[len("file:"):])
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no start time in {path} after {timeout:.0f} s")
        await asyncio.sleep(0.05)
    return float(path.read_text())


async def main(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    daemon = OwnedP2PDaemon()
    key = Ed25519PrivateKey.generate()  # as a daemon's: its libp2p identity signs its matchmaking entries
    write_p2p_identity(key, args.out / "p2p.key")
    p2p = await daemon.start(identity_path=str(args.out / "p2p.key"), host_maddrs=[args.listen], bootstrap=args.join)
    dht = await DHTNode.create(p2p=p2p, initial_peers=args.join or None, ensure_bootstrap_success=bool(args.join),
                               record_validator=SignedMatchmakingValidator(key))
    me = p2p.peer_id.to_base58()

    async def on_phase(phase: Phase, round_id: str) -> None:
        emit(event="phase", phase=phase.value, round=round_id)
        if args.stop_at == phase.value and round_id == f"r{args.fault_round}":
            os.kill(os.getpid(), signal.SIGSTOP)  # frozen mid-phase; the test SIGKILLs us here

    schedule = {f"r{i}": name for i, name in enumerate(args.fault_schedule.split(",")) if name not in ("", "-")}
    if args.fault:
        schedule[f"r{args.fault_round}"] = args.fault

    def outgoing_part(frame, data: bytes) -> bytes:
        if frame.round_id in schedule and Fault(schedule[frame.round_id]) not in RESULT_FAULTS:
            return mangle_part(Fault(schedule[frame.round_id]), frame, data, seed=args.seed)
        return data

    def outgoing_result(frame, data: bytes) -> bytes:  # a byzantine owner: the same bad bytes to every member
        if frame.round_id in schedule and Fault(schedule[frame.round_id]) in RESULT_FAULTS:
            return mangle_result(Fault(schedule[frame.round_id]), frame, data)
        return data

    config = RoundConfig(
        swarm=args.swarm, tensor=TensorSpec("grads", args.size), min_group=args.min_group,
        expected_group=args.expected_group, matchmaking_time=args.matchmaking_time, part_timeout=args.part_timeout,
        result_timeout=args.result_timeout, commit_timeout=args.commit_timeout, bandwidth=args.bandwidth,
        value_codec=args.value_codec, result_value_codec=args.result_value_codec, result_density=args.result_density,
        aggregator=args.aggregator, max_weight=args.max_weight,
    )
    averager = Averager(p2p, dht, config, RoundHooks(on_phase=on_phase, outgoing_part=outgoing_part,
                                                     outgoing_result=outgoing_result))
    await averager.start()
    addr = str((await p2p.get_visible_maddrs())[0])
    emit(event="ready", peer_id=me, addr=addr, pid=os.getpid())
    args.start_at = await resolve_start(args.start_at)
    sparsifier = ErrorFeedbackSparsifier(args.size, args.density, args.mode, seed=args.seed)
    produced = np.zeros(args.size, np.float64)
    first = args.first_round
    if first is None:
        first = max(0, int(np.ceil((time.time() - args.start_at) / args.period)))
    try:
        for r in range(first, args.rounds):
            grad = gradient(args.seed, r, args.size)  # made before the round starts, as a trainer's backward pass
            produced += grad
            delay = args.start_at + r * args.period - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.perf_counter()
            timing: dict[str, float] = {}
            selected: dict[str, SparseUpdate] = {}  # the update select() took out of the error-feedback buffer

            def select(grad: np.ndarray = grad, timing: dict[str, float] = timing,
                       selected: dict[str, SparseUpdate] = selected) -> SparseUpdate:
                # runs in a thread while matchmaking proceeds; the defaults bind this round's grad and dicts
                t = time.perf_counter()
                update = sparsifier.select(grad, quantize=select_quantizer(args.value_codec))
                timing["select"] = time.perf_counter() - t
                selected["update"] = update
                return update

            outcome = await averager.step(f"r{r}", select, args.weight)
            t_round = time.perf_counter() - t0
            sparsifier.restore(outcome.returned)
            rep = outcome.report
            digest = None
            if outcome.average is not None:
                avg = outcome.average
                digest = hashlib.sha256(avg.indices.tobytes() + avg.values.tobytes()).hexdigest()
                if args.save_averages:
                    np.save(args.out / f"round_{r}.npy", avg.to_dense())
            if args.save_averages and "update" in selected:  # what this round took out of the error-feedback buffer
                removed = (selected["update"].to_dense().astype(np.float64)
                           - outcome.returned.to_dense().astype(np.float64))
                np.save(args.out / f"removed_{r}.npy", removed)
            emit(event="round", round=r, ok=rep.ok, error=rep.error, leader=rep.leader, members=list(rep.members),
                 excluded=list(rep.excluded), spans=[list(s) for s in rep.spans], spans_applied=list(rep.spans_applied),
                 span_weights=list(rep.span_weights), votes_missing=list(rep.votes_missing), hash=digest,
                 evidence=rep.evidence,
                 sent=rep.total_sent, received=rep.total_received,
                 select_s=timing.get("select"), round_s=t_round, phases=rep.phase_seconds)
    finally:
        np.save(args.out / "residual.npy", np.asarray(sparsifier.residual, np.float64))
        np.save(args.out / "produced.npy", produced)
        emit(event="done", peer_id=me)
        await averager.stop()
        await dht.shutdown()
        await daemon.stop()


class PeerProcess:
    """Launch a reduce peer (or another ``module`` that prints JSON event lines and takes ``--out``, such as
    node/devtools/stage_peer.py) as a real process (own process group) and follow its JSON events. ``cwd``: the
    process's working directory (default: this one's)."""

    def __init__(self, out: pathlib.Path, args: list[str], prefix: list[str] | None = None,
                 module: str = "node.devtools.reduce_peer", cwd: pathlib.Path | None = None):
        self.out, self.args = pathlib.Path(out), list(args)
        self.prefix = list(prefix or [])  # e.g. ["ip", "netns", "exec", "sn0"]: it execs, so the pid stays ours
        self.module, self.cwd = module, cwd
        self.events: list[dict] = []
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def start(self) -> PeerProcess:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "stderr.log", "wb") as stderr:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", self.module, "--out", str(self.out), *self.args],
                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True, text=True,
                cwd=self.cwd,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        stdout = self.proc.stdout if self.proc is not None else None
        if stdout is None:  # start() spawns the process, with stdout a pipe, before it starts this reader
            raise RuntimeError(f"{self.out.name}'s output is not readable")
        for line in stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self.events.append(event)

    def wait_event(self, timeout: float, what: str, **match) -> dict:
        """The first event matching ``match``; RuntimeError (with the process's stderr tail) as soon as the process
        has exited without printing it, TimeoutError at the deadline."""
        def look():
            with self._lock:
                return next((e for e in self.events if all(e.get(k) == v for k, v in match.items())), None)

        def find():
            found = look()
            if found is None and self.proc is not None and self.proc.poll() is not None:
                self._reader.join(5)  # read its output to the end: an event printed just before exiting counts
                found = look()
                if found is None:
                    self.check_alive(f"before {what}")
            return found

        return wait_for(find, timeout, f"{what} from {self.out.name}")

    def check_alive(self, when: str = "") -> None:
        """RuntimeError naming the exit code and the end of stderr.log if the process has exited."""
        if self.proc is None or self.proc.poll() is None:
            return
        try:
            tail = " | ".join((self.out / "stderr.log").read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            tail = ""
        raise RuntimeError(f"{self.out.name} exited with code {self.proc.returncode} {when}: {tail}")

    def rounds(self) -> dict[int, dict]:
        with self._lock:
            return {e["round"]: e for e in self.events if e["event"] == "round"}

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._reader.join(10)  # EOF once the process is gone
        if self.proc.stdout is not None:  # always a pipe (start())
            self.proc.stdout.close()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=os.environ.get("SWARMNODE_LOG", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main(parse_args()))
