"""node/cli/main.py output formatting (peers table, --json) from hand-built PeersResponse messages, and the parser."""

from __future__ import annotations

import json

import pytest

from node.api.rpc import control_pb2
from node.api.serde import peers_json
from node.cli.format import format_peers_table
from node.cli.main import build_parser

GIB = 2**30
NOW = 1_700_000_000.0
CPU_ID = "12D3KooWCpuOnlyPeerAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
GPU_ID = "12D3KooWGpuPeerBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"


def cpu_peer(is_self: bool = False) -> control_pb2.Peer:
    return control_pb2.Peer(
        peer_id=CPU_ID,
        addrs=[f"/ip4/127.0.0.1/tcp/4001/p2p/{CPU_ID}"],
        version="0.1.0",
        capability=control_pb2.Capability(
            cpu_cores=8, ram_bytes=16 * GIB, disk_free_bytes=100 * GIB, tflops_fp32=0.25, platform="Linux / torch cpu"
        ),
        last_seen=NOW,
        expires_at=NOW + 30,
        is_self=is_self,
    )


def gpu_peer(is_self: bool = False, names: tuple[str, str] = ("NVIDIA H100 80GB HBM3",) * 2) -> control_pb2.Peer:
    return control_pb2.Peer(
        peer_id=GPU_ID,
        addrs=[f"/ip4/10.0.0.2/tcp/4001/p2p/{GPU_ID}", f"/ip6/::1/tcp/4001/p2p/{GPU_ID}"],
        version="0.2.0",
        capability=control_pb2.Capability(
            gpus=[control_pb2.Gpu(name=n, memory_bytes=80 * GIB, cc_major=9, cc_minor=0) for n in names],
            cpu_cores=64,
            ram_bytes=512 * GIB,
            disk_free_bytes=2048 * GIB,
            tflops_fp32=51.2,
            tflops_bf16=612.5,
            platform="Linux / torch cu128",
        ),
        last_seen=NOW,
        expires_at=NOW + 30,
        is_self=is_self,
    )


def row_of(table: str, peer_id: str) -> str:
    rows = [line for line in table.splitlines() if line.startswith(peer_id)]
    assert len(rows) == 1, table
    return rows[0]


# ---- format_peers_table --------------------------------------------------------------------------------


def test_table_cpu_and_gpu_peers():
    table = format_peers_table(control_pb2.PeersResponse(peers=[cpu_peer(is_self=True), gpu_peer()]))
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["PEER", "ID"]
    assert lines[-1] == "2 node(s); * = this node"
    assert len(lines) == 4

    cpu = row_of(table, CPU_ID)
    assert "none (CPU only)" in cpu
    assert cpu.startswith(CPU_ID + " *")
    assert "16.0 GiB" in cpu and "0.250/-" in cpu and "0.1.0" in cpu
    assert "/ip4/127.0.0.1/tcp/4001" in cpu and "/p2p/" not in cpu

    gpu = row_of(table, GPU_ID)
    assert "2x NVIDIA H100 80GB HBM3" in gpu and "(mixed)" not in gpu
    assert "160.0 GiB" in gpu  # total VRAM
    assert "512.0 GiB" in gpu  # RAM
    assert "51.200/612.50" in gpu
    assert "/ip4/10.0.0.2/tcp/4001 (+1)" in gpu
    assert not gpu.startswith(GPU_ID + " *")


def test_table_marks_only_the_self_peer():
    table = format_peers_table(control_pb2.PeersResponse(peers=[cpu_peer(), gpu_peer(is_self=True)]))
    assert row_of(table, GPU_ID).startswith(GPU_ID + " *")
    assert not row_of(table, CPU_ID).startswith(CPU_ID + " *")


def test_table_columns_aligned():
    table = format_peers_table(control_pb2.PeersResponse(peers=[cpu_peer(is_self=True), gpu_peer()]))
    header, *rows = table.splitlines()[:-1]
    for column in ("ADDRESS", "GPU", "VRAM", "CORES", "VERSION", "LAST SEEN"):
        start = header.index(column)
        for row in rows:
            assert row[start - 2 : start] == "  " and row[start] != " ", (column, row)


def test_table_mixed_gpus():
    peer = gpu_peer(names=("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"))
    row = row_of(format_peers_table(control_pb2.PeersResponse(peers=[peer])), GPU_ID)
    assert "2x NVIDIA A100-SXM4-80GB (mixed)" in row


def test_table_peer_without_addrs():
    peer = cpu_peer()
    del peer.addrs[:]
    row = row_of(format_peers_table(control_pb2.PeersResponse(peers=[peer])), CPU_ID)
    assert f"{CPU_ID}  -  " in row


def test_table_empty():
    assert format_peers_table(control_pb2.PeersResponse()).splitlines()[-1] == "0 node(s); * = this node"


# ---- peers_json ----------------------------------------------------------------------------------------


def test_peers_json():
    out = peers_json(control_pb2.PeersResponse(peers=[cpu_peer(is_self=True), gpu_peer()]))
    assert json.loads(json.dumps(out)) == out  # serialisable as is
    cpu, gpu = out
    assert cpu["peer_id"] == CPU_ID and cpu["is_self"] is True
    assert cpu["capability"]["gpus"] == []
    assert cpu["capability"]["tflops_bf16"] is None
    assert cpu["capability"]["ram_bytes"] == 16 * GIB
    assert cpu["addrs"] == [f"/ip4/127.0.0.1/tcp/4001/p2p/{CPU_ID}"]
    assert gpu["is_self"] is False and gpu["version"] == "0.2.0"
    assert gpu["capability"]["gpus"] == [
        {"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 * GIB, "compute_capability": "9.0"}
    ] * 2
    assert gpu["capability"]["tflops_bf16"] == 612.5
    assert gpu["last_seen"] == NOW and gpu["expires_at"] == NOW + 30


# ---- build_parser --------------------------------------------------------------------------------------


def test_parser_repeated_join():
    args = build_parser().parse_args(["run", "--join", "A", "--join", "B"])
    assert args.command == "run"
    assert args.join == ["A", "B"]
    assert args.listen is None and args.swarm is None and args.heartbeat is None and args.json is False


def test_parser_run_types():
    args = build_parser().parse_args(
        ["run", "--heartbeat", "2.5", "--join-attempts", "3", "--listen", "/ip4/0.0.0.0/tcp/0", "--json"]
    )
    assert args.heartbeat == 2.5 and args.join_attempts == 3
    assert args.listen == ["/ip4/0.0.0.0/tcp/0"] and args.json is True


@pytest.mark.parametrize("command", ["status", "peers", "leave"])
def test_parser_client_commands(command, tmp_path):
    args = build_parser().parse_args([command, "--home", str(tmp_path), "--json"])
    assert args.command == command and args.home == str(tmp_path) and args.json is True


def test_parser_requires_a_command(capsys):
    with pytest.raises(SystemExit) as excinfo:
        build_parser().parse_args([])
    assert excinfo.value.code == 2
    capsys.readouterr()
