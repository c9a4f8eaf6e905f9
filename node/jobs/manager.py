"""The daemon's jobs: publish them, find them in the DHT, decide to take part, run their rounds, report.

Every node polls the swarm's ``jobs`` dictionary. For each running job it checks, locally and without
telling anyone its data, whether it can serve it: its own slice of the job's dataset under its data directory
(``<data>/<dataset>/``, written by ``swarmnode data add``), data that fits the job's model (node/ml/job_model.py)
and enough memory for the model. If so it announces itself with a signed JobProgress at its starting round,
runs the job's rounds with node/jobs.JobRunner and publishes a signed JobProgress after each; if not it
declines: ``swarmnode jobs`` shows why with what to do about it, and a signed JobProgress in state
"declined" tells the swarm the reason (no local paths in it), so ``submit --follow`` shows every decline as it
arrives. While fewer than min_participants are ready the participants publish "paused" and keep
retrying the same round. When the last round completes, every participant writes the final model
(safetensors), a manifest, a JSON report of every round and a PNG of the curves (node/jobs/federated/export.py); any
other node can write the same files with ``swarmnode job ID --export DIR``.

A node that finds a job already past round 0, or that fell behind (its round failed while the others'
succeeded), downloads the current global model, outer momentum and round history from a participant over a
libp2p stream, served between rounds, and checks the parameters against their sha256 and that sha256
against the swarm's signed progress before adopting them: it never contributes an update computed from
stale parameters.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import psutil
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

from node.ml.datasets import NoLocalData, load_node_data
from node.runtime.errors import EXIT_USAGE, NodeError
from node.jobs.federated.export import export_job, history_from_json, history_to_json, merge_history, round_entry
from node.jobs.federated.runner import JobRunner, RoundResult, params_hash
from node.jobs.spec import job_spec_from_text
from node.jobs.pipeline.pipeline_jobs import PipelineJobs
from node.ml.job_model import build_job_model, data_misfit, job_model_config
from node.ml.models import estimate_memory_bytes, flatten_params, load_flat_params
from protocol.records.jobs import (
    MAX_REASON,
    MAX_STATE_HEADER_BYTES,
    JobProgress,
    JobRecord,
    StateHeader,
    job_progress_from_wire,
    job_progress_to_wire,
    job_record_from_wire,
    job_record_to_wire,
    jobs_key,
    parse_progress_subkey,
    progress_key,
    progress_subkey,
    state_header_from_wire,
    state_header_to_wire,
)
from protocol.allreduce.rounds import RoundHooks
from protocol.streams import close_quietly, read_frame, write_frame
from protocol.wire import WireError

logger = logging.getLogger(__name__)
JOB_TTL_S = 24 * 3600.0  # a job record outlives any node; the submitter and participants refresh it
POLL_S = 1.0
DIAL_TIMEOUT_S = 10.0  # opening a stream to a participant that may have died since its last progress


@dataclass
class JobView:
    record: JobRecord
    progress: JobProgress | None = None  # the freshest participant view
    at_best: tuple[JobProgress, ...] = ()  # every writer's progress at that round, freshest first

    declined: str = ""  # why this node does not take part ("" if it does or has not decided), with a hint
    declines: dict[str, str] = field(default_factory=dict)  # writer -> reason, every node's signed decline
    takers: int = 0  # nodes that announced they take part (any non-declined progress)
    history: list[RoundResult] = field(default_factory=list)  # this node's own rounds
    inherited: list[dict] = field(default_factory=list)  # earlier rounds, from the peer whose state we adopted
    announced: set[tuple[int, str]] = field(default_factory=set)  # (round, model hash) in signed progress

    def report(self, reporter: str) -> list[dict]:
        return merge_history([round_entry(r, reporter) for r in reversed(self.history)], self.inherited)

    @property
    def holders(self) -> tuple[str, ...]:  # who can serve the state of the latest round
        return tuple(p.writer for p in self.at_best)

    @property
    def state(self) -> str:
        if self.record.state in ("cancelled", "done") or self.progress is None:
            return self.record.state
        if any(p.state == "done" for p in self.at_best):
            return "done"
        return self.progress.state

    @property
    def round(self) -> int:
        return max(self.record.round, self.progress.round if self.progress else 0)


class JobManager:
    def __init__(self, p2p: P2P, dht: DHTNode, swarm: str, peer_id: str, home: pathlib.Path,
                 data_dir: pathlib.Path, bandwidth: float = 12.5e6, hooks: RoundHooks | None = None,
                 after_round=None, key=None, peers=None):
        self.p2p, self.dht, self.swarm, self.peer_id = p2p, dht, swarm, peer_id
        self.home, self.data_dir, self.bandwidth, self.hooks = home, data_dir, bandwidth, hooks
        self.after_round = after_round  # fault injection for tests (JobRunner's after_round)
        self.views: dict[str, JobView] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._runners: dict[str, JobRunner] = {}
        self._poller: asyncio.Task | None = None
        self.pipeline = PipelineJobs(self, key, peers)  # kind = "pipeline" jobs (node/jobs/pipeline/pipeline_jobs.py)

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(self._state_protocol, self._serve_state)
        self._poller = asyncio.create_task(self._poll_forever(), name="jobs-poll")

    @property
    def _state_protocol(self) -> str:
        return f"swarmnode/{self.swarm}/job-state"

    async def stop(self) -> None:
        for task in [self._poller, *self._tasks.values()]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [self._poller, *self._tasks.values()] if t], return_exceptions=True)
        await self.pipeline.stop()

    # ---- what the control API calls ----------------------------------------------------------------------

    async def submit(self, toml_text: str, source: str) -> str:
        spec = job_spec_from_text(toml_text, source)  # bad TOML, nesting, 64-bit ints: NodeError
        try:
            job_model_config(spec)  # unknown dataset or config name, a model that cannot take the data: here
        except ValueError as e:
            raise NodeError(f"{source}: {e}", EXIT_USAGE) from None
        nonce = secrets.token_hex(8)
        assignment = await self.pipeline.prepare(spec, nonce, source) if spec.kind == "pipeline" else None
        record = JobRecord.create(spec, self.peer_id, nonce, time.time(), assignment)
        if not await self._store_record(record):
            raise NodeError("the job could not be stored in the DHT (no peer accepted it)")
        self.views[record.job_id] = JobView(record)
        logger.info("submitted job %s (%s)", record.job_id, spec.name)
        return record.job_id

    async def cancel(self, job_id: str) -> bool:
        await self.refresh()
        view = self.views.get(job_id)
        if view is None:
            raise NodeError(f"no job {job_id} in this swarm", EXIT_USAGE)
        if view.record.submitter != self.peer_id:
            raise NodeError(f"only the submitter ({view.record.submitter}) can cancel job {job_id}", EXIT_USAGE)
        view.record = view.record.replace(state="cancelled", updated_at=time.time())
        return await self._store_record(view.record)

    async def refresh(self) -> None:
        """Read every job record and its progress from the DHT into ``views``."""
        found = await self.dht.get(jobs_key(self.swarm), latest=True)
        records = found.value if found is not None and isinstance(found.value, dict) else {}
        for job_id, item in records.items():
            try:
                record = job_record_from_wire(item.value)
            except (WireError, ValueError) as e:
                logger.debug("skipping job entry %s: %s", job_id, e)
                continue
            view = self.views.setdefault(record.job_id, JobView(record))
            if record.updated_at >= view.record.updated_at:
                view.record = record
            entries = await self._progress_entries(record.job_id)
            view.declines = {p.writer: p.reason for p in entries if p.state == "declined"}
            progress = [p for p in entries if p.state != "declined"]
            view.takers = len({p.writer for p in progress})
            if progress:
                view.announced |= {(p.round, p.model_hash) for p in progress}
                view.progress = max(progress, key=lambda p: (p.round, p.updated_at))
                at_best = [p for p in progress if p.round == view.progress.round]
                view.at_best = tuple(sorted(at_best, key=lambda p: -p.updated_at))

    async def _progress_entries(self, job_id: str) -> list[JobProgress]:
        found = await self.dht.get(progress_key(self.swarm, job_id), latest=True)
        entries = []
        if found is not None and isinstance(found.value, dict):
            for subkey, item in found.value.items():
                try:
                    if parse_progress_subkey(subkey)[0] != job_id:
                        continue
                    entries.append(job_progress_from_wire(item.value))
                except (WireError, ValueError):
                    continue
        return entries

    # ---- taking part ---------------------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.refresh()
                for job_id, view in list(self.views.items()):
                    if view.state in ("running", "paused") and job_id not in self._tasks and not view.declined:
                        self._consider(view)
            except Exception as e:  # a failed poll must not end the node's job service
                logger.warning("job poll failed: %s", e)
            await asyncio.sleep(POLL_S)

    def _consider(self, view: JobView) -> None:
        pipeline = view.record.spec.kind == "pipeline"
        reason, hint = (self.pipeline.why_not(view.record), "") if pipeline else self._why_not(view)
        if reason:
            view.declined = f"{reason}{'; ' + hint if hint else ''}"
            logger.info("declining job %s: %s", view.record.job_id, view.declined)
            self._tasks[view.record.job_id] = asyncio.create_task(
                self._publish_decline(view.record.job_id, reason), name=f"decline-{view.record.job_id}")
            return
        run = self.pipeline.run(view) if pipeline else self._participate(view)
        self._tasks[view.record.job_id] = asyncio.create_task(run, name=f"job-{view.record.job_id}")

    def _why_not(self, view: JobView) -> tuple[str, str]:
        """("", "") if this node can take part, else (the reason it tells the swarm, a hint for its own user)."""
        spec = view.record.spec
        try:
            cfg = job_model_config(spec)
        except ValueError as e:  # a dataset or model this version does not know, a model that cannot fit it
            return f"this node cannot train the job's model: {e}"[:MAX_REASON], ""
        try:
            data = load_node_data(self.data_dir / spec.dataset, dataset=spec.dataset)
        except NoLocalData:
            return (f"no local data for dataset {spec.dataset!r}",
                    f"add it with `swarmnode data add {spec.dataset} --home {self.home}`")
        except (ValueError, OSError) as e:
            return f"its local data for dataset {spec.dataset!r} is unusable", str(e)
        misfit = data_misfit(spec, cfg, data)
        if misfit:
            return misfit[:MAX_REASON], ""
        try:
            need = estimate_memory_bytes(spec.model.arch, cfg, batch_size=spec.batch_size)
        except ValueError as e:
            return f"cannot build model {spec.model.arch!r}: {e}"[:MAX_REASON], ""
        available = psutil.virtual_memory().available
        if need > available:
            return f"the model needs about {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available", ""
        return "", ""

    async def _publish_decline(self, job_id: str, reason: str) -> None:
        """Tell the swarm why this node does not take part (signed, under this node's progress subkey)."""
        decline = JobProgress(job_id, self.peer_id, 0, "", "declined", updated_at=time.time(),
                              reason="".join(c if c.isprintable() else " " for c in reason)[:MAX_REASON])
        ok = await self.dht.store(progress_key(self.swarm, job_id), job_progress_to_wire(decline),
                                  time.time() + JOB_TTL_S, subkey=progress_subkey(job_id, self.peer_id))
        if not ok:
            logger.warning("the decline of job %s was not stored", job_id)

    async def _participate(self, view: JobView) -> None:
        record, spec = view.record, view.record.spec
        data = load_node_data(self.data_dir / spec.dataset, dataset=spec.dataset)
        runner = JobRunner(self.p2p, self.dht, self.swarm, record.job_id, spec, data, bandwidth=self.bandwidth,
                           hooks=self.hooks, after_round=self.after_round)
        self._runners[record.job_id] = runner
        await runner.start()
        logger.info("taking part in job %s (%s) at round %d", record.job_id, spec.name, view.round)
        if view.progress is None:  # the first taker: tell followers the job has a participant
            await self._publish(JobProgress(record.job_id, self.peer_id, runner.completed, runner.model_hash,
                                            "running", updated_at=time.time()))
        paused, last_size = False, 0  # last_size: the group of the last applied round
        try:
            while runner.completed < spec.rounds:
                if view.record.state == "cancelled":
                    logger.info("job %s was cancelled", record.job_id)
                    return
                try:
                    await self._resync_if_needed(view, runner)
                except RuntimeError as e:  # no participant could serve a verified state right now: try again
                    logger.warning("job %s: %s; retrying", record.job_id, e)
                    await asyncio.sleep(POLL_S)
                    continue
                if runner.completed >= spec.rounds:
                    break
                result = await runner.run_round()
                await asyncio.sleep(0)  # state requests waiting for a round boundary are served here
                view.history.append(result)
                # next round: start as soon as this round's members have all declared, unless the round failed
                # or its group just shrank (those left out are often alive, merely late: one full window for them)
                shrank = result.ok and len(result.participants) < last_size
                runner.expect(len(result.participants) if result.ok and not shrank else None)
                last_size = len(result.participants) if result.ok else last_size
                if result.paused:
                    if not paused:  # published once per pause, not on every retry
                        logger.info("job %s paused: fewer than %d participants ready; retrying round %d",
                                    record.job_id, spec.min_participants, runner.next_round)
                        await self._publish(self._progress(runner, result, "paused"))
                    paused = True
                    same = [p.next_round for p in view.at_best
                            if p.round == runner.completed and p.model_hash == runner.model_hash]
                    runner.align_round(max(same, default=0))  # paused peers drifted apart: meet on the latest id
                    continue
                if not result.ok:  # nothing changed here; a failed round is in the report, not in progress
                    continue
                if paused:
                    logger.info("job %s resumed", record.job_id)
                paused = False
                await self._publish(self._progress(runner, result, "done" if runner.completed == spec.rounds else "running"))
            if record.submitter == self.peer_id:
                view.record = record.replace(state="done", round=runner.completed, model_hash=runner.model_hash,
                                             participants=view.progress.participants if view.progress else (),
                                             updated_at=time.time())
                await self._store_record(view.record)
            params, _, completed, _ = runner.snapshot()
            await asyncio.to_thread(self._write_export, self.home / "jobs" / record.job_id, view, params, completed)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("job %s failed on this node", record.job_id)
        finally:
            if runner.completed < spec.rounds:  # a finished job's final state stays servable for late nodes
                self._runners.pop(record.job_id, None)
            await runner.stop()

    def _progress(self, runner: JobRunner, result: RoundResult, state: str) -> JobProgress:
        return JobProgress(
            runner.job_id, self.peer_id, runner.completed, runner.model_hash, state, result.participants,
            result.train_loss if result.ok else None, (result.metrics or {}).get(runner.bundle.metric),
            result.bytes_sent + result.bytes_received, result.seconds, time.time(), runner.next_round)

    async def _resync_if_needed(self, view: JobView, runner: JobRunner) -> None:
        """Before a round: never contribute an update computed from parameters the swarm does not hold
        (joining mid-job or behind: download; left out of a round: wait for who moved on; outvoted: re-sync)."""
        if view.state == "done" or (view.progress and view.progress.round > runner.completed):
            await self._sync(view, runner)  # the others moved on without us: catch up, don't pollute
        elif not runner.in_sync:
            await self._catch_up_if_behind(view, runner)
        elif (majority := self._outvoted(view, runner)) is not None:
            logger.warning("job %s: this node's model after round %d differs from the other participants'; "
                           "re-syncing to %s...", view.record.job_id, runner.completed, majority[:12])
            await self._sync(view, runner, avoid_hash=runner.model_hash)

    def _outvoted(self, view: JobView, runner: JobRunner) -> str | None:
        """The model hash that more participants published for this node's round than this node's own, if any.
        A tie counts only once every member of the last round has reported (then the larger hash wins, so two
        nodes that disagree never both switch): a half-known vote must not move a node off the right model."""
        reports = {p.writer: p.model_hash for p in view.at_best if p.round == runner.completed and p.writer != self.peer_id}
        if not reports:
            return None
        votes = Counter(reports.values())
        votes[runner.model_hash] += 1
        mine = votes[runner.model_hash]
        last = next((r.participants for r in reversed(view.history) if r.ok), ())
        complete = set(last) <= set(reports) | {self.peer_id}
        best = max(votes, key=lambda h: (votes[h], h))
        if best == runner.model_hash or (votes[best] == mine and not complete):
            return None
        return best

    async def _catch_up_if_behind(self, view: JobView, runner: JobRunner) -> None:
        """After a round this node missed (left out, or its loss was not finite): if another participant
        reports a later round within a round's time, download its state; if none does, nobody moved on."""
        deadline = time.monotonic() + runner.spec.round_timeout_s
        while time.monotonic() < deadline:
            if view.state == "done" or (view.progress and view.progress.round > runner.completed):
                await self._sync(view, runner)
                return
            await asyncio.sleep(POLL_S / 2)  # the poller refreshes view.progress
        runner.in_sync = True

    def local_state(self, job_id: str) -> tuple[int, str] | None:
        """(rounds completed, model hash) of this node's own copy of a job's model, if it takes part."""
        runner = self._runners.get(job_id)
        if runner is None:
            return self.pipeline.local.get(job_id)  # a pipeline job: (steps, this node's stage parameter hash)
        return (runner.completed, runner.model_hash)

    # ---- state transfer --------------------------------------------------------------------------------------

    async def _serve_state(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Send a job's current global state to a peer (between rounds, so it can join the next one), then
        this node's report of the rounds so far."""
        try:
            job_id = (await asyncio.wait_for(read_frame(reader, 64), 10)).decode(errors="replace")
            runner, view = self._runners.get(job_id), self.views.get(job_id)
            if runner is None or view is None:
                return
            await asyncio.wait_for(runner.idle.wait(), runner.spec.round_timeout_s)  # best effort: fresh state
            params, momentum, completed, next_round = runner.snapshot()
            history = history_to_json(view.report(self.peer_id))
            header = StateHeader(job_id, completed, next_round, params_hash(params), params.size, momentum is not None,
                                 len(history))
            await write_frame(writer, state_header_to_wire(header))
            await write_frame(writer, params.astype("<f4").tobytes())
            if momentum is not None:
                await write_frame(writer, momentum.astype("<f4").tobytes())
            await write_frame(writer, history)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, WireError) as e:
            logger.debug("state request from %s ended: %s", info.peer_id, e)
        finally:
            close_quietly(writer)

    async def _download(self, view: JobView, size: int, timeout: float, avoid_hash: str | None = None):
        """(header, params, momentum, history) from the first participant that serves a state whose hash
        checks out, both against the bytes and against the signed progress the swarm published for that
        round; RuntimeError naming every peer's failure if none does."""
        candidates = [*view.holders, *(view.progress.participants if view.progress else ())]
        peers = [p for p in dict.fromkeys(candidates) if p != self.peer_id]
        errors = []
        for peer in peers:
            writer = None
            try:
                _, reader, writer = await asyncio.wait_for(self.p2p.call_binary_stream_handler(
                    PeerID.from_base58(peer), self._state_protocol), DIAL_TIMEOUT_S)
                await write_frame(writer, view.record.job_id.encode())
                header = state_header_from_wire(await asyncio.wait_for(read_frame(reader, MAX_STATE_HEADER_BYTES), timeout))
                if header.job_id != view.record.job_id or header.size != size:
                    raise WireError(f"state for {header.job_id} of {header.size} parameters, expected {size}")
                if header.model_hash == avoid_hash:
                    raise WireError(f"serves the model {avoid_hash[:12]}... this node is moving away from")
                announced = {h for r, h in view.announced if r == header.completed}
                if announced and header.model_hash not in announced:
                    raise WireError(f"model hash for round {header.completed} differs from the swarm's signed progress")
                params = np.frombuffer(await asyncio.wait_for(read_frame(reader, 4 * size), timeout), "<f4")
                if params_hash(params) != header.model_hash:
                    raise WireError("downloaded parameters do not match the announced model hash")
                momentum = None
                if header.has_momentum:
                    momentum = np.frombuffer(await asyncio.wait_for(read_frame(reader, 4 * size), timeout), "<f4")
                history = []
                if header.history_size:
                    history = history_from_json(await asyncio.wait_for(read_frame(reader, header.history_size), timeout))
                return header, params.astype(np.float32), None if momentum is None else momentum.astype(np.float32), history
            except Exception as e:  # try the next participant
                errors.append(f"{peer[-8:]}: {type(e).__name__}: {e}")
            finally:
                close_quietly(writer)
        raise RuntimeError(f"could not download the state of job {view.record.job_id}: {'; '.join(errors) or 'no peers'}")

    async def _sync(self, view: JobView, runner: JobRunner, avoid_hash: str | None = None) -> None:
        """Adopt the current state of a participant; raise if none can provide a verified one."""
        header, params, momentum, history = await self._download(view, runner.params.size, runner.spec.round_timeout_s * 2,
                                                                 avoid_hash)
        runner.load_state(params, momentum, header.completed, header.next_round, header.model_hash)
        view.inherited = merge_history(view.inherited, history)
        logger.info("job %s: synced to round %d (hash %s...)", view.record.job_id, header.completed,
                    header.model_hash[:12])

    # ---- export ----------------------------------------------------------------------------------------------

    async def export(self, job_id: str, out: pathlib.Path) -> list[pathlib.Path]:
        """Write the job's current model, manifest, report and curve under ``out``: from this node's own copy
        if it takes part, else downloaded from a participant and checked like a joiner's."""
        await self.refresh()
        view = self.views.get(job_id)
        if view is None:
            raise NodeError(f"no job {job_id} in this swarm", EXIT_USAGE)
        if view.record.spec.kind == "pipeline":
            raise NodeError(f"job {job_id} is a pipeline job: its trained shards are under <home>/jobs/{job_id}/trained "
                            "on the submitting node", EXIT_USAGE)
        runner = self._runners.get(job_id)
        if runner is not None:
            params, _, completed, _ = runner.snapshot()
        else:
            if view.progress is None:
                raise NodeError(f"job {job_id} has no participant yet: nothing to export")
            size = flatten_params(self._fresh_model(view).module).size
            try:
                header, params, _, history = await self._download(view, size, view.record.spec.round_timeout_s * 2)
            except RuntimeError as e:
                raise NodeError(str(e)) from None
            completed, view.inherited = header.completed, merge_history(view.inherited, history)
        return await asyncio.to_thread(self._write_export, out, view, params, completed)

    def _fresh_model(self, view: JobView):
        return build_job_model(view.record.spec)

    def _write_export(self, out: pathlib.Path, view: JobView, params: np.ndarray, completed: int) -> list[pathlib.Path]:
        bundle = self._fresh_model(view)
        load_flat_params(bundle.module, params)
        return export_job(out, view.record, bundle.module, params_hash(params), completed, sum(r.ok for r in view.history),
                          view.report(self.peer_id), bundle.metric)

    async def _publish(self, progress: JobProgress) -> None:
        ok = await self.dht.store(progress_key(self.swarm, progress.job_id), job_progress_to_wire(progress),
                                  time.time() + JOB_TTL_S, subkey=progress_subkey(progress.job_id, self.peer_id))
        if not ok:
            logger.warning("progress of job %s was not stored", progress.job_id)
        view = self.views.get(progress.job_id)
        if view is not None and (view.progress is None or progress.round >= view.progress.round):
            view.progress = progress

    async def _store_record(self, record: JobRecord) -> bool:
        return bool(await self.dht.store(jobs_key(self.swarm), job_record_to_wire(record), time.time() + JOB_TTL_S,
                                         subkey=record.job_id))
