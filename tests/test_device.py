"""node/runtime/device.py and the node's device: resolving --device, precision support and refusals, local training
and stage compute under autocast on the CPU (the CUDA path runs the same code), the capability record's device
fields on the wire, the config key and the CLI flag.

This machine's torch may or may not see a GPU: tests that need "no CUDA" say so and skip where one exists.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from node.cli.main import build_parser
from node.jobs.federated.local_training import LocalTrainer, make_inner_optimizer, pseudo_gradient
from node.jobs.pipeline.stage_device import StageCompute
from node.ml.models import build_model, flatten_params
from node.runtime.capability import detect, refresh_free
from node.runtime.config import resolve
from node.runtime.device import (
    autocast,
    check_precision,
    device_label,
    grad_scaler,
    memory_of,
    memory_shortfall,
    precision_refusal,
    refusal_for,
    resolve_device,
)
from node.runtime.errors import NodeError
from protocol.records.peer import (
    Capability,
    PeerRecord,
    capability_from_wire,
    capability_to_wire,
    peer_record_from_wire,
    peer_record_to_wire,
)
from protocol.wire import WireError

NO_CUDA = not torch.cuda.is_available()
CPU = torch.device("cpu")


# ---- resolving a device name ---------------------------------------------------------------------------------

def test_cpu_resolves_to_the_cpu_and_auto_to_the_cpu_without_cuda():
    assert resolve_device("cpu") == CPU
    if NO_CUDA:
        assert resolve_device("auto") == CPU
    else:
        assert resolve_device("auto") == torch.device("cuda", 0)
    assert device_label(CPU) == "cpu"


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", "cuda:1:2", "", "cuda:0 ", "mps", "cuda:1234"])
def test_malformed_device_names_are_one_line_errors(name):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N") as e:
        resolve_device(name)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_a_cuda_device_torch_does_not_see_is_refused(name):
    with pytest.raises(ValueError, match=f"device {name}: torch sees no CUDA device") as e:
        resolve_device(name)
    assert "\n" not in str(e.value)


def test_cpu_memory_is_psutil_ram():
    free, total = memory_of(CPU)
    assert 0 < free <= total


def test_memory_shortfall_names_what_is_short():
    assert memory_shortfall(CPU, 1, 1) == ""
    reason = memory_shortfall(CPU, 2**60, 0)
    assert reason.startswith("training needs about") and "GiB of RAM" in reason
    assert memory_shortfall(CPU, 2**59, 2**59).startswith("training needs about")  # on the CPU both come out of RAM


# ---- precision -----------------------------------------------------------------------------------------------

def test_the_cpu_runs_every_precision():
    """torch 2.13's CPU autocast takes bfloat16 and float16, and GradScaler("cpu") exists (the module docstring)."""
    for precision in ("fp32", "bf16", "fp16"):
        assert precision_refusal(CPU, precision) == ""
        check_precision(CPU, precision)


def test_refusals_without_the_hardware():
    """The pure rule: a CUDA device without native bf16 refuses bf16 (fp16 and fp32 stay); unknown precisions too."""
    assert "compute capability 8.0" in refusal_for("cuda", "bf16", bf16_native=False)
    assert refusal_for("cuda", "bf16", bf16_native=True) == ""
    assert refusal_for("cuda", "fp16", bf16_native=False) == ""
    assert refusal_for("cuda", "fp32", bf16_native=False) == ""
    assert "unknown precision" in refusal_for("cpu", "fp8", bf16_native=True)
    assert "no autocast" in refusal_for("meta", "bf16", bf16_native=True)
    with pytest.raises(ValueError, match="cpu: unknown precision"):
        check_precision(CPU, "int4")


def test_autocast_and_scaler_follow_the_precision():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast(CPU, precision):
            assert layer(x).dtype == dtype
    assert grad_scaler(CPU, "fp32") is None and grad_scaler(CPU, "bf16") is None
    scaler = grad_scaler(CPU, "fp16")
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()


# ---- local training on the device ----------------------------------------------------------------------------

TINY_GPT2 = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 16}


def _token_batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(1, 256, (4, 16), generator=g)
        yield x, torch.roll(x, -1, dims=1)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_local_training_in_every_precision_gives_finite_loss_and_fp32_cpu_parameters(precision):
    bundle = build_model("gpt2", TINY_GPT2, seed=0)
    start = flatten_params(bundle.module)
    optimizer = make_inner_optimizer(bundle.module, "adamw", 1e-2)
    trainer = LocalTrainer(bundle, optimizer, _token_batches(0), CPU, precision)
    result = trainer.run(start, 3)
    assert result.finite and np.isfinite(result.mean_loss) and result.samples == 12
    assert isinstance(result.params, np.ndarray) and result.params.dtype == np.float32
    assert result.params.shape == start.shape
    assert all(p.dtype == torch.float32 and p.device == CPU for p in bundle.module.parameters())
    delta = pseudo_gradient(start, result.params)
    assert delta.dtype == np.float32 and np.abs(delta).sum() > 0  # it trained
    assert (trainer.scaler is not None) == (precision == "fp16")


