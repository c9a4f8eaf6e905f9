"""The committed generated code must be exactly what scripts/regen_protos.py produces from proto/."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, "scripts/regen_protos.py", "--out", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == ["control_pb2.py", "control_pb2.pyi", "control_pb2_grpc.py"]
    for name in generated:
        committed = (REPO / "node" / "api" / "rpc" / name).read_text()
        assert committed == (tmp_path / name).read_text(), f"node/api/rpc/{name} is stale: run `make protos`"


def test_every_proto_field_is_commented():
    for proto in (REPO / "proto").rglob("*.proto"):
        lines = proto.read_text().splitlines()
        assert any(line.startswith("package ") for line in lines), f"{proto} has no package"
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("option", "syntax",
                                                                                               "reserved"))
            if is_field or stripped.startswith(("rpc ", "message ", "service ", "enum ")):
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} lacks a comment: {stripped}"
