"""node/ml/splitter.py + protocol/transfer/shards.py: shards and their signed manifest round-trip, and a stage rebuilt
from its shard computes exactly what the stage it was cut as computes; a tampered shard, a tampered manifest, the
wrong signer and another model's manifest are each refused with a one-line ValueError."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.ml.models import minilm_path, params_sha256, quiet_transformers
from node.ml.splitter import load_stage, read_manifest, shard_file_name, split_model, stage_from_bytes
from node.ml.stages import cut_model, stage_tensors
from protocol.records.peer_keys import peer_id_of
from protocol.transfer.shards import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    ShardError,
    ShardInfo,
    ShardManifest,
    TiedWeight,
    canonical_config_json,
    check_shard_bytes,
    manifest_from_wire,
    manifest_to_wire,
    sign_manifest,
    verify_manifest,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PEER, OTHER_PEER = peer_id_of(KEY.public_key()), peer_id_of(OTHER_KEY.public_key())
VOCAB = 256


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    with quiet_transformers():
        if arch == "gpt2":
            model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=4, n_head=2, bos_token_id=None,
                eos_token_id=None))
        elif arch == "llama":
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=VOCAB, max_position_embeddings=32, hidden_size=32, intermediate_size=64,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, bos_token_id=None,
                eos_token_id=None))
        elif arch == "bert":
            model = transformers.BertForSequenceClassification(transformers.BertConfig(
                vocab_size=VOCAB, max_position_embeddings=32, hidden_size=32, num_hidden_layers=4,
                num_attention_heads=2, intermediate_size=64, pad_token_id=0))
        else:
            raise KeyError(arch)
    return model.eval()


def tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(1, VOCAB, (2, 10), generator=g)  # (B, T), last row right-padded
    mask = torch.ones(2, 10, dtype=torch.long)
    x[1, 7:], mask[1, 7:] = 0, 0
    return x, mask


def run(stages, x, mask) -> list[torch.Tensor]:
    """Each stage's output, in order."""
    outs, h = [], x
    with torch.no_grad():
        for stage in stages:
            h = stage(h, attention_mask=mask)
            outs.append(h)
    return outs


@pytest.fixture
def gpt2_split(tmp_path):
    model = tiny("gpt2")
    manifest = split_model(model, [(0, 2), (2, 4)], tmp_path, KEY)
    return model, manifest, tmp_path


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# -------------------------------------------------------------------------------------------- round trip

def test_split_writes_shards_and_a_signed_manifest(gpt2_split):
    model, manifest, out = gpt2_split
    assert manifest.arch == "GPT2LMHeadModel" and manifest.num_layers == 4 and manifest.dtype == "float32"
    assert manifest.spans == ((0, 2), (2, 4))
    assert manifest.model_hash == params_sha256(model)
    assert manifest.splitter == PEER
    assert manifest.tied == (TiedWeight(target="lm_head.weight", source="transformer.wte.weight"),)
    assert manifest.config["n_embd"] == 32 and "_name_or_path" not in manifest.config
    for i, info in enumerate(manifest.shards):
        data = (out / info.file).read_bytes()
        assert info.file == shard_file_name(i)
        assert len(data) == info.size and hashlib.sha256(data).hexdigest() == info.sha256
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_FILE, *(s.file for s in manifest.shards)])
    assert read_manifest(out, trusted_signers={PEER}, expected_model_hash=manifest.model_hash) == manifest


def test_manifest_wire_round_trip_and_determinism(gpt2_split, tmp_path_factory):
    model, manifest, out = gpt2_split
    data = manifest_to_wire(manifest)
    assert (out / MANIFEST_FILE).read_bytes() == data
    assert manifest_from_wire(data) == manifest
    assert verify_manifest(manifest_from_wire(data)) == manifest
    # Same model, spans and key: the same bytes (Ed25519 signatures are deterministic, the encoding canonical).
    again = split_model(model, [(0, 2), (2, 4)], tmp_path_factory.mktemp("again"), KEY)
    assert manifest_to_wire(again) == data


