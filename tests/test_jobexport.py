"""node/jobs/federated/export.py: report merging (whole-job reports for joiners and exporters), bounded history,
files."""

from __future__ import annotations

import json

import pytest

from node.jobs.federated.export import FILES, export_job, history_from_json, history_to_json, merge_history, round_entry
from node.jobs.federated.runner import RoundResult
from node.ml.models import build_model, flatten_params, params_sha256
from protocol.records.job_records import JobRecord
from protocol.records.job_spec import InnerOpt, JobSpec, ModelSpec, OuterOpt
from protocol.transfer.job_state import MAX_HISTORY_BYTES


def result(r: int, ok: bool, error: str | None = None, accuracy: float | None = 0.5) -> RoundResult:
    return RoundResult(r, ok, error, ("a", "b") if ok else (), 1.0 + 1 / (r + 1), 64,
                       {"accuracy": accuracy} if ok and accuracy is not None else {}, 10, 20, 0.5, 0.4, "0" * 64)


def test_merge_prefers_applied_rounds_and_keeps_this_nodes_failure_visible():
    own = [round_entry(result(3, False, "non-finite loss"), "me"), round_entry(result(4, True), "me")]
    received = [round_entry(result(r, True), "peer") for r in range(5)]
    merged = merge_history(own, received)
    assert [e["round"] for e in merged] == [0, 1, 2, 3, 4]
    assert all(e["ok"] for e in merged)
    assert merged[3]["reported_by"] == "peer" and merged[3]["this_node_error"] == "non-finite loss"
    assert merged[4]["reported_by"] == "me"  # own applied entry wins over the peer's
    assert "this_node_error" not in merged[2]


def test_merge_ignores_malformed_received_entries():
    assert merge_history([], [{"round": "x"}, 7, {"no": 1}, round_entry(result(1, True), "p")]) == \
        [round_entry(result(1, True), "p")]


def test_history_json_round_trip_and_bounds():
    history = [round_entry(result(r, r % 3 != 0), "me") for r in range(50)]
    assert history_from_json(history_to_json(history)) == json.loads(json.dumps(history))
    huge = [{"round": r, "ok": True, "pad": "x" * 4096} for r in range(MAX_HISTORY_BYTES // 4096 + 100)]
    blob = history_to_json(huge)
    kept = history_from_json(blob)
    assert len(blob) <= MAX_HISTORY_BYTES and kept[-1]["round"] == huge[-1]["round"]  # the oldest are dropped
    for bad in (b"{", b'{"round": 1}', b'[{"round": "1"}]', b"\xff"):
        with pytest.raises(ValueError, match="round history"):
            history_from_json(bad)


def test_export_writes_model_manifest_report_and_curve(tmp_path):
    spec = JobSpec(name="t", model=ModelSpec("mlp", {"hidden": 16}), dataset="digits", task="classification",
                   rounds=5, inner=InnerOpt("sgd", 0.1), local_steps=1, batch_size=8, outer=OuterOpt("fedavg"),
                   density=0.1, min_participants=2, max_participants=4, round_timeout_s=10.0)
    record = JobRecord.create(spec, "12D3KooWPsxMNwGhcey1qdysmSqkSM4NGUgLjJfbuMzktEgNqPxC", "00", 1.0)
    bundle = build_model("mlp", {"hidden": 16}, 0, num_classes=10)
    history = [round_entry(result(r, True), "me") for r in range(5)]
    files = export_job(tmp_path / "out", record, bundle.module, "ab" * 32, 5, 2, history, "accuracy")
    assert [f.name for f in files] == list(FILES) and FILES[-1] == "manifest.json"  # written last
    by_name = {f.name: f for f in files}
    manifest = json.loads(by_name["manifest.json"].read_text())
    assert manifest["rounds"] == 5 and manifest["rounds_this_node"] == 2 and manifest["spec"]["name"] == "t"
    assert set(manifest["tensors"]) == set(bundle.module.state_dict())
    assert json.loads(by_name["report.json"].read_text()) == json.loads(json.dumps(history))
    assert by_name["curve.png"].read_bytes().startswith(b"\x89PNG")
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    from safetensors.torch import load_file

    loaded = build_model("mlp", {"hidden": 16}, 1, num_classes=10).module
    loaded.load_state_dict(load_file(files[0]))
    assert params_sha256(loaded) == params_sha256(bundle.module) and flatten_params(loaded).size > 0


def test_export_of_a_model_with_tied_weights(tmp_path):
    """GPT-2 ties lm_head to the token embedding (shared storage, which safetensors refuses as is)."""
    spec = JobSpec(name="lm", model=ModelSpec("gpt2", {"n_layer": 1, "n_embd": 32, "n_head": 2}),
                   dataset="pystdlib-bytes", task="causal-lm", rounds=1, inner=InnerOpt("adamw", 1e-3), local_steps=1,
                   batch_size=2, outer=OuterOpt("fedavg"), density=0.1, min_participants=2, max_participants=4,
                   round_timeout_s=10.0)
    record = JobRecord.create(spec, "12D3KooWPsxMNwGhcey1qdysmSqkSM4NGUgLjJfbuMzktEgNqPxC", "00", 1.0)
    bundle = build_model("gpt2", {"n_layer": 1, "n_embd": 32, "n_head": 2}, 0)
    files = export_job(tmp_path, record, bundle.module, "ab" * 32, 1, 1, [], "loss")
    from safetensors.torch import load_file

    loaded = build_model("gpt2", {"n_layer": 1, "n_embd": 32, "n_head": 2}, 1).module
    loaded.load_state_dict(load_file(files[0]))
    assert params_sha256(loaded) == params_sha256(bundle.module)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
