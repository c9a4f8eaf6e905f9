"""`swarmnode split`: plans the stages of a real local model (the bundled MiniLM), prints the plan, writes
signed shards that load back; every bad input is one line and exit 2."""

from __future__ import annotations

import json

from node.ml.splitter import load_stage, read_manifest
from tests.conftest import cli_in_process, run_cli
from tests.test_bad_input import assert_one_line_error


def test_split_plans_prints_and_writes_verified_shards(tmp_path):
    out = tmp_path / "shards"
    done = run_cli("split", "minilm", "--stages", "3", "--strategy", "balanced", "--out", str(out),
                   "--home", str(tmp_path / "home"), timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    assert "balanced into 3 stages" in done.stdout and "start  end  layers" in done.stdout
    key = tmp_path / "home" / "identity.key"  # a new key is made, and the user is told so (not silently)
    assert f"created a new identity key at {key}" in done.stderr and key.is_file()
    manifest = read_manifest(out)
    spans = [(s.start, s.end) for s in manifest.shards]
    assert spans[0][0] == 0 and spans[-1][1] == 6 and len(spans) == 3
    assert spans[0] == (0, 1)  # the 11.7 M-parameter embeddings weigh on the first stage: it gets one block
    for i in range(3):
        load_stage(out, i, trusted_signers=[manifest.splitter])
    as_json = run_cli("split", "minilm", "--stages", "2", "--strategy", "layer_wise", "--out", str(tmp_path / "lw"),
                      "--json", "--home", str(tmp_path / "home"), timeout=120)
    assert as_json.returncode == 0, as_json.stderr[-1500:]
    report = json.loads(as_json.stdout)
    assert [(s["start"], s["end"]) for s in report["shards"]] == [(0, 3), (3, 6)]
    assert report["splitter"] == manifest.splitter  # the node's own identity signs
    assert "identity key" not in as_json.stderr  # the existing key: nothing to say


def test_split_bad_input_is_one_line(tmp_path):
    home = ["--home", str(tmp_path / "home")]
    cases = [
        (["split", str(tmp_path / "nowhere"), "--stages", "2", "--out", str(tmp_path / "o")], "config.json"),
        (["split", "minilm", "--out", str(tmp_path / "o")], "--stages"),
        (["split", "minilm", "--strategy", "memory_aware", "--out", str(tmp_path / "o")], "--host"),
        (["split", "minilm", "--stages", "2", "--host", "1:1", "--out", str(tmp_path / "o")], "--host"),
        (["split", "minilm", "--strategy", "memory_aware", "--host", "lots", "--out", str(tmp_path / "o")], "MEM_GIB"),
        (["split", "minilm", "--strategy", "memory_aware", "--host", "0.01:10", "--host", "0.01:10",
          "--out", str(tmp_path / "o")], "does not fit"),
        (["split", "minilm", "--stages", "9", "--out", str(tmp_path / "o")], "9"),
    ]
    first, *rest = cases  # the installed program once, then main(argv) in this process for the others
    assert_one_line_error(run_cli(*first[0], *home, timeout=120), 2, first[1])
    for args, needle in rest:
        assert_one_line_error(cli_in_process(*args, *home), 2, needle)
    assert not (tmp_path / "o").exists()