def test_local_training_is_reproducible_in_bf16():
    """Two nodes with the same data, seed and precision on the same kind of device reach the same parameters."""
    results = []
    for _ in range(2):
        bundle = build_model("gpt2", TINY_GPT2, seed=1)
        trainer = LocalTrainer(bundle, make_inner_optimizer(bundle.module, "sgd", 0.1), _token_batches(3), CPU, "bf16")
        results.append(trainer.run(flatten_params(bundle.module), 2).params)
    assert np.array_equal(results[0], results[1])


def test_a_trainer_refuses_a_precision_its_device_cannot_run():
    bundle = build_model("mlp", {"hidden": 8}, seed=0)
    with pytest.raises(ValueError, match="unknown precision"):
        LocalTrainer(bundle, make_inner_optimizer(bundle.module, "sgd", 0.1), iter(()), CPU, "fp8")


# ---- pipeline stage compute ----------------------------------------------------------------------------------

def test_stage_compute_on_the_cpu_is_the_stage_itself_and_returns_cpu_float32():
    from node.ml.stages import cut_stage
    model = build_model("gpt2", {**TINY_GPT2, "n_layer": 2, "tie_word_embeddings": False}, seed=0).module
    stage = cut_stage(model, 1, 2)
    for precision in ("fp32", "bf16"):
        compute = StageCompute(stage, CPU, precision)
        assert compute.module is stage
        h = torch.randn(2, 16, 32)
        x, out = compute.forward(h)
        wire = compute.to_wire(out)
        assert wire.dtype == torch.float32 and wire.device == CPU and x.requires_grad
        flat, grad_in = compute.backward(x, out, torch.ones_like(wire))
        n = sum(p.numel() for p in stage.parameters())
        assert flat.shape == (n,) and flat.dtype == torch.float32 and torch.isfinite(flat).all()
        assert grad_in is not None and grad_in.shape == h.shape and grad_in.dtype == torch.float32
        assert compute.evaluate(h).dtype == torch.float32


# ---- the capability record -----------------------------------------------------------------------------------

BASE = Capability(gpus=(), cpu_cores=2, ram_bytes=8 * 2**30, disk_free_bytes=2**35, tflops_fp32=0.1, tflops_bf16=None,
                  platform="Linux / torch cpu")


def test_capability_without_the_new_fields_keeps_its_old_wire_map():
    wire = capability_to_wire(BASE)
    assert "device" not in wire and "device_free" not in wire
    assert capability_from_wire(wire) == BASE


@pytest.mark.parametrize("device, free", [("cuda:1", 70 * 2**30), ("cpu", 5 * 2**30), ("cuda:0", None)])
def test_capability_round_trips_with_the_device_fields(device, free):
    cap = Capability(**{**BASE.__dict__, "train_device": device, "device_free_bytes": free})
    record = PeerRecord("12D3KooWx", ("/ip4/127.0.0.1/tcp/1",), "0.1", cap, 1.0)
    assert peer_record_from_wire(peer_record_to_wire(record)).capability == cap


@pytest.mark.parametrize("bad", [{"device": "gpu"}, {"device": 3}, {"device": "cuda:1" * 10}, {"device_free": -1},
                                 {"device_free": "lots"}])
def test_bad_device_fields_from_a_peer_are_refused(bad):
    with pytest.raises(WireError):
        capability_from_wire(capability_to_wire(BASE) | bad)


def test_detect_names_the_training_device_and_its_free_memory(tmp_path):
    cap = detect(tmp_path, 0.01, CPU)
    assert cap.train_device == "cpu" and cap.device_free_bytes is not None and cap.device_free_bytes > 0
    assert refresh_free(cap, CPU).train_device == "cpu"


# ---- config and CLI ------------------------------------------------------------------------------------------

def test_device_config_key_env_and_flag():
    assert resolve({}, env={}).device == "auto"
    assert resolve({}, env={"SWARMNODE_DEVICE": "cpu"}).device == "cpu"
    assert resolve({"device": "cuda:1"}, env={"SWARMNODE_DEVICE": "cpu"}).device == "cuda:1"
    with pytest.raises(NodeError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve({}, env={"SWARMNODE_DEVICE": "gpu"})
    args = build_parser().parse_args(["run", "--device", "cpu"])
    assert args.device == "cpu"


def test_the_device_reaches_the_peers_table():
    from node.api.serde import capability_json, capability_to_proto
    from node.cli.format import train_device

    cap = Capability(**{**BASE.__dict__, "train_device": "cuda:0", "device_free_bytes": 3 * 2**30})
    msg = capability_to_proto(cap)
    assert train_device(msg) == "cuda:0 (3.0 GiB free)"
    assert capability_json(msg)["train_device"] == "cuda:0" and capability_json(msg)["device_free_bytes"] == 3 * 2**30
    old = capability_to_proto(BASE)
    old.ClearField("train_device")
    assert train_device(old) == "-"

