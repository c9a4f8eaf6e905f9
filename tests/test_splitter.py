"""node/ml/stages.py: a model cut into 1, 2, 3 or N stages computes exactly what the unsplit model computes (fp32,
eval, max abs difference 0.0), forward and backward, with either attention implementation a stage builds masks
for (sdpa, eager), with and without padding, and with packed position ids; the backward is run as separate
processes would run it (each boundary detached, activation gradients handed back by hand), with GPT-2's tied
embedding/head gradient combined by summing; per-layer parameter counts add up to the model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from node.ml.attention_masks import ATTENTION_IMPLEMENTATIONS
from node.ml.models import build_model, minilm_path, param_count, quiet_transformers
from node.ml.stages import (
    Stage,
    check_spans,
    cut_model,
    cut_stage,
    layer_costs,
    layer_costs_for,
    sync_tied_grads,
    tied_grad_sum,
)

TOL = 0.0  # exact: a stage runs the unsplit model's own ops on the same inputs, masks in the same format
B, T, VOCAB = 3, 12, 256


def equal_spans(num_layers: int, k: int) -> list[tuple[int, int]]:
    """k contiguous spans of sizes differing by at most one (the planner decides real spans)."""
    bounds = [round(i * num_layers / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def _tiny(name: str) -> nn.Module:
    """Small seeded models; 4 layers each (6 for MiniLM, fixed by its checkpoint)."""
    import transformers

    torch.manual_seed(0)
    with quiet_transformers():
        if name == "gpt2":
            cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=4, n_head=2,
                                          bos_token_id=None, eos_token_id=None)
            model = transformers.GPT2LMHeadModel(cfg)
        elif name == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
            cfg = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=32, hidden_size=32,
                                           intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                           num_key_value_heads=2, bos_token_id=None, eos_token_id=None)
            model = transformers.LlamaForCausalLM(cfg)
        elif name == "bert":
            cfg = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=32, hidden_size=32,
                                          num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                          pad_token_id=0)
            model = transformers.BertModel(cfg)
        elif name == "bert-cls":  # what node/ml/models.py builds for jobs
            model = build_model("bert", {"num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 2,
                                         "intermediate_size": 64, "max_position_embeddings": 32}, seed=0).module
        elif name == "minilm":
            model = transformers.BertModel.from_pretrained(str(minilm_path()), local_files_only=True,
                                                           dtype=torch.float32)
        else:
            raise KeyError(name)
    return model.float().eval()


MODELS = ["gpt2", "llama", "bert", "bert-cls", "minilm"]


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {}


def get(models: dict, name: str) -> nn.Module:
    """The cached model, attending with sdpa (a test that cuts it with attention="eager" pins eager on it)."""
    if name not in models:
        models[name] = _tiny(name)
    models[name].set_attn_implementation("sdpa")
    return models[name]


def batch(name: str) -> dict[str, torch.Tensor]:
    """Token ids (B, T) with the last row right-padded (0 = pad), its attention mask, and targets."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, VOCAB, (B, T), generator=g)  # (B, T)
    mask = torch.ones(B, T, dtype=torch.long)
    x[-1, T - 4:] = 0
    mask[-1, T - 4:] = 0
    if name in ("gpt2", "llama"):
        y = torch.randint(0, VOCAB, (B, T), generator=g)  # (B, T) next tokens
    elif name == "bert-cls":
        y = torch.randint(0, 2, (B,), generator=g)  # (B,) classes
    else:
        y = torch.randn(B, T, 384 if name == "minilm" else 32, generator=g)  # (B, T, H) weights of a linear loss
    return {"x": x, "mask": mask, "y": y}


def unsplit_output(name: str, model: nn.Module, b: dict) -> torch.Tensor:
    out = model(input_ids=b["x"], attention_mask=b["mask"])
    return out.last_hidden_state if name in ("bert", "minilm") else out.logits


def loss_of(name: str, out: torch.Tensor, b: dict) -> torch.Tensor:
    if name in ("gpt2", "llama"):
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), b["y"].reshape(-1))  # out (B, T, V)
    if name == "bert-cls":
        return nn.functional.cross_entropy(out, b["y"])  # out (B, C)
    return (out * b["y"]).mean()  # out (B, T, H)


def n_layers(name: str) -> int:
    return 6 if name == "minilm" else 4


def split_counts(name: str) -> list[int]:
    return [1, 2, 3, n_layers(name)]


CASES = [(name, k) for name in MODELS for k in split_counts(name)]


