"""GET /metrics: a dashboard snapshot (node/api/dashboard.py ``snapshot``) in Prometheus' text format, built with
prometheus_client from the same numbers the page and ``swarmnode ... --json`` show.

    text = metrics_text(state)          # bytes, CONTENT_TYPE_LATEST

Every scrape renders a fresh registry from the snapshot: the counts are this node's records of its jobs' rounds
(the entries of each export's report.json), not counters of this process's lifetime, so a restarted node that
resumed from its checkpoint reports the same totals as before the restart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

ROUND_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ROUND_BYTES_BUCKETS = (1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9)
JOB_STATES = ("running", "paused", "done", "cancelled")


def histogram(name: str, doc: str, labels: dict[str, str], values: Iterable[float], buckets: tuple[float, ...],
              family: HistogramMetricFamily | None = None) -> HistogramMetricFamily:
    """``values`` as one labelled histogram sample of ``family`` (a new family when None)."""
    family = family or HistogramMetricFamily(name, doc, labels=list(labels))
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    cumulative = [(str(b), sum(1 for v in values if v <= b)) for b in buckets] + [("+Inf", len(values))]
    family.add_metric(list(labels.values()), cumulative, sum(values))
    return family


class SnapshotCollector(Collector):
    def __init__(self, state: dict):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        peers = GaugeMetricFamily("swarmnode_peers", "Live peer records this node reads, its own included")
        peers.add_metric([], len(state["peers"]))
        yield peers
        jobs = GaugeMetricFamily("swarmnode_jobs", "Jobs in the swarm by state", labels=["state"])
        for s in sorted({*JOB_STATES, *(j["state"] for j in state["jobs"])}):
            jobs.add_metric([s], sum(1 for j in state["jobs"] if j["state"] == s))
        yield jobs
        rounds = CounterMetricFamily("swarmnode_rounds", "Rounds of a job in this node's report, by outcome",
                                     labels=["job_id", "outcome"])
        job_round = GaugeMetricFamily("swarmnode_job_round", "Rounds completed (the freshest progress record)",
                                      labels=["job_id"])
        seconds = bytes_ = None
        for job in state["jobs"]:
            history = job.get("history", [])
            ok = [e for e in history if e.get("ok")]
            rounds.add_metric([job["job_id"], "ok"], len(ok))
            rounds.add_metric([job["job_id"], "failed"], sum(1 for e in history if not e.get("ok")))
            job_round.add_metric([job["job_id"]], job["round"])
            labels = {"job_id": job["job_id"]}
            seconds = histogram("swarmnode_round_seconds", "Wall time of this node's applied rounds", labels,
                                (e.get("seconds") for e in ok), ROUND_SECONDS_BUCKETS, seconds)
            bytes_ = histogram("swarmnode_round_bytes", "Bytes sent and received in this node's applied rounds "
                               "(a pipeline step: the activations the trainer relayed)", labels,
                               (e.get("bytes_exchanged", (e.get("bytes_sent") or 0) + (e.get("bytes_received") or 0))
                                for e in ok), ROUND_BYTES_BUCKETS, bytes_)
        yield rounds
        yield job_round
        yield from (f for f in (seconds, bytes_) if f is not None)
        yield from pipeline_gauges(state["jobs"])
        host = state["host"]
        for key, name, doc in (("cpu_percent", "swarmnode_host_cpu_percent", "CPU use of this machine, percent"),
                               ("memory_used_bytes", "swarmnode_host_memory_used_bytes", "Memory in use"),
                               ("memory_total_bytes", "swarmnode_host_memory_total_bytes", "Memory installed")):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], host[key])
            yield gauge
        refused = CounterMetricFamily("swarmnode_rejected", "What this node refused from peers, by what and why "
                                      "(the error's class)", labels=["what", "reason"])
        for r in state.get("rejected", []):
            refused.add_metric([r["what"], r["reason"]], r["count"])
        yield refused
        util = GaugeMetricFamily("swarmnode_gpu_utilization_percent", "GPU utilisation (NVML)", labels=["gpu"])
        used = GaugeMetricFamily("swarmnode_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"])
        for gpu in host["gpus"]:
            util.add_metric([str(gpu["index"])], gpu["utilization_percent"])
            used.add_metric([str(gpu["index"])], gpu["memory_used_bytes"])
        yield util
        yield used


def pipeline_gauges(jobs: list[dict]) -> Iterator[Metric]:
    """The last step of each pipeline job this node trains (node/jobs/pipeline/throughput.py)."""
    tokens = GaugeMetricFamily("swarmnode_pipeline_tokens_per_second", "Tokens per second of the last pipeline step",
                               labels=["job_id"])
    load = GaugeMetricFamily("swarmnode_pipeline_stage_load_seconds", "Seconds of hops per serving replica of each "
                             "stage in the last step", labels=["job_id", "stage"])
    neck = GaugeMetricFamily("swarmnode_pipeline_bottleneck_stage", "The most loaded stage of the last step",
                             labels=["job_id"])
    for job in jobs:
        last = next((e for e in reversed(job.get("history", [])) if "stage_load_s" in e), None)
        if last is None:
            continue
        if last.get("tokens_per_s") is not None:
            tokens.add_metric([job["job_id"]], last["tokens_per_s"])
        for stage, seconds in enumerate(last["stage_load_s"]):
            load.add_metric([job["job_id"], str(stage)], seconds)
        if last.get("bottleneck_stage") is not None:
            neck.add_metric([job["job_id"]], last["bottleneck_stage"])
    yield from (tokens, load, neck)


def metrics_text(state: dict) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(state))
    return generate_latest(registry)
