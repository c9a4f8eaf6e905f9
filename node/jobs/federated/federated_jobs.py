"""Federated jobs on this node: decide to take part, run the rounds, stay in sync, serve state, export.

    jobs = FederatedJobs(p2p, board, home, data_dir)     # node/jobs/manager.py makes one per daemon
    await jobs.start()                                    # serves the job-state protocol to joiners
    reason, hint = jobs.why_not(view)                     # ("", "") when this node can take part
    await jobs.run(view)                                  # this node's rounds of one job, until it ends
    files = await jobs.export(view, out)                  # model, manifest, report, curve

For each running job the manager finds on the board, this node checks, locally and without telling anyone its
data, whether it can serve it: its own slice of the job's dataset under its data directory
(``<data>/<dataset>/``, written by ``swarmnode data add``), data that fits the job's model
(node/ml/job_model.py) and enough memory for the model. If so it announces itself with a signed JobProgress
at its starting round, runs the job's rounds with node/jobs/federated/runner.py JobRunner and publishes a
signed JobProgress after each applied round; if not, the manager publishes its decline. What follows each
round (the group size to expect next, pausing and resuming, the round id paused peers meet on, whether this
node was outvoted) is protocol/planning/round_policy.py's decision. When the last round completes, every
participant writes the final model (safetensors), a manifest, a JSON report of every round and a PNG of the
curves (node/jobs/federated/export.py); any other node can write the same files with ``swarmnode job ID
--export DIR``.

A node that finds a job already past round 0, or that fell behind (its round failed while the others'
succeeded), downloads the current global model, outer momentum and round history from a participant
(protocol/transfer/job_state.py), served between rounds, and checks the parameters against their sha256 and
that sha256 against the swarm's signed progress before adopting them: it never contributes an update computed
from stale parameters.

After every applied round (and every download) the node checkpoints its state to disk, off the event loop
(node/jobs/federated/checkpoints.py). Restarted on the same home after a kill or a whole-swarm power cut, it goes
on from its newest valid checkpoint, and the submitter puts the job's record back on the board; nodes one round
apart converge on the later round (the rule and why: checkpoints.py's docstring).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import pathlib
from collections.abc import Callable

import numpy as np
import torch
from hivemind.p2p import P2P

from node.jobs.board import POLL_S, JobBoard, JobView
from node.jobs.federated import script_runs
from node.jobs.federated.checkpoints import (
    Checkpoint,
    CheckpointStore,
    CheckpointWriter,
    checkpoint_dir,
    survivors_back,
    unfinished_records,
)
from node.jobs.federated.export import Rounds, export_job, history_from_json, history_to_json, merge_history
from node.jobs.federated.runner import JobRunner, RoundResult
from node.jobs.model_files import ModelFetchError, ModelStore
from node.ml.analyze import analyze_arch, analyze_folder, check_buildable, job_memory
from node.ml.datasets import NodeData, NoLocalData
from node.ml.hf_models import ModelFilesMissing, export_files, memory_bytes
from node.ml.job_model import build_job_model, data_misfit, job_model_config, load_job_data
from node.ml.models import flatten_params, load_flat_params
from node.ml.user_data import DataMismatch
from node.runtime.device import memory_shortfall, precision_decline
from node.runtime.errors import NodeError
from protocol.allreduce.rounds import RoundHooks
from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.planning.round_policy import RoundPolicy, meeting_round, outvoted
from protocol.records.job_records import MAX_EXCLUDED, MAX_REASON, JobProgress, JobRecord
from protocol.streams import serve_on, stop_serving
from protocol.transfer.job_state import (
    JobState,
    StateHeader,
    fetch_job_state,
    job_state_protocol,
    params_hash,
    serve_job_state,
)
from protocol.wire import WireError

logger = logging.getLogger(__name__)
REDO_EXPORT_RETRY_S = 10.0  # between attempts to redo an interrupted export (no participant served the state yet)


class FederatedJobs:
    def __init__(self, p2p: P2P, board: JobBoard, home: pathlib.Path, data_dir: pathlib.Path,
                 bandwidth: float = 12.5e6, hooks: RoundHooks | None = None, after_round=None,
                 clock: Clock = SYSTEM_CLOCK, runner_factory=None, device: torch.device | None = None,
                 admit: Callable[[str], bool] | None = None, memory_limit: Callable[[int, int], str] | None = None):
        self.p2p, self.board, self.home, self.data_dir = p2p, board, home, data_dir
        # admit: the private swarm's admission rule (node/runtime/admission.py), which every round applies
        self.bandwidth, self.clock = bandwidth, clock
        self.hooks = hooks if admit is None else dataclasses.replace(hooks or RoundHooks(), admit=admit)
        self.memory_limit = memory_limit  # this node's per-job memory bound (node/jobs/policy.py): "" or why not
        self.after_round = after_round  # fault injection for tests (JobRunner's after_round)
        self.device = torch.device("cpu") if device is None else device  # where local steps run (--device)
        # tests pass a scripted runner (same interface as JobRunner)
        self.runner_factory = runner_factory or functools.partial(JobRunner, device=self.device)
        self.rounds: dict[str, Rounds] = {}
        self._runners: dict[str, JobRunner] = {}
        self._data: dict[str, NodeData] = {}  # read by why_not for run(), per job id
        self.models = ModelStore(p2p, home, board.swarm)  # job model folders: fetched, verified, served
        self.export_hook = None  # fault injection for tests: called with each export file's name before it is written
        self._writers: dict[str, CheckpointWriter] = {}  # per job: its per-round checkpoints (checkpoints.py)
        self.scripts: dict[str, script_runs.ScriptBridge] = {}  # script runs this node takes part in
        self._halted: set[str] = set()  # jobs whose local work was halted: their rounds end
        self._restorer: asyncio.Task | None = None

    @property
    def peer_id(self) -> str:
        return self.board.peer_id

    async def start(self) -> None:
        await serve_on(self.p2p, {job_state_protocol(self.board.swarm): self._serve_state}, logger,
                       "job state handler")
        await self.models.start()
        records = await asyncio.to_thread(unfinished_records, self.home, self.peer_id)
        if records:
            self._restorer = asyncio.create_task(self._restore_records(records), name="restore-job-records")

    async def stop(self) -> None:
        if self._restorer is not None:
            self._restorer.cancel()
            await asyncio.gather(self._restorer, return_exceptions=True)
        await stop_serving(self.p2p, [job_state_protocol(self.board.swarm)], logger)
        await self.models.stop()

    def halt(self, job_id: str | None = None) -> None:
        """Stop the local training of one job (cancelled) or of all (the node is stopping) at its next step; a
        round halted in its local steps sends nothing and the job's run ends."""
        for jid, runner in list(self._runners.items()):
            if job_id is None or jid == job_id:
                runner.halt()
                self._halted.add(jid)

    def local_state(self, job_id: str) -> tuple[int, str] | None:
        """(rounds completed, model hash) of this node's own copy of a job's model, if it takes part."""
        runner = self._runners.get(job_id)
        return None if runner is None else (runner.completed, runner.model_hash)

    # ---- taking part -------------------------------------------------------------------------------------

    def why_not(self, view: JobView) -> tuple[str, str]:
        """("", "") if this node can take part, else (the reason it tells the swarm, a hint for its own user)."""
        spec = view.record.spec
        if script_runs.is_script_run(spec):
            return ("", "") if view.job_id in self.scripts else ("a script's run: only the scripts running it "
                                                                 "take part", "")
        cfg: dict | None = None  # a model folder not fetched yet: its fit is checked after the fetch (run)
        try:
            cfg = job_model_config(spec)
        except ModelFilesMissing:
            pass
        except ValueError as e:  # a dataset or model this version does not know, a model that cannot fit it
            return f"this node cannot train the job's model: {e}"[:MAX_REASON], ""
        if cfg is not None and spec.model.arch != "hf":  # its size by formula, before reading data or building
            try:
                bound = check_buildable(spec.model.arch, cfg)
            except ValueError as e:
                return f"cannot build model {spec.model.arch!r}: {e}"[:MAX_REASON], ""
            short = self._shortfall(bound.training_bytes(spec.inner.kind, spec.inner.momentum), 0)
            if short:
                return f"{short} ({bound.params:,} parameters)"[:MAX_REASON], ""
        try:
            data = self._data.pop(view.job_id, None) or load_job_data(spec, self.data_dir)
        except NoLocalData:
            formats = {"tabular": "csv|parquet|jsonl", "text": "text|jsonl", "image": "imagefolder"}
            how = f"{spec.dataset} PATH --format {formats[spec.data.kind]}" if spec.data else spec.dataset
            return (f"no local data for dataset {spec.dataset!r}",
                    f"add it with `swarmnode data add {how} --home {self.home}`")
        except DataMismatch as e:  # its own data does not hold what the job declares
            return str(e)[:MAX_REASON], ""
        except ModelFilesMissing:  # text read with the model folder's tokenizer: after the fetch (run)
            data = None
        except (ValueError, OSError) as e:
            return f"its local data for dataset {spec.dataset!r} is unusable", str(e)
        misfit = data_misfit(spec, cfg, data) if cfg is not None and data is not None else ""
        if misfit:
            return misfit[:MAX_REASON], ""
        refusal = precision_decline(self.device, spec.precision)  # the device it trains on (--device)
        if refusal:
            return refusal[:MAX_REASON], ""
        try:  # training memory where it trains, the round's vectors in host RAM (node/ml/analyze.py)
            on_device, on_host = ((memory_bytes(spec.model.files, spec.adapter), 0) if spec.model.arch == "hf" else
                                  job_memory(analyze_arch(spec.model.arch, cfg, spec.batch_size), spec.precision,
                                             spec.inner.kind, spec.inner.momentum))
        except ValueError as e:
            return f"cannot build model {spec.model.arch!r}: {e}"[:MAX_REASON], ""
        short = self._shortfall(on_device, on_host)
        if short:
            return short[:MAX_REASON], ""
        if data is not None:
            self._data[view.job_id] = data  # read once: run() takes it
        return "", ""

    async def run(self, view: JobView) -> None:
        """Take part in the job until its last round (or its cancellation); then write the export."""
        record, spec = view.record, view.record.spec
        if record.job_id in self.scripts:
            return await self._run_script(view, self.scripts[record.job_id])
        if spec.model.arch == "hf" and not await self._fetch_model(view):
            return  # declined, with the reason
        data = self._data.pop(record.job_id, None)
        if data is None:  # text read with the fetched folder's tokenizer, or a run without why_not
            try:
                data = await asyncio.to_thread(load_job_data, spec, self.data_dir)
            except (ValueError, OSError) as e:  # DataMismatch, NoLocalData: the reason to decline
                return await self._decline(view, str(e))
        if spec.model.arch == "hf" and (misfit := data_misfit(spec, job_model_config(spec), data)):
            return await self._decline(view, misfit)
        runner = self.runner_factory(self.p2p, self.board.dht, self.board.swarm, record.job_id, spec, data,
                                     bandwidth=self.bandwidth, hooks=self.hooks, after_round=self.after_round,
                                     clock=self.clock)
        await self._run_rounds(view, runner)

    async def _run_script(self, view: JobView, bridge: script_runs.ScriptBridge) -> None:
        """A script's run: the script does the local steps (script_runs.py); it hears when the run is over."""
        runner = script_runs.ScriptRunner(self.p2p, self.board.dht, self.board.swarm, view.job_id, view.record.spec,
                                          bridge, bandwidth=self.bandwidth, hooks=self.hooks,
                                          after_round=self.after_round, clock=self.clock)
        try:
            await script_runs.await_submitter(view, self.peer_id, self.clock)  # its weights, not this script's
            await self._run_rounds(view, runner)
        finally:
            params, _, completed, _ = runner.snapshot()
            done = completed >= view.record.spec.rounds
            name = view.record.spec.name
            bridge.end(f"run {name!r} finished after {completed} rounds" if done else
                       f"run {name!r} ended at round {view.round} while this node was behind at round {completed}, "
                       "and no participant is left to serve its state" if view.state == "done" else
                       f"run {name!r} stopped on this node after {completed} rounds ({view.record.state})",
                       (params, completed) if done else None)

    async def _run_rounds(self, view: JobView, runner: JobRunner) -> None:
        record, spec = view.record, view.record.spec
        self._runners[record.job_id] = runner
        self._halted.discard(record.job_id)
        rounds = self.rounds.setdefault(record.job_id, Rounds())
        resumed = await self._resume(view, runner, rounds)
        await runner.start()
        logger.info("taking part in job %s (%s) at round %d", record.job_id, spec.name, view.round)
        if view.progress is None or resumed is not None:  # the first taker, or back from a checkpoint: say so
            await self.board.publish(JobProgress(record.job_id, self.peer_id, runner.completed, runner.model_hash,
                                                 "running", updated_at=self.clock.time(),
                                                 next_round=runner.next_round))
        policy, stranded = RoundPolicy(), math.inf  # stranded: since when syncs fail (a run that ended: give up)
        try:
            if resumed is not None:
                await self._await_survivors(view, runner, len(resumed.participants))
            while runner.completed < spec.rounds:
                if view.record.state == "cancelled":
                    logger.info("job %s was cancelled", record.job_id)
                    await asyncio.to_thread(CheckpointStore(checkpoint_dir(self.home, record.job_id)).forget)
                    return
                try:
                    await self._resync_if_needed(view, runner)
                except RuntimeError as e:  # no participant could serve a verified state right now: try again
                    stranded = min(stranded, self.clock.monotonic())
                    if view.state == "done" and self.clock.monotonic() - stranded > spec.round_timeout_s:
                        logger.warning("job %s ended while this node was behind; none serves its state", record.job_id)
                        return  # a job that ended, whose participants all left: not forever
                    logger.warning("job %s: %s; retrying", record.job_id, e)
                    await self.clock.sleep(POLL_S)
                    continue
                stranded = math.inf
                if runner.completed >= spec.rounds:
                    break
                result = await runner.run_round()
                if record.job_id in self._halted and view.record.state != "cancelled":  # node stops, script left
                    logger.info("job %s: halted after %d rounds", record.job_id, runner.completed)
                    return
                if view.record.state == "cancelled":  # seen mid-round (the manager halted the local steps)
                    logger.info("job %s was cancelled; round %d abandoned", record.job_id, result.round)
                    await asyncio.to_thread(CheckpointStore(checkpoint_dir(self.home, record.job_id)).forget)
                    return
                await asyncio.sleep(0)  # state requests waiting for a round boundary are served here
                rounds.own.append(result)
                if result.ok:
                    self._checkpoint(view, runner, result.participants)
                decision = policy.after_round(result.ok, len(result.participants), result.paused)
                runner.expect(decision.expected_group)
                if decision.announce_pause:
                    logger.info("job %s paused: fewer than %d participants ready; retrying round %d",
                                record.job_id, spec.min_participants, runner.next_round)
                    await self.board.publish(self._progress(runner, result, "paused"))
                if decision.align:  # paused peers drifted apart: meet on the latest id
                    runner.align_round(meeting_round(runner.next_round, [
                        p.next_round for p in view.at_best
                        if p.round == runner.completed and p.model_hash == runner.model_hash]))
                if decision.resumed:
                    logger.info("job %s resumed", record.job_id)
                if decision.publish:
                    state = "done" if runner.completed == spec.rounds else "running"
                    await self.board.publish(self._progress(runner, result, state))
            if record.submitter == self.peer_id:
                view.record = record.replace(state="done", round=runner.completed, model_hash=runner.model_hash,
                                             participants=view.progress.participants if view.progress else (),
                                             updated_at=self.clock.time())
                await self.board.store_record(view.record)
            params, _, completed, _ = runner.snapshot()
            if record.job_id in self._writers:  # the last round's checkpoint on disk before the export
                await self._writers[record.job_id].flush()
            script = self.scripts.get(record.job_id)
            await asyncio.to_thread(self._write_export, self.home / "jobs" / record.job_id, view, params, completed,
                                    False, script.layout if script else None)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("job %s failed on this node", record.job_id)
        finally:
            if runner.completed < spec.rounds:  # a finished job's final state stays servable for late nodes
                self._runners.pop(record.job_id, None)
            await runner.stop()

    def model_holders(self, view: JobView) -> list[str]:
        """Who can serve a job's model folder: its submitter, then every node that announced taking part."""
        peers = [view.record.submitter, *view.holders, *(view.progress.participants if view.progress else ())]
        return [p for p in dict.fromkeys(peers) if p != self.peer_id]

    async def _fetch_model(self, view: JobView) -> bool:
        """A model folder job: fetch and verify its files (node/jobs/model_files.py), then check that the model
        takes the job's data; False after declining with the reason."""
        spec = view.record.spec
        try:
            folder = await self.models.ensure(spec.model.files, self.model_holders(view))
            cfg = await asyncio.to_thread(job_model_config, spec)
            short = await asyncio.to_thread(self._folder_shortfall, folder, spec, cfg)
        except (ModelFetchError, ValueError) as e:
            await self._decline(view, f"the job's model folder: {e}")
            return False
        if short:
            await self._decline(view, short)
            return False
        return True

    def _folder_shortfall(self, folder: pathlib.Path, spec, cfg: dict) -> str:
        """The memory check of a model folder job, now that its config is here (why_not could only size the
        weights): the training memory of its model (node/ml/analyze.py) on this node's device. With an adapter the
        base is frozen: its weights and the activations stay, its gradients and optimizer state do not."""
        seq = None if spec.data is None else min(spec.data.block_size, int(cfg["context"]))
        analysis = analyze_folder(folder, spec.batch_size, seq, task=spec.task)
        if spec.adapter is None:
            return self._shortfall(*job_memory(analysis, spec.precision, spec.inner.kind, spec.inner.momentum))
        memory = analysis.memory(spec.precision, spec.inner.kind, spec.inner.momentum)
        # the adapter's own vectors (host RAM, optimizer state) are a small fraction of the base's weights
        return self._shortfall(memory.weights + memory.activations + memory.workspace, 0)

    def _shortfall(self, on_device: int, on_host: int) -> str:
        """Why a job needing these bytes cannot train here: the device's free memory, then this node's limits."""
        short = memory_shortfall(self.device, on_device, on_host)
        return short or (self.memory_limit(on_device, on_host) if self.memory_limit is not None else "")

    async def _decline(self, view: JobView, reason: str) -> None:
        view.declined = reason[:MAX_REASON]
        logger.info("declining job %s: %s", view.job_id, view.declined)
        await self.board.decline(view.job_id, reason)

    def _metric(self, job_id: str) -> str:  # what progress and curve show: a script run's script's, else the model's
        runner = self._runners.get(job_id)
        return self.scripts[job_id].metric if job_id in self.scripts else runner.bundle.metric if runner else "accuracy"

    def _progress(self, runner: JobRunner, result: RoundResult, state: str) -> JobProgress:
        return JobProgress(
            runner.job_id, self.peer_id, runner.completed, runner.model_hash, state, result.participants,
            result.train_loss if result.ok and math.isfinite(result.train_loss) else None,
            (result.metrics or {}).get(self._metric(runner.job_id)),
            result.bytes_sent + result.bytes_received, result.seconds, self.clock.time(), runner.next_round,
            excluded=tuple(runner.excluded)[-MAX_EXCLUDED:], evidence=tuple(runner.excluded.values())[-MAX_EXCLUDED:])

    async def _resync_if_needed(self, view: JobView, runner: JobRunner) -> None:
        """Before a round: never contribute an update computed from parameters the swarm does not hold
        (joining mid-job or behind: download; left out of a round: wait for who moved on; outvoted: re-sync)."""
        if view.state == "done" or (view.progress and view.progress.round > runner.completed):
            await self._sync(view, runner)  # the others moved on without us: catch up, don't pollute
        elif not runner.completed and (start := script_runs.submitters_start(view, self.peer_id,
                                                                              runner.model_hash)):
            await self._sync(view, runner, want_hash=start)  # a script's own initial parameters: start from the run's
        elif not runner.in_sync:
            await self._catch_up_if_behind(view, runner)
        elif (majority := self._outvoted(view, runner)) is not None:
            logger.warning("job %s: this node's model after round %d differs from the other participants'; "
                           "re-syncing to %s...", view.record.job_id, runner.completed, majority[:12])
            await self._sync(view, runner, avoid_hash=runner.model_hash)

    def _outvoted(self, view: JobView, runner: JobRunner) -> str | None:
        reports = {p.writer: p.model_hash for p in view.at_best if p.round == runner.completed}
        own = self.rounds.get(view.job_id, Rounds()).own
        last = next((r.participants for r in reversed(own) if r.ok), ())
        return outvoted(runner.model_hash, reports, last, self.peer_id)

    async def _catch_up_if_behind(self, view: JobView, runner: JobRunner) -> None:
        """After a round this node missed (left out, or its loss was not finite): if another participant
        reports a later round within a round's time, download its state; if none does, nobody moved on."""
        deadline = self.clock.monotonic() + runner.spec.round_timeout_s
        while self.clock.monotonic() < deadline:
            if view.state == "done" or (view.progress and view.progress.round > runner.completed):
                await self._sync(view, runner)
                return
            await self.clock.sleep(POLL_S / 2)  # the manager's poll refreshes view.progress
        runner.in_sync = True

    # ---- checkpoints: a restart goes on from the last round on disk (node/jobs/federated/checkpoints.py) ---------

    def _checkpoint(self, view: JobView, runner: JobRunner, participants: tuple[str, ...]) -> None:
        """Hand the state just applied to the job's checkpoint writer: copied here, written in a worker thread."""
        params, momentum, completed, next_round = runner.snapshot()
        writer = self._writers.get(view.job_id)
        if writer is None:
            writer = self._writers[view.job_id] = CheckpointWriter(
                CheckpointStore(checkpoint_dir(self.home, view.job_id), clock=self.clock))
        now = self.rounds.get(view.job_id, Rounds())
        rounds, model_hash, record = Rounds(list(now.own), list(now.inherited)), runner.model_hash, view.record

        def make() -> Checkpoint:  # in the writer's thread: a long job's round report is built off the event loop
            return Checkpoint(view.job_id, completed, next_round, model_hash, params, momentum, tuple(participants),
                              rounds.report(self.peer_id), record)

        writer.submit(make)

    async def _resume(self, view: JobView, runner: JobRunner, rounds: Rounds) -> Checkpoint | None:
        """Adopt this node's newest valid checkpoint of the job, if it has one (restarted after a kill or a power
        cut): the job goes on from the last round this node applied, not from round 0."""
        store = CheckpointStore(checkpoint_dir(self.home, view.job_id), clock=self.clock)
        try:
            ckpt = await asyncio.to_thread(store.load_latest, runner.params.size)
        except OSError as e:  # an unreadable checkpoint folder: start as a joiner would
            logger.warning("job %s: cannot read its checkpoints: %s", view.job_id, e)
            return None
        if ckpt is None or ckpt.completed <= runner.completed:
            return None
        try:
            runner.load_state(ckpt.params, ckpt.momentum, ckpt.completed, ckpt.next_round, ckpt.model_hash)
        except ValueError as e:  # e.g. the job's outer optimizer keeps no momentum but the checkpoint has one
            logger.warning("job %s: checkpoint of round %d not usable: %s", view.job_id, ckpt.completed, e)
            return None
        rounds.inherited = merge_history(rounds.inherited, ckpt.history)
        logger.info("job %s: resumed from this node's checkpoint at round %d (hash %s..., next round id %d)",
                    view.job_id, ckpt.completed, ckpt.model_hash[:12], ckpt.next_round)
        return ckpt

    async def _await_survivors(self, view: JobView, runner: JobRunner, last_members: int) -> None:
        """Before a resumed node's first round: wait, one round timeout at most, until the members of its last round
        are back on the board or one of them is ahead (checkpoints.py survivors_back; the manager's poll refreshes
        the view), so that nodes one round apart converge on the later round instead of forking."""
        deadline = self.clock.monotonic() + runner.spec.round_timeout_s
        while not survivors_back(view.takers, last_members, view.progress.round if view.progress else 0,
                                 runner.completed):
            if self.clock.monotonic() >= deadline:
                logger.info("job %s: %d of the last round's %d members are back; going on", view.job_id,
                            view.takers, last_members)
                return
            await self.clock.sleep(POLL_S / 2)

    async def _restore_records(self, records: list[JobRecord]) -> None:
        """After a restart: put back on the board the unfinished jobs this node submitted (after a whole-swarm power
        cut no DHT copy of their records is left, and only the submitter's key can sign one), until the board shows
        each; a record still on the board (cancelled or done since the checkpoint) is never overwritten."""
        pending = {r.job_id: r for r in records}
        while pending:
            try:
                await self.board.refresh()
                for job_id, record in list(pending.items()):
                    if job_id in self.board.views:
                        del pending[job_id]
                    elif await self.board.store_record(record):
                        logger.info("job %s: its record is back on the board (from this node's checkpoint)", job_id)
            except Exception as e:  # a DHT hiccup: try again at the next poll
                logger.warning("restoring job records failed: %s", e)
            await self.clock.sleep(POLL_S)

    # ---- state transfer ----------------------------------------------------------------------------------

    async def _state_of(self, job_id: str) -> JobState | None:
        """A job's current global state (between rounds, so the requester can join the next one), then this
        node's report of the rounds so far; None if this node holds no state of it."""
        runner, view = self._runners.get(job_id), self.board.views.get(job_id)
        if runner is None or view is None:
            return None
        try:  # best effort: fresh state (a script's local steps may outlast it; the last boundary's is consistent)
            await asyncio.wait_for(runner.idle.wait(), runner.spec.round_timeout_s)
        except TimeoutError:
            pass
        params, momentum, completed, next_round = runner.snapshot()
        report = self.rounds.get(job_id, Rounds()).report(self.peer_id)
        return JobState(completed, next_round, params, momentum, history_to_json(report))

    async def _serve_state(self, stream) -> None:
        await serve_job_state(stream, self._state_of)

    async def _download(self, view: JobView, size: int, timeout: float, avoid_hash: str | None = None,
                        want_hash: str | None = None):
        """(header, state, history) from the first participant that serves a state whose hash checks out, both
        against the bytes and against the signed progress the swarm published for that round; RuntimeError
        naming every peer's failure if none does."""
        candidates = [*view.holders, *(view.progress.participants if view.progress else ())]
        peers = [p for p in dict.fromkeys(candidates) if p != self.peer_id]

        def check(header: StateHeader) -> None:
            if header.model_hash == avoid_hash:
                raise WireError(f"serves the model {avoid_hash[:12]}... this node is moving away from")
            if want_hash is not None and header.model_hash != want_hash:
                raise WireError(f"serves the model {header.model_hash[:12]}..., not {want_hash[:12]}...")
            announced = {h for r, h in view.announced if r == header.completed}
            if announced and header.model_hash not in announced:
                raise WireError(f"model hash for round {header.completed} differs from the swarm's signed progress")

        errors = []
        for peer in peers:
            try:
                header, state = await fetch_job_state(self.p2p, peer, self.board.swarm, view.job_id, size, timeout,
                                                      check)
                history = history_from_json(state.history) if state.history else []
                return header, state, history
            except Exception as e:  # try the next participant
                errors.append(f"{peer[-8:]}: {type(e).__name__}: {e}")
        raise RuntimeError(f"could not download the state of job {view.job_id}: {'; '.join(errors) or 'no peers'}")

    async def _sync(self, view: JobView, runner: JobRunner, avoid_hash: str | None = None,
                    want_hash: str | None = None) -> None:
        """Adopt the current state of a participant; raise if none can provide a verified one."""
        header, state, history = await self._download(view, runner.params.size, runner.spec.round_timeout_s * 2,
                                                      avoid_hash, want_hash)
        runner.load_state(state.params, state.momentum, header.completed, header.next_round, header.model_hash)
        rounds = self.rounds.setdefault(view.job_id, Rounds())
        rounds.inherited = merge_history(rounds.inherited, history)
        logger.info("job %s: synced to round %d (hash %s...)", view.job_id, header.completed, header.model_hash[:12])
        self._checkpoint(view, runner, view.progress.participants if view.progress else ())

    # ---- export ------------------------------------------------------------------------------------------

    async def export(self, view: JobView, out: pathlib.Path, merge: bool = False) -> list[pathlib.Path]:
        """Write the job's current model, manifest, report and curve under ``out``: from this node's own copy
        if it takes part, else downloaded from a participant and checked like a joiner's (a model folder job's
        files too). ``merge``: an adapter job's merged model as well (node/ml/hf_models.py export_files)."""
        if merge and view.record.spec.adapter is None:
            raise NodeError(f"--merge: job {view.job_id} trains no adapter; its export is the whole model")
        layout = None
        if view.record.spec.model.arch in ("hf", "script"):
            try:
                folder = await self.models.ensure(view.record.spec.model.files, self.model_holders(view))
                layout = await asyncio.to_thread(script_runs.script_layout, view.record.spec, folder)
            except (ModelFetchError, ValueError) as e:
                raise NodeError(f"the job's model folder: {e}") from None
        runner = self._runners.get(view.job_id)
        if runner is not None:
            params, _, completed, _ = runner.snapshot()
        else:
            if view.progress is None:
                raise NodeError(f"job {view.job_id} has no participant yet: nothing to export")
            size = layout.size if layout else flatten_params(build_job_model(view.record.spec).module).size
            try:
                header, state, history = await self._download(view, size, view.record.spec.round_timeout_s * 2)
            except RuntimeError as e:
                raise NodeError(str(e)) from None
            rounds = self.rounds.setdefault(view.job_id, Rounds())
            params, completed = state.params, header.completed
            rounds.inherited = merge_history(rounds.inherited, history)
        return await asyncio.to_thread(self._write_export, out, view, params, completed, merge, layout)

    def _write_export(self, out: pathlib.Path, view: JobView, params: np.ndarray, completed: int,
                      merge: bool = False, layout: script_runs.ParameterLayout | None = None) -> list[pathlib.Path]:
        rounds = self.rounds.get(view.job_id, Rounds())
        if layout is not None:  # a script's run: its parameters under the script's names
            return export_job(out, view.record, layout.tensors_of(params), params_hash(params), completed,
                              sum(r.ok for r in rounds.own), rounds.report(self.peer_id), self._metric(view.job_id),
                              before_write=self.export_hook)
        bundle = build_job_model(view.record.spec)
        load_flat_params(bundle.module, params)
        folder = export_files(bundle.module, merge) if view.record.spec.model.arch == "hf" else None
        return export_job(out, view.record, bundle.module, params_hash(params), completed,
                          sum(r.ok for r in rounds.own), rounds.report(self.peer_id), bundle.metric, folder,
                          before_write=self.export_hook)

    def export_unfinished(self, view: JobView) -> bool:
        """True if this node's own export of a finished job was interrupted (SIGKILL, power cut): its folder
        under the home is there, its manifest (written last) is not."""
        folder = self.home / "jobs" / view.job_id
        return view.record.spec.kind == "federated" and folder.is_dir() and not (folder / "manifest.json").exists()

    async def redo_export(self, view: JobView) -> None:
        """Redo an interrupted export (node/jobs/federated/export.py export_job clears the torn ``.tmp`` files):
        from the job's final state, downloaded and checked as ``swarmnode job ID --export`` does; retried until a
        participant serves it."""
        folder = self.home / "jobs" / view.job_id
        logger.warning("job %s: the export in %s was interrupted; redoing it", view.job_id, folder)
        while True:
            try:
                await self.export(view, folder)
                logger.info("job %s: export redone in %s", view.job_id, folder)
                return
            except (NodeError, OSError, ValueError) as e:
                logger.warning("job %s: cannot redo the export yet: %s", view.job_id, e)
            await self.clock.sleep(REDO_EXPORT_RETRY_S)
