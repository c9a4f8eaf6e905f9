"""Served models on this node (kind = "serve"): a model's stages hosted by other nodes for inference, and the HTTP
endpoint on the node that submitted it.

    kind = "serve" in a job file (node/jobs/spec.py), or ``swarmnode serve MODEL --stages N``; node/jobs/manager.py
    hands such jobs to ServeJobs:
      submit  -> prepare(spec, nonce): check the model can be served, then place it as a pipeline job is placed
      poll    -> why_not(view), then run(view): the submitter serves the endpoint, an assigned node a stage

Life cycle of a served model ``J`` (submitter ``T``):
  1. At submission T checks the model (a GPT-2 or LLaMA causal LM -- from an arch and the job's seed, or a model
     folder -- or a BertModel encoder folder such as the bundled MiniLM) and a tokenizer for it (the folder's own, or
     the byte vocabulary of the byte-level LMs), then places it exactly as a pipeline job: the stages planned, their
     hosts chosen among the live peers, the model split into shards signed by T and served by sha256, the spans and
     hosts in the signed job record (node/jobs/pipeline/pipeline_jobs.py PipelineJobs.place, shared with it).
  2. A node the record assigns stage i fetches the manifest and shard i (sha256-verified, signature checked,
     PipelineJobs.fetch_stage) and serves it with node/serving/host.py InferenceHost on its device, in the job's
     precision, eval mode, for as long as the job runs; a stage it is moved to or from is started or stopped.
  3. T runs the endpoint: node/serving/http_api.py over a SwarmBackend whose InferenceClient routes each request
     through one live replica per stage, at the daemon's ``--http`` address (127.0.0.1 and any free port by default;
     off loopback a token in <home>/jobs/J/http.token); it writes <home>/jobs/J/serving.json (the URL, the model's
     name and kind), which ``swarmnode generate`` / ``embed`` read. Meanwhile it keeps the record's hosts up to date
     with the live peers (PipelineJobs.follow_hosts: the dead replaced, newcomers to the busiest stage up to
     max_replicas). Cancelling the job stops the endpoint and every host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib

import torch

from node.jobs.board import POLL_S, JobView
from node.jobs.pipeline.pipeline_jobs import RETRY_S, PipelineJobs, layers_of, pipeline_model_config
from node.ml.hf_models import read_config, verified_folder
from node.ml.servable import TOKENIZER_FILES
from node.runtime.errors import EXIT_USAGE, NodeError
from node.runtime.files import atomic_write
from node.serving.backend import SwarmBackend
from node.serving.client import ClientConfig, InferenceClient, ServedModel
from node.serving.host import HostConfig, InferenceHost
from node.serving.http_api import start_http
from node.serving.text import ByteText, HFText, TextCodec
from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.pipeline.control import one_line
from protocol.records.job_records import PipelineAssignment
from protocol.records.job_spec import JobSpec
from protocol.transfer.shards import ShardError

logger = logging.getLogger(__name__)
CAUSAL_CLASSES = ("GPT2LMHeadModel", "LlamaForCausalLM")
ENCODER_CLASSES = ("BertModel",)
SERVING_FILE = "serving.json"
MAX_CONTEXT = 4096  # tokens a host keeps per session, at most (the model's own context below it)


def context_of(config: dict) -> int:
    """The tokens a session may hold: the model's context (n_positions / max_position_embeddings), at most
    MAX_CONTEXT."""
    return min(int(config.get("n_positions") or config.get("max_position_embeddings") or MAX_CONTEXT), MAX_CONTEXT)


def served_class(spec: JobSpec) -> tuple[str, dict]:
    """(transformers class, config dict) of the model a serve spec names; ValueError naming the field if it cannot be
    served."""
    if spec.model.arch in ("gpt2", "llama"):
        return CAUSAL_CLASSES[spec.model.arch == "llama"], pipeline_model_config(spec)
    if spec.model.arch != "hf":
        raise ValueError(f"model.arch: a served model is gpt2, llama or a model folder (model.path), got "
                         f"{spec.model.arch!r}")
    config = read_config(verified_folder(spec.model.files))
    archs = list(getattr(config, "architectures", None) or ())
    if not archs or archs[0] not in (*CAUSAL_CLASSES, *ENCODER_CLASSES):
        raise ValueError(f"model.path: serving takes {', '.join((*CAUSAL_CLASSES, *ENCODER_CLASSES))} folders, this "
                         f"one holds {archs[0] if archs else config.model_type!r}")
    return archs[0], config.to_dict()


def check_serve_spec(spec: JobSpec) -> None:
    cls, config = served_class(spec)
    task = "causal-lm" if cls in CAUSAL_CLASSES else "embedding"
    if spec.task != task:
        raise ValueError(f"task: a {cls} {'generates' if task == 'causal-lm' else 'embeds'}: task = {task!r}, got "
                         f"{spec.task!r}")
    layers = layers_of(config)
    if spec.pipeline is None or not 1 <= spec.pipeline.stages <= layers:
        raise ValueError(f"pipeline.stages: must be 1 to the model's {layers} layers")
    text_codec(spec, config)  # a tokenizer it can be served with


def text_codec(spec: JobSpec, config: dict) -> TextCodec:
    """The folder's own tokenizer, or the byte vocabulary of a byte-level LM (vocab_size <= 256)."""
    if spec.model.arch == "hf":
        folder = verified_folder(spec.model.files)
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return HFText.from_folder(folder)
    vocab = int(config["vocab_size"])
    if vocab > 256:
        raise ValueError(f"model.path: no tokenizer beside the model (tokenizer.json, vocab.txt, ...) and a vocabulary "
                         f"of {vocab} ids, not the byte vocabulary: save its tokenizer in the folder")
    return ByteText(vocab)


