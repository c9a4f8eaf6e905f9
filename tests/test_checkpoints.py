"""Per-round checkpoints of a federated job (node/jobs/federated/checkpoints.py): atomic writes, a torn write at
every step (fault injection, and a real SIGKILL of a writing process), a corrupt checkpoint skipped for the next
older one with its reason logged, pruning, the coalescing writer, the records a restarted submitter puts back, and
FederatedJobs resuming from a checkpoint (a scripted runner, a virtual clock for the wait for survivors).

The whole swarm killed at once and restarted with real daemons: tests/test_power_cut.py (slow).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from node.devtools.localswarm import wait_for
from node.jobs.board import JobBoard, JobView
from node.jobs.federated.checkpoints import (
    MANIFEST,
    MOMENTUM,
    PARAMS,
    RECORD,
    STEPS,
    Checkpoint,
    CheckpointStore,
    CheckpointWriter,
    checkpoint_dir,
    survivors_back,
    unfinished_records,
)
from protocol.records.job_records import JobRecord, job_progress_from_wire
from protocol.transfer.job_state import params_hash
from tests.clocks import VirtualClock
from tests.conftest import REPO
from tests.test_round_policy import ME, OTHER, PEER, MemoryDHT, ScriptedRunner, job, participant

SPEC = job(rounds=10)
RECORD_OF_ME = JobRecord.create(SPEC, ME, "n1", 1_700_000_000.0)
JOB_ID = RECORD_OF_ME.job_id


def state(completed: int, size: int = 1000, momentum: bool = True, job_id: str = JOB_ID,
          record: JobRecord | None = RECORD_OF_ME) -> Checkpoint:
    params = np.random.default_rng(completed).standard_normal(size).astype(np.float32)
    mom = np.full(size, completed, np.float32) if momentum else None
    history = [{"round": r, "ok": True, "model_hash": "x"} for r in range(completed)]
    return Checkpoint(job_id, completed, completed + 1, params_hash(params), params, mom, (ME, PEER), history, record)


class PowerCut(BaseException):
    """What a SIGKILL is to the writer: nothing after it runs (not an Exception: no handler swallows it)."""


def cut_before(step: str, store: CheckpointStore):
    """A before_write hook: the power goes just before ``step``, leaving a half-written temporary file."""
    def hook(name: str) -> None:
        if name == step:
            (store.folders()[-1] / f".{name}.k3j2.tmp").write_bytes(b"\x00half")
            raise PowerCut(name)
    return hook


def test_a_checkpoint_round_trips_with_every_file_hashed_in_its_manifest_written_last(tmp_path):
    order: list[str] = []
    store = CheckpointStore(checkpoint_dir(tmp_path, JOB_ID), before_write=order.append)
    folder = store.write(state(4))
    assert order == list(STEPS)  # the manifest last
    assert sorted(p.name for p in folder.iterdir()) == sorted(STEPS)  # no temporary file left
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["model_hash"] == manifest["files"][PARAMS] and manifest["completed"] == 4
    got = store.load_latest(1000)
    want = state(4)
    assert got is not None and got.completed == 4 and got.next_round == 5 and got.model_hash == want.model_hash
    assert np.array_equal(got.params, want.params) and got.params.dtype == np.float32
    assert np.array_equal(got.momentum, want.momentum)
    assert got.participants == (ME, PEER) and got.history == want.history and got.record == RECORD_OF_ME
    no_momentum = CheckpointStore(tmp_path / "other" / JOB_ID)
    no_momentum.write(state(2, momentum=False, record=None))
    loaded = no_momentum.load_latest()
    assert loaded is not None and loaded.momentum is None and loaded.record is None


def test_the_writer_refuses_params_that_do_not_match_their_model_hash(tmp_path):
    bad = state(1)
    store = CheckpointStore(tmp_path / JOB_ID)
    with pytest.raises(ValueError, match="model hash"):
        store.write(Checkpoint(JOB_ID, 1, 2, "0" * 64, bad.params))
    with pytest.raises(ValueError, match="momentum"):
        store.write(Checkpoint(JOB_ID, 1, 2, bad.model_hash, bad.params, np.zeros(3, np.float32)))
    assert store.load_latest() is None


@pytest.mark.parametrize("step", STEPS)
def test_a_power_cut_before_any_step_leaves_the_previous_checkpoint_in_force(tmp_path, step, caplog):
    store = CheckpointStore(tmp_path / JOB_ID)
    store.write(state(3))
    store.before_write = cut_before(step, store)
    with pytest.raises(PowerCut):
        store.write(state(4))
    torn = store.folders()[-1]
    assert not (torn / MANIFEST).exists() and any(p.name.endswith(".tmp") for p in torn.iterdir())
    with caplog.at_level(logging.WARNING):
        got = CheckpointStore(tmp_path / JOB_ID).load_latest(1000)  # the restarted node
    assert got is not None and got.completed == 3 and got.model_hash == state(3).model_hash
    assert "skipped: no manifest: its write was interrupted" in caplog.text
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 1
    assert all("\n" not in r.getMessage() for r in caplog.records)
    restarted = CheckpointStore(tmp_path / JOB_ID)  # the next write cleans the torn folder up
    restarted.write(state(5))
    assert [p.name for p in restarted.folders()] == ["00000001.c3", "00000003.c5"]
    assert restarted.load_latest(1000).completed == 5


def test_a_real_sigkill_while_writing_never_leaves_an_unloadable_newest_state(tmp_path):
    """A process writes 4 MB checkpoints in a loop; SIGKILLed at an arbitrary moment, what it leaves loads."""
    root = tmp_path / JOB_ID
    script = (
        "import sys, numpy as np\n"
        "from node.jobs.federated.checkpoints import Checkpoint, CheckpointStore\n"
        "from protocol.transfer.job_state import params_hash\n"
        "store = CheckpointStore(sys.argv[1])\n"
        "for c in range(1, 10**6):\n"
        "    p = np.full(1_000_000, c, np.float32)\n"
        "    store.write(Checkpoint(sys.argv[2], c, c + 1, params_hash(p), p, p.copy()))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(root), JOB_ID], cwd=REPO, start_new_session=True)
    try:
        wait_for(lambda: len(list(root.glob("*.c*"))) >= 3, 60, "three checkpoints")
        time.sleep(np.random.default_rng().uniform(0, 0.05))  # any moment of a write
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    got = CheckpointStore(root).load_latest(1_000_000)
    assert got is not None and got.completed >= 2 and np.all(got.params == got.completed)
    assert np.all(got.momentum == got.completed)
    assert len(CheckpointStore(root).folders()) <= 3 + 1  # KEEP complete, at most one torn


def corrupt_params(folder) -> None:
    raw = bytearray((folder / PARAMS).read_bytes())
    raw[17] ^= 0x40  # one flipped bit
    (folder / PARAMS).write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, reason", [
    (corrupt_params, "params.f32: sha256 does not match the manifest (torn or corrupt)"),
    (lambda f: (f / MOMENTUM).write_bytes(b"short"), "momentum.f32: sha256 does not match"),
    (lambda f: (f / RECORD).unlink(), "record.bin: No such file"),
    (lambda f: (f / MANIFEST).write_bytes(b'{"format": 1, "job_id'), "unreadable manifest: JSONDecodeError"),
    (lambda f: (f / MANIFEST).write_text(json.dumps({**json.loads((f / MANIFEST).read_text()), "files": 3})),
     "malformed manifest"),
    (lambda f: (f / MANIFEST).write_text(json.dumps({**json.loads((f / MANIFEST).read_text()),
                                                     "model_hash": "ab" * 32})),
     "parameters do not hash to the recorded model hash"),
])
def test_a_corrupt_newest_checkpoint_is_skipped_with_its_reason_for_the_next_older(tmp_path, caplog, damage, reason):
    store = CheckpointStore(tmp_path / JOB_ID)
    for c in (6, 7):
        store.write(state(c))
    damage(store.folders()[-1])
    with caplog.at_level(logging.WARNING):
        got = store.load_latest(1000)
    assert got is not None and got.completed == 6 and np.array_equal(got.params, state(6).params)
    assert reason in caplog.text, caplog.text


def test_a_checkpoint_of_another_size_or_job_is_not_loaded(tmp_path, caplog):
    store = CheckpointStore(tmp_path / JOB_ID)
    store.write(state(2))
    with caplog.at_level(logging.WARNING):
        assert store.load_latest(999) is None
    assert "1000 parameters, the job's model has 999" in caplog.text
    (tmp_path / ("f" * 16)).mkdir()
    os.rename(store.folders()[0], tmp_path / ("f" * 16) / "00000001.c2")
    assert CheckpointStore(tmp_path / ("f" * 16)).load_latest() is None
    assert "expected format 1 for ffffffffffffffff" in caplog.text


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    store = CheckpointStore(tmp_path / JOB_ID)
    for c in range(1, 7):
        store.write(state(c))
    assert [p.name for p in store.folders()] == ["00000004.c4", "00000005.c5", "00000006.c6"]
    one = CheckpointStore(tmp_path / JOB_ID, keep=1)
    one.write(state(7))
    assert [p.name for p in one.folders()] == ["00000007.c7"]
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path, keep=0)
    one.forget()
    assert not (tmp_path / JOB_ID).exists() and one.load_latest() is None


def test_the_writer_works_off_the_event_loop_and_keeps_only_the_newest_waiting_state(tmp_path):
    release, writing = threading.Event(), threading.Event()

    def slow_disk(name: str) -> None:
        if name == PARAMS:
            writing.set()
            release.wait(10)

    store = CheckpointStore(tmp_path / JOB_ID, before_write=slow_disk)
    written: list[int] = []

    async def main() -> None:
        writer = CheckpointWriter(store)
        writer.submit(state(1))
        while not writing.is_set():  # the loop keeps running while the disk is slow
            await asyncio.sleep(0.001)
        for c in (2, 3, 4):
            writer.submit(state(c))
        release.set()
        await writer.flush()
        written.append(writer.written)

    asyncio.run(main())
    assert written == [2]  # 1, then only the newest of 2-4
    assert [p.name for p in store.folders()] == ["00000001.c1", "00000002.c4"]


def test_a_failed_write_is_logged_and_the_job_goes_on(tmp_path, caplog):
    (tmp_path / "checkpoints").write_text("not a directory")
    writer = CheckpointWriter(CheckpointStore(checkpoint_dir(tmp_path, JOB_ID)))

    async def main() -> None:
        writer.submit(state(1))
        await writer.flush()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert writer.written == 0 and f"job {JOB_ID}: a checkpoint was not written" in caplog.text


def test_a_restarted_submitter_puts_back_only_its_own_unfinished_jobs(tmp_path):
    others = JobRecord.create(SPEC, PEER, "n2", 1_700_000_000.0)
    done_spec = job(rounds=3)
    finished = JobRecord.create(done_spec, ME, "n3", 1_700_000_000.0)
    cancelled = JobRecord.create(SPEC, ME, "n4", 1_700_000_000.0).replace(state="cancelled")
    for record, completed in ((RECORD_OF_ME, 4), (others, 4), (finished, 3), (cancelled, 2)):
        CheckpointStore(checkpoint_dir(tmp_path, record.job_id)).write(state(completed, job_id=record.job_id,
                                                                             record=record))
    assert unfinished_records(tmp_path, ME) == [RECORD_OF_ME]
    assert unfinished_records(tmp_path / "nowhere", ME) == []


def test_survivors_are_back_when_the_last_rounds_members_are_or_someone_is_ahead():
    assert not survivors_back(takers=1, last_members=3, best_round=5, own_completed=5)
    assert survivors_back(takers=3, last_members=3, best_round=5, own_completed=5)
    assert survivors_back(takers=1, last_members=3, best_round=6, own_completed=5)  # it downloads round 6 first


# ---- FederatedJobs resuming from a checkpoint ----------------------------------------------------------------


class ResumableRunner(ScriptedRunner):
    """The scripted runner, with JobRunner's load_state."""

    excluded: dict[str, str] = {}

    def load_state(self, params, momentum, completed, next_round, model_hash) -> None:
        if params_hash(params) != model_hash:
            raise ValueError("hash")
        self.params, self.completed, self.next_round = params.copy(), completed, next_round


