"""Regenerate node/api/rpc/ from proto/ with grpcio-tools (the committed code must match; tests check it).

    python scripts/regen_protos.py              # rewrite node/api/rpc/*_pb2*.py
    python scripts/regen_protos.py --out DIR    # write to DIR instead (used by the staleness test)

protoc emits absolute imports (`from swarmnode.v1 import control_pb2`); they are rewritten to relative
imports so the generated modules live inside the `node.api.rpc` package.
"""

import argparse
import pathlib
import re
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTOS = sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        if protoc.main(args + [str(p) for p in PROTOS]) != 0:
            sys.exit("protoc failed")
        written = []
        for path in sorted(pathlib.Path(tmp).rglob("*.py*")):
            text = path.read_text()
            text = re.sub(r"^from swarmnode\.v1 import (\w+)", r"from . import \1", text, flags=re.M)
            target = out / path.name
            target.write_text(text)
            written.append(target)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "node" / "api" / "rpc")
    for path in generate(parser.parse_args().out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
