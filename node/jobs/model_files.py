"""The node's model store: verified copies of job model folders, served to peers and fetched from them.

    store = ModelStore(p2p, home, swarm)         # <home>/models/<manifest digest>/..., one folder per manifest
    await store.start()                          # serves the files of every verified folder by sha256
    folder = await asyncio.to_thread(store.put, "./my-model", files)   # the submitter: link (or copy) + verify
    folder = await store.ensure(files, holders)  # everyone else: fetch what is missing, verify, then use
    await store.stop()

A job's model folder travels as its manifest inside the signed job spec (protocol/records/job_inputs.py ModelFile:
name, size, sha256 of every file), so the submitter's signature covers every byte of the weights. The submitter
puts its folder into its store at submit (a hard link per file when the store is on the same filesystem, else a
copy; then every file is hashed again). Every other node fetches the files before it builds the model (before
round 0, when joining later, or to export a job it never took part in) with the resumable, verified shard
transfer (protocol/transfer/shard_transfer.py, under its own protocol name), from the submitter first and then
from every node that announced taking part (JobView progress: it built the model, so it holds the files).

Peers are hostile, so: the manifest's names are checked for code (pickles, .py) before a byte is fetched, and the
free disk space against its sizes; config.json comes first and is checked for remote code before the weights;
each file is fetched from one holder at a time and renamed into place only when its sha256 matches the manifest,
so bytes of a file that a holder altered (a damaged or tampered store copy) are refused with a one-line reason
naming the file and that holder, deleted, and asked of the next holder. Files land in
``<digest>.incoming/`` (a cut transfer resumes there) and the folder is renamed to ``<digest>/`` once whole;
only then does the node register it for building (node/ml/hf_models.py) and serve it. A copy found in the store
at start-up is hashed again before it is used.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pathlib
import re
import shutil
import uuid
from collections.abc import Iterable

from hivemind.p2p import P2P

from node.ml.hf_models import manifest_digest, register_folder
from node.ml.model_folder import check_folder_against, check_no_remote_code
from protocol.records.job_inputs import ModelFile
from protocol.transfer.shard_transfer import ShardServer, ShardTransferError, fetch_shard
from protocol.transfer.shards import ShardInfo

logger = logging.getLogger(__name__)
DISK_HEADROOM = 64 << 20  # bytes left free on the store's disk after a fetch
_LABEL = re.compile(r"[^A-Za-z0-9._-]")


def model_file_protocol(swarm: str) -> str:
    """The libp2p protocol name model folder files of ``swarm`` are served under."""
    return f"swarmnode/{swarm}/model-file"


class ModelFetchError(RuntimeError):
    """The job's model folder could not be fetched and verified; the message is one line naming the file."""


def _label(f: ModelFile) -> str:
    """A bare name for the shard transfer's messages (it takes no paths)."""
    return (_LABEL.sub("_", f.name).lstrip("._-") or "model-file")[:128]