def resumable(tmp_path, spec, script, clock):
    jobs, board, view, made = participant(tmp_path, spec, script, clock)

    def factory(*args, **kwargs):
        made.append(ResumableRunner(*args, script=script, **kwargs))
        return made[-1]

    jobs.runner_factory = factory
    return jobs, board, view, made


def checkpoint_from_the_last_life(tmp_path, view, completed: int) -> Checkpoint:
    size = ScriptedRunner(None, None, "", view.job_id, view.record.spec, None, script=[]).params.size
    ckpt = state(completed, size, momentum=False, job_id=view.job_id, record=view.record)
    ckpt = Checkpoint(view.job_id, completed, completed + 2, ckpt.model_hash, ckpt.params,
                      participants=(ME, PEER, OTHER), history=ckpt.history, record=view.record)
    CheckpointStore(checkpoint_dir(tmp_path / "home", view.job_id)).write(ckpt)
    return ckpt


@pytest.mark.parametrize("takers, waited", [(1, 12.0), (3, 0.0)])
def test_a_restarted_node_resumes_from_its_checkpoint_waits_for_the_last_round_then_finishes(tmp_path, takers,
                                                                                              waited):
    clock = VirtualClock()
    spec = job(rounds=5)
    jobs, board, view, made = resumable(tmp_path, spec, [(True, 3, False), (True, 3, False)], clock)
    ckpt = checkpoint_from_the_last_life(tmp_path, view, 3)
    view.takers = takers  # how many nodes the board shows back (the manager's poll would refresh it)
    asyncio.run(jobs.run(view))
    runner = made[0]
    assert runner.completed == 5 and runner.next_round == 7  # rounds 3 and 4 ran as ids 5 and 6
    published = [job_progress_from_wire(value) for _, value, _ in board.dht.stored]
    assert (published[0].round, published[0].model_hash, published[0].next_round) == (3, ckpt.model_hash, 5)
    assert [p.round for p in published] == [3, 4, 5]
    assert clock.now == pytest.approx(waited, abs=0.5)  # one round timeout at most, for the absent members
    newest = CheckpointStore(checkpoint_dir(tmp_path / "home", view.job_id)).load_latest()
    assert newest is not None and newest.completed == 5 and newest.record == view.record
    assert [e["round"] for e in newest.history if e["ok"]][:3] == [0, 1, 2]  # the earlier life's rounds kept
    manifest = json.loads((tmp_path / "home" / "jobs" / view.job_id / "manifest.json").read_text())
    assert manifest["rounds"] == 5 and manifest["model_hash"] == runner.model_hash