@pytest.mark.parametrize("arch,spans", [("gpt2", [(0, 2), (2, 4)]), ("gpt2", [(0, 4)]),
                                        ("llama", [(0, 1), (1, 3), (3, 4)]), ("bert", [(0, 2), (2, 4)])])
def test_stage_rebuilt_from_its_shard_computes_the_same(tmp_path, arch, spans):
    model = tiny(arch)
    manifest = split_model(model, spans, tmp_path, KEY)
    original = cut_model(model, spans)
    rebuilt = [load_stage(tmp_path, i, trusted_signers={PEER}, expected_model_hash=manifest.model_hash).eval()
               for i in range(len(spans))]
    for a, b in zip(original, rebuilt):
        ta, tb = stage_tensors(a), stage_tensors(b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        assert all(not t.is_meta for t in b.state_dict().values())
        assert all(p.requires_grad for p in b.parameters())  # ready to train
    x, mask = tokens()
    for out_a, out_b in zip(run(original, x, mask), run(rebuilt, x, mask)):
        assert torch.equal(out_a, out_b)
    if arch == "gpt2" and len(spans) == 1:  # the tie inside one stage is restored as one Parameter
        assert rebuilt[0].get_parameter("lm_head.weight") is rebuilt[0].get_parameter("transformer.wte.weight")


def test_minilm_split_from_its_local_folder(tmp_path):
    """The bundled pretrained encoder, split straight from its folder, reassembles to BertModel's output."""
    import transformers

    manifest = split_model(minilm_path(), [(0, 3), (3, 6)], tmp_path, KEY)
    assert manifest.arch == "BertModel" and manifest.num_layers == 6 and manifest.tied == ()
    stages = [load_stage(tmp_path, i, expected_model_hash=manifest.model_hash).eval() for i in range(2)]
    with quiet_transformers():
        model = transformers.BertModel.from_pretrained(str(minilm_path()), local_files_only=True,
                                                       dtype=torch.float32).eval()
    assert params_sha256(model) == manifest.model_hash
    x, mask = tokens()
    with torch.no_grad():
        expected = model(input_ids=x, attention_mask=mask).last_hidden_state  # (B, T, 384)
    assert (run(stages, x, mask)[-1] - expected).abs().max().item() == 0.0  # exact, as node/ml/stages.py promises


def test_stage_from_bytes_received_from_a_peer(gpt2_split):
    _, manifest, out = gpt2_split
    data = (out / manifest.shards[1].file).read_bytes()
    stage = stage_from_bytes(manifest_from_wire(manifest_to_wire(manifest)), 1, data, trusted_signers={PEER})
    assert stage.is_last and (stage.start, stage.end) == (2, 4)


# ------------------------------------------------------------------------------------------- refusals

def test_tampered_shard_refused(gpt2_split):
    _, manifest, out = gpt2_split
    path = out / manifest.shards[1].file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256") as e:
        load_stage(out, 1)
    one_line(e)
    path.write_bytes(bytes(data[:-1]))  # truncated: refused on its size before hashing
    with pytest.raises(ValueError, match="bytes") as e:
        load_stage(out, 1)
    one_line(e)
    load_stage(out, 0)  # the untouched shard still loads


def test_garbage_with_the_right_size_never_reaches_the_parser(gpt2_split):
    _, manifest, _ = gpt2_split
    with pytest.raises(ShardError, match="sha256"):
        stage_from_bytes(manifest, 0, b"\xff" * manifest.shards[0].size)
    with pytest.raises(ShardError, match="shard index"):
        check_shard_bytes(manifest, 2, b"")


def test_another_models_shard_refused(gpt2_split, tmp_path_factory):
    _, manifest, out = gpt2_split
    other_dir = tmp_path_factory.mktemp("other")
    split_model(tiny("gpt2", seed=1), [(0, 2), (2, 4)], other_dir, KEY)
    (out / manifest.shards[0].file).write_bytes((other_dir / manifest.shards[0].file).read_bytes())
    with pytest.raises(ValueError, match="sha256") as e:
        load_stage(out, 0)
    one_line(e)


def test_manifest_for_another_model_refused(gpt2_split, tmp_path_factory):
    _, manifest, out = gpt2_split
    other = split_model(tiny("gpt2", seed=1), [(0, 2), (2, 4)], tmp_path_factory.mktemp("other"), KEY)
    assert other.model_hash != manifest.model_hash
    with pytest.raises(ValueError, match="is for model") as e:
        load_stage(out, 0, expected_model_hash=other.model_hash)
    one_line(e)
    with pytest.raises(ValueError, match="is for model"):
        stage_from_bytes(manifest, 0, (out / manifest.shards[0].file).read_bytes(),
                         expected_model_hash=other.model_hash)


def _rewrite(out, change) -> None:
    """Edit the manifest's fields on disk and keep the old signature (what an attacker without the key does)."""
    obj = msgpack.unpackb((out / MANIFEST_FILE).read_bytes(), raw=False)
    change(obj)
    (out / MANIFEST_FILE).write_bytes(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize("change", [
    lambda m: m["shards"][1].update(sha256=hashlib.sha256(b"evil").hexdigest()),
    lambda m: m.update(model_hash="0" * 64),
    lambda m: m.update(config_json=m["config_json"].replace('"n_embd":32', '"n_embd":64')),
    lambda m: m.update(tied=[]),
    lambda m: m["shards"][0].update(end=1) or m["shards"][1].update(start=1),
])
def test_tampered_manifest_refused(gpt2_split, change):
    _, _, out = gpt2_split
    _rewrite(out, change)
    with pytest.raises(ValueError, match="bad signature") as e:
        load_stage(out, 0)
    one_line(e)


def test_wrong_signer_refused(gpt2_split):
    _, manifest, out = gpt2_split
    with pytest.raises(ValueError, match="not a trusted splitter") as e:
        read_manifest(out, trusted_signers={OTHER_PEER})
    one_line(e)
    # Claiming another splitter without its key: the signature no longer verifies.
    _rewrite(out, lambda m: m.update(splitter=OTHER_PEER))
    with pytest.raises(ValueError, match="bad signature"):
        read_manifest(out)
    # Re-signed by another key under the original splitter's name: refused too.
    forged = manifest.replace(signature=OTHER_KEY.sign(manifest.signed_bytes()))
    (out / MANIFEST_FILE).write_bytes(manifest_to_wire(forged))
    with pytest.raises(ValueError, match="bad signature"):
        load_stage(out, 0)
    # A validly signed manifest of another splitter passes only where that splitter is trusted.
    theirs = sign_manifest(manifest.replace(splitter=OTHER_PEER, signature=b""), OTHER_KEY)
    (out / MANIFEST_FILE).write_bytes(manifest_to_wire(theirs))
    assert read_manifest(out, trusted_signers={OTHER_PEER}) == theirs
    with pytest.raises(ValueError, match="not a trusted splitter"):
        load_stage(out, 0, trusted_signers={PEER})
    with pytest.raises(ShardError, match="not the peer id"):
        sign_manifest(manifest.replace(signature=b""), OTHER_KEY)


def test_unsigned_manifest_refused(gpt2_split):
    _, manifest, _ = gpt2_split
    unsigned = manifest.replace(signature=b"")
    with pytest.raises(ShardError, match="not signed"):
        verify_manifest(unsigned)
    with pytest.raises(ShardError, match="unsigned"):
        manifest_to_wire(unsigned)


def test_signed_but_inconsistent_manifest_refused(gpt2_split):
    """A splitter's own mistakes (config or ties that do not fit its shards) are refused, not half-loaded."""
    _, manifest, out = gpt2_split
    data = (out / manifest.shards[0].file).read_bytes()
    wider = manifest.replace(config_json=canonical_config_json({**manifest.config, "n_embd": 64}), signature=b"")
    with pytest.raises(ShardError, match="shape") as e:
        stage_from_bytes(sign_manifest(wider, KEY), 0, data)
    one_line(e)
    untied = sign_manifest(manifest.replace(tied=(), signature=b""), KEY)
    with pytest.raises(ShardError, match="tied weights"):
        stage_from_bytes(untied, 0, data)
    alien = sign_manifest(manifest.replace(arch="GPT2Model", signature=b""), KEY)
    with pytest.raises(ShardError, match="can host"):
        stage_from_bytes(alien, 0, data)


# ------------------------------------------------------------------------------------ wire-form checks

def _wire_map(manifest: ShardManifest) -> dict:
    return msgpack.unpackb(manifest_to_wire(manifest), raw=False)


@pytest.mark.parametrize("change,reason", [
    (lambda m: m["shards"][0].update(file="../../etc/passwd"), "bare file name"),
    (lambda m: m["shards"][1].update(file=m["shards"][0]["file"]), "same file"),
    (lambda m: m["shards"][1].update(start=3), "contiguous"),
    (lambda m: m.update(num_layers=5), "cover layers"),
    (lambda m: m["shards"][0].update(size=0), "shard.size"),
    (lambda m: m["shards"][0].update(sha256="ABC"), "hex"),
    (lambda m: m.update(extra=1), "unknown field"),
    (lambda m: m.pop("tied"), "missing field"),
    (lambda m: m.update(v=2), "schema version"),
    (lambda m: m.update(dtype="int8"), "dtype"),
    (lambda m: m.update(splitter="not-a-peer"), "splitter"),
    (lambda m: m.update(signature=b"short"), "signature"),
    (lambda m: m.update(config_json="[1, 2]"), "JSON object"),
    (lambda m: m.update(shards=[]), "1 to"),
    (lambda m: m.update(arch="../GPT2"), "class name"),
    (lambda m: m.update(tied=[{"target": "a b", "source": "x"}]), "tensor name"),
])
def test_malformed_manifest_refused(gpt2_split, change, reason):
    _, manifest, _ = gpt2_split
    obj = _wire_map(manifest)
    change(obj)
    with pytest.raises(ShardError, match=reason) as e:
        manifest_from_wire(msgpack.packb(obj, use_bin_type=True))
    one_line(e)


@pytest.mark.parametrize("data", [b"", b"\x93\x01\x02\x03", b"\xc1", b"\xd4\x01\x00",
                                  msgpack.packb("x" * (MAX_MANIFEST_BYTES + 1))])
def test_undecodable_manifest_refused(data):
    with pytest.raises(ShardError) as e:
        manifest_from_wire(data)
    one_line(e)


def test_manifest_schema_checks_in_memory():
    info = ShardInfo(start=0, end=4, file="s.safetensors", sha256="0" * 64, size=1)
    base = dict(model_hash="0" * 64, arch="GPT2LMHeadModel", config_json="{}", num_layers=4, dtype="float32",
                shards=(info,), tied=(), splitter=PEER)
    ShardManifest(**base)
    with pytest.raises(ShardError, match="tied to itself"):
        TiedWeight(target="a.weight", source="a.weight")
    with pytest.raises(ShardError, match="listed twice"):
        ShardManifest(**{**base, "tied": (TiedWeight("a", "b"), TiedWeight("a", "c"))})
    with pytest.raises(ShardError, match="shard.end"):
        ShardInfo(start=2, end=2, file="s", sha256="0" * 64, size=1)
    with pytest.raises(ShardError, match="plain JSON"):
        canonical_config_json({"x": float("nan")})