def _link_or_copy(src: pathlib.Path, dest: pathlib.Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:  # another filesystem, or links not allowed: a copy
        shutil.copyfile(src, dest)


class ModelStore:
    """Verified model folders under ``<home>/models``, served to the swarm by sha256 (see the module docstring)."""

    def __init__(self, p2p: P2P, home: pathlib.Path, swarm: str, timeout: float = 30.0):
        self.p2p, self.root, self.swarm, self.timeout = p2p, pathlib.Path(home) / "models", swarm, timeout
        self._files: dict[str, pathlib.Path] = {}  # sha256 -> a file of a verified folder this node serves
        self._locks: dict[str, asyncio.Lock] = {}
        self._verified: set[str] = set()  # manifest digests whose folder was checked in this process
        self._server = ShardServer(p2p, model_file_protocol(swarm), self._files.get)
        self._serving = False

    async def start(self) -> None:
        await self._server.start()
        self._serving = True

    async def stop(self) -> None:
        if self._serving:
            self._serving = False
            await self._server.stop()

    def folder(self, files: tuple[ModelFile, ...]) -> pathlib.Path:
        return self.root / manifest_digest(files)

    def _use(self, folder: pathlib.Path, files: tuple[ModelFile, ...]) -> pathlib.Path:
        register_folder(files, folder)
        self._verified.add(folder.name)
        for f in files:
            self._files[f.sha256] = folder / f.name
        return folder

    # ---- the submitter -------------------------------------------------------------------------------------

    def put(self, source: str | os.PathLike, files: tuple[ModelFile, ...]) -> pathlib.Path:
        """Put the folder at ``source`` (whose manifest is ``files``) into the store and return the store's copy,
        every file checked against ``files``; ValueError naming the file if the folder changed meanwhile.
        Blocking: call it off the event loop."""
        dest = self.folder(files)
        if dest.is_dir():
            try:
                check_folder_against(dest, files)
                return self._use(dest, files)
            except ValueError:
                shutil.rmtree(dest)
        tmp = self.root / f".{dest.name}.put-{uuid.uuid4().hex[:8]}"
        try:
            for f in files:
                _link_or_copy(pathlib.Path(source) / f.name, tmp / f.name)
            check_folder_against(tmp, files)
            try:
                os.replace(tmp, dest)
            except OSError as e:  # another put of the same folder won the rename
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                check_folder_against(dest, files)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self._use(dest, files)

    # ---- every other node ----------------------------------------------------------------------------------

    async def ensure(self, files: tuple[ModelFile, ...], holders: Iterable[str]) -> pathlib.Path:
        """The verified local copy of the folder ``files`` names: the store's, hashed again once per process, or
        fetched from ``holders`` (tried in order for each file). ModelFetchError (one line) if no holder serves
        some file intact; ValueError if the manifest itself asks for code."""
        digest = manifest_digest(files)
        async with self._locks.setdefault(digest, asyncio.Lock()):
            dest = self.folder(files)
            if digest in self._verified and dest.is_dir():
                return dest  # verified in this process already
            if dest.is_dir():
                try:
                    await asyncio.to_thread(check_folder_against, dest, files)
                    return self._use(dest, files)
                except ValueError as e:
                    logger.warning("model store copy %s is damaged (%s); fetching it again", dest.name, e)
                    await asyncio.to_thread(shutil.rmtree, dest, True)
            check_no_remote_code(dest, [f.name for f in files])  # names only: no folder yet
            peers = list(dict.fromkeys(holders))
            if not peers:
                raise ModelFetchError("the job's model folder has no holder to fetch it from")
            incoming = self.root / f".{dest.name}.incoming"
            incoming.mkdir(parents=True, exist_ok=True)
            need = sum(f.size for f in files if not (incoming / f.name).is_file())
            free = shutil.disk_usage(incoming).free
            if need + DISK_HEADROOM > free:
                raise ModelFetchError(f"the job's model folder needs {need / 2**30:.2f} GiB, the store's disk has "
                                      f"{free / 2**30:.2f} GiB free")
            ordered = sorted(files, key=lambda f: f.name != "config.json")  # config first: remote code is refused
            for f in ordered:
                await self._fetch(f, incoming / f.name, peers)
                if f.name == "config.json":
                    check_no_remote_code(incoming, ["config.json"])
            await asyncio.to_thread(check_no_remote_code, incoming, [f.name for f in files])
            os.replace(incoming, dest)
            logger.info("model folder %s fetched and verified (%d files)", dest.name, len(files))
            return self._use(dest, files)

    async def _fetch(self, f: ModelFile, dest: pathlib.Path, peers: list[str]) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.size == 0:
            dest.write_bytes(b"")
            return
        info = ShardInfo(0, 1, _label(f), f.sha256, f.size)
        errors = []
        for peer in peers:
            try:
                await fetch_shard(self.p2p, [peer], info, dest, protocol_name=model_file_protocol(self.swarm),
                                  timeout=self.timeout)
                return
            except ShardTransferError as e:
                reason = str(e).removeprefix(f"{info.file}: ")
                if "is not the manifest's" in reason:
                    logger.warning("model file %s from %s refused: its sha256 differs from the job's signed "
                                   "manifest", f.name, peer)
                    reason = "sha256 differs from the job's signed manifest (refused)"
                errors.append(f"{peer[-8:]}: {reason}")
        raise ModelFetchError(f"model file {f.name}: no holder served it intact: {'; '.join(errors)[:600]}")


__all__ = ["ModelFetchError", "ModelStore", "model_file_protocol"]