def test_a_cancelled_job_forgets_its_checkpoints(tmp_path):
    clock = VirtualClock()
    jobs, board, view, made = resumable(tmp_path, job(rounds=5), [], clock)
    checkpoint_from_the_last_life(tmp_path, view, 2)
    view.takers = 3
    view.record = view.record.replace(state="cancelled")
    asyncio.run(jobs.run(view))
    assert not checkpoint_dir(tmp_path / "home", view.job_id).exists()


def test_the_restored_record_is_stored_only_while_the_board_lacks_it(tmp_path):
    clock = VirtualClock()

    class BoardDHT(MemoryDHT):  # a store shows up on the board at the next read
        async def store(self, key, value, expiration_time, subkey=None) -> bool:
            board.views[subkey] = JobView(RECORD_OF_ME)
            return await super().store(key, value, expiration_time, subkey)

    board = JobBoard(BoardDHT(), "policy", ME, clock)
    jobs, *_ = participant(tmp_path, SPEC, [], clock)
    jobs.board = board
    asyncio.run(jobs._restore_records([RECORD_OF_ME]))
    assert [subkey for _, _, subkey in board.dht.stored] == [JOB_ID]
    asyncio.run(jobs._restore_records([RECORD_OF_ME]))  # on the board already (say, cancelled since): untouched
    assert len(board.dht.stored) == 1
