"""A federated job's per-round checkpoints on this node's disk, and the rule by which a swarm resumes from them.

    store = CheckpointStore(checkpoint_dir(home, job_id))   # <home>/checkpoints/<job_id>/
    store.write(Checkpoint(job_id, completed, next_round, model_hash, params, momentum))   # atomic, then prunes
    latest = store.load_latest(size)                        # the newest checkpoint that verifies, or None
    writer = CheckpointWriter(store); writer.submit(ckpt)   # federated_jobs.py, after each applied round
    records = unfinished_records(home, peer_id)             # jobs this node submitted, to put back on the board

Layout: a folder per checkpoint, ``<seq>.c<completed>`` (seq counts writes: the newest sorts last), holding
params.f32 (the global model, little-endian float32), momentum.f32 (outer momentum, if any), history.json (this
node's round report), record.bin (the job record's wire form) and manifest.json: round numbers, model hash, the
last round's members and every other file's sha256. Each file is written by node/runtime/files.py atomic_write
(temporary file, fsync, rename, fsync the folder), the manifest last: a folder without one is a torn write. The
newest KEEP complete checkpoints stay; older and torn ones go after each write. They sit beside the job's export
folder (<home>/jobs/<id>), not in it: there a folder without manifest.json is an export to redo. Loading verifies
first (the manifest parses and names the job, every sha256 matches, params_hash of the parameters equals the
recorded model hash, sizes fit the model); a checkpoint that fails is skipped with a one-line logged reason and
the next older one is tried.

Resuming after a whole-swarm power cut (every participant killed at once, the DHT's records with them):
  * each node adopts its own newest valid checkpoint (JobRunner.load_state) and at once publishes signed progress
    for that round and model hash; the submitter, whose key alone signs the job record, stores the record from its
    checkpoint again (unfinished_records), which puts the job back on everyone's board;
  * nodes may stand one round apart: a kill can land between two members' applies of a round, or between an
    apply and its checkpoint. The job resumes from the LATEST round any survivor has on disk (so never before the
    last round all of them completed): a node behind sees the later round on the board and downloads that state
    from the node ahead through the existing re-sync path (federated_jobs.py _resync_if_needed), checked against
    its sha256 and the signed progress. Rolling everyone back to the common round would discard a round the swarm
    completed; and since a round id carries the model hash (``<job>/r<id>/<hash>``), a node behind never
    averages with one ahead by mistake;
  * a resumed node waits (one round timeout at most) before its first round until every member of its last round
    is back on the board or one announced a later round (``survivors_back``): two nodes behind must not redo a
    round between themselves while a third that applied it is still starting (were they to, the outvote rule in
    protocol/planning/round_policy.py would still bring all three to one model, at the cost of that round's work).
A round applied in memory whose checkpoint had not reached the disk when the power went counts as not completed:
every node resumes from its disk. The error-feedback residual and the data order are not checkpointed: the
residual restarts at zero, as a joiner's does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import pathlib
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from node.jobs.federated.export import history_from_json, history_to_json
from node.runtime.files import atomic_write, fsync_dir
from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.records.job_records import JobRecord, job_record_from_wire, job_record_to_wire
from protocol.transfer.job_state import params_hash
from protocol.wire import WireError

logger = logging.getLogger(__name__)
KEEP = 3  # checkpoints kept per job: the newest, and two to fall back to if it is torn or corrupt
FORMAT = 1
STEPS = PARAMS, MOMENTUM, HISTORY, RECORD, MANIFEST = (  # the files, in the order of the writes (manifest last)
    "params.f32", "momentum.f32", "history.json", "record.bin", "manifest.json")
_FOLDER = re.compile(r"^(\d{8})\.c(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why in one line."""


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """One node's state of one job as of a round boundary."""

    job_id: str
    completed: int  # rounds applied: params are the global model after them
    next_round: int  # the round id to run next
    model_hash: str  # params_hash(params)
    params: np.ndarray  # (N,) float32
    momentum: np.ndarray | None = None  # (N,) float32 outer momentum, if the outer optimizer keeps one
    participants: tuple[str, ...] = ()  # members of the last applied round (who to wait for on resume)
    history: list[dict] = field(default_factory=list)  # this node's round report so far
    record: JobRecord | None = None  # the job record (the submitter stores it again after a power cut)


def checkpoint_dir(home: pathlib.Path, job_id: str) -> pathlib.Path:
    return pathlib.Path(home) / "checkpoints" / job_id