def run_pipeline(stages: list[Stage], b: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward through the stages as separate processes would: every boundary is a fresh leaf (detach +
    requires_grad), so each stage's graph ends at its own input. Returns (stage inputs, stage outputs)."""
    inputs, outputs, h = [], [], b["x"]
    for stage in stages:
        inp = h if stage.is_first else h.detach().requires_grad_(True)  # (B, T) ids or (B, T, H)
        h = stage(inp, attention_mask=b["mask"])
        inputs.append(inp)
        outputs.append(h)
    return inputs, outputs


def pipeline_backward(stages: list[Stage], inputs: list[torch.Tensor], outputs: list[torch.Tensor],
                      loss: torch.Tensor) -> None:
    """Backward in reverse stage order, handing each stage the gradient of its output by hand."""
    loss.backward()
    for k in range(len(stages) - 2, -1, -1):
        grad = inputs[k + 1].grad  # (B, T, H): d loss / d (output of stage k)
        assert grad is not None
        outputs[k].backward(grad)


# --------------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("attention", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("name,k", CASES)
def test_stages_compose_to_the_unsplit_model(models, name, k, attention):
    model = get(models, name)
    b = batch(name)
    spans = equal_spans(n_layers(name), k)
    stages = cut_model(model, spans, attention=attention)  # pins the implementation on the model too
    assert [(s.start, s.end) for s in stages] == spans and all(s.attention == attention for s in stages)
    with torch.no_grad():
        expected = unsplit_output(name, model, b)
        _, outputs = run_pipeline(stages, b)
    assert outputs[-1].shape == expected.shape
    assert (outputs[-1] - expected).abs().max().item() <= TOL
    for stage, out in zip(stages[:-1], outputs[:-1]):
        assert out.shape == (B, T, stage.hidden_size)  # hidden states between stages


@pytest.mark.parametrize("attention", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "minilm"])
def test_stages_equal_the_unsplit_model_without_padding_and_with_packed_sequences(models, name, attention):
    """No attention mask at all (the SDPA path without a mask), and position ids that pack two sequences per
    row (each token attends only within its own sequence, as transformers detects packing)."""
    model = get(models, name)
    x = batch(name)["x"][:2, :8]  # (2, 8), no padding
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])  # (1, 8): sequences of 3 and 5 tokens
    stages = cut_model(model, equal_spans(n_layers(name), 2), attention=attention)
    with torch.no_grad():
        for position_ids in (None, packed):
            cache = {"use_cache": False} if name in ("gpt2", "llama") else {}  # a stage keeps no cache
            out = model(input_ids=x, position_ids=position_ids, **cache)
            expected = out.last_hidden_state if name in ("bert", "minilm") else out.logits
            got = stages[1](stages[0](x, position_ids=position_ids), position_ids=position_ids)
            assert (got - expected).abs().max().item() <= TOL, position_ids
        # packing is real: the second sequence's tokens do not see the first's
        a = stages[1](stages[0](x, position_ids=packed), position_ids=packed)
        x2 = x.clone()
        x2[:, 0] = (x2[:, 0] % (VOCAB - 1)) + 1
        c = stages[1](stages[0](x2, position_ids=packed), position_ids=packed)
        assert torch.equal(a[:, 3:], c[:, 3:]) and not torch.equal(a[:, :3], c[:, :3])


def test_an_unsupported_attention_implementation_is_refused(models):
    with pytest.raises(ValueError, match="attention implementation must be one of sdpa, eager"):
        cut_model(get(models, "gpt2"), equal_spans(4, 2), attention="flash_attention_2")


def test_causal_models_are_causal(models):
    """A change at the last position leaves every earlier position's logits unchanged, through 2 stages."""
    for name in ("gpt2", "llama"):
        stages = cut_model(get(models, name), equal_spans(4, 2))
        x = batch(name)["x"][:1]
        x2 = x.clone()
        x2[0, -1] = (x2[0, -1] + 1) % VOCAB
        with torch.no_grad():
            a, c = stages[1](stages[0](x)), stages[1](stages[0](x2))
        assert torch.equal(a[:, :-1], c[:, :-1]) and not torch.equal(a[:, -1], c[:, -1])


def test_bert_padding_mask_is_applied(models):
    """Changing a padded token changes nothing at the real tokens when the mask is passed to every stage."""
    stages = cut_model(get(models, "bert"), equal_spans(4, 2))
    b = batch("bert")
    x2 = b["x"].clone()
    x2[-1, -1] = 7  # a padded position (mask 0)
    with torch.no_grad():
        a = stages[1](stages[0](b["x"], attention_mask=b["mask"]), attention_mask=b["mask"])
        c = stages[1](stages[0](x2, attention_mask=b["mask"]), attention_mask=b["mask"])
        unmasked = stages[1](stages[0](x2))
    real = b["mask"][-1].bool()
    assert (a[-1, real] - c[-1, real]).abs().max().item() <= TOL
    assert (a[-1, real] - unmasked[-1, real]).abs().max().item() > 1e-3


# -------------------------------------------------------------------------------------------- backward

