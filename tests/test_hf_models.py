"""node/ml/hf_models.py: a model folder built from its safetensors the same on every build, sized against the job's
data (a mismatch is one line), under a seeded LoRA adapter whose trainable parameters alone are the job's flat
vector (flatten_params, load_flat_params, params_sha256), exported in peft's format (PeftModel.from_pretrained on
the base folder gives the same outputs) and merged; remote code refused when the folder is read."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from node.ml.hf_models import (
    ModelFilesMissing,
    export_files,
    hf_job_config,
    load_tokenizer,
    memory_bytes,
    register_folder,
    verified_folder,
)
from node.ml.job_model import build_job_model, job_model_config
from node.ml.model_folder import folder_manifest
from node.ml.models import flatten_params, load_flat_params, param_count, params_sha256
from protocol.records.job_inputs import AdapterSpec
from protocol.records.job_spec import InnerOpt, JobSpec, ModelSpec


def tiny_gpt2(folder: pathlib.Path, seed: int = 0, **config) -> pathlib.Path:
    """A small but real GPT-2 saved as transformers saves any model (config.json + model.safetensors), byte vocab."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    args = dict(vocab_size=256, n_positions=160, n_embd=32, n_layer=2, n_head=2, bos_token_id=None,
                eos_token_id=None) | config
    GPT2LMHeadModel(GPT2Config(**args)).save_pretrained(folder, safe_serialization=True)
    return folder


LORA = AdapterSpec(r=4, alpha=8.0)


def job(folder: pathlib.Path, adapter: AdapterSpec | None = LORA, **fields) -> JobSpec:
    files = folder_manifest(folder)
    register_folder(files, folder)
    base = dict(name="lora", model=ModelSpec("hf", files=files), dataset="pystdlib-bytes", task="causal-lm",
                rounds=2, inner=InnerOpt("adamw", 1e-3), adapter=adapter)
    return JobSpec(**(base | fields))


def test_an_unverified_folder_is_not_built(tmp_path):
    files = folder_manifest(tiny_gpt2(tmp_path / "m"))
    spec = JobSpec(name="x", model=ModelSpec("hf", files=files), dataset="pystdlib-bytes", task="causal-lm", rounds=1,
                   inner=InnerOpt("sgd", 0.1))
    with pytest.raises(ModelFilesMissing, match="not on this node yet"):
        job_model_config(spec)
    register_folder(files, tmp_path / "m")
    assert verified_folder(files) == tmp_path / "m"


def test_the_adapter_is_the_flat_vector_seeded_and_alone_trainable(tmp_path):
    spec = job(tiny_gpt2(tmp_path / "m"))
    assert job_model_config(spec) == {"vocab_size": 256, "context": 160}
    a, b = build_job_model(spec), build_job_model(spec)
    lora = {n: p for n, p in a.module.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert all(not p.requires_grad for n, p in a.module.named_parameters() if "lora_" not in n)  # base frozen
    vec = flatten_params(a.module)
    # layers x r x (c_attn's inputs + outputs)
    assert vec.size == param_count(a.module) == sum(p.numel() for p in lora.values()) == 2 * 4 * (32 + 96)
    assert params_sha256(a.module) == params_sha256(b.module)  # the seed draws the same LoRA init everywhere
    other = build_job_model(spec.replace(seed=1))
    assert params_sha256(other.module) != params_sha256(a.module)
    base_before = {n: p.detach().clone() for n, p in a.module.named_parameters() if not p.requires_grad}
    load_flat_params(a.module, vec + np.float32(0.5))
    assert np.array_equal(flatten_params(a.module), vec + np.float32(0.5))
    assert all(torch.equal(p, base_before[n]) for n, p in a.module.named_parameters() if not p.requires_grad)
    full = build_job_model(spec.replace(adapter=None))  # full fine-tuning: every weight, from the safetensors
    assert flatten_params(full.module).size == sum(p.numel() for p in full.module.parameters()) > 30 * vec.size
    assert memory_bytes(spec.model.files, spec.adapter) < memory_bytes(spec.model.files, None)


def test_targets_and_training_move_only_the_adapter(tmp_path):
    spec = job(tiny_gpt2(tmp_path / "m"), AdapterSpec(r=2, alpha=4.0, target_modules=("c_attn", "c_fc")))
    bundle = build_job_model(spec)
    names = [n for n, p in bundle.module.named_parameters() if p.requires_grad]
    assert any(".c_fc.lora_A" in n for n in names) and any(".c_attn.lora_B" in n for n in names)
    x = torch.randint(0, 256, (4, 17))
    opt = torch.optim.SGD([p for p in bundle.module.parameters() if p.requires_grad], lr=0.5)
    start = bundle.loss(bundle.module, (x[:, :-1], x[:, 1:])).item()
    for _ in range(5):
        opt.zero_grad()
        bundle.loss(bundle.module, (x[:, :-1], x[:, 1:])).backward()
        opt.step()
    assert bundle.loss(bundle.module, (x[:, :-1], x[:, 1:])).item() < start


def test_classification_takes_its_classes_and_refuses_another_classifier(tmp_path):
    spec = job(tiny_gpt2(tmp_path / "m", pad_token_id=0), adapter=None, dataset="digits", task="classification")
    assert hf_job_config(spec, classes=3, vocab=256, window=None)["classes"] == 3
    with pytest.raises(ValueError, match="vocabulary of 256; the data uses token ids up to 999"):
        hf_job_config(spec, classes=3, vocab=1000, window=None)
    with pytest.raises(ValueError, match="takes at most 160 tokens; the data has 512-token windows"):
        hf_job_config(spec, classes=3, vocab=256, window=512)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2ForSequenceClassification"],
                                                                     "id2label": {"0": "a", "1": "b"}}))
    (tmp_path / "c" / "model.safetensors").write_bytes((tmp_path / "m" / "model.safetensors").read_bytes())
    classifier = job(tmp_path / "c", adapter=None, dataset="digits", task="classification")
    with pytest.raises(ValueError, match="the folder's classifier has 2 labels, the job's data 3 classes"):
        hf_job_config(classifier, classes=3, vocab=256, window=None)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft reads it on load
def test_the_export_loads_with_peft_and_merges(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = tiny_gpt2(tmp_path / "m")
    spec = job(folder)
    bundle = build_job_model(spec)
    vec = flatten_params(bundle.module)
    load_flat_params(bundle.module, vec + np.random.default_rng(0).normal(0, 0.05, vec.size).astype(np.float32))
    x = torch.randint(0, 256, (2, 12))
    bundle.module.eval()
    with torch.no_grad():
        want = bundle.module(input_ids=x).logits
    files = export_files(bundle.module, merge=True)
    assert {"adapter_config.json", "adapter_model.safetensors", "merged/config.json",
            "merged/model.safetensors"} <= set(files)
    out = tmp_path / "out"
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    base = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    loaded = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", local_files_only=True, use_safetensors=True).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, want, atol=1e-5)
        assert torch.allclose(merged(input_ids=x).logits, want, atol=1e-4)
    full = build_job_model(spec.replace(adapter=None))
    assert "model.safetensors" in export_files(full.module) and "config.json" in export_files(full.module)
    with pytest.raises(ValueError, match="--merge"):
        export_files(full.module, merge=True)


def test_a_folder_without_a_tokenizer_says_so(tmp_path):
    with pytest.raises(ValueError, match="data.tokenizer: the model folder has no tokenizer"):
        load_tokenizer(tiny_gpt2(tmp_path / "m"))