def survivors_back(takers: int, last_members: int, best_round: int, own_completed: int) -> bool:
    """May a node that resumed from a checkpoint run its first round? Yes once as many nodes announced themselves
    on the board (``takers``) as the last round it applied had members, or once a node announced a later round
    than its own (it will download that state first). The caller gives up waiting after one round timeout."""
    return takers >= last_members or best_round > own_completed


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointStore:
    """The checkpoints of one job in ``root`` (see the module docstring). ``before_write`` (fault injection for
    tests) is called with each step's name (STEPS) before that write."""

    def __init__(self, root: pathlib.Path, keep: int = KEEP, clock: Clock = SYSTEM_CLOCK,
                 before_write: Callable[[str], None] | None = None):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root, self.keep, self.clock, self.before_write = pathlib.Path(root), keep, clock, before_write

    def folders(self) -> list[pathlib.Path]:
        """Every checkpoint folder, complete or torn, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _FOLDER.match(p.name))]
        return [p for _, p in sorted(found)]

    def write(self, ckpt: Checkpoint) -> pathlib.Path:
        """Write ``ckpt`` as a new checkpoint (each file atomically, the manifest last), then prune; its folder."""
        params = np.ascontiguousarray(ckpt.params, "<f4")
        if params.ndim != 1 or ckpt.params.dtype != np.float32:
            raise ValueError("params must be a flat float32 vector")
        if ckpt.momentum is not None and (ckpt.momentum.shape != params.shape or ckpt.momentum.dtype != np.float32):
            raise ValueError("momentum must be float32 of the params' shape")
        # memoryviews, not tobytes() copies: hashing and writing them release the GIL (the loop keeps running)
        contents: dict[str, bytes | memoryview] = {PARAMS: params.data.cast("B"),
                                                   HISTORY: history_to_json(list(ckpt.history))}
        if ckpt.momentum is not None:
            contents[MOMENTUM] = np.ascontiguousarray(ckpt.momentum, "<f4").data.cast("B")
        if ckpt.record is not None:
            contents[RECORD] = job_record_to_wire(ckpt.record)
        digests = {name: _sha256(data) for name, data in contents.items()}
        if digests[PARAMS] != ckpt.model_hash:  # the same sha256 as params_hash
            raise ValueError("params do not hash to the checkpoint's model hash")
        existing = self.folders()
        seq = int(existing[-1].name[:8]) + 1 if existing else 1
        folder = self.root / f"{seq:08d}.c{ckpt.completed}"
        new_root = not self.root.is_dir()
        folder.mkdir(parents=True)
        fsync_dir(self.root)  # the new folder's own entry (and the job's folder's, the first time)
        if new_root:
            fsync_dir(self.root.parent)
        for name in STEPS[:-1]:
            if name in contents:
                self._step(name)
                atomic_write(folder / name, contents[name])
        manifest = {
            "format": FORMAT, "job_id": ckpt.job_id, "completed": ckpt.completed, "next_round": ckpt.next_round,
            "model_hash": ckpt.model_hash, "size": int(params.size), "participants": list(ckpt.participants),
            "written_at": self.clock.time(), "files": digests,
        }
        self._step(MANIFEST)
        atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
        self.prune()
        return folder

    def _step(self, name: str) -> None:
        if self.before_write is not None:
            self.before_write(name)

    def prune(self) -> list[pathlib.Path]:
        """Keep the newest ``keep`` complete checkpoints; remove older ones and torn ones (no manifest); return what
        went. Called after each write, so never while a write of this store is under way."""
        complete = [p for p in self.folders() if (p / MANIFEST).is_file()]
        kept = set(complete[-self.keep:])
        gone = [p for p in self.folders() if p not in kept]
        for path in gone:
            shutil.rmtree(path, ignore_errors=True)
        return gone

    def forget(self) -> None:
        """Remove every checkpoint of the job (it was cancelled: it must never resume)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def load(self, folder: pathlib.Path, size: int | None = None) -> Checkpoint:
        """The checkpoint in ``folder``, verified (see the module docstring); CheckpointError saying why not."""
        try:
            manifest = json.loads((folder / MANIFEST).read_bytes())
        except FileNotFoundError:
            raise CheckpointError("no manifest: its write was interrupted") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"unreadable manifest: {type(e).__name__}") from None
        try:
            job_id, completed, next_round, model_hash, n, files, participants = (
                str(manifest["job_id"]), int(manifest["completed"]), int(manifest["next_round"]),
                str(manifest["model_hash"]), int(manifest["size"]), dict(manifest["files"]),
                tuple(str(p) for p in manifest["participants"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"malformed manifest: {type(e).__name__} {e}") from None
        if manifest.get("format") != FORMAT or job_id != self.root.name:
            raise CheckpointError(f"manifest of format {manifest.get('format')!r} for job {job_id}: expected "
                                  f"format {FORMAT} for {self.root.name}")
        if size is not None and n != size:
            raise CheckpointError(f"{n} parameters, the job's model has {size}")
        if PARAMS not in files or HISTORY not in files:
            raise CheckpointError("manifest lists no parameters or history")
        blobs = {}
        for name, digest in files.items():
            if name not in STEPS[:-1]:
                raise CheckpointError(f"manifest lists an unknown file {name!r}")
            try:
                blobs[name] = (folder / name).read_bytes()
            except OSError as e:
                raise CheckpointError(f"{name}: {e.strerror or type(e).__name__}") from None
            if _sha256(blobs[name]) != digest:
                raise CheckpointError(f"{name}: sha256 does not match the manifest (torn or corrupt)")
        if len(blobs[PARAMS]) != 4 * n or (MOMENTUM in blobs and len(blobs[MOMENTUM]) != 4 * n):
            raise CheckpointError(f"parameter files do not hold {n} float32 values")
        params = np.frombuffer(blobs[PARAMS], "<f4").astype(np.float32)
        if params_hash(params) != model_hash:
            raise CheckpointError("parameters do not hash to the recorded model hash")
        momentum = np.frombuffer(blobs[MOMENTUM], "<f4").astype(np.float32) if MOMENTUM in blobs else None
        try:
            history = history_from_json(blobs[HISTORY])
            record = job_record_from_wire(blobs[RECORD]) if RECORD in blobs else None
        except (ValueError, WireError) as e:
            raise CheckpointError(str(e)) from None
        if record is not None and record.job_id != job_id:
            raise CheckpointError(f"its job record is of job {record.job_id}")
        return Checkpoint(job_id, completed, next_round, model_hash, params, momentum, participants, history, record)

    def load_latest(self, size: int | None = None) -> Checkpoint | None:
        """The newest checkpoint that verifies; each one skipped on the way is logged with its reason."""
        for folder in reversed(self.folders()):
            try:
                return self.load(folder, size)
            except CheckpointError as e:
                logger.warning("job %s: checkpoint %s skipped: %s", self.root.name, folder.name, e)
        return None

    def latest_record(self) -> tuple[JobRecord, int] | None:
        """(job record, rounds completed) of the newest checkpoint whose manifest and record file check out,
        without reading its parameters: what a restarted submitter needs to put the job back on the board."""
        for folder in reversed(self.folders()):
            try:
                manifest = json.loads((folder / MANIFEST).read_bytes())
                blob = (folder / RECORD).read_bytes()
                if _sha256(blob) != manifest["files"][RECORD]:
                    continue
                return job_record_from_wire(blob), int(manifest["completed"])
            except (OSError, ValueError, KeyError, TypeError, WireError):
                continue
        return None


def unfinished_records(home: pathlib.Path, peer_id: str) -> list[JobRecord]:
    """The records of running jobs ``peer_id`` submitted whose newest checkpoint here is short of the last round."""
    root = pathlib.Path(home) / "checkpoints"
    out = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        found = CheckpointStore(folder).latest_record() if folder.is_dir() else None
        if found is not None:
            record, completed = found
            if record.submitter == peer_id and record.state in ("running", "paused") and completed < record.spec.rounds:
                out.append(record)
    return out


class CheckpointWriter:
    """Writes one job's checkpoints in a worker thread, one at a time: a checkpoint submitted while another is being
    written waits, and replaces any older one waiting (only the newest state matters), so a slow disk never queues
    rounds up nor holds a round back. A failed write (a full disk) is logged; the job goes on. ``submit`` takes a
    Checkpoint, or a function that makes one in the worker thread (the round report of a long job is built there,
    not on the event loop)."""

    def __init__(self, store: CheckpointStore):
        self.store = store
        self.written = 0  # checkpoints written
        self._pending: Checkpoint | Callable[[], Checkpoint] | None = None
        self._task: asyncio.Task | None = None

    def submit(self, ckpt: Checkpoint | Callable[[], Checkpoint]) -> None:
        self._pending = ckpt
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name=f"checkpoints-{self.store.root.name}")

    async def _drain(self) -> None:
        while self._pending is not None:
            make, self._pending = self._pending, None
            try:
                await asyncio.to_thread(self._write, make)
                self.written += 1
            except Exception as e:  # a full disk, a bug: the job goes on without this checkpoint
                logger.warning("job %s: a checkpoint was not written: %s: %s", self.store.root.name,
                               type(e).__name__, e)

    def _write(self, make: Checkpoint | Callable[[], Checkpoint]) -> None:
        self.store.write(make if isinstance(make, Checkpoint) else make())

    async def flush(self) -> None:
        """Until every submitted checkpoint is on disk (or failed)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
