"""A pipeline step's figures for the dashboard (node/jobs/pipeline/throughput.py): tokens per second, each stage's
load per serving replica, the bottleneck stage; their /metrics gauges; and pipeline frames that do not decode
counted as refusals (protocol/pipeline/activations.py, control.py)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.api.metrics import metrics_text
from node.jobs.pipeline.steps import StageStep, StepReport
from node.jobs.pipeline.throughput import bottleneck, stage_loads, step_entry
from protocol import rejections
from protocol.pipeline.activations import FLOAT_DTYPES, ExpectedTensor, ForwardRequest, activation_from_wire
from protocol.pipeline.control import EndStepReply, Status, control_from_wire
from protocol.wire import WireError, pack


def reply(hash_: str) -> EndStepReply:
    return EndStepReply(3, True, 4.0, 2, 0, 2, hash_, None, "")


def report(busy: tuple[float, ...], replicas: list[int], seconds: float = 0.5) -> StepReport:
    stages = tuple(StageStep(i, {f"p{i}{j}": reply("ab" * 32) for j in range(n)} | {f"dead{i}": None}, 4, True, True)
                   for i, n in enumerate(replicas))
    return StepReport(3, 2.5, 4, 1, seconds, stages, busy)


def test_the_bottleneck_is_the_stage_with_most_hop_time_per_serving_replica():
    # stage 1 spends the most time, but over 3 replicas; stage 2, 0.9 s on one, is the bottleneck
    loads = stage_loads((1.0, 2.4, 0.9), [2, 3, 1])
    assert loads == pytest.approx([0.5, 0.8, 0.9]) and bottleneck(loads) == 2
    assert bottleneck([0.4, 0.4]) == 0  # the first on ties
    assert bottleneck([]) is None and bottleneck([0.0, 0.0]) is None  # no figures: no bottleneck
    assert stage_loads((0.3,), [0]) == [0.3]  # a stage none of whose replicas ended the step counts as one


def test_a_steps_entry_has_the_federated_keys_and_the_pipelines_figures():
    entry = step_entry(report((1.0, 3.0), [2, 1]), 4, 256, ("p00", "p01", "p10"), 1.9, 12_345, "me")
    assert entry["round"] == 4 and entry["ok"] and entry["train_loss"] == 2.5 and entry["reported_by"] == "me"
    assert entry["metrics"] == {"eval_bits_per_byte": 1.9} and entry["participants"] == ["p00", "p01", "p10"]
    assert entry["tokens_per_s"] == pytest.approx(512.0) and entry["bytes_exchanged"] == 12_345
    assert entry["stage_replicas"] == [2, 1]  # the replicas that answered the step end (not the dead one)
    assert entry["stage_load_s"] == pytest.approx([0.5, 3.0]) and entry["bottleneck_stage"] == 1
    assert step_entry(report((1.0,), [1], seconds=0.0), 1, 8, (), None, 0, "me")["tokens_per_s"] is None
    assert step_entry(report((1.0,), [1]), 1, 8, (), None, 0, "me")["metrics"] == {}


def test_metrics_export_the_last_steps_throughput_load_and_bottleneck():
    steps = [step_entry(report((1.0, 3.0), [2, 1], s), i + 1, 256, ("a",), None, 1000, "me")
             for i, s in enumerate((0.5, 0.25))]
    state = {"peers": [], "jobs": [{"job_id": "j1", "state": "running", "round": 2, "history": steps}],
             "host": {"cpu_percent": 1.0, "memory_used_bytes": 1, "memory_total_bytes": 2, "gpus": []}}
    families = {f.name: f for f in text_string_to_metric_families(metrics_text(state).decode())}
    tokens = families["swarmnode_pipeline_tokens_per_second"].samples
    assert [(s.labels, s.value) for s in tokens] == [({"job_id": "j1"}, pytest.approx(1024.0))]
    loads = {s.labels["stage"]: s.value for s in families["swarmnode_pipeline_stage_load_seconds"].samples}
    assert loads == {"0": pytest.approx(0.5), "1": pytest.approx(3.0)}
    assert families["swarmnode_pipeline_bottleneck_stage"].samples[0].value == 1
    counted = {s.name: s.value for s in families["swarmnode_rounds"].samples if s.labels["outcome"] == "ok"}
    assert counted == {"swarmnode_rounds_total": 2}
    assert families["swarmnode_round_bytes"].samples[-1].value == 2000  # the _sum: the relayed activations


def test_pipeline_frames_that_do_not_decode_are_counted_as_refusals():
    before = rejections.counts()
    expect = ExpectedTensor(FLOAT_DTYPES, (1, 4, 8), "float32")
    for frame in (b"\xc1garbage", pack({"t": "fwd", "v": 99})):
        with pytest.raises(WireError):
            activation_from_wire(frame, ForwardRequest, expect)
    with pytest.raises(WireError):
        control_from_wire(pack([1, 2, 3]), Status)
    after = rejections.counts()
    assert after.get(("pipeline ForwardRequest", "WireError"), 0) - before.get(
        ("pipeline ForwardRequest", "WireError"), 0) == 2
    assert after.get(("pipeline control", "WireError"), 0) - before.get(("pipeline control", "WireError"), 0) == 1
    with pytest.raises(TypeError):  # a caller's mistake is not a peer's refusal
        activation_from_wire(b"", int, expect)
    assert rejections.counts() == after
