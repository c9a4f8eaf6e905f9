"""node/ml/models.py: every architecture builds, trains a step, hashes deterministically from its seed; parameter
vectors round-trip; overrides are checked; the memory estimate grows with the model."""

from __future__ import annotations

import hashlib
import math
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from node.ml.analyze import estimate_memory_bytes
from node.ml.models import (
    ARCHS,
    CAUSAL_LM,
    CLASSIFICATION,
    build_model,
    flatten_params,
    load_flat_params,
    minilm_path,
    param_count,
    params_sha256,
    resolve_overrides,
)

# Tiny configs so the whole file runs in seconds (minilm is fixed by its checkpoint).
TINY = {
    "mlp": {"hidden": 16, "layers": 1},
    "cnn": {"channels": 4, "hidden": 16},
    "gpt2": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 16},
    "llama": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 16},
    "bert": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 16},
    "minilm": {},
}
FAST = [a for a in ARCHS if a != "minilm"]


def tiny_batch(arch: str, b: int = 3, t: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if arch in ("mlp", "cnn"):
        return torch.rand(b, 64, generator=g), torch.randint(0, 10, (b,), generator=g)  # (B, 64), (B,)
    x = torch.randint(1, 256, (b, t), generator=g)  # (B, T) token ids, none of them pad
    if ARCHS[arch].task == CAUSAL_LM:
        return x, torch.randint(0, 256, (b, t), generator=g)  # (B, T) next tokens
    return x, torch.randint(0, 2, (b,), generator=g)


@pytest.fixture(scope="module")
def minilm():
    return build_model("minilm", {}, seed=0)


def bundle_for(arch: str, request, seed: int = 0):
    return request.getfixturevalue("minilm") if arch == "minilm" and seed == 0 else build_model(arch, TINY[arch], seed)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_builds_and_a_training_step_changes_the_model(arch, request):
    bundle = bundle_for(arch, request)
    assert bundle.task == ARCHS[arch].task and bundle.arch == arch
    model = bundle.module
    before = params_sha256(model)
    loss = bundle.loss(model, tiny_batch(arch))
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    if arch == "minilm":  # leave the shared module as it was for the other tests
        model.zero_grad(set_to_none=True)
        return
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert params_sha256(model) != before


@pytest.mark.parametrize("arch", FAST)
def test_same_seed_same_hash_and_global_rng_untouched(arch):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(arch, TINY[arch], seed=7)
    assert torch.equal(torch.rand(1), expected_next)  # building did not consume the caller's RNG
    b = build_model(arch, TINY[arch], seed=7)
    c = build_model(arch, TINY[arch], seed=8)
    assert params_sha256(a.module) == params_sha256(b.module) != params_sha256(c.module)


def test_hash_is_the_same_in_another_process():
    """Nodes are separate processes: the seeded init must not depend on anything process-local."""
    code = ("from node.ml.models import build_model, params_sha256; "
            f"print(params_sha256(build_model('gpt2', {TINY['gpt2']!r}, 3).module))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == params_sha256(build_model("gpt2", TINY["gpt2"], 3).module)


def test_minilm_loads_the_pretrained_encoder_without_the_network(monkeypatch, minilm):
    def refuse(*args, **kwargs):
        raise AssertionError("minilm tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    again = build_model("minilm", {"classes": 3}, seed=1)
    from safetensors.numpy import load_file
    weights = load_file(str(minilm_path() / "model.safetensors"))
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    got = again.module.bert.embeddings.word_embeddings.weight.detach().numpy()
    np.testing.assert_array_equal(got, weights[key])  # the checkpoint, not a random init
    assert again.module.classifier.out_features == 3
    assert params_sha256(again.module) != params_sha256(minilm.module)  # the head follows the seed
    assert param_count(minilm.module) > 20_000_000


def test_flatten_load_round_trip_and_hash_definition():
    a, b = build_model("gpt2", TINY["gpt2"], 0), build_model("gpt2", TINY["gpt2"], 1)
    vec = flatten_params(a.module)
    assert vec.dtype == np.float32 and vec.shape == (param_count(a.module),)
    assert params_sha256(a.module) == hashlib.sha256(vec.astype("<f4").tobytes()).hexdigest()
    readonly = np.frombuffer(vec.tobytes(), dtype=np.float32)  # as a wire frame would hand it over
    load_flat_params(b.module, readonly)
    assert params_sha256(b.module) == params_sha256(a.module)
    np.testing.assert_array_equal(flatten_params(b.module), vec)
    vec[0] += 1.0  # flatten_params returned a copy
    assert params_sha256(a.module) == params_sha256(b.module)
    # tied input/output embeddings appear once in the vector
    assert param_count(a.module) == sum(p.numel() for p in a.module.parameters())


def test_load_flat_params_rejects_bad_vectors():
    m = build_model("mlp", TINY["mlp"], 0).module
    n = param_count(m)
    with pytest.raises(ValueError, match="has 3 values"):
        load_flat_params(m, np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="float32"):
        load_flat_params(m, np.zeros(n, dtype=np.float64))
    with pytest.raises(ValueError, match="float32"):
        load_flat_params(m, torch.zeros(n))
    bad = np.zeros(n, dtype=np.float32)
    bad[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        load_flat_params(m, bad)


@pytest.mark.parametrize("arch, overrides, num_classes, fragment", [
    ("resnet", {}, None, "unknown model architecture 'resnet'"),
    ("gpt2", {"n_layers": 2}, None, "unknown override 'n_layers'"),
    ("gpt2", {"n_layer": 2.0}, None, "n_layer must be an integer"),
    ("gpt2", {"n_layer": True}, None, "n_layer must be an integer"),
    ("gpt2", {"n_layer": 0}, None, "n_layer must be >= 1"),
    ("gpt2", {"n_embd": 30, "n_head": 4}, None, "n_embd=30 must be divisible by n_head=4"),
    ("gpt2", {}, 10, "num_classes does not apply"),
    ("llama", {"num_key_value_heads": 3}, None, "divisible by num_key_value_heads=3"),
    ("mlp", {"dropout": 1.0}, None, "dropout must be in [0, 1)"),
    ("mlp", {"dropout": "0.1"}, None, "dropout must be a finite number"),
    ("mlp", {"classes": 4}, 10, "disagrees with the dataset's 10 classes"),
    ("mlp", {}, 1, "classes must be >= 2"),
    ("cnn", {"side": 6}, None, "side=6 must be divisible by 2**blocks=4"),
    ("minilm", {"hidden_size": 64}, None, "unknown override 'hidden_size'"),
])
def test_bad_overrides_raise_value_error_naming_the_problem(arch, overrides, num_classes, fragment):
    with pytest.raises(ValueError) as e:
        build_model(arch, overrides, 0, num_classes=num_classes)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("arch, default", [("gpt2", True), ("llama", False)])
def test_tie_word_embeddings_override_keeps_transformers_default(arch, default):
    """Defaults as GPT2Config / LlamaConfig (so default builds hash as before); the override unties or ties the LM
    head (pipeline training needs an untied one), and it must be a boolean."""
    def tied(bundle):
        return bundle.module.get_output_embeddings().weight is bundle.module.get_input_embeddings().weight

    assert resolve_overrides(arch, TINY[arch])["tie_word_embeddings"] is default
    same = build_model(arch, {**TINY[arch], "tie_word_embeddings": default}, 0)
    other = build_model(arch, {**TINY[arch], "tie_word_embeddings": not default}, 0)
    assert params_sha256(same.module) == params_sha256(build_model(arch, TINY[arch], 0).module)
    assert tied(same) is default and tied(other) is not default
    assert param_count(other.module) != param_count(same.module)
    with pytest.raises(ValueError, match="tie_word_embeddings must be true or false"):
        build_model(arch, {"tie_word_embeddings": 0}, 0)


def test_num_classes_sets_the_head_and_bad_seed_is_rejected():
    assert resolve_overrides("mlp", None, num_classes=3)["classes"] == 3
    assert build_model("mlp", {"inputs": 13}, 0, num_classes=3).module(torch.zeros(2, 13)).shape == (2, 3)
    for seed in (-1, 1.5, True, 2 ** 63):
        with pytest.raises(ValueError, match="seed"):
            build_model("mlp", {}, seed)


def test_cnn_takes_flat_or_image_shaped_digits():
    bundle = build_model("cnn", TINY["cnn"], 0)
    x = torch.rand(2, 64)  # (B, 64)
    torch.testing.assert_close(bundle.module(x), bundle.module(x.reshape(2, 1, 8, 8)))


def test_evaluate_metrics_and_mode_restored():
    lm = build_model("gpt2", TINY["gpt2"], 0)
    batch = tiny_batch("gpt2")
    lm.module.train()
    metrics = lm.evaluate(lm.module, [batch, batch])
    assert lm.module.training
    assert set(metrics) == {"loss", "perplexity", "bits_per_byte", "token_accuracy"}
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert metrics["bits_per_byte"] == pytest.approx(metrics["loss"] / math.log(2))
    assert abs(metrics["loss"] - math.log(256)) < 0.5  # near uniform over bytes at init
    assert lm.metric == "bits_per_byte"
    clf = build_model("mlp", TINY["mlp"], 0)
    x, y = tiny_batch("mlp")
    pred = clf.module(x).argmax(-1)
    got = clf.evaluate(clf.module, [(x, y)])
    assert got["accuracy"] == pytest.approx((pred == y).float().mean().item()) and clf.metric == "accuracy"
    assert clf.task == CLASSIFICATION
    with pytest.raises(ValueError, match="no batches"):
        clf.evaluate(clf.module, [])


def test_memory_estimate_covers_state_and_grows_with_size():
    for arch in ARCHS:
        built = build_model(arch, TINY[arch], 0).module if arch != "minilm" else None
        if built is not None:
            assert estimate_memory_bytes(arch, TINY[arch]) >= 7 * 4 * param_count(built)
    sizes = [estimate_memory_bytes("gpt2", {"n_embd": e, "n_head": 4}) for e in (32, 64, 128, 256)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    layers = [estimate_memory_bytes("llama", {"num_hidden_layers": n}) for n in (1, 2, 4)]
    assert layers == sorted(layers) and len(set(layers)) == 3
    widths = [estimate_memory_bytes("mlp", {"hidden": h}) for h in (8, 64, 512)]
    assert widths == sorted(widths) and len(set(widths)) == 3
    assert estimate_memory_bytes("cnn", {}, batch_size=64) > estimate_memory_bytes("cnn", {}, batch_size=8)
    assert estimate_memory_bytes("minilm", {}, seq_len=128) > 7 * 4 * 22_000_000
    with pytest.raises(ValueError, match="seq must be"):
        estimate_memory_bytes("gpt2", {}, seq_len=10_000)
    with pytest.raises(ValueError, match="unknown override"):
        estimate_memory_bytes("gpt2", {"width": 3})