@pytest.mark.parametrize("attention", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("name,k", CASES)
def test_pipeline_backward_matches_unsplit_gradients(models, name, k, attention):
    ref = copy.deepcopy(get(models, name))
    ref.set_attn_implementation(attention)
    split = copy.deepcopy(ref)  # the stages hold the model's own modules: cut a copy
    b = batch(name)
    ref.zero_grad(set_to_none=True)
    loss_of(name, unsplit_output(name, ref, b), b).backward()
    stages = cut_model(split, equal_spans(n_layers(name), k), attention=attention)
    inputs, outputs = run_pipeline(stages, b)
    loss = loss_of(name, outputs[-1], b)
    pipeline_backward(stages, inputs, outputs, loss)
    sync_tied_grads(stages)

    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    seen = set()
    for stage in stages:
        for pname, p in stage.named_parameters(remove_duplicate=False):
            seen.add(pname)
            want = ref_params[pname].grad
            if want is None:  # e.g. BertModel's pooler: not on the loss's path in either
                assert p.grad is None, pname
                continue
            assert p.grad is not None, pname
            assert (p.grad - want).abs().max().item() <= TOL, pname
    assert seen == set(ref_params)  # every parameter of the model, each tied name included, is in some stage
    ref.zero_grad(set_to_none=True)


def test_tied_embedding_and_head_across_processes(models):
    """GPT-2 cut in two: the last stage holds a copy of the tied weight; the sum of the two stages'
    gradients (what each process applies) is the unsplit model's gradient of the one shared tensor."""
    reference = get(models, "gpt2")
    assert reference.lm_head.weight is reference.transformer.wte.weight
    ref = copy.deepcopy(reference)
    ref.zero_grad(set_to_none=True)
    b = batch("gpt2")
    loss_of("gpt2", unsplit_output("gpt2", ref, b), b).backward()

    first, last = cut_model(copy.deepcopy(reference), equal_spans(4, 2))
    emb, head = first.get_parameter("transformer.wte.weight"), last.get_parameter("lm_head.weight")
    assert emb is not head and torch.equal(emb, head)
    assert [(t.target, t.source) for t in first.ties] == [("lm_head.weight", "transformer.wte.weight")]
    inputs, outputs = run_pipeline([first, last], b)
    pipeline_backward([first, last], inputs, outputs, loss_of("gpt2", outputs[-1], b))
    # Each process alone holds only its part of the gradient ...
    assert (emb.grad - ref.transformer.wte.weight.grad).abs().max().item() > TOL
    # ... the exchanged sum is the whole of it, and both apply it.
    combined = tied_grad_sum(emb.grad, head.grad)
    assert (combined - ref.transformer.wte.weight.grad).abs().max().item() <= TOL
    # Both copies take the same SGD step and stay equal.
    with torch.no_grad():
        emb -= 0.1 * combined
        head -= 0.1 * tied_grad_sum(head.grad, emb.grad)
    assert torch.equal(emb, head)


def test_single_stage_keeps_the_tie_and_cutting_leaves_the_model_alone(models):
    model = get(models, "gpt2")
    (stage,) = cut_model(model, [(0, 4)])
    assert stage.get_parameter("lm_head.weight") is stage.get_parameter("transformer.wte.weight")
    cut_model(model, equal_spans(4, 3))
    assert model.lm_head.weight is model.transformer.wte.weight


# ------------------------------------------------------------------------------------------------ costs

@pytest.mark.parametrize("name", MODELS)
def test_layer_costs_add_up(models, name):
    model = get(models, name)
    costs = layer_costs(model)
    assert costs.num_layers == n_layers(name)
    assert costs.total_params == param_count(model)
    assert costs.bytes_per_param == 4
    for k in split_counts(name):
        for stage in cut_model(model, equal_spans(costs.num_layers, k)):
            assert costs.stage_params(stage.start, stage.end) == sum(p.numel() for p in stage.parameters())
    if name != "minilm":
        assert layer_costs_for(type(model).__name__, model.config.to_dict()) == costs
    if name == "gpt2":
        assert costs.tied_params == VOCAB * 32 and costs.head_params == VOCAB * 32 + 2 * 32  # lm_head + ln_f


# ------------------------------------------------------------------------------------------- bad input

def test_spans_are_checked():
    assert check_spans([(0, 2), (2, 4)], 4) == ((0, 2), (2, 4))
    for spans in ([], [(0, 2)], [(0, 2), (3, 4)], [(0, 3), (2, 4)], [(0, 0), (0, 4)], [(1, 4)], [(0, 5)],
                  [(0, 2.0), (2, 4)], [(0, True), (1, 4)], "0-4"):
        with pytest.raises(ValueError):
            check_spans(spans, 4)


def test_bad_stage_input_is_refused(models):
    model = get(models, "gpt2")
    first, last = cut_model(model, equal_spans(4, 2))
    with pytest.raises(ValueError, match="token ids"):
        first(torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="hidden states"):
        last(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden states"):
        last(torch.zeros(1, 4, 16))
    with pytest.raises(ValueError, match="attention_mask"):
        first(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="token_type_ids"):
        first(torch.ones(1, 4, dtype=torch.long), token_type_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="range"):
        cut_stage(model, 2, 2)
    with pytest.raises(ValueError, match="cannot cut"):
        cut_model(model.transformer, [(0, 4)])  # a bare GPT2Model is not supported
    with pytest.raises(ValueError, match="no pooler"):
        first.pool(torch.zeros(1, 4, 32))


