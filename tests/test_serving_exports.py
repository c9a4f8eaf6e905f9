"""A trained job's export served directly (node/ml/servable.py, `swarmnode serve EXPORT`): a federated arch job's
export and a pipeline job's trained shards become model folders whose model computes exactly what the trained one
does; an adapter's export is served through its merged model; what cannot be served says why in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.jobs.federated.export import export_job
from node.ml.models import build_model, minilm_path, params_sha256
from node.ml.servable import servable_folder
from node.ml.splitter import load_model_dir, split_model
from node.serving.text import HFText
from protocol.records.job_records import JobRecord
from protocol.records.job_spec import InnerOpt, JobSpec, ModelSpec, OuterOpt

PEER = "12D3KooWPsxMNwGhcey1qdysmSqkSM4NGUgLjJfbuMzktEgNqPxC"
GPT2 = {"n_layer": 3, "n_embd": 32, "n_head": 2, "n_positions": 64}


def same_logits(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x).logits, b.eval()(x).logits)


def gpt2_export(tmp_path, overrides=GPT2):
    spec = JobSpec(name="lm", model=ModelSpec("gpt2", overrides), dataset="pystdlib-bytes", task="causal-lm",
                   rounds=1, inner=InnerOpt("adamw", 1e-3), local_steps=1, batch_size=2, outer=OuterOpt("fedavg"),
                   density=0.1, min_participants=2, max_participants=4, round_timeout_s=10.0, seed=3)
    trained = build_model("gpt2", overrides, 7).module  # other weights than the spec's seed gives: "trained"
    export_job(tmp_path / "export", JobRecord.create(spec, PEER, "00", 1.0), trained, "ab" * 32, 1, 1, [], "loss")
    return trained


def test_a_federated_arch_jobs_export_becomes_the_trained_model(tmp_path):
    trained = gpt2_export(tmp_path)
    folder = servable_folder(tmp_path / "export", tmp_path / "served")
    assert folder == tmp_path / "served" and (folder / "config.json").is_file()
    served = load_model_dir(folder)
    assert params_sha256(served) == params_sha256(trained) and same_logits(served, trained)
    assert not (tmp_path / "export" / "config.json").exists()  # the export itself is left as it was


def test_a_pipeline_jobs_trained_shards_become_the_whole_model(tmp_path):
    for tied in (False, True):  # tied: the head in the last stage holds its own copy of the embedding
        model = build_model("gpt2", {**GPT2, "tie_word_embeddings": tied}, 5).module
        split_model(model, [(0, 1), (1, 3)], tmp_path / f"job{tied}" / "trained", Ed25519PrivateKey.generate())
        (tmp_path / f"job{tied}" / "pipeline.json").write_text("{}")
        served = load_model_dir(servable_folder(tmp_path / f"job{tied}", tmp_path / f"served{tied}"))
        assert same_logits(served, model)
        if tied:
            assert served.lm_head.weight.data_ptr() == served.transformer.wte.weight.data_ptr()
    # a shard altered after signing is refused, as a stage host refuses it
    shard = next((tmp_path / "jobFalse" / "trained").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(Exception, match="sha256|size"):
        servable_folder(tmp_path / "jobFalse", tmp_path / "again")


def test_an_adapter_export_is_served_through_its_merged_model_and_a_tokenizer_can_be_added(tmp_path):
    adapter = tmp_path / "adapter-export"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="export it with --merge"):
        servable_folder(adapter, tmp_path / "served")
    trained = gpt2_export(tmp_path)
    merged = servable_folder(tmp_path / "export", tmp_path / "rebuilt")
    (adapter / "merged").mkdir()
    for f in merged.iterdir():
        (adapter / "merged" / f.name).write_bytes(f.read_bytes())
    assert servable_folder(adapter, tmp_path / "served") == adapter / "merged"
    with_tokenizer = servable_folder(adapter, tmp_path / "with-tokenizer", tokenizer=minilm_path())
    assert with_tokenizer == tmp_path / "with-tokenizer" and not (adapter / "merged" / "tokenizer.json").exists()
    assert HFText.from_folder(with_tokenizer).encode("hello")  # the folder now serves with that tokenizer
    assert same_logits(load_model_dir(with_tokenizer), trained)


def test_what_cannot_be_served_says_why(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a model folder"):
        servable_folder(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ValueError, match="not a folder"):
        servable_folder(tmp_path / "missing", tmp_path / "out")
    gpt2_export(tmp_path)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    manifest["spec"]["model"]["arch"] = "mlp"
    (tmp_path / "export" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a transformers model folder"):
        servable_folder(tmp_path / "export", tmp_path / "out")
    manifest["spec"]["model"] = {"arch": "gpt2", "overrides": [["n_layer", 2], ["n_embd", 32], ["n_head", 2]]}
    (tmp_path / "export" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match the spec's gpt2 model"):
        servable_folder(tmp_path / "export", tmp_path / "out")
    with pytest.raises(ValueError, match="no tokenizer files"):
        servable_folder(tmp_path / "export", tmp_path / "out", tokenizer=tmp_path / "empty")


def test_an_adapter_export_without_its_merged_model_is_merged_with_the_base_in_the_node_store(tmp_path):
    import transformers
    from peft import LoraConfig, get_peft_model

    from node.ml.hf_models import manifest_digest, quiet_dependencies
    from node.ml.model_folder import folder_manifest

    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_layer=2, n_embd=32, n_head=2,
                                                                n_positions=64))
    base.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    (tmp_path / "base" / "tokenizer.json").write_text((minilm_path() / "tokenizer.json").read_text())
    files = folder_manifest(tmp_path / "base")
    store = tmp_path / "home" / "models"
    shutil.copytree(tmp_path / "base", store / manifest_digest(files))  # where the node keeps the job's folder
    with quiet_dependencies():
        adapted = get_peft_model(load_model_dir(tmp_path / "base"), LoraConfig(r=4, target_modules=["c_attn"],
                                                                               fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter, not peft's zero start
    export = tmp_path / "export"
    adapted.save_pretrained(str(export), safe_serialization=True)
    listed = [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in files]
    (export / "manifest.json").write_text(json.dumps({"spec": {"model": {"arch": "hf", "overrides": [],
                                                                         "files": listed}}}))

    with pytest.raises(ValueError, match="not in this node's model store"):
        servable_folder(export, tmp_path / "served", models=tmp_path / "elsewhere")
    folder = servable_folder(export, tmp_path / "served", models=store)
    merged = load_model_dir(folder)
    x = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(merged.eval()(x).logits, adapted.eval()(x).logits, atol=1e-5)
        assert not torch.allclose(merged(x).logits, base.eval()(x).logits, atol=1e-3)  # the adapter counts
    assert (folder / "tokenizer.json").is_file()  # the base folder's tokenizer, lent to the export
    (store / manifest_digest(files) / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="model.safetensors"):
        servable_folder(export, tmp_path / "again", models=store)
