"""The daemon's jobs: submit them, find them on the board, hand each to its kind, decline, cancel, export.

    manager = JobManager(p2p, dht, swarm, peer_id, home, data_dir, key=key, peers=membership.peers)
    await manager.start()                      # polls the board every POLL_S; serves what the kinds serve
    job_id = await manager.submit(toml, "job.toml")
    await manager.stop()

Every POLL_S the manager reads the swarm's jobs (node/jobs/board.py JobBoard) and hands each running job it has
not decided on yet to its kind: node/jobs/federated/federated_jobs.py FederatedJobs (kind = "federated") or
node/jobs/pipeline/pipeline_jobs.py PipelineJobs (kind = "pipeline") or node/jobs/serve/serve_jobs.py ServeJobs
(kind = "serve"). The kind says whether this node can
take part (``why_not``); if it cannot, the manager publishes the node's signed decline with the reason
(``swarmnode jobs`` on this node shows it with a hint), else it runs the kind's ``run(view)`` as a task
until the job ends.

Before asking the kind, the manager applies the node owner's rule (node/jobs/policy.py JobLimits): whose jobs
it runs (accept_jobs_from), how many at once (max_jobs: a job declined for that is considered again once a
slot frees, its later progress replacing the decline), how long a job may be (max_job_steps, max_job_hours:
a job still running here after max_job_hours is left, with a decline saying so); the kind applies the per-job
memory bound (max_job_memory, gpu_memory_fraction) to its own estimate.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import secrets
import tempfile
from collections.abc import Awaitable, Callable
from typing import Protocol

import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from node.jobs.board import POLL_S, JobBoard, JobView
from node.jobs.federated.checkpoints import checkpoint_dir
from node.jobs.federated.federated_jobs import FederatedJobs
from node.jobs.federated.script_runs import ParameterLayout, ScriptBridge, canonical, is_script_run, script_layout
from node.jobs.pipeline.pipeline_jobs import PipelineJobs
from node.jobs.policy import JobLimits, concurrency_refusal, job_refusal, memory_refusal
from node.jobs.serve.serve_jobs import ServeJobs
from node.jobs.spec import job_spec_from_text
from node.ml.job_model import job_model_config
from node.ml.model_folder import folder_manifest
from node.runtime.device import device_label, memory_of
from node.runtime.errors import EXIT_USAGE, NodeError
from protocol.allreduce.rounds import RoundHooks
from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.records.job_records import JobRecord
from protocol.records.job_spec import SCRIPT_LAYOUT, JobSpec

logger = logging.getLogger(__name__)


class JobKind(Protocol):
    """What the manager needs of a kind of job (FederatedJobs, PipelineJobs)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def why_not(self, view: JobView) -> tuple[str, str]:
        """("", "") to take part; else (the reason this node tells the swarm, a hint for its own user)."""
        ...

    async def run(self, view: JobView) -> None: ...

    def local_state(self, job_id: str) -> tuple[int, str] | None: ...

    async def export(self, view: JobView, out: pathlib.Path, merge: bool = False) -> list[pathlib.Path]: ...


