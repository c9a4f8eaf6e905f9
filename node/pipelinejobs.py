"""Pipeline jobs: one causal LM cut into stages hosted by different daemons, trained by the submitting daemon.

    kind = "pipeline" in a job file (node/jobspec.py); node/jobmanager.py hands such jobs to PipelineJobs:
      submit  -> prepare(spec, nonce): plan, choose hosts, split + sign shards, serve them -> PipelineAssignment
      poll    -> why_not(record) ("" to take part, else the reason shown in `swarmnode jobs`), then run(view)

Life cycle of a job ``J`` (swarm ``S``, submitter ``T``):
  1. At submission T builds the model from its config and seed (node/models.py), plans the stages
     (node/splitter.py plan_for_model: strategy balanced | layer_wise), takes the ``stages * replicas`` fastest
     live peers other than itself from the swarm's signed peer records (capability: fp32 TFLOPS, RAM), places
     them with protocol/stage_assign.py assign_nodes, then evens the groups to ``replicas`` hosts per stage
     (assign_nodes maximises the slowest stage's throughput and may give a cheap stage a single host; the job
     asks for ``replicas`` per stage so that every stage survives the loss of a host). It splits the model into
     signed shards (split_model with T's key) under <home>/jobs/J/shards/, serves them and the manifest by
     sha256 with a ShardServer, and publishes the spans, hosts and manifest sha256/size inside the signed job
     record (the manifest itself can outgrow the record's bound for large configs; its hash cannot).
  2. A daemon that finds itself among the hosts of stage i fetches the manifest and then shard i from T
     (protocol/shard_transfer.py: sha256-verified, atomically written), checks that the manifest is signed by
     T and that its spans are the record's, loads the stage (load_stage: size + sha256 before parsing) and
     serves it with node/stagehost.py StageHost under pipeline id J until the job is done or cancelled. Other
     daemons show "not assigned".
  3. T runs node/pipeline.py PipelineTrainer on its own slice of the byte corpus for ``rounds`` steps, finding
     the replicas through their DHT records (a dead replica's record expires; the trainer retries hops
     elsewhere), and publishes a signed JobProgress per step (round = steps done, the step's mean loss, an
     estimate of the activation bytes it relayed, the step time; model_hash = sha256 over the stages'
     parameter hashes in stage order).
  4. After the last step T fetches every stage's state from its replicas (checked against its header and
     parameter hash), reassembles the model and writes the trained shards, signed, under <home>/jobs/J/trained/
     plus <home>/jobs/J/pipeline.json (each replica's parameter hash per stage), atomically, and only then
     publishes "done" (so `--follow` ending means the files are there).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import pathlib
import time
from typing import Awaitable, Callable

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.datasets import DATASETS, load_node_data
from node.errors import EXIT_USAGE, NodeError
from node.files import atomic_write
from node.models import build_model, params_sha256, resolve_overrides
from node.pipeline import PipelineError, PipelineTrainer, StepReport, TrainerConfig
from node.splitter import load_stage, plan_for_model, read_manifest, split_model
# via node.stagehost, which imports them wherever they are defined (node/stage_state.py, protocol/pipeline_messages.py)
from node.stagehost import StageConfig, StageHooks, StageHost, fetch_state, pipe_protocol
from protocol.jobs import JobProgress, JobRecord, JobSpec, PipelineAssignment, job_id_for
from protocol.shard_transfer import ShardServer, fetch_shard, shard_protocol
from protocol.shards import MANIFEST_FILE, ShardError, ShardInfo
from protocol.stage_assign import NodeSpec, assign_nodes

logger = logging.getLogger(__name__)
PIPELINE_ARCHS = ("gpt2", "llama")
POLL_S = 1.0
STEP_ATTEMPTS = 3  # a step that fails (no replica of a stage, out of retries) is tried again this many times


def layers_of(config) -> int:
    return int(config.get("n_layer") or config["num_hidden_layers"])


def check_pipeline_spec(spec: JobSpec) -> None:
    """ValueError naming the field when a pipeline spec cannot run: the model, the stage count, the data."""
    if spec.model.arch not in PIPELINE_ARCHS:
        raise ValueError(f"model.arch: a pipeline job takes {' or '.join(PIPELINE_ARCHS)}, got {spec.model.arch!r}")
    cfg = resolve_overrides(spec.model.arch, spec.model.config())
    if cfg.get("tie_word_embeddings", True):
        raise ValueError("model.tie_word_embeddings: must be false for a pipeline job (the embedding and the LM "
                         "head live in different stages)")
    layers = layers_of(cfg)
    if spec.pipeline.stages > layers:
        raise ValueError(f"pipeline.stages: must be <= the model's {layers} layers, got {spec.pipeline.stages}")
    info = DATASETS.get(spec.dataset)
    if info is None or info.task != "causal-lm":
        known = [n for n, d in DATASETS.items() if d.task == "causal-lm"]
        raise ValueError(f"dataset: a pipeline job trains on a byte corpus ({', '.join(map(repr, known))}), "
                         f"got {spec.dataset!r}")


def even_groups(groups: list[list[NodeSpec]], costs: tuple[float, ...], replicas: int) -> list[list[NodeSpec]]:
    """assign_nodes' groups moved to exactly ``replicas`` per stage: the slowest host of the fullest stage moves
    to the costliest short stage until none is short (the caller passes stages * replicas nodes)."""
    groups = [sorted(g, key=lambda x: (-x.throughput, x.node_id)) for g in groups]
    while True:
        short = [s for s, g in enumerate(groups) if len(g) < replicas]
        if not short:
            return groups
        full = max(range(len(groups)), key=lambda s: (len(groups[s]), -s))
        to = max(short, key=lambda s: (costs[s], -s))
        groups[to].append(groups[full].pop())


def combined_hash(stage_hashes: list[str]) -> str:
    return hashlib.sha256("".join(stage_hashes).encode()).hexdigest() if all(stage_hashes) else ""


def _majority(hashes: dict[str, str]) -> str:
    values = list(hashes.values())
    return max(sorted(set(values)), key=values.count) if values else ""


def stage_config(spec: JobSpec, swarm: str) -> StageConfig:
    """Every replica of every stage of a job uses the same settings, derived from the spec alone."""
    return StageConfig(swarm=swarm, optimizer=spec.inner.kind, lr=spec.inner.lr, momentum=spec.inner.momentum,
                       weight_decay=spec.inner.weight_decay, density=spec.density,
                       max_batch=max(64, spec.pipeline.micro_batch), part_timeout=min(10.0, spec.round_timeout_s),
                       result_timeout=min(20.0, 2 * spec.round_timeout_s))


class PipelineJobs:
    """The pipeline half of a node's JobManager (``manager``: p2p, dht, swarm, peer_id, home, data_dir,
    _publish, _store_record); ``key`` signs the shards, ``peers()`` lists the live peer records."""

    def __init__(self, manager, key: Ed25519PrivateKey | None, peers: Callable[[], Awaitable[list]] | None):
        self.m, self.key, self.peers = manager, key, peers
        self._files: dict[str, pathlib.Path] = {}  # sha256 -> file this node serves (shards, manifests)
        self._server: ShardServer | None = None
        self._hosts: dict[str, StageHost] = {}
        self.local: dict[str, tuple[int, str]] = {}  # job id -> (steps, parameter hash) held here

    async def stop(self) -> None:
        for host in list(self._hosts.values()):
            await host.stop()
        self._hosts.clear()
        if self._server is not None:
            await self._server.stop()
            self._server = None

    def _dir(self, job_id: str) -> pathlib.Path:
        return self.m.home / "jobs" / job_id

    async def _serve(self, paths: list[pathlib.Path]) -> None:
        for path in paths:
            self._files[hashlib.sha256(path.read_bytes()).hexdigest()] = path
        if self._server is None:
            self._server = ShardServer(self.m.p2p, shard_protocol(self.m.swarm), self._files.get)
            await self._server.start()

    # ---- the submitter: plan, place, split, serve ------------------------------------------------------------

    async def prepare(self, spec: JobSpec, nonce: str, source: str) -> PipelineAssignment:
        """Everything the job record must say before it is stored (module docstring, step 1); NodeError (one
        line, naming the field) when the swarm or this node cannot run the job."""
        try:
            check_pipeline_spec(spec)
        except ValueError as e:
            raise NodeError(f"{source}: {e}", EXIT_USAGE) from None
        if self.key is None or self.peers is None:
            raise NodeError("this node cannot submit pipeline jobs (no signing key or peer view)")
        if self.m.data_dir is None:
            raise NodeError(f"{source}: dataset: the submitting node trains on its own data; start it with --data DIR "
                            f"holding DIR/{spec.dataset}", EXIT_USAGE)
        try:
            load_node_data(self.m.data_dir / spec.dataset, dataset=spec.dataset)
        except (ValueError, OSError) as e:
            raise NodeError(f"{source}: dataset: no usable local data for {spec.dataset!r}: {e}", EXIT_USAGE) from None
        p = spec.pipeline
        need = p.stages * p.replicas
        views = [v for v in await self.peers() if v.record.peer_id != self.m.peer_id]
        if len(views) < need:
            raise NodeError(f"{source}: pipeline.replicas: {p.stages} stages x {p.replicas} replicas need {need} hosts, "
                            f"the swarm has {len(views)} live peers besides this node", EXIT_USAGE)
        job_id = job_id_for(spec, self.m.peer_id, nonce)
        model = (await asyncio.to_thread(build_model, spec.model.arch, spec.model.config(), spec.seed)).module
        plan = plan_for_model(model, p.stages, p.strategy)
        nodes = sorted((NodeSpec(v.record.peer_id, max(v.record.capability.tflops_fp32, 1e-6),
                                 float(v.record.capability.ram_bytes)) for v in views),
                       key=lambda x: (-x.throughput, x.node_id))[:need]
        groups = even_groups([list(g) for g in assign_nodes(plan, nodes).stages], plan.costs, p.replicas)
        shard_dir = self._dir(job_id) / "shards"
        manifest = await asyncio.to_thread(split_model, model, plan.spans, shard_dir, self.key)
        manifest_bytes = (shard_dir / MANIFEST_FILE).read_bytes()
        await self._serve([shard_dir / MANIFEST_FILE, *(shard_dir / s.file for s in manifest.shards)])
        logger.info("pipeline job %s: stages %s on %s", job_id, plan.spans,
                    [[x.node_id[-6:] for x in g] for g in groups])
        return PipelineAssignment(plan.spans, tuple(tuple(x.node_id for x in g) for g in groups),
                                  hashlib.sha256(manifest_bytes).hexdigest(), len(manifest_bytes))

    # ---- every node: take part or not --------------------------------------------------------------------

    def why_not(self, record: JobRecord) -> str:
        if record.assignment is None:
            return "the pipeline job has no stage assignment"
        if record.submitter == self.m.peer_id:
            if not (self._dir(record.job_id) / "shards" / MANIFEST_FILE).exists():
                return "this node submitted the job but holds no shards of it (restarted?)"
            return ""
        return "" if record.assignment.stage_of(self.m.peer_id) is not None else "not assigned"

    async def run(self, view) -> None:
        try:
            if view.record.submitter == self.m.peer_id:
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
        record, spec = view.record, view.record.spec
        a, job_id = record.assignment, record.job_id
        index = a.stage_of(self.m.peer_id)
        shard_dir = self._dir(job_id) / "shards"
        shard_dir.mkdir(parents=True, exist_ok=True)
        proto = shard_protocol(self.m.swarm)
        # the manifest travels as a "shard" whose sha256 and size the signed record gives
        manifest_info = ShardInfo(0, 1, MANIFEST_FILE, a.manifest_sha256, a.manifest_size)
        await fetch_shard(self.m.p2p, [record.submitter], manifest_info, shard_dir / MANIFEST_FILE, protocol_name=proto)
        manifest = read_manifest(shard_dir, trusted_signers=[record.submitter])
        if tuple((s.start, s.end) for s in manifest.shards) != a.spans:
            raise ShardError(f"the manifest's stages {[(s.start, s.end) for s in manifest.shards]} are not the "
                             f"record's {list(a.spans)}")
        info = manifest.shards[index]
        others = [p for p in a.hosts[index] if p != self.m.peer_id]
        await fetch_shard(self.m.p2p, [record.submitter, *others], info, shard_dir / info.file, protocol_name=proto)
        stage = await asyncio.to_thread(load_stage, shard_dir, index, trusted_signers=[record.submitter])
        await self._serve([shard_dir / MANIFEST_FILE, shard_dir / info.file])  # a later replica may fetch here

        def after_step(reply) -> None:
            self.local[job_id] = (reply.step, reply.params_hash)

        host = StageHost(self.m.p2p, self.m.dht, job_id, index, stage, stage_config(spec, self.m.swarm),
                         StageHooks(after_step=after_step), manifest)
        self.local[job_id] = (host.step, host.params_hash)
        await host.start()
        self._hosts[job_id] = host
        logger.info("pipeline job %s: hosting stage %d (layers %s)", job_id, index, a.spans[index])
        try:
            while view.state not in ("done", "cancelled"):
                await asyncio.sleep(POLL_S)
        finally:
            self.local[job_id] = (host.step, host.params_hash)
            self._hosts.pop(job_id, None)
            await host.stop()

    # ---- the trainer (the submitter) --------------------------------------------------------------------------

    async def _train(self, view) -> None:
        record, spec = view.record, view.record.spec
        job_id, p = record.job_id, spec.pipeline
        shard_dir = self._dir(job_id) / "shards"
        data = load_node_data(self.m.data_dir / spec.dataset, dataset=spec.dataset)
        cfg = resolve_overrides(spec.model.arch, spec.model.config())
        t = min(data.x.shape[1] - 1, int(cfg.get("n_positions") or cfg["max_position_embeddings"]))
        tokens = torch.from_numpy(np.ascontiguousarray(data.x[:, : t + 1]).astype(np.int64))  # (n, T + 1)
        timeout = spec.round_timeout_s
        trainer = PipelineTrainer(self.m.p2p, self.m.dht, job_id, shard_dir, TrainerConfig(
            swarm=self.m.swarm, micro_batch_size=p.micro_batch, hop_timeout=timeout, end_step_timeout=2 * timeout,
            replica_wait=timeout, seed=spec.seed), trusted_signers=[self.m.peer_id])
        rng = np.random.default_rng(spec.seed)
        completed = 0
        while completed < spec.rounds:
            if view.record.state == "cancelled":
                return
            rows = tokens[torch.from_numpy(rng.integers(0, len(tokens), spec.batch_size))]  # (B, T + 1)
            for attempt in range(1, STEP_ATTEMPTS + 1):
                try:
                    report = await trainer.step(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())
                    break
                except PipelineError as e:
                    logger.warning("pipeline job %s: step %d failed (attempt %d): %s", job_id, completed, attempt, e)
                    if attempt == STEP_ATTEMPTS:
                        raise
                    await asyncio.sleep(POLL_S)
            completed += 1
            model_hash = combined_hash([_majority(st.hashes) for st in report.stages])
            self.local[job_id] = (completed, model_hash)
            state = "running"
            if completed == spec.rounds:  # the files first, then "done": --follow ending means they are there
                await self._export(view, report)
                state = "done"
            participants = tuple(dict.fromkeys(q for st in report.stages for q, r in st.replies.items() if r))
            await self.m._publish(JobProgress(job_id, self.m.peer_id, completed, model_hash, state, participants[:256],
                                              report.loss, None, self._bytes(trainer, report, t), report.seconds,
                                              time.time(), completed))
            logger.info("pipeline job %s: step %d/%d loss %.4f (%.2f s, %d retries)", job_id, completed,
                        spec.rounds, report.loss, report.seconds, report.retries)
        view.record = view.record.replace(state="done", round=completed, model_hash=self.local[job_id][1],
                                          updated_at=time.time())
        await self.m._store_record(view.record)

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
        job_id, out = record.job_id, self._dir(record.job_id)
        model = (await asyncio.to_thread(build_model, spec.model.arch, spec.model.config(), spec.seed)).module
        named = dict(model.named_parameters())
        cfg = stage_config(spec, self.m.swarm)
        stages = []
        for index, st in enumerate(report.stages):
            stage = await asyncio.to_thread(load_stage, out / "shards", index, trusted_signers=[self.m.peer_id])
            checker = StageHost(self.m.p2p, None, job_id, index, stage, cfg)  # never started: parses and checks
            head, data = await fetch_state(self.m.p2p, list(st.hashes), pipe_protocol(self.m.swarm, job_id, "state"),
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
        manifest = await asyncio.to_thread(split_model, model, record.assignment.spans, out / "trained", self.key)
        summary = {"job_id": job_id, "steps": spec.rounds, "final_loss": report.loss,
                   "model_hash": manifest.model_hash, "stages": stages}
        atomic_write(out / "pipeline.json", json.dumps(summary, indent=2).encode(), mode=0o644)
