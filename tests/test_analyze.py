"""node/ml/analyze.py and ``swarmnode analyze``: parameter counts, FLOPs and training memory per block, checked against
the built models, the transformer rule of thumb, and the measured peak memory of one real training step.

The measurement runs in a subprocess (python tests/test_analyze.py ...) so that nothing else in the process moves its
memory: glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so that every large tensor is its own mapping,
returned on free; one warm-up step creates the optimizer state; then the kernel's peak-RSS counter is reset
(/proc/self/clear_refs "5", Linux >= 4.0) and one more step is run. The peak above the RSS before that step is what
training adds on top of the weights and optimizer state (activations, gradients, workspace) -- the part of the
estimate that is not plain arithmetic. The estimate is an upper bound: gradients are allocated while activations are
freed in backward, so the two never peak together as the estimate assumes. Measured on this machine (2.13 CPU
torch, see node/ml/analyze.py HALF_ACTIVATIONS) the estimate is 1.09-1.38x the measurement; the test accepts 1.0-1.6x.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from node.ml.analyze import analyze, analyze_arch, analyze_folder, estimate_memory_bytes, job_memory
from node.ml.models import build_model, param_count

REPO = pathlib.Path(__file__).resolve().parents[1]
GPT2 = {"n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 128}
LLAMA = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "max_position_embeddings": 128}


@pytest.mark.parametrize("arch, overrides", [("gpt2", {"n_layer": 2}), ("llama", {"num_hidden_layers": 3}),
                                             ("bert", {}), ("mlp", {"hidden": 32}), ("cnn", {})])
def test_parameters_match_the_built_model_and_blocks_are_rows(arch, overrides):
    a = analyze_arch(arch, overrides, batch=4, seq=32 if arch in ("gpt2", "llama", "bert") else None)
    assert a.params == param_count(build_model(arch, overrides, 0).module)
    layers = overrides.get("n_layer") or overrides.get("num_hidden_layers")
    if layers:
        assert len(a.rows) == layers + 2  # embeddings, the blocks, the head
        assert len({r.params for r in a.rows[1:-1]}) == 1  # identical blocks


def test_flops_follow_six_n_t_and_memory_grows_with_batch():
    a = analyze_arch("gpt2", GPT2, batch=2, seq=128)
    block_params = sum(r.params for r in a.rows[1:-1])
    assert 6 * block_params * 128 <= a.flops_per_sample <= 6 * a.params * 128 * 1.5  # + attention scores
    small, big = analyze_arch("gpt2", GPT2, batch=2, seq=128), analyze_arch("gpt2", GPT2, batch=8, seq=128)
    assert big.memory().activations > 3.5 * small.memory().activations
    assert big.memory().weights == small.memory().weights
    fp32, bf16 = big.memory("fp32"), big.memory("bf16")
    assert bf16.activations < fp32.activations and bf16.total < fp32.total
    assert big.memory(optimizer="sgd").optimizer == 0 and big.memory(optimizer="adamw").optimizer == 2 * fp32.weights
    device, host = job_memory(big, "fp32")
    assert device == fp32.total and host == 5 * 4 * big.trainable
    assert estimate_memory_bytes("gpt2", GPT2, batch_size=8, seq_len=128) == device + host


def test_bad_sizes_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="seq must be an integer in"):
        analyze_arch("gpt2", {}, seq=10_000)
    with pytest.raises(ValueError, match="batch must be"):
        analyze_arch("gpt2", {}, batch=0)
    with pytest.raises(ValueError, match="no config.json"):
        analyze(str(tmp_path))
    with pytest.raises(ValueError, match="--set applies"):
        analyze(str(tmp_path), {"n_layer": 2})


def _save_tiny_gpt2(folder: pathlib.Path, **extra) -> None:
    from transformers import GPT2Config
    GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64, bos_token_id=None, eos_token_id=None,
               architectures=["GPT2LMHeadModel"], **extra).save_pretrained(folder)


def test_a_folder_is_analysed_from_its_config_alone(tmp_path):
    _save_tiny_gpt2(tmp_path)
    a = analyze_folder(tmp_path, batch=2, seq=32)
    assert a.params == 64 * 300 + 64 * 64 + 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64  # wte, wpe, blocks, ln_f
    assert a.seq == 32 and len(a.rows) == 4


def test_a_folder_naming_remote_code_is_refused(tmp_path):
    _save_tiny_gpt2(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModel": "x.Model"}}))
    with pytest.raises(ValueError, match="remote code"):
        analyze_folder(tmp_path)


def test_the_cli_prints_a_table_json_and_one_line_errors(tmp_path):
    from tests.conftest import cli_in_process  # here: this file also runs as a script (the peak-memory probe)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "node.cli", "analyze", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
    ok = run("gpt2", "--set", "n_layer=2", "--batch", "2", "--seq", "32", "--precision", "bf16")
    assert ok.returncode == 0, ok.stderr
    assert "transformer.h.1" in ok.stdout and "training memory bf16" in ok.stdout
    out = cli_in_process("analyze", "mlp", "--json")  # the rest in this process (no interpreter start each)
    assert out.returncode == 0 and json.loads(out.stdout)["params"] == param_count(build_model("mlp", {}, 0).module)
    bad = cli_in_process("analyze", "gpt2", "--seq", "100000")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("swarmnode: error: analyze:")
    bad = cli_in_process("analyze", "gpt2", "--set", "n_layer")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_the_memory_aware_splitter_counts_activations():
    from node.ml.splitter import stage_memory
    from node.ml.stages import layer_costs

    model = build_model("gpt2", {**GPT2, "tie_word_embeddings": False}, 0).module
    layers, first, last = stage_memory(model, micro_batch=4)
    plain = [c * 4 * 7 for c in layer_costs(model).layer_params]
    assert all(m > p for m, p in zip(layers, plain)) and first > 0 and last > 0
    more, _, _ = stage_memory(model, micro_batch=8)
    assert more[0] > layers[0]


# ---- the estimate against one measured training step ----------------------------------------------------------

def measure(arch: str, overrides: dict, batch: int, seq: int, precision: str) -> int:
    """Peak RSS bytes one AdamW training step adds on top of the weights and optimizer state (module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, arch, json.dumps(overrides), str(batch), str(seq), precision],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not pathlib.Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