class JobManager:
    def __init__(self, p2p: P2P, dht: DHTNode, swarm: str, peer_id: str, home: pathlib.Path,
                 data_dir: pathlib.Path, bandwidth: float = 12.5e6, hooks: RoundHooks | None = None,
                 after_round=None, key=None, peers: Callable[[], Awaitable[list]] | None = None,
                 clock: Clock = SYSTEM_CLOCK, device: torch.device | None = None, limits: JobLimits | None = None,
                 is_member: Callable[[str], Awaitable[bool]] | None = None, admit: Callable[[str], bool] | None = None,
                 private: bool = False, http: tuple[str, int] = ("127.0.0.1", 0)):
        self.board = JobBoard(dht, swarm, peer_id, clock)
        self.peer_id, self.clock, self.home = peer_id, clock, home
        device = torch.device("cpu") if device is None else device  # where this node trains (the daemon's --device)
        # the node owner's rule (node/jobs/policy.py); is_member: whether a submitter is a member of the swarm
        # (node/runtime/admission.py); admit, private: the private swarm's admission rule, applied to every round
        self.limits, self.is_member, self.private = limits or JobLimits(), is_member, private
        total = memory_of(device)[1] if self.limits.gpu_memory_fraction else 0
        memory_limit = lambda on_device, on_host: memory_refusal(  # noqa: E731
            self.limits, on_device, on_host, device.type, total, device_label(device))
        self.federated = FederatedJobs(p2p, self.board, home, data_dir, bandwidth, hooks, after_round, clock,
                                       device=device, admit=admit, memory_limit=memory_limit)
        self.pipeline = PipelineJobs(p2p, self.board, home, data_dir, key, peers, clock, device=device,
                                     models=self.federated.models)
        self.serve = ServeJobs(self.pipeline, http, clock, device=device)
        self.kinds: dict[str, JobKind] = {"federated": self.federated, "pipeline": self.pipeline, "serve": self.serve}
        self._tasks: dict[str, asyncio.Task] = {}
        self._poller: asyncio.Task | None = None
        self.running: set[str] = set()  # jobs this node takes part in (accepted and not ended): max_jobs counts them
        self._busy: set[str] = set()  # jobs declined only because max_jobs were running: considered again later

    @property
    def views(self) -> dict[str, JobView]:
        return self.board.views

    async def start(self) -> None:
        for kind in self.kinds.values():
            await kind.start()
        self._poller = asyncio.create_task(self._poll_forever(), name="jobs-poll")

    def halt(self) -> None:
        """The node is stopping: local training stops at its next step (stop() then ends every job's task)."""
        self.federated.halt()

    async def stop(self) -> None:
        self.halt()
        tasks = [t for t in [self._poller, *self._tasks.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for kind in self.kinds.values():
            await kind.stop()

    # ---- what the control API calls ----------------------------------------------------------------------

    async def submit(self, toml_text: str, source: str) -> str:
        def model_folder(path: str):  # [model] path, relative to the job file; read and hashed off the event loop,
            folder = pathlib.Path(source).expanduser().parent / pathlib.Path(path).expanduser()
            files = folder_manifest(folder)
            try:  # then linked (or copied) into this node's model store, which serves it (node/jobs/model_files.py)
                self.federated.models.put(folder, files)
            except OSError as e:
                raise ValueError(f"model.path: cannot put {folder} into this node's model store: "
                                 f"{e.strerror or e}") from None
            return files

        spec = await asyncio.to_thread(job_spec_from_text, toml_text, source, None, model_folder)  # NodeError if bad
        try:
            if spec.kind != "serve":  # (a served model has no data: ServeJobs.prepare checks its model)
                job_model_config(spec)  # unknown dataset or config name, a model that cannot take the data: here
        except ValueError as e:
            raise NodeError(f"{source}: {e}", EXIT_USAGE) from None
        nonce = secrets.token_hex(8)
        assignment = None  # where other nodes host the stages of a pipeline job or a served model
        if spec.kind == "pipeline":
            assignment = await self.pipeline.prepare(spec, nonce, source)
        elif spec.kind == "serve":
            assignment = await self.serve.prepare(spec, nonce, source)
        record = JobRecord.create(spec, self.peer_id, nonce, self.clock.time(), assignment)
        if not await self.board.store_record(record):
            raise NodeError("the job could not be stored in the DHT (no peer accepted it)")
        self.board.views[record.job_id] = JobView(record)
        logger.info("submitted job %s (%s)", record.job_id, spec.name)
        return record.job_id

    async def cancel(self, job_id: str) -> bool:
        view = await self._view(job_id)
        if view.record.submitter != self.peer_id:
            raise NodeError(f"only the submitter ({view.record.submitter}) can cancel job {job_id}", EXIT_USAGE)
        view.record = view.record.replace(state="cancelled", updated_at=self.clock.time())
        self.federated.halt(job_id)  # this node's own local steps stop now; the others' at their next poll
        return await self.board.store_record(view.record)

    async def refresh(self) -> None:
        await self.board.refresh()

    # ---- script runs (node/jobs/federated/script_runs.py; swarmnode.Optimizer calls these) ----------------------

    def _script_run(self, name: str) -> str | None:
        """The running run of this name; else one that ended while this node (restarted) was away from it."""
        runs = {j: v for j, v in self.board.views.items()
                if is_script_run(v.record.spec) and v.record.spec.name == name}
        return (canonical(j for j, v in runs.items() if v.state in ("running", "paused")) or
                canonical(j for j, v in runs.items() if v.state == "done" and checkpoint_dir(self.home, j).is_dir()))

    async def join_script_run(self, spec: JobSpec, layout: ParameterLayout, bridge: ScriptBridge) -> JobView:
        """Take part in the running script run named ``spec.name`` (stored from ``spec`` if there is none), its local
        steps the script's through ``bridge``; NodeError (one line) if the run trains a model of another layout."""
        def put() -> None:  # this node serves the layout file, like a model folder (node/jobs/model_files.py)
            self.federated.models.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.federated.models.root) as tmp:
                (pathlib.Path(tmp) / SCRIPT_LAYOUT).write_bytes(layout.to_bytes())
                self.federated.models.put(tmp, (layout.file,))

        await asyncio.to_thread(put)
        await self.board.refresh()
        job_id = self._script_run(spec.name)
        if job_id is None:
            record = JobRecord.create(spec, self.peer_id, secrets.token_hex(8), self.clock.time())
            if not await self.board.store_record(record):
                raise NodeError("the run could not be stored in the DHT (no peer accepted it)")
            self.board.views[record.job_id] = JobView(record)
            logger.info("started run %r (job %s)", spec.name, record.job_id)
            await self.clock.sleep(2 * POLL_S)  # another script starting the same run id now: one of them stays
            await self.board.refresh()
            job_id = self._script_run(spec.name) or record.job_id
            if job_id != record.job_id:
                logger.info("run %r: job %s was stored at the same time; withdrawing %s", spec.name, job_id,
                            record.job_id)
                await self.board.store_record(record.replace(state="cancelled", updated_at=self.clock.time()))
        view = self.board.views[job_id]
        theirs = view.record.spec.model.files[0]
        if theirs != layout.file:
            try:
                jobs = self.federated
                folder = await jobs.models.ensure(view.record.spec.model.files, jobs.model_holders(view))
                other = await asyncio.to_thread(script_layout, view.record.spec, folder)
                why = other.difference(layout) if other is not None else ""
            except (RuntimeError, ValueError, OSError) as e:
                why = f"its layout file (sha256 {theirs.sha256[:12]}...) differs from this script's ({e})"
            raise NodeError(f"run {spec.name!r} (job {job_id}) trains another model: {why}", EXIT_USAGE)
        self.federated.scripts[job_id] = bridge
        if job_id in self._tasks and view.declined:  # considered before the script attached: again
            self._tasks.pop(job_id)
            view.declined = ""
        return view

    async def leave_script_run(self, job_id: str) -> None:
        """The script stops training in the run: its node's rounds end (no update leaves after this)."""
        bridge = self.federated.scripts.get(job_id)
        self.federated.halt(job_id)
        if bridge is not None:
            bridge.end("the script left the run")
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.wait({task}, timeout=5.0)
        self.federated.scripts.pop(job_id, None)

    def local_state(self, job_id: str) -> tuple[int, str] | None:
        """(rounds completed, model hash) of this node's own copy of a job's model, if it takes part (a pipeline
        job: steps, and the hash of the stage held here)."""
        view = self.board.views.get(job_id)
        kind = self.kinds.get(view.record.spec.kind) if view is not None else None
        return None if kind is None else kind.local_state(job_id)

    async def export(self, job_id: str, out: pathlib.Path, merge: bool = False) -> list[pathlib.Path]:
        """Write the job's current model, manifest, report and curve under ``out`` (the kind says how); ``merge``:
        an adapter job's merged model too."""
        view = await self._view(job_id)
        return await self.kinds[view.record.spec.kind].export(view, out, merge=merge)

    async def _view(self, job_id: str) -> JobView:
        await self.board.refresh()
        view = self.board.views.get(job_id)
        if view is None:
            raise NodeError(f"no job {job_id} in this swarm", EXIT_USAGE)
        return view

    # ---- taking part ---------------------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception as e:  # a failed poll must not end the node's job service
                logger.warning("job poll failed: %s", e)
            await self.clock.sleep(POLL_S)

    async def poll(self) -> None:
        """Read the board and consider every running job not decided on yet; halt the local training of a job
        cancelled since; redo this node's export of a finished job that a kill interrupted."""
        await self.board.refresh()
        for job_id in list(self._busy):  # declined while max_jobs ran: again, once a slot is free
            view = self.board.views[job_id]
            if view.state not in ("running", "paused") or not concurrency_refusal(self.limits, len(self.running)):
                self._busy.discard(job_id)
                if self._tasks.pop(job_id, None) is not None and view.state in ("running", "paused"):
                    view.declined = ""
        for job_id, view in list(self.board.views.items()):
            if is_script_run(view.record.spec) and job_id not in self.federated.scripts:
                continue  # only the scripts running it take part; daemons neither run nor decline it
            active = view.state in ("running", "paused") or job_id in self.federated.scripts  # a script's: to its end
            if active and job_id not in self._tasks and not view.declined:
                self._consider(view)
            elif view.state == "cancelled" and job_id in self._tasks:
                self.federated.halt(job_id)
            elif view.state == "done" and job_id not in self._tasks and self.federated.export_unfinished(view):
                self._tasks[job_id] = asyncio.create_task(self.federated.redo_export(view), name=f"export-{job_id}")

    def _consider(self, view: JobView) -> None:
        self._tasks[view.job_id] = asyncio.create_task(self._decide(view), name=f"job-{view.job_id}")

    async def _decide(self, view: JobView) -> None:
        """Apply the node owner's rule (node/jobs/policy.py), then ask the job's kind whether this node can take
        part (off the event loop: it reads this node's data and sizes the model); decline with the reason or
        run the job, within max_job_hours."""
        kind, record = self.kinds[view.record.spec.kind], view.record
        member = record.submitter == self.peer_id or ("members" in self.limits.accept_from and
                                                       self.is_member is not None and
                                                       await self.is_member(record.submitter))
        reason, hint = job_refusal(self.limits, record.spec, record.submitter, self.peer_id, member,
                                   len(self.running), self.private), ""
        if view.job_id in self.federated.scripts:  # the node's own script asked to train in it
            reason = ""
        if reason and concurrency_refusal(self.limits, len(self.running)) == reason:
            self._busy.add(view.job_id)
        if not reason:
            self.running.add(view.job_id)  # counted before the await: jobs deciding at once share max_jobs
            reason, hint = await asyncio.to_thread(kind.why_not, view)
        if reason:
            self.running.discard(view.job_id)
            await self._decline(view, reason, hint)
            return
        try:
            if not await self._run_within(kind, view):
                hours = self.limits.max_job_hours
                self.federated.halt(view.job_id)
                await self._decline(view, f"left the job after {hours:g} h on this node (max_job_hours = {hours:g})")
        except Exception as e:  # a bug or a ruined model: say so, loudly, instead of a job task dying in silence
            logger.exception("job %s failed on this node", view.job_id)
            self.federated.halt(view.job_id)
            await self._decline(view, f"this node's run of the job failed: {type(e).__name__}: {e}")
        finally:
            self.running.discard(view.job_id)

    async def _decline(self, view: JobView, reason: str, hint: str = "") -> None:
        view.declined = f"{reason}{'; ' + hint if hint else ''}"
        logger.info("declining job %s: %s", view.job_id, view.declined)
        await self.board.decline(view.job_id, reason)

    async def _run_within(self, kind: JobKind, view: JobView) -> bool:
        """Run the job on this node; False if max_job_hours ran out first (its run is cancelled)."""
        limit = self.limits.max_job_seconds
        if limit is None:
            await kind.run(view)
            return True
        run = asyncio.ensure_future(kind.run(view))
        timer = asyncio.ensure_future(self.clock.sleep(limit))
        try:
            done, _ = await asyncio.wait({run, timer}, return_when=asyncio.FIRST_COMPLETED)
            if run in done:
                run.result()
                return True
            logger.warning("job %s ran past max_job_hours (%g h) on this node: leaving it", view.job_id,
                           self.limits.max_job_hours)
            return False
        finally:
            for task in (run, timer):
                task.cancel()
            await asyncio.gather(run, timer, return_exceptions=True)
