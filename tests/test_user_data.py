"""A node's own data (node/ml/user_data.py): CSV, Parquet, JSON lines, text folders and image folders read in place,
checked against a job's declared schema (a mismatch is the reason the node declines), the train/test split, the
sizes a job's model takes from the declaration, and `swarmnode data add / list` with one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from node.jobs.spec import job_spec_from_text
from node.ml.job_model import build_job_model, data_misfit, job_model_config, load_job_data
from node.ml.user_data import (
    DataMismatch,
    add_source,
    find_source,
    list_sources,
    load_for_job,
    sync_config_sources,
)
from node.runtime.errors import NodeError
from protocol.records.job_inputs import DataSpec
from tests.conftest import cli_in_process
from tests.test_bad_input import assert_one_line_error

TABULAR = DataSpec("tabular", features=("a", "b", "c"), label="churned", classes=("no", "yes"))


def write_csv(path, rows: int = 50, seed: int = 0, labels=("no", "yes")):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    with open(path, "w") as f:
        f.write("a,b,c,churned,note\n")
        for i, r in enumerate(x):
            f.write(f"{r[0]:.5f},{r[1]:.5f},{r[2]:.5f},{labels[int(r[0] + r[1] > 0)]},row{i}\n")
    return x


def test_csv_source_reads_declared_columns_and_splits_train_from_test(tmp_path):
    x = write_csv(tmp_path / "churn.csv", rows=50)
    entry = add_source(tmp_path / "data", "churn", tmp_path / "churn.csv", "csv", label="churned")
    assert entry["rows"] == 50 and entry["schema"]["a"] == "double" and entry["labels"] == {"no": 30, "yes": 20}
    source = find_source(tmp_path / "data", "churn")
    data = load_for_job(source, TABULAR, seed=3)
    assert data.x.dtype == np.float32 and data.x.shape == (40, 3) and data.test_x.shape == (10, 3)
    # every row lands in exactly one split, with its own label
    both = np.concatenate([data.x, data.test_x])
    expect = x.round(5).astype(np.float32)
    assert np.allclose(both[np.argsort(both[:, 0])], expect[np.argsort(expect[:, 0])], atol=1e-6)
    assert set(np.concatenate([data.labels, data.test_labels])) == {0, 1}
    again = load_for_job(source, TABULAR, seed=3)
    assert np.array_equal(again.x, data.x) and again.sha256 == data.sha256  # deterministic by seed
    assert not np.array_equal(load_for_job(source, TABULAR, seed=4).test_x, data.test_x)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_parquet_and_json_lines_read_like_csv(tmp_path, fmt):
    rng = np.random.default_rng(1)
    cols = {"a": rng.normal(size=20), "b": rng.integers(0, 5, 20), "c": rng.normal(size=20),
            "churned": rng.integers(0, 2, 20)}
    if fmt == "parquet":
        pq.write_table(pa.table(cols), tmp_path / "t.parquet")
    else:
        with open(tmp_path / "t.jsonl", "w") as f:
            for i in range(20):
                f.write(json.dumps({k: v[i].item() for k, v in cols.items()}) + "\n")
    add_source(tmp_path / "data", "t", tmp_path / f"t.{fmt}", fmt, label="churned")
    spec = DataSpec("tabular", features=("a", "b", "c"), label="churned", classes=("0", "1"))
    data = load_for_job(find_source(tmp_path / "data", "t"), spec, seed=0)
    assert data.x.shape[1] == 3 and data.n_train + data.test_x.shape[0] == 20
    assert np.array_equal(np.sort(np.concatenate([data.labels, data.test_labels])), np.sort(cols["churned"]))


def test_a_folder_of_csv_files_is_one_table(tmp_path):
    (tmp_path / "parts").mkdir()
    write_csv(tmp_path / "parts" / "1.csv", rows=10, seed=1)
    write_csv(tmp_path / "parts" / "2.csv", rows=15, seed=2)
    assert add_source(tmp_path / "data", "p", tmp_path / "parts", "csv", label="churned")["rows"] == 25


@pytest.mark.parametrize(("spec", "reason"), [
    (DataSpec("tabular", features=("a", "b", "zzz"), label="churned", classes=("no", "yes")),
     "has no column 'zzz'"),
    (DataSpec("tabular", features=("a", "b", "note"), label="churned", classes=("no", "yes")),
     "column 'note' is string, the job needs numbers"),
    (DataSpec("tabular", features=("a", "b", "c"), label="churned", classes=("no", "maybe")),
     "label column 'churned' holds 'yes', not among the job's classes ('no', 'maybe')"),
    (DataSpec("text", block_size=16), "no text field 'text'"),
    (DataSpec("image", classes=("a", "b"), side=4, channels=1), "is csv; the job declares an image folder"),
])
def test_a_mismatch_with_the_declared_schema_is_a_one_line_reason(tmp_path, spec, reason):
    write_csv(tmp_path / "churn.csv")
    add_source(tmp_path / "data", "churn", tmp_path / "churn.csv", "csv", label="churned")
    with pytest.raises(DataMismatch) as e:
        load_for_job(find_source(tmp_path / "data", "churn"), spec, seed=0)
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_missing_values_and_non_finite_features_are_refused(tmp_path):
    (tmp_path / "m.csv").write_text("a,b,c,churned\n1,2,,no\n1,2,3,yes\n")
    add_source(tmp_path / "data", "m", tmp_path / "m.csv", "csv", label="churned")
    with pytest.raises(DataMismatch, match="column 'c' has 1 missing values"):
        load_for_job(find_source(tmp_path / "data", "m"), TABULAR, seed=0)
    (tmp_path / "n.csv").write_text("a,b,c,churned\n1,2,inf,no\n1,2,3,yes\n")
    add_source(tmp_path / "data", "n", tmp_path / "n.csv", "csv", label="churned")
    with pytest.raises(DataMismatch, match="not finite"):
        load_for_job(find_source(tmp_path / "data", "n"), TABULAR, seed=0)


def write_texts(folder, n: int = 10, size: int = 300):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i}: " + "the quick brown fox. " * (size // 21))


def test_text_folder_becomes_byte_windows_with_whole_documents_held_out(tmp_path):
    write_texts(tmp_path / "docs", n=10)
    entry = add_source(tmp_path / "data", "docs", tmp_path / "docs", "text")
    assert entry["rows"] == 10
    data = load_for_job(find_source(tmp_path / "data", "docs"), DataSpec("text", block_size=32), seed=0)
    assert data.task == "causal-lm" and data.x.dtype == np.uint8 and data.x.shape[1] == 33
    assert data.test_x.shape[0] > 0 and set(data.labels) & set(data.test_labels) == set()  # documents, not windows
    assert bytes(data.x[0][:9]).startswith(b"document")


def test_text_classification_from_json_lines(tmp_path):
    with open(tmp_path / "reviews.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"body": "good " * (i + 1) if i % 2 else "bad " * (i + 1), "stars": i % 2}) + "\n")
    add_source(tmp_path / "data", "reviews", tmp_path / "reviews.jsonl", "jsonl", label="stars", text_field="body")
    spec = DataSpec("text", label="stars", classes=("0", "1"), block_size=8)
    data = load_for_job(find_source(tmp_path / "data", "reviews"), spec, seed=0)
    assert data.task == "classification" and data.x.shape[1] == 8 and data.x.dtype == np.int64
    assert data.n_train + data.test_x.shape[0] == 12


def write_images(folder, classes=("cat", "dog"), per_class: int = 6, size: int = 12):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((size, size, 3)) * 100 + 150 * c).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


def test_image_folder_is_resized_to_the_declared_side_and_channels(tmp_path):
    write_images(tmp_path / "pets")
    entry = add_source(tmp_path / "data", "pets", tmp_path / "pets", "imagefolder")
    assert entry["rows"] == 12 and entry["labels"] == {"cat": 6, "dog": 6}
    spec = DataSpec("image", classes=("cat", "dog"), side=8, channels=3)
    data = load_for_job(find_source(tmp_path / "data", "pets"), spec, seed=0)
    assert data.x.shape[1] == 3 * 8 * 8 and 0 <= data.x.min() and data.x.max() <= 1
    with pytest.raises(DataMismatch, match="subfolders holds 'dog', not among the job's classes"):
        load_for_job(find_source(tmp_path / "data", "pets"), DataSpec("image", classes=("cat", "cow"), side=8,
                                                                      channels=3), seed=0)


JOB = """
name = "own"
dataset = "{dataset}"
task = "{task}"
rounds = 2
[model]
arch = "{arch}"
[inner]
lr = 0.1
[data]
{data}
"""


def job(dataset: str, task: str, arch: str, data: str):
    return job_spec_from_text(JOB.format(dataset=dataset, task=task, arch=arch, data=data), "job.toml")


def test_the_model_is_sized_by_the_declaration_and_trains_on_the_nodes_rows(tmp_path):
    write_csv(tmp_path / "churn.csv")
    add_source(tmp_path / "data", "churn", tmp_path / "churn.csv", "csv", label="churned")
    spec = job("churn", "classification", "mlp",
               'kind = "tabular"\nfeatures = ["a", "b", "c"]\nlabel = "churned"\nclasses = ["no", "yes"]')
    cfg = job_model_config(spec)
    assert cfg["inputs"] == 3 and cfg["classes"] == 2
    data = load_job_data(spec, tmp_path / "data")
    assert data_misfit(spec, cfg, data) == ""
    bundle = build_job_model(spec)
    loss = bundle.loss(bundle.module, (__import__("torch").from_numpy(data.x[:8]),
                                       __import__("torch").from_numpy(data.labels[:8])))
    assert loss.item() > 0
    write_images(tmp_path / "pets")
    add_source(tmp_path / "data", "pets", tmp_path / "pets", "imagefolder")
    spec = job("pets", "classification", "cnn",
               'kind = "image"\nclasses = ["cat", "dog"]\nside = 8\nchannels = 3')
    cfg = job_model_config(spec)
    assert (cfg["in_channels"], cfg["side"], cfg["classes"]) == (3, 8, 2)
    assert data_misfit(spec, cfg, load_job_data(spec, tmp_path / "data")) == ""


def test_a_job_naming_own_data_and_a_node_holding_another_kind(tmp_path):
    from node.ml.datasets import NoLocalData, write_node_data

    spec = job("churn", "classification", "mlp",
               'kind = "tabular"\nfeatures = ["a", "b", "c"]\nlabel = "churned"\nclasses = ["no", "yes"]')
    with pytest.raises(NoLocalData):
        load_job_data(spec, tmp_path / "data")
    write_node_data("wine", tmp_path / "data" / "churn", n_nodes=1, node_index=0)  # a bundled slice, same name
    with pytest.raises(DataMismatch, match="slice of a bundled dataset"):
        load_job_data(spec, tmp_path / "data")


@pytest.mark.parametrize(("data", "error"), [
    ('kind = "tabular"\nlabel = "y"\nclasses = ["a", "b"]', "data.features: a tabular dataset needs"),
    ('kind = "tabular"\nfeatures = ["x"]\nlabel = "y"', "data.classes: label 'y' needs the list of its classes"),
    ('kind = "image"\nclasses = ["a", "b"]\nside = 8\nchannels = 2', "data.side, data.channels"),
    ('kind = "text"\nblock_size = 16\nwhatever = 1', "data.whatever: unknown key"),
    ('block_size = 16', "data.kind: missing, required"),
    ('kind = "text"\nblock_size = 16\ntokenizer = "model"', "data.tokenizer: 'model' needs a model folder"),
])
def test_bad_declarations_are_named_by_their_field(data, error):
    with pytest.raises(NodeError) as e:
        job("x", "classification" if "classes" in data else "causal-lm", "mlp" if "classes" in data else "gpt2",
            data)
    assert error in str(e.value) and "\n" not in str(e.value)


def test_a_declaration_that_disagrees_with_the_task_is_refused():
    with pytest.raises(NodeError, match="declares a causal-lm dataset"):
        job("x", "classification", "mlp", 'kind = "text"')


def test_config_sources_are_bound_and_unbound(tmp_path):
    write_csv(tmp_path / "churn.csv")
    tables = {"churn": {"path": str(tmp_path / "churn.csv"), "format": "csv", "label": "churned"}}
    assert sync_config_sources(tmp_path / "data", tables) == ["churn"]
    listed = list_sources(tmp_path / "data")
    assert listed[0]["name"] == "churn" and listed[0]["rows"] == 50 and listed[0]["error"] == ""
    assert sync_config_sources(tmp_path / "data", {}) == [] and list_sources(tmp_path / "data") == []
    with pytest.raises(ValueError, match="datasets.churn.colour: unknown key"):
        sync_config_sources(tmp_path / "data", {"churn": {**tables["churn"], "colour": "red"}})


def test_data_add_and_list_through_the_cli(tmp_path):
    write_csv(tmp_path / "churn.csv")
    home = str(tmp_path / "home")
    added = cli_in_process("data", "add", "churn", str(tmp_path / "churn.csv"), "--format", "csv", "--label", "churned",
                           "--home", home, "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["rows"] == 50
    listed = cli_in_process("data", "list", "--home", home)
    assert "churn" in listed.stdout and "csv" in listed.stdout and "read in place" in listed.stdout
    listed = json.loads(cli_in_process("data", "list", "--home", home, "--json").stdout)
    assert [e["name"] for e in listed] == ["churn"] and len(listed[0]["schema_sha256"]) == 64


@pytest.mark.parametrize(("args", "message"), [
    (["data", "add", "churn", "{tmp}/nothere.csv", "--format", "csv"], "no file or folder at"),
    (["data", "add", "churn", "{tmp}/churn.csv"], "--format is required"),
    (["data", "add", "churn", "{tmp}/churn.csv", "--format", "csv", "--label", "nope"], "no label column 'nope'"),
    (["data", "add", "churn", "--format", "csv"], "give their PATH"),
    (["data", "add", "bad/name", "{tmp}/churn.csv", "--format", "csv"], "dataset name must be"),
    (["data", "add", "t", "{tmp}/churn.csv", "--format", "text", "--label", "x"], "a text source has no label"),
    (["data", "add", "i", "{tmp}", "--format", "imagefolder"], "has no class subfolders"),
    (["data", "add", "p", "{tmp}/churn.csv", "--format", "parquet"], "not readable as parquet"),
])
def test_bad_data_add_is_one_line(tmp_path, args, message):
    write_csv(tmp_path / "churn.csv")
    (tmp_path / "empty").mkdir()
    args = [a.replace("{tmp}", str(tmp_path if "imagefolder" not in args else tmp_path / "empty")) for a in args]
    result = cli_in_process(*args, "--home", str(tmp_path / "home"))
    assert_one_line_error(result, 2, message)


def test_text_tokenized_by_a_model_folders_tokenizer(tmp_path):
    """DataSpec tokenizer = "model": the documents are tokenized by the tokenizer saved in the job's model folder
    (a BPE trained here on the documents and saved with save_pretrained, read back with AutoTokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from node.ml.hf_models import load_tokenizer
    from node.ml.job_model import token_ids

    write_texts(tmp_path / "docs", n=10, size=600)
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train([str(p) for p in sorted((tmp_path / "docs").iterdir())],
              trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]").save_pretrained(tmp_path / "model")
    tokenizer = token_ids(load_tokenizer(tmp_path / "model"))
    add_source(tmp_path / "data", "docs", tmp_path / "docs", "text")
    spec = DataSpec("text", block_size=16, tokenizer="model")
    data = load_for_job(find_source(tmp_path / "data", "docs"), spec, seed=0, tokenizer=tokenizer)
    assert data.x.dtype == np.int64 and data.x.shape[1] == 17 and 0 <= data.x.min() and data.x.max() < 300
    by_bytes = load_for_job(find_source(tmp_path / "data", "docs"), DataSpec("text", block_size=16), seed=0)
    assert data.n_train < by_bytes.n_train  # BPE tokens cover more than a byte each
    with pytest.raises(DataMismatch, match="tokenizes with its model folder's tokenizer"):
        load_for_job(find_source(tmp_path / "data", "docs"), spec, seed=0)