@pytest.mark.parametrize("arch, overrides, precision", [
    ("gpt2", GPT2, "fp32"), pytest.param("llama", LLAMA, "bf16", marks=pytest.mark.slow)])  # llama: make chaos
def test_the_estimate_bounds_the_measured_peak_of_a_training_step(arch, overrides, precision):
    batch, seq = 16, 128
    measured = measure(arch, overrides, batch, seq, precision)
    memory = analyze_arch(arch, overrides, batch, seq).memory(precision, "adamw")
    estimated = memory.total - memory.weights - memory.optimizer
    assert measured > 100 * 2**20  # big enough that allocator noise (a few MiB) does not matter
    assert 1.0 <= estimated / measured <= 1.6, (estimated / 2**20, measured / 2**20)


def _measure_in_this_process(arch: str, overrides: dict, batch: int, seq: int, precision: str) -> int:
    import gc

    import torch

    from node.runtime.device import autocast

    torch.set_num_threads(1)
    bundle = build_model(arch, overrides, seed=0)
    model = bundle.module
    model.set_attn_implementation("eager")  # as analyze traces it
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (batch, seq), generator=g)  # (B, S)
    y = torch.randint(0, 256, (batch, seq), generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        with autocast(torch.device("cpu"), precision):
            loss = bundle.loss(model, (x, y))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    step()  # the optimizer's state exists from here on, as in every later step of a node
    gc.collect()
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    return status("VmHWM:") - before


if __name__ == "__main__":
    print(_measure_in_this_process(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                                   sys.argv[5]))
