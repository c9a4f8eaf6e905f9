"""Pipeline jobs: one causal LM cut into stages hosted by different daemons, trained by the submitting daemon.

    kind = "pipeline" in a job file (node/jobs/spec.py); node/jobs/manager.py hands such jobs to PipelineJobs:
      submit  -> prepare(spec, nonce): plan, choose hosts, split + sign shards, serve them -> PipelineAssignment
      poll    -> why_not(view) ("" to take part, else the reason shown in `swarmnode jobs`), then run(view)

Life cycle of a job ``J`` (swarm ``S``, submitter ``T``):
  1. At submission T builds the model from its config and seed (node/ml/models.py), takes the ``stages *
     replicas`` fastest live peers other than itself from the swarm's signed peer records (capability: fp32
     TFLOPS, RAM) and plans the stages (node/ml/splitter.py plan_for_model). balanced | layer_wise: the plan
     first, then the peers placed with protocol/planning/stage_assign.py assign_nodes and evened to ``replicas`` hosts
     per stage (assign_nodes maximises the slowest stage's throughput and may give a cheap stage a single
     host; the job asks for ``replicas`` per stage so that every stage survives the loss of a host).
     memory_aware: the peers first, grouped by memory (replica_groups), then the stage sizes fitted to each
     group's memory and speed, in the order of groups that makes the slowest stage fastest (memory_aware_plan);
     a model that fits no order is refused at submission. It splits the model into
     signed shards (split_model with T's key) under <home>/jobs/J/shards/, serves them and the manifest by
     sha256 with a ShardServer, and publishes the spans, hosts and manifest sha256/size inside the signed job
     record (the manifest itself can outgrow the record's bound for large configs; its hash cannot).
  2. A daemon that finds itself among the hosts of stage i fetches the manifest and then shard i from T
     (protocol/transfer/shard_transfer.py: sha256-verified, atomically written), checks that the manifest is signed by
     T and that its spans are the record's, loads the stage (load_stage: size + sha256 before parsing) and
     serves it with node/jobs/pipeline/stage_host.py StageHost under pipeline id J until the job is done or
     cancelled. Other daemons show "not assigned".
  3. T runs node/jobs/pipeline/trainer.py PipelineTrainer on its own slice of the byte corpus for ``rounds`` steps,
     finding the replicas through their DHT records (a dead replica's record expires; the trainer retries hops
     elsewhere), and publishes a signed JobProgress per step (round = steps done, the step's mean loss, every
     eval_every steps and at the last the bits per byte on the test split (evaluation passes through the
     pipeline), an estimate of the activation bytes it relayed, the step time; model_hash = sha256 over the
     stages' parameter hashes in stage order), and keeps each step's figures (throughput.py: tokens per second,
     each stage's load, the bottleneck) as the job's history: the dashboard's and pipeline.json's.
  4. After the last step T fetches every stage's state from its replicas (checked against its header and
     parameter hash), reassembles the model and writes the trained shards, signed, under <home>/jobs/J/trained/
     plus <home>/jobs/J/pipeline.json (each replica's parameter hash per stage), atomically, and only then
     publishes "done" (so `--follow` ending means the files are there).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import pathlib
from collections.abc import Awaitable, Callable

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p import P2P

from node.jobs.board import POLL_S, JobBoard, JobView
from node.jobs.model_files import ModelStore
from node.jobs.pipeline.stage_config import StageConfig, StageHooks
from node.jobs.pipeline.stage_host import StageHost
from node.jobs.pipeline.stage_state import Refused, fetch_state, holders
from node.jobs.pipeline.steps import HopError, PipelineError, StepReport, TrainerConfig, causal_lm_loss
from node.jobs.pipeline.throughput import step_entry
from node.jobs.pipeline.trainer import PipelineTrainer
from node.ml.datasets import DATASETS, NoLocalData, eval_batches
from node.ml.hf_models import read_config, verified_folder
from node.ml.job_model import declared_info, load_job_data
from node.ml.models import build_model, params_sha256, resolve_overrides
from node.ml.splitter import (
    load_model_dir,
    load_stage,
    memory_aware_plan,
    plan_for_model,
    read_manifest,
    split_model,
)
from node.runtime.device import precision_decline
from node.runtime.errors import EXIT_USAGE, NodeError
from node.runtime.files import atomic_write
from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.pipeline.control import one_line, pipe_protocol
from protocol.planning.stage_assign import NodeSpec, assign_nodes, even_groups, follow_live
from protocol.planning.stage_plan import plan_from_json, plan_to_json
from protocol.records.job_records import JobProgress, PipelineAssignment
from protocol.records.job_spec import JobSpec, PipelineSpec, job_id_for
from protocol.transfer.shard_transfer import ShardServer, fetch_shard, shard_protocol
from protocol.transfer.shards import MANIFEST_FILE, ShardError, ShardInfo

logger = logging.getLogger(__name__)
PIPELINE_ARCHS = ("gpt2", "llama")
PIPELINE_CLASSES = ("GPT2LMHeadModel", "LlamaForCausalLM")  # a model folder's class (config.json architectures)
PLAN_FILE = "plan.json"
MAX_HISTORY = 10_000  # steps of a job's history kept (the newest)
EVAL_ITEMS, EVAL_BATCH = 64, 32  # test windows per evaluation; rows per evaluation pass (<= the hosts' max_batch)
RETRY_S = 5.0  # a host that could not start its stage (shard or state unavailable) tries again after this
RECOVERY_TIMEOUTS = 6  # a failed step (no replica of a stage, out of retries) is retried for this many round
#                       timeouts: long enough for a dead host's peer record to expire and a new host to load


def layers_of(config) -> int:
    return int(config.get("n_layer") or config["num_hidden_layers"])


def _pipeline(spec: JobSpec) -> PipelineSpec:
    if spec.pipeline is None:  # JobSpec requires it for kind "pipeline", the only kind this module is given
        raise ValueError("pipeline: kind 'pipeline' needs a [pipeline] table")
    return spec.pipeline


def pipeline_model_config(spec: JobSpec) -> dict:
    """The config of a pipeline job's model: the arch's (with overrides), or a model folder's config.json (its
    verified copy in this node's model store: the submitter's, which put it there at submission)."""
    if spec.model.arch != "hf":
        return resolve_overrides(spec.model.arch, spec.model.config())
    config = read_config(verified_folder(spec.model.files))
    archs = list(getattr(config, "architectures", None) or ())
    if not archs or archs[0] not in PIPELINE_CLASSES:
        raise ValueError(f"model.path: a pipeline job cuts {' or '.join(PIPELINE_CLASSES)} folders, this one holds "
                         f"{archs[0] if archs else config.model_type!r}")
    return config.to_dict()


def pipeline_model(spec: JobSpec) -> torch.nn.Module:
    """The whole model a pipeline job cuts: built from the arch and the job's seed, or a model folder's
    pretrained weights."""
    if spec.model.arch == "hf":
        return load_model_dir(verified_folder(spec.model.files))
    return build_model(spec.model.arch, spec.model.config(), spec.seed).module


def check_pipeline_spec(spec: JobSpec) -> None:
    """ValueError naming the field when a pipeline spec cannot run: the model, the stage count, the data."""
    if spec.model.arch not in (*PIPELINE_ARCHS, "hf"):
        raise ValueError(f"model.arch: a pipeline job takes {' or '.join(PIPELINE_ARCHS)} or a model folder "
                         f"(model.path), got {spec.model.arch!r}")
    cfg = pipeline_model_config(spec)
    if cfg.get("tie_word_embeddings", True):
        raise ValueError("model.tie_word_embeddings: must be false for a pipeline job (the embedding and the LM "
                         "head live in different stages)")
    layers = layers_of(cfg)
    if _pipeline(spec).stages > layers:
        raise ValueError(f"pipeline.stages: must be <= the model's {layers} layers, got {_pipeline(spec).stages}")
    info = DATASETS.get(spec.dataset) if spec.data is None else declared_info(spec.dataset, spec.data)
    if info is None or info.task != "causal-lm":
        known = [n for n, d in DATASETS.items() if d.task == "causal-lm"]
        raise ValueError(f"dataset: a pipeline job trains on a byte corpus ({', '.join(map(repr, known))}) or your "
                         f"own text ([data] kind = \"text\"), got {spec.dataset!r}")


def node_spec(view) -> NodeSpec:
    """A live peer (node/runtime/membership.py PeerView) as the stage assignment sees it: fp32 TFLOPS and the free
    memory of the device it trains on (its total RAM when its record predates that field)."""
    cap = view.record.capability
    memory = cap.device_free_bytes if cap.device_free_bytes is not None else cap.ram_bytes
    return NodeSpec(view.record.peer_id, max(cap.tflops_fp32, 1e-6), float(memory))


def combined_hash(stage_hashes: list[str]) -> str:
    return hashlib.sha256("".join(stage_hashes).encode()).hexdigest() if all(stage_hashes) else ""


def _majority(hashes: dict[str, str]) -> str:
    values = list(hashes.values())
    return max(sorted(set(values)), key=values.count) if values else ""


def stage_config(spec: JobSpec, swarm: str) -> StageConfig:
    """Every replica of every stage of a job uses the same settings, derived from the spec alone."""
    return StageConfig(swarm=swarm, optimizer=spec.inner.kind, lr=spec.inner.lr, momentum=spec.inner.momentum,
                       weight_decay=spec.inner.weight_decay, density=spec.density,
                       max_batch=max(64, _pipeline(spec).micro_batch), part_timeout=min(10.0, spec.round_timeout_s),
                       result_timeout=min(20.0, 2 * spec.round_timeout_s), precision=spec.precision)


class PipelineJobs:
    """Pipeline jobs on this node (see the module docstring), over the daemon's job board; ``key`` signs the
    shards, ``peers()`` lists the live peer records."""

    def __init__(self, p2p: P2P, board: JobBoard, home: pathlib.Path, data_dir: pathlib.Path,
                 key: Ed25519PrivateKey | None, peers: Callable[[], Awaitable[list]] | None,
                 clock: Clock = SYSTEM_CLOCK, device: torch.device | None = None, models: ModelStore | None = None):
        self.p2p, self.board, self.home, self.data_dir = p2p, board, home, data_dir
        self.models = models  # model folders (the submitter's own, put there at submission)
        self.key, self.peers, self.clock = key, peers, clock
        self.device = torch.device("cpu") if device is None else device  # stage compute and the trainer's loss
        self._files: dict[str, pathlib.Path] = {}  # sha256 -> file this node serves (shards, manifests)
        self._server: ShardServer | None = None
        self._hosts: dict[str, StageHost] = {}
        self.local: dict[str, tuple[int, str]] = {}  # job id -> (steps, parameter hash) held here
        self.history: dict[str, list[dict]] = {}  # job id -> the steps trained from here (throughput.step_entry)

    @property
    def peer_id(self) -> str:
        return self.board.peer_id

    async def start(self) -> None:
        pass  # the shard server starts with the first job this node submits or hosts

    async def stop(self) -> None:
        for host in list(self._hosts.values()):
            await host.stop()
        self._hosts.clear()
        if self._server is not None:
            await self._server.stop()
            self._server = None

    def job_dir(self, job_id: str) -> pathlib.Path:
        return self.home / "jobs" / job_id

    async def serve_files(self, paths: list[pathlib.Path]) -> None:
        for path in paths:
            self._files[hashlib.sha256(path.read_bytes()).hexdigest()] = path
        if self._server is None:
            self._server = ShardServer(self.p2p, shard_protocol(self.board.swarm), self._files.get)
            await self._server.start()

    # ---- the submitter: plan, place, split, serve ------------------------------------------------------------

    async def prepare(self, spec: JobSpec, nonce: str, source: str) -> PipelineAssignment:
        """Everything the job record must say before it is stored (module docstring, step 1); NodeError (one
        line, naming the field) when the swarm or this node cannot run the job."""
        try:
            check_pipeline_spec(spec)
        except ValueError as e:
            raise NodeError(f"{source}: {e}", EXIT_USAGE) from None
        try:
            await asyncio.to_thread(load_job_data, spec, self.data_dir)
        except NoLocalData:
            raise NodeError(f"{source}: dataset: the submitting node trains on its own data and has none of "
                            f"{spec.dataset!r}; add it with `swarmnode data add {spec.dataset} --home {self.home}`",
                            EXIT_USAGE) from None
        except (ValueError, OSError) as e:
            raise NodeError(f"{source}: dataset: no usable local data for {spec.dataset!r}: {e}", EXIT_USAGE) from None
        return await self.place(spec, nonce, source)

    async def place(self, spec: JobSpec, nonce: str, source: str) -> PipelineAssignment:
        """Plan the stages, choose their hosts among the live peers, split and sign the shards, serve them."""
        if self.key is None or self.peers is None:
            raise NodeError("this node cannot submit pipeline jobs (no signing key or peer view)")
        p = _pipeline(spec)
        need = p.stages * p.replicas
        views = [v for v in await self.peers() if v.record.peer_id != self.peer_id]
        if len(views) < need:
            raise NodeError(f"{source}: pipeline.replicas: {p.stages} stages x {p.replicas} replicas need {need} "
                            f"hosts, the swarm has {len(views)} live peers besides this node", EXIT_USAGE)
        job_id = job_id_for(spec, self.peer_id, nonce)
        model = await asyncio.to_thread(pipeline_model, spec)
        nodes = sorted(map(node_spec, views), key=lambda x: (-x.throughput, x.node_id))[:need]
        if p.strategy == "memory_aware":
            try:
                plan, groups = await asyncio.to_thread(memory_aware_plan, model, nodes, p.stages, p.replicas,
                                                       p.micro_batch)
            except ValueError as e:  # "the model does not fit: ..."
                raise NodeError(f"{source}: pipeline.strategy: memory_aware on the {need} fastest live peers: {e}",
                                EXIT_USAGE) from None
        else:
            plan = plan_for_model(model, p.stages, p.strategy)
            groups = even_groups([list(g) for g in assign_nodes(plan, nodes).stages], plan.costs, p.replicas)
        atomic_write(self.job_dir(job_id) / PLAN_FILE, plan_to_json(plan), mode=0o644)  # for follow_hosts, restarts too
        shard_dir = self.job_dir(job_id) / "shards"
        manifest = await asyncio.to_thread(split_model, model, plan.spans, shard_dir, self.key)
        manifest_bytes = (shard_dir / MANIFEST_FILE).read_bytes()
        await self.serve_files([shard_dir / MANIFEST_FILE, *(shard_dir / s.file for s in manifest.shards)])
        logger.info("pipeline job %s: stages %s on %s", job_id, plan.spans,
                    [[x.node_id[-6:] for x in g] for g in groups])
        return PipelineAssignment(plan.spans, tuple(tuple(x.node_id for x in g) for g in groups),
                                  hashlib.sha256(manifest_bytes).hexdigest(), len(manifest_bytes))

    # ---- every node: take part or not --------------------------------------------------------------------

    def why_not(self, view: JobView) -> tuple[str, str]:
        """("", "") to take part (host a stage, stand by, or train), else (the reason, no hint)."""
        record = view.record
        if record.assignment is None:
            return "the pipeline job has no stage assignment", ""
        refusal = precision_decline(self.device, record.spec.precision)  # stage compute runs on this device
        if refusal:
            return refusal[:200], ""
        if record.submitter == self.peer_id:
            if not (self.job_dir(record.job_id) / "shards" / MANIFEST_FILE).exists():
                return "this node submitted the job but holds no shards of it (restarted?)", ""
        return "", ""  # any other node stands by: the trainer may assign it a stage at any time (_follow)

    def local_state(self, job_id: str) -> tuple[int, str] | None:
        """(steps, the parameter hash of the stage held here; the trainer: of every stage) if this node takes part."""
        return self.local.get(job_id)

    async def export(self, view: JobView, out: pathlib.Path, merge: bool = False) -> list[pathlib.Path]:
        raise NodeError(f"job {view.job_id} is a pipeline job: its trained shards are under "
                        f"<home>/jobs/{view.job_id}/trained on the submitting node", EXIT_USAGE)

    async def run(self, view) -> None:
        try:
            if view.record.submitter == self.peer_id:
                await self._train(view)
            else:
                await self._host(view)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("pipeline job %s failed on this node", view.record.job_id)
            view.declined = f"failed: {type(e).__name__}: {e}"[:200]

    # ---- a host ----------------------------------------------------------------------------------------------

    async def _host(self, view) -> None:
        """Host whatever stage the submitter's signed record assigns this node, for as long as the job runs: the
        trainer moves hosts as nodes die and join (module docstring, step 3), so the stage may change, appear
        or go away. Standing by shows "not assigned"."""
        job_id = view.record.job_id
        hosting: tuple[int, StageHost] | None = None
        carried = None  # (StateHead, bytes): a backup of the stage this node moves to, held by its old host
        retry_at = 0.0
        try:
            while view.state not in ("done", "cancelled"):
                index = view.record.assignment.stage_of(self.peer_id)
                if hosting is not None and hosting[0] != index:
                    logger.info("pipeline job %s: no longer hosting stage %d", job_id, hosting[0])
                    # moved to the stage whose backup this host held (its last replica died): keep that state
                    carried = hosting[1].backups.get(index) if index is not None else None
                    await self._stop_host(job_id, hosting[1])
                    hosting = None
                if index is not None and hosting is None and self.clock.monotonic() >= retry_at:
                    try:
                        hosting = (index, await self._start_host(view, index, carried))
                        carried = None
                    except (ShardError, asyncio.CancelledError):
                        raise  # a bad signature or shard hash: nothing to retry
                    except Exception as e:  # a peer that died while serving, a state not announced yet
                        view.declined = f"stage {index}: {type(e).__name__}: {one_line(e)}"[:200]
                        logger.warning("pipeline job %s: %s; retrying", job_id, view.declined)
                        retry_at = self.clock.monotonic() + RETRY_S
                if hosting is not None or index is None:
                    view.declined = "" if hosting is not None else "not assigned"
                await self.clock.sleep(POLL_S)
        finally:
            if hosting is not None:
                await self._stop_host(job_id, hosting[1])

    async def _stop_host(self, job_id: str, host: StageHost) -> None:
        self.local[job_id] = (host.step, host.params_hash)
        self._hosts.pop(job_id, None)
        await host.stop()

    async def _start_host(self, view, index: int, carried=None) -> StageHost:
        """Fetch stage ``index``'s shard (from the submitter or its other hosts) and its latest state (from a
        replica or a backup holder, newest first, or the backup ``carried`` over from this node's previous
        stage; the shard's own parameters only before the first step), then serve it."""
        record, spec = view.record, view.record.spec
        a, job_id = record.assignment, record.job_id
        t0 = self.clock.monotonic()
        manifest, stage = await self.fetch_stage(view, index)

        def after_step(reply) -> None:
            self.local[job_id] = (reply.step, reply.params_hash)

        host = StageHost(self.p2p, self.board.dht, job_id, index, stage, stage_config(spec, self.board.swarm),
                         StageHooks(after_step=after_step), manifest, clock=self.clock, device=self.device)
        source = await self._load_latest_state(view, index, host, carried)
        self.local[job_id] = (host.step, host.params_hash)
        await host.start()
        self._hosts[job_id] = host
        logger.info("pipeline job %s: hosting stage %d (layers %s) at step %d, state from %s, ready in %.1f s",
                    job_id, index, a.spans[index], host.step, source, self.clock.monotonic() - t0)
        return host

    async def fetch_stage(self, view, index: int):
        """(manifest, stage ``index``): the signed manifest from the submitter, the shard from it or the stage's
        other hosts (sha256-verified, then load_stage's checks), both served on from here."""
        record, a = view.record, view.record.assignment
        shard_dir = self.job_dir(record.job_id) / "shards"
        shard_dir.mkdir(parents=True, exist_ok=True)
        proto = shard_protocol(self.board.swarm)
        # the manifest travels as a "shard" whose sha256 and size the signed record gives
        manifest_info = ShardInfo(0, 1, MANIFEST_FILE, a.manifest_sha256, a.manifest_size)
        await fetch_shard(self.p2p, [record.submitter], manifest_info, shard_dir / MANIFEST_FILE, protocol_name=proto)
        manifest = read_manifest(shard_dir, trusted_signers=[record.submitter])
        if tuple((s.start, s.end) for s in manifest.shards) != a.spans:
            raise ShardError(f"the manifest's stages {[(s.start, s.end) for s in manifest.shards]} are not the "
                             f"record's {list(a.spans)}")
        info = manifest.shards[index]
        others = [p for p in a.hosts[index] if p != self.peer_id]
        await fetch_shard(self.p2p, [record.submitter, *others], info, shard_dir / info.file, protocol_name=proto)
        stage = await asyncio.to_thread(load_stage, shard_dir, index, trusted_signers=[record.submitter])
        await self.serve_files([shard_dir / MANIFEST_FILE, shard_dir / info.file])  # a later replica may fetch here
        return manifest, stage

    async def _load_latest_state(self, view, index: int, host: StageHost, carried=None) -> str:
        """Load the newest state of stage ``index`` that a replica or backup holder announces, or ``carried``
        if none is newer; with neither, the shard's parameters are the state only while the job has taken no
        step (else Refused: a stage whose every replica and backup died is lost; the step fails and is retried
        as hosts come). A state older than the trainer's step with no peer at that step (the last replica died
        before its newest state was backed up) is taken at the trainer's step: that stage loses those updates,
        the job goes on."""
        swarm, job_id = self.board.swarm, view.record.job_id
        deadline = self.clock.monotonic() + view.record.spec.round_timeout_s
        while True:
            found = [(step, p) for step, p in await holders(self.board.dht, swarm, job_id, [index])
                     if p != self.peer_id]
            if carried is not None and (not found or carried[0].step >= found[0][0]):
                await asyncio.to_thread(host.load_state, *carried)
                return self._catch_up(view, host, found, f"the backup this node held (step {carried[0].step})")
            if found and found[0][0] > 0:
                head, data = await fetch_state(self.p2p, [p for _, p in found], pipe_protocol(swarm, job_id, "state"),
                                               index, host.state_bound(), timeout=view.record.spec.round_timeout_s)
                await asyncio.to_thread(host.load_state, head, data)  # header, sha256, names, shapes, hash
                return self._catch_up(view, host, found, f"a peer at step {head.step}")
            if view.round == 0:
                return "the shard (no step taken yet)"
            if self.clock.monotonic() > deadline:
                raise Refused(f"no replica or backup of stage {index} announces its state (step {view.round})")
            await self.clock.sleep(POLL_S)

    @staticmethod
    def _catch_up(view, host: StageHost, found: list[tuple[int, str]], source: str) -> str:
        trainer_at = view.round  # the steps the trainer has published
        if host.step >= trainer_at or any(step >= trainer_at for step, _ in found):
            return source
        logger.warning("pipeline job %s: stage %d: the newest state is step %d, the trainer is at %d; the updates "
                       "in between died with the stage's last replica", view.record.job_id, host.index, host.step,
                       trainer_at)
        lost = trainer_at - host.step
        host.skip_to(trainer_at)
        return f"{source}, taken at step {trainer_at} ({lost} step(s) of this stage lost)"

    # ---- the trainer (the submitter) --------------------------------------------------------------------------

    async def _train(self, view) -> None:
        record, spec = view.record, view.record.spec
        job_id, p = record.job_id, spec.pipeline
        shard_dir = self.job_dir(job_id) / "shards"
        if spec.model.arch == "hf" and self.models is not None:  # a restarted trainer: hashed again, registered
            await self.models.ensure(spec.model.files, [])
        data = await asyncio.to_thread(load_job_data, spec, self.data_dir)
        cfg = await asyncio.to_thread(pipeline_model_config, spec)
        t = min(data.x.shape[1] - 1, int(cfg.get("n_positions") or cfg["max_position_embeddings"]))
        tokens = torch.from_numpy(np.ascontiguousarray(data.x[:, : t + 1]).astype(np.int64))  # (n, T + 1)
        timeout = spec.round_timeout_s
        trainer = PipelineTrainer(self.p2p, self.board.dht, job_id, shard_dir, TrainerConfig(
            swarm=self.board.swarm, micro_batch_size=p.micro_batch, hop_timeout=timeout, end_step_timeout=2 * timeout,
            replica_wait=timeout, seed=spec.seed, device=str(self.device)), trusted_signers=[self.peer_id],
            clock=self.clock)
        rng = np.random.default_rng(spec.seed)
        follower = asyncio.create_task(self.follow_hosts(view), name=f"follow-{job_id}")
        try:
            await self._steps(view, trainer, tokens, rng, t, data)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            await trainer.close()  # its pooled direct connections to the hosts

    async def _steps(self, view, trainer: PipelineTrainer, tokens: torch.Tensor, rng, t: int, data) -> None:
        record, spec = view.record, view.record.spec
        job_id = record.job_id
        completed = min(view.round, spec.rounds)  # > 0: this trainer restarted; the replicas kept the state
        for _ in range(completed):  # the batches an uninterrupted trainer would see from here on
            rng.integers(0, len(tokens), spec.batch_size)
        if completed:
            logger.info("pipeline job %s: resuming after step %d", job_id, completed)
        while completed < spec.rounds:
            if view.record.state == "cancelled":
                return
            rows = tokens[torch.from_numpy(rng.integers(0, len(tokens), spec.batch_size))]  # (B, T + 1)
            give_up = self.clock.monotonic() + RECOVERY_TIMEOUTS * spec.round_timeout_s
            for attempt in itertools.count(1):
                try:
                    report = await trainer.step(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())
                    break
                except PipelineError as e:
                    logger.warning("pipeline job %s: step %d failed (attempt %d): %s", job_id, completed, attempt, e)
                    if self.clock.monotonic() > give_up:
                        raise
                    await self.clock.sleep(POLL_S)
            completed = min(report.step + 1, spec.rounds)  # the replicas' count: right after a restart too
            model_hash = combined_hash([_majority(st.hashes) for st in report.stages])
            self.local[job_id] = (completed, model_hash)
            participants = tuple(dict.fromkeys(q for st in report.stages for q, r in st.replies.items() if r))
            metric = await self._evaluate(view, trainer, data, t) if (
                completed % spec.eval_every == 0 or completed == spec.rounds) else None
            sent = self._bytes(trainer, report, t)
            steps = self.history.setdefault(job_id, [])
            steps.append(step_entry(report, completed, len(rows) * t, participants, metric, sent, self.peer_id))
            del steps[:-MAX_HISTORY]
            state = "running"
            if completed == spec.rounds:  # the files first, then "done": --follow ending means they are there
                await self._export(view, report)
                state = "done"
            await self.board.publish(JobProgress(job_id, self.peer_id, completed, model_hash, state, participants[:256],
                                              report.loss, metric, sent, report.seconds, self.clock.time(), completed))
            logger.info("pipeline job %s: step %d/%d loss %.4f (%.2f s, %d retries)", job_id, completed,
                        spec.rounds, report.loss, report.seconds, report.retries)
        view.record = view.record.replace(state="done", round=completed, model_hash=self.local[job_id][1],
                                          updated_at=self.clock.time())
        await self.board.store_record(view.record)

    async def _evaluate(self, view, trainer: PipelineTrainer, data, t: int) -> float | None:
        """Bits per byte of the model as the stages hold it now on EVAL_ITEMS windows spread evenly over the
        test split (the same windows every time): evaluation passes through the pipeline, which the hosts keep
        nothing of. None (logged) if a pass fails: evaluation never fails the job."""
        total, count = 0.0, 0
        try:
            for batch in eval_batches(data, EVAL_BATCH, EVAL_ITEMS):
                x, y = batch.x[:, :t].contiguous(), batch.y[:, :t].contiguous()
                total += causal_lm_loss(await trainer.forward(x), y).item() * len(x)
                count += len(x)
        except (PipelineError, HopError) as e:  # a host died mid-pass (no retries): the next evaluation counts
            logger.warning("pipeline job %s: evaluation skipped: %s", view.record.job_id, e)
            return None
        return total / count / math.log(2) if count else None

    async def follow_hosts(self, view) -> None:
        """While the job trains: every POLL_S, bring the record's hosts up to date with the live peers
        (protocol/planning/stage_assign.py follow_live: the dead leave, a stage left empty is refilled, newcomers join
        the bottleneck up to pipeline.replica_cap) and store the re-signed record; the hosts follow it (_host).
        A peer counts as dead once its signed peer record expires (the node's ttl)."""
        spec = view.record.spec
        try:  # written at submission, so a restarted trainer has it too
            plan = plan_from_json((self.job_dir(view.record.job_id) / PLAN_FILE).read_bytes())
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("pipeline job %s: no usable stage plan here (%s); hosts will not be reassigned",
                           view.record.job_id, e)
            return
        if plan.spans != view.record.assignment.spans:
            logger.warning("pipeline job %s: the planned stages %s differ from the record's %s; hosts will not be "
                           "reassigned", view.record.job_id, plan.spans, view.record.assignment.spans)
            return
        complaint = ""
        while True:
            await self.clock.sleep(POLL_S)
            try:
                if self.peers is None:  # prepare() refuses to submit without a peer view
                    raise RuntimeError("this node has no view of the live peers")
                live = [node_spec(v) for v in await self.peers() if v.record.peer_id != self.peer_id]
                a = view.record.assignment
                moved = follow_live(plan, a.hosts, live, max_per_stage=spec.pipeline.replica_cap)
            except ValueError as e:  # a stage nobody can take yet: its hops wait, then the step fails
                if str(e) != complaint:
                    complaint = str(e)
                    logger.warning("pipeline job %s: %s", view.record.job_id, e)
                continue
            except Exception as e:  # a failed DHT read: try again
                logger.warning("pipeline job %s: reading the live peers failed: %s", view.record.job_id, e)
                continue
            complaint = ""
            if not moved.moves:
                continue
            hosts = tuple(tuple(x.node_id for x in g) for g in moved.assignment.stages)
            view.record = view.record.replace(assignment=dataclasses.replace(a, hosts=hosts),
                                              updated_at=self.clock.time())
            await self.board.store_record(view.record)
            logger.info("pipeline job %s: hosts moved %s", view.record.job_id, ", ".join(
                f"{m.node_id[-6:]} {m.from_stage}->{m.to_stage}" for m in moved.moves))

    @staticmethod
    def _bytes(trainer: PipelineTrainer, report: StepReport, t: int) -> int:
        """An estimate of a step's activation traffic at the trainer, which relays every hop: per sequence, the
        token ids out; each stage's output in and (but the last) out again to the next stage; the gradients
        the same way back; float32 on the wire (TrainerConfig.wire_dtype is left unset)."""
        s, h, v = trainer.num_stages, trainer.hidden, trainer.vocab
        forward = 8 * t + 4 * t * (2 * h * (s - 1) + v)
        backward = 4 * t * (v + 2 * h * (s - 1))
        return int((forward + backward) * report.micro_batches * trainer.config.micro_batch_size)

    async def _export(self, view, report: StepReport) -> None:
        """Fetch every stage's final state, check it, write the trained shards (signed) and pipeline.json."""
        record, spec = view.record, view.record.spec
        job_id, out = record.job_id, self.job_dir(record.job_id)
        model = await asyncio.to_thread(pipeline_model, spec)
        named = dict(model.named_parameters())
        cfg = stage_config(spec, self.board.swarm)
        stages = []
        for index, st in enumerate(report.stages):
            stage = await asyncio.to_thread(load_stage, out / "shards", index, trusted_signers=[self.peer_id])
            checker = StageHost(self.p2p, None, job_id, index, stage, cfg)  # never started: parses and checks
            head, data = await fetch_state(self.p2p, list(st.hashes), pipe_protocol(self.board.swarm, job_id, "state"),
                                           index, checker.state_bound(), min_step=spec.rounds,
                                           timeout=spec.round_timeout_s)
            await asyncio.to_thread(checker.load_state, head, data)  # header, sha256, names and shapes checked
            if params_sha256(stage) != head.params_hash:
                raise ShardError(f"stage {index}: fetched parameters do not match their announced hash")
            with torch.no_grad():
                for name, tensor in stage.named_parameters():
                    named[name].copy_(tensor)
            stages.append({"stage": index, "layers": list(record.assignment.spans[index]), "step": head.step,
                           "params_hash": head.params_hash, "replicas": st.hashes})
        if self.key is None:  # prepare() refuses to submit without a signing key
            raise RuntimeError(f"pipeline job {job_id}: no key to sign the trained shards with")
        manifest = await asyncio.to_thread(split_model, model, record.assignment.spans, out / "trained", self.key)
        summary = {"job_id": job_id, "steps": spec.rounds, "final_loss": report.loss,
                   "model_hash": manifest.model_hash, "stages": stages, "history": self.history.get(job_id, [])}
        atomic_write(out / "pipeline.json", json.dumps(summary, indent=2).encode(), mode=0o644)