def served_model(spec: JobSpec, config: dict, cls: str) -> ServedModel:
    hidden = int(config.get("n_embd") or config["hidden_size"])
    causal = cls in CAUSAL_CLASSES
    assert spec.pipeline is not None  # check_serve_spec
    return ServedModel(spec.pipeline.stages, hidden, int(config["vocab_size"]) if causal else hidden,
                       "causal-lm" if causal else "encoder", context_of(config))


class ServeJobs:
    """Kind "serve" (see the module docstring), over the daemon's PipelineJobs, whose placement, shard transfer
    and host reassignment it shares; ``http``: (host, port) of the endpoints of the models this node submits."""

    def __init__(self, pipeline: PipelineJobs, http: tuple[str, int] = ("127.0.0.1", 0), clock: Clock = SYSTEM_CLOCK,
                 device: torch.device | None = None):
        self.pipeline, self.http, self.clock = pipeline, http, clock
        self.device = torch.device("cpu") if device is None else device
        self.hosts: dict[str, InferenceHost] = {}
        self.local: dict[str, tuple[int, str]] = {}  # job id -> (0, sha256 of the shard this node serves)
        self.urls: dict[str, str] = {}  # job id -> the endpoint's URL (models this node submitted)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        for host in list(self.hosts.values()):
            await host.stop()
        self.hosts.clear()

    async def prepare(self, spec: JobSpec, nonce: str, source: str) -> PipelineAssignment:
        try:
            await asyncio.to_thread(check_serve_spec, spec)
        except ValueError as e:
            raise NodeError(f"{source}: {e}", EXIT_USAGE) from None
        return await self.pipeline.place(spec, nonce, source)

    def why_not(self, view: JobView) -> tuple[str, str]:
        return self.pipeline.why_not(view)

    def local_state(self, job_id: str) -> tuple[int, str] | None:
        """(0, the sha256 of the stage's shard) while this node serves a stage of the model (it trains nothing)."""
        return self.local.get(job_id) if job_id in self.hosts else None

    async def export(self, view: JobView, out: pathlib.Path, merge: bool = False) -> list[pathlib.Path]:
        raise NodeError(f"job {view.job_id} is a served model: it trains nothing to export", EXIT_USAGE)

    async def run(self, view: JobView) -> None:
        try:
            if view.record.submitter == self.pipeline.peer_id:
                await self._endpoint(view)
            else:
                await self._host(view)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("served model %s failed on this node", view.record.job_id)
            view.declined = f"failed: {type(e).__name__}: {one_line(e)}"[:200]

    # ---- the submitter: the endpoint ---------------------------------------------------------------------------

    async def _endpoint(self, view: JobView) -> None:
        record, spec = view.record, view.record.spec
        job_id, folder = record.job_id, self.pipeline.job_dir(record.job_id)
        if spec.model.arch == "hf" and self.pipeline.models is not None:  # after a restart: hashed again
            await self.pipeline.models.ensure(spec.model.files, [])
        cls, config = await asyncio.to_thread(served_class, spec)
        text = await asyncio.to_thread(text_codec, spec, config)
        model = served_model(spec, config, cls)
        client = InferenceClient(self.pipeline.p2p, self.pipeline.board.dht, job_id, model,
                                 ClientConfig(swarm=self.pipeline.board.swarm, hop_timeout=spec.round_timeout_s,
                                              replica_wait=spec.round_timeout_s))
        backend = SwarmBackend(client, text, name=spec.name)
        runner, url = await start_http(backend, self.http[0], self.http[1], folder / "http.token")
        follower = asyncio.create_task(self.pipeline.follow_hosts(view), name=f"follow-{job_id}")
        try:
            self.urls[job_id] = url
            atomic_write(folder / SERVING_FILE, json.dumps({
                "job_id": job_id, "model": spec.name, "kind": model.kind, "url": url, "stages": model.stages,
                "token_file": str(folder / "http.token") if (folder / "http.token").exists() else None}).encode(),
                mode=0o644)
            logger.info("served model %s (%s, %d stages): endpoint at %s", spec.name, model.kind, model.stages, url)
            while view.state not in ("done", "cancelled"):
                await self.clock.sleep(POLL_S)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            client.close()
            self.urls.pop(job_id, None)
            (folder / SERVING_FILE).unlink(missing_ok=True)
            await runner.cleanup()

    # ---- a host ------------------------------------------------------------------------------------------------

    async def _host(self, view: JobView) -> None:
        """Serve whatever stage the submitter's signed record assigns this node while the job runs."""
        job_id = view.record.job_id
        retry_at = 0.0
        try:
            while view.state not in ("done", "cancelled"):
                index = view.record.assignment.stage_of(self.pipeline.peer_id) if view.record.assignment else None
                host = self.hosts.get(job_id)
                if host is not None and host.index != index:
                    logger.info("served model %s: no longer hosting stage %d", job_id, host.index)
                    await self.hosts.pop(job_id).stop()
                    host = None
                if index is not None and host is None and self.clock.monotonic() >= retry_at:
                    try:
                        host = await self._start_host(view, index)
                    except (ShardError, asyncio.CancelledError):
                        raise  # a bad signature or shard hash: nothing to retry
                    except Exception as e:  # the submitter or a peer unreachable for now
                        view.declined = f"stage {index}: {type(e).__name__}: {one_line(e)}"[:200]
                        logger.warning("served model %s: %s; retrying", job_id, view.declined)
                        retry_at = self.clock.monotonic() + RETRY_S
                if host is not None or index is None:
                    view.declined = "" if host is not None else "not assigned"
                await self.clock.sleep(POLL_S)
        finally:
            if job_id in self.hosts:
                await self.hosts.pop(job_id).stop()

    async def _start_host(self, view: JobView, index: int) -> InferenceHost:
        spec = view.record.spec
        manifest, stage = await self.pipeline.fetch_stage(view, index)
        context = context_of(manifest.config)
        host = InferenceHost(self.pipeline.p2p, self.pipeline.board.dht, view.record.job_id, index, stage,
                             HostConfig(swarm=self.pipeline.board.swarm, max_tokens=context,
                                        max_cached_tokens=64 * context, precision=spec.precision),
                             self.clock, self.device)
        await host.start()
        self.hosts[view.record.job_id] = host
        self.local[view.record.job_id] = (0, manifest.shards[index].sha256)
        logger.info("served model %s: hosting stage %d (layers %s)", view.record.job_id, index,
                    view.record.assignment.spans[index] if view.record.assignment else "?")
        return host


__all__ = ["SERVING_FILE", "ServeJobs", "check_serve_spec"]
